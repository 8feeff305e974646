"""Microbenchmarks: ``python -m megalora.bench kernels`` (more arrive with their issues).

Shared harness: medians from ``triton.testing.do_bench``, the measured device-to-device copy
bandwidth as the 100% line, and CSV rows stamped with the GPU, versions and commit.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import subprocess
from typing import Dict, List


def stamp() -> Dict[str, str]:
    """What every CSV row records about where and with what it was measured."""
    import torch

    import megalora

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=os.path.dirname(__file__), timeout=10).stdout.strip()
    except Exception:
        commit = ""
    # a copy of the tree without .git (a lent GPU machine): the caller says which commit
    commit = commit or os.environ.get("MEGALORA_COMMIT", "") or "unknown"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "gpu": gpu, "torch": torch.__version__, "cuda": str(torch.version.cuda),
            "triton": triton_version, "megalora": megalora.__version__, "commit": commit}


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth (read + write), the roof for streaming ops."""
    import torch
    import triton

    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def write_csv(rows: List[dict], path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def default_csv(name: str, gpu: str) -> str:
    tag = "".join(c if c.isalnum() else "-" for c in gpu).strip("-").lower()
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return os.path.join("out", "bench", f"{name}_{tag}_{when}.csv")

"""``python -m megalora.bench.environment [PATH.json]``: where a benchmark ran, as one JSON
object (GPU, driver, Python, torch, CUDA, Triton, megatron-core, megalora._C, commit)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from importlib import metadata


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def _nvidia_smi() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30)
        return out.stdout.strip() or out.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi unavailable ({exc})"


def environment() -> dict:
    import torch

    from megalora import extension
    from megalora.bench import stamp

    ext = extension.load()
    info = stamp()
    info.update({
        "python": platform.python_version(), "host": platform.node(),
        "nvidia_smi": _nvidia_smi(),
        "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability()))
        if torch.cuda.is_available() else "",
        "megatron_core": _version("megatron-core"),
        "transformer_engine": _version("transformer-engine"), "apex": _version("apex"),
        "megalora_C": "absent: " + str(extension.unavailable_reason()) if ext is None
        else ("built with CUDA" if ext.has_cuda() else "built without CUDA"),
    })
    return info


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    info = environment()
    text = json.dumps(info, indent=1)
    print(text)
    if argv:
        with open(argv[0], "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

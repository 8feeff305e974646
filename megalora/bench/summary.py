"""The GPU check's ``summary.md``: where it ran, each step's status and time, the CSVs as
markdown tables."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import List, Optional

# The columns worth reading in each CSV (the CSVs keep everything).
COLUMNS = {
    "tiles.csv": ["BLOCK_M", "BLOCK_N", "ms", "ms_p20", "ms_p80"],
    "kernels.csv": ["bench", "d", "r", "K", "mode", "provider", "ms", "GB/s", "pct_hbm",
                    "vs_ref"],
    "reductions.csv": ["device", "op", "dtype", "K", "backend", "ms", "GB/s", "pct_copy_bw",
                       "speedup_vs_torch"],
    "train.csv": ["config", "variant", "step_ms", "tokens_per_s", "model_tflops",
                  "mfu_measured_peak", "mfu_datasheet", "peak_mem_gib", "held_out_text",
                  "held_out_image"],
}


@dataclasses.dataclass
class Outcome:
    name: str
    what: str
    status: str
    seconds: float
    log: Optional[str]

    @property
    def ok(self) -> bool:
        return self.status == "ok" or self.status.startswith(("wired", "needs a GPU"))


def _table(path: str, columns: List[str]) -> List[str]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    columns = [c for c in columns if rows and c in rows[0]]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return lines


def write_summary(out: str, outcomes: List[Outcome], seconds: float, dry_run: bool) -> str:
    env_path = os.path.join(out, "environment.json")
    env = json.load(open(env_path)) if os.path.exists(env_path) else {}
    title = "GPU check (CPU dry run: no GPU figures)" if dry_run else "GPU check"
    lines = [f"# {title}", "",
             f"- GPU: {env.get('nvidia_smi') or env.get('gpu', '?')}",
             f"- versions: python {env.get('python', '?')}, torch {env.get('torch', '?')} "
             f"(CUDA {env.get('cuda', '?')}), triton {env.get('triton', '?')}, megatron-core "
             f"{env.get('megatron_core', '?')}; megalora._C {env.get('megalora_C', '?')}",
             f"- commit {env.get('commit', '?')}, {env.get('timestamp', '?')}, host "
             f"{env.get('host', '?')}",
             f"- wall time of the steps: {seconds:.0f} s", "",
             "| step | status | seconds | what |", "|---|---|---|---|"]
    lines += [f"| {o.name} | {o.status} | {o.seconds:.0f} | {o.what} |" for o in outcomes]
    for name, columns in COLUMNS.items():
        path = os.path.join(out, name)
        if os.path.exists(path):
            lines += ["", f"## {name}", ""] + _table(path, columns)
    path = os.path.join(out, "summary.md")
    with open(path + ".tmp", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)
    return path

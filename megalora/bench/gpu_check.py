"""``make gpu-check OUT=folder``: every GPU figure of megalora in one run, sized for a short,
rare GPU slot; ``make gpu-check DRY=1`` is its CPU dry run (CI).

``launch/gpu_check.sh`` installs what the GPU machine lacks from the wheels carried in
``.whl/`` (``make gpu-wheels`` downloads them here) and builds ``megalora._C`` with its CUDA
kernels; then this module runs the steps below, each in a process of its own with a time limit
and a log in the output folder, and writes ``summary.md`` there: the GPU, versions, commit,
each step's status and time, and the CSVs as tables. A failing step does not stop the others.

On a CPU (``--dry-run``) each step runs its CPU counterpart where one exists (the kernel
bench's interpreter smoke, a small reductions bench, two training steps of the tiny UMM), the
GPU tests are collected (they skip without a GPU), the wheel list is checked, and the summary
says which steps need a GPU.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from typing import List, Optional

from megalora.bench.summary import Outcome, write_summary

# Every op and gradient of the Triton kernels (the kernel tests run on CUDA tensors when a GPU
# is there), the CUDA Gram/combine and one UMM training step against the CPU reference.
GPU_TESTS = ["tests/kernels/test_lora_ops_triton.py", "tests/reductions/test_reductions_cuda.py",
             "tests/umm/test_umm_cuda.py"]
TINY_CPU = ["--config", "launch/configs/umm_tiny.yaml", "train.device=cpu",
            "parallel.tensor_parallel=1", "parallel.sequence_parallel=false"]


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of the check: its GPU command, its CPU dry-run command (None: GPU only)."""

    name: str
    what: str
    gpu: List[str]
    dry: Optional[List[str]]
    limit_s: int
    csv: Optional[str] = None


def steps(out: str) -> List[Step]:
    py = [sys.executable]
    bench = py + ["-m", "megalora.bench"]
    pytest = py + ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra"]
    return [
        Step("environment", "GPU, driver, versions, megalora._C's CUDA build",
             py + ["-m", "megalora.bench.environment", os.path.join(out, "environment.json")],
             py + ["-m", "megalora.bench.environment", os.path.join(out, "environment.json")],
             30),
        Step("gpu-tests", "Triton ops and gradients, CUDA Gram/combine, one UMM step on CUDA "
             "vs float64 references (2x rule)",
             pytest + [f"--junitxml={out}/gpu-tests.xml", *GPU_TESTS],
             pytest + ["--collect-only", *GPU_TESTS], 120),
        Step("kernels", "tile search, fused adapter vs reference / PEFT loop / torch.compile, "
             "layer overhead over the base GEMM (d=4096, r=16, K=1,2, bf16)",
             bench + ["kernels", "--quick", "--tune", "--csv", f"{out}/kernels.csv"],
             bench + ["kernels"], 120, "kernels.csv"),
        Step("reductions", "Gram/combine: megalora._C vs torch._foreach vs one matmul over a "
             "flat buffer", bench + ["reductions", "--gpu-only", "--csv", f"{out}/reductions.csv"],
             bench + ["reductions", "--elements", "200000", "--repeats", "1", "--csv",
                      f"{out}/reductions.csv"], 60, "reductions.csv"),
        Step("train", "umm_small bf16, 30 steps each: vanilla, Pareto exact, Pareto cheap "
             "(tokens/s, MFU, peak memory)",
             bench + ["train", "--steps", "30", "--warmup", "5", "--csv", f"{out}/train.csv"],
             bench + ["train", "--steps", "3", "--warmup", "1", "--csv", f"{out}/train.csv",
                      *TINY_CPU], 150, "train.csv"),
    ]


def _run_step(step: Step, out: str, dry_run: bool) -> Outcome:
    cmd = step.dry if dry_run else step.gpu
    if cmd is None:
        return Outcome(step.name, step.what, "needs a GPU", 0.0, None)
    log = os.path.join(out, f"{step.name}.log")
    print(f"[gpu-check] {step.name}: {' '.join(cmd)}", flush=True)
    start = time.monotonic()
    with open(log, "w") as fh:
        try:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=step.limit_s,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {step.limit_s} s"
    seconds = time.monotonic() - start
    if dry_run and status == "ok" and step.name != "environment":
        status = "wired (CPU counterpart ran; figures need a GPU)"
    print(f"[gpu-check] {step.name}: {status} in {seconds:.0f} s", flush=True)
    return Outcome(step.name, step.what, status, seconds, log)


def run(out: str, dry_run: bool = False) -> int:
    import torch

    from megalora.bench.wheels import check_wheels

    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("megalora gpu-check: no CUDA GPU is visible; on a CPU run the dry "
                         "run instead: make gpu-check DRY=1")
    os.makedirs(out, exist_ok=True)
    start = time.monotonic()
    outcomes = []
    if dry_run:  # the wheels that launch/gpu_check.sh installs there, checked here
        problems = check_wheels()
        outcomes.append(Outcome("wheels", "the wheel list resolves for cp312 manylinux and "
                                "covers what the GPU image lacks",
                                "ok" if not problems else "failed: " + "; ".join(problems),
                                time.monotonic() - start, None))
    for step in steps(out):
        outcomes.append(_run_step(step, out, dry_run))
    path = write_summary(out, outcomes, time.monotonic() - start, dry_run)
    print(open(path).read())
    return 0 if all(o.ok for o in outcomes) else 1

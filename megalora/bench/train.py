"""``python -m megalora.bench train``: tokens/s, MFU and peak memory of a short training run,
vanilla LoRA and Pareto LoRA (exact and cheap) in the same process, on one GPU.

Each variant trains ``--steps`` steps of the config (default ``umm_small``: bf16 on CUDA) from
the same init and data, world 1. Steps after the first ``--warmup`` are timed: a host clock
read after a device synchronize, once per optimizer step (a trainer hook), median over steps.

Model FLOPs per token (Megatron's convention, adapted to LoRA, whose base weights get no
gradient): 2 N forward + 2 N for the backward's data gradients, N the frozen matmul weights
(every 2-D weight but the embeddings); attention 4 s h per layer forward and twice that
backward (causal masking not discounted). Adapters and the Pareto reductions are not counted:
they are what the run measures. MFU = model FLOPs / step time / peak, against two peaks: the
bf16 rate of a 8192^3 matmul measured in the same process, and the datasheet's dense bf16 rate
where the GPU is known. Without a GPU it runs the same variants on the CPU (``umm_tiny``
overrides work too), which checks the wiring; CPU rows have no MFU.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Dict, List, Optional

from megalora.umm.hooks import TrainerHook

VARIANTS: Dict[str, List[str]] = {
    "vanilla": ["pareto.mode=off"],
    "pareto-exact": ["pareto.mode=exact", "pareto.rule=pareto", "pareto.groups=layer"],
    "pareto-cheap": ["pareto.mode=cheap", "pareto.rule=pareto", "pareto.groups=layer",
                     "pareto.every=5"],
}
# Dense bf16 tensor-core rate, TFLOP/s, from the vendors' datasheets (SXM parts).
DATASHEET_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


class StepClock(TrainerHook):
    """Wall time of every optimizer step, after a device synchronize."""

    name = "step_clock"

    def __init__(self):
        self.times: List[float] = []

    def _now(self, session) -> float:
        import torch

        if session.device.type == "cuda":
            torch.cuda.synchronize(session.device)
        return time.perf_counter()

    def start(self, session, step: int) -> None:
        self.times = [self._now(session)]

    def after_optimizer_step(self, step: int, session, scalars: dict) -> None:
        self.times.append(self._now(session))

    def finish(self, session, completed: bool) -> List[float]:
        return [b - a for a, b in zip(self.times, self.times[1:])]


def model_flops_per_token(model, run) -> float:
    """Forward + data-gradient backward FLOPs per token of the frozen model (module doc)."""
    frozen = sum(p.numel() for name, p in model.named_parameters()
                 if p.dim() == 2 and "lora" not in name and "embedding" not in name)
    m = run.model
    attention = 12 * m.num_layers * run.data.seq_length * m.hidden_size
    return 4.0 * frozen + attention


def matmul_tflops(device) -> Optional[float]:
    """Measured bf16 rate of an 8192^3 matmul on random data (median of 10 after warm-up)."""
    import torch

    if device.type != "cuda":
        return None
    import triton

    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(8192, 8192, device=device, generator=g, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, generator=g, dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=200, return_mode="median")
    return 2 * 8192 ** 3 / (ms * 1e-3) / 1e12


def _datasheet(gpu: str) -> Optional[float]:
    return next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in gpu), None)


def _run_config(config: str, variant: str, steps: int, out_dir: str, overrides: List[str]):
    from megalora.umm.config import RunConfig

    base = RunConfig.from_yaml(config, list(overrides))
    t = base.train
    samples = max(32, steps * t.micro_batch_size * t.num_microbatches)
    over = [f"train.steps={steps}", f"train.out_dir={out_dir}", "train.resume=false",
            "train.save_every=0", "train.tensorboard=false", f"train.log_every={steps}",
            f"data.synthetic_samples={samples}", "data.eval_samples=8",
            "pareto.history=false", *VARIANTS[variant], *overrides]
    return RunConfig.from_yaml(config, over)


def _measure(run, warmup: int) -> dict:
    """Train ``run`` in this process; step times, tokens/step, FLOPs/token, peak memory."""
    import torch

    from megalora.umm.train import train

    clock, probe = StepClock(), _FlopsProbe()
    cuda = run.train.device == "cuda" or (run.train.device == "auto" and
                                          torch.cuda.is_available())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result = train(run, hooks=[probe, clock])
    times = result["step_clock"][warmup:]
    if not times:
        raise ValueError(f"--steps must exceed --warmup ({warmup}): no step was timed")
    t = run.train
    tokens = t.micro_batch_size * t.num_microbatches * run.data.seq_length
    return {"step_s": statistics.median(times), "steps_timed": len(times),
            "tokens_per_step": tokens, "flops_per_token": result["flops_probe"],
            "peak_mem_gib": (torch.cuda.max_memory_allocated() / 2 ** 30) if cuda else None,
            "text": result["eval"]["text"], "image": result["eval"]["image"]}


class _FlopsProbe(TrainerHook):
    """Reads the model's frozen weight count once the session is built."""

    name = "flops_probe"

    def setup(self, session) -> None:
        self.flops = model_flops_per_token(session.model, session.run)

    def finish(self, session, completed: bool) -> float:
        return self.flops


def run(config: str = "launch/configs/umm_small.yaml", steps: int = 30, warmup: int = 5,
        variants: Optional[List[str]] = None, overrides: Optional[List[str]] = None,
        csv_path: Optional[str] = None) -> int:
    import torch

    from megalora.bench import default_csv, stamp, write_csv
    from megalora.distributed import init
    from megalora.umm.session import teardown

    variants = variants or list(VARIANTS)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}: choose from {sorted(VARIANTS)}")
    info = stamp()
    first = _run_config(config, variants[0], steps, "unused", overrides or [])
    device = "cuda" if first.train.device == "cuda" and torch.cuda.is_available() else "cpu"
    if device == "cpu" and first.train.device == "cuda":
        raise ValueError(f"{config} trains on CUDA but no GPU is visible here: add "
                         "train.device=cpu (and model.bf16=false) to run it on the CPU")
    init(1, 1, device=device)  # one world-1 group for every variant (train keeps it)
    peak = matmul_tflops(torch.device(device))
    sheet = _datasheet(info["gpu"]) if device == "cuda" else None
    rows = []
    try:
        for name in variants:
            with tempfile.TemporaryDirectory() as tmp:
                m = _measure(_run_config(config, name, steps, tmp, overrides or []), warmup)
            tps = m["tokens_per_step"] / m["step_s"]
            achieved = m["flops_per_token"] * tps / 1e12
            rows.append({**info, "config": os.path.basename(config), "variant": name,
                         "steps": steps, "steps_timed": m["steps_timed"],
                         "step_ms": round(1e3 * m["step_s"], 2), "tokens_per_s": round(tps, 1),
                         "model_tflops": round(achieved, 2),
                         "mfu_measured_peak": round(achieved / peak, 4) if peak else "",
                         "mfu_datasheet": round(achieved / sheet, 4) if sheet else "",
                         "peak_matmul_tflops": round(peak, 1) if peak else "",
                         "peak_mem_gib": round(m["peak_mem_gib"], 2)
                         if m["peak_mem_gib"] is not None else "",
                         "held_out_text": round(m["text"], 4),
                         "held_out_image": round(m["image"], 4)})
    finally:
        teardown()
    base = rows[0]["step_ms"]
    print(f"\n{'variant':<14} {'ms/step':>9} {'tokens/s':>10} {'vs first':>8} {'MFU':>6} "
          f"{'peak GiB':>8}")
    for r in rows:
        mfu = f"{100 * r['mfu_measured_peak']:.1f}%" if r["mfu_measured_peak"] != "" else "n/a"
        print(f"{r['variant']:<14} {r['step_ms']:>9.1f} {r['tokens_per_s']:>10.0f} "
              f"{r['step_ms'] / base:>7.2f}x {mfu:>6} {str(r['peak_mem_gib']):>8}")
    if peak:
        print(f"MFU against the measured bf16 matmul rate, {peak:.0f} TFLOP/s"
              + (f" (datasheet {sheet:.0f})" if sheet else ""))
    path = write_csv(rows, csv_path or default_csv("train", info["gpu"]))
    print(f"wrote {path}")
    return 0

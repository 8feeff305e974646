"""Vanilla LoRA vs Pareto LoRA on the tiny UMM (CPU, 2 processes at TP=2+SP, seeds fixed).

    python launch/experiments/pareto_tiny.py            # the table in README.md
    python launch/experiments/pareto_tiny.py --steps 30 --seeds 0

Each variant trains the same steps on the same data from the same init; the held-out text and
image losses (mean over the seeds) and the measured seconds per step are printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

VARIANTS = {
    "vanilla": {"mode": "off"},
    "pareto (exact)": {"mode": "exact", "rule": "pareto", "groups": "layer"},
    "pareto (cheap, every 5)": {"mode": "cheap", "rule": "pareto", "groups": "layer",
                                "every": 5},
    "mgda (exact)": {"mode": "exact", "rule": "mgda", "groups": "layer"},
    "pcgrad (exact)": {"mode": "exact", "rule": "pcgrad", "groups": "layer"},
    "pareto lm/caption/image": {"mode": "exact", "rule": "pareto", "groups": "layer",
                                "objectives": ["lm", "caption", "image"]},
}


def _worker(rank, world, run):
    from megalora.umm.train import train

    tick = time.time()
    result = train(run)
    result["seconds"] = time.time() - tick
    return result


def _config(out_dir: str, steps: int, seed: int, pareto: dict, extra: list):
    from megalora.umm.config import RunConfig

    over = [f"train.steps={steps}", f"train.out_dir={out_dir}", "train.resume=false",
            "train.save_every=0", "train.log_every=1000", "train.tensorboard=false",
            f"train.seed={seed}", f"data.seed={seed}"]
    over += [f"pareto.{k}={v}" for k, v in pareto.items()] + extra
    return RunConfig.from_yaml("launch/configs/umm_tiny.yaml", over)


def main(argv=None) -> int:
    from megalora.testing.dist import run_distributed

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("overrides", nargs="*", help="section.field=value for every variant")
    args = p.parse_args(argv)
    rows = []
    for name in args.variants:
        text, image, sec = [], [], []
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                run = _config(tmp, args.steps, seed, VARIANTS[name], args.overrides)
                result = run_distributed(2, _worker, (run,), timeout=3600)[0]
            text.append(result["eval"]["text"])
            image.append(result["eval"]["image"])
            sec.append(result["seconds"] / args.steps)
        rows.append((name, statistics.mean(text), statistics.mean(image), statistics.mean(sec)))
        print(f"{name}: held-out text {rows[-1][1]:.4f} image {rows[-1][2]:.4f} "
              f"({rows[-1][3]:.3f} s/step)", flush=True)
    base = rows[0]
    print(f"\n{'variant':<26} {'text':>8} {'image':>8} {'image vs vanilla':>17} "
          f"{'s/step':>7} {'overhead':>8}")
    for name, text, image, sec in rows:
        print(f"{name:<26} {text:8.4f} {image:8.4f} {100 * (image / base[2] - 1):+16.1f}% "
              f"{sec:7.3f} {sec / base[3]:7.2f}x")
    print(f"(held-out losses, mean over seeds {args.seeds}; {args.steps} steps; TP=2+SP on CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

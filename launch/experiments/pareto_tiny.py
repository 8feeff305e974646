"""Vanilla LoRA vs Pareto LoRA on the tiny UMM (CPU, 2 processes at TP=2+SP, seeds fixed).

    python launch/experiments/pareto_tiny.py            # the table in docs/experiments.md
    python launch/experiments/pareto_tiny.py --steps 30 --seeds 0

Each variant trains the same steps on the same data from the same init (per seed), one run at
a time on 2 processes. Results (``--out``): results.json, results.md (held-out text and image
losses and CPU s/step: means with 95 % intervals, paired differences against vanilla),
differences.png. A rerun trains only what is missing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from _report import LOSSES, write_report
from _runs import grid, train_distributed

EXACT = ["pareto.mode=exact", "pareto.groups=layer"]
VARIANTS = {
    "vanilla": ["pareto.mode=off"],
    "pareto_exact": [*EXACT, "pareto.rule=pareto"],
    "pareto_cheap5": ["pareto.mode=cheap", "pareto.groups=layer", "pareto.rule=pareto",
                      "pareto.every=5"],
    "mgda_exact": [*EXACT, "pareto.rule=mgda"],
    "pcgrad_exact": [*EXACT, "pareto.rule=pcgrad"],
    "pareto_lm_caption_image": [*EXACT, "pareto.rule=pareto",
                                "pareto.objectives=[lm,caption,image]"],
}
"""The variants: overrides of launch/configs/umm_tiny.yaml."""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default=None, help="work and results folder (default: temporary)")
    p.add_argument("overrides", nargs="*", help="section.field=value for every variant")
    args = p.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="pareto_tiny_")
    variants = {k: VARIANTS[k] for k in args.variants}
    base = [f"train.steps={args.steps}", "train.save_every=0", "train.log_every=1000",
            "train.tensorboard=false", *args.overrides]
    runs = grid("umm_tiny", base, variants, args.seeds, out)
    trained = train_distributed(runs, out, world=2)
    write_report(out, variants, args.seeds, trained, {}, reference=next(iter(variants)),
                 title=f"Pareto LoRA on the tiny UMM ({args.steps} steps, TP=2+SP)",
                 command=" ".join(sys.argv), plot_keys=("image", "text"), metrics=LOSSES)
    return 0


if __name__ == "__main__":
    sys.exit(main())

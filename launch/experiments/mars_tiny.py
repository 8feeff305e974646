"""MARS vs a full 4x4 grid of (vision rank, LLM rank) on the tiny UMM with its in-loop ViT
(CPU, one process per run, seeds fixed).

    python launch/experiments/mars_tiny.py            # the table in docs/experiments.md
    python launch/experiments/mars_tiny.py --steps 60 --jobs 2

The grid trains every pair of ``--ranks`` for ``--steps`` steps on the full data and measures
the held-out loss (text + image); MARS runs its probes (short, small-batch runs on data
subsets), fits the laws, picks a pair within the same parameter budget (``--budget``), and
its cost includes one full run of that pair. Written to ``--out``/results.md (and printed):
each pair's loss and parameters, the grid's best pair within the budget, MARS's pair and fits,
and both costs (steps, sequences, CPU seconds).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from _mars import compare, markdown
from _report import write_text


def add_mars_arguments(p: argparse.ArgumentParser, probe_samples, probe_batch) -> None:
    """The grid's and MARS's arguments (both MARS experiments)."""
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--budget", default="uniform:4")
    p.add_argument("--probe-steps", type=int, default=10)
    p.add_argument("--probe-samples", type=int, nargs="+", default=probe_samples)
    p.add_argument("--probe-batch", type=int, default=probe_batch)
    p.add_argument("--probe-lr", type=float, default=None, help="default: the config's lr")
    p.add_argument("--every", type=int, default=3, help="steps between a probe's evaluations")
    p.add_argument("--min-r2", type=float, default=0.5, help="the balance step's fit gate")
    from megalora.mars.probes import CONTRIBUTION_ON

    p.add_argument("--contribution", choices=CONTRIBUTION_ON, default="heldout",
                   help="where a probe measures a module group's loss contribution")


def mars_config(args, out: str):
    from megalora.mars.cli import MarsConfig

    return MarsConfig(budget=args.budget, vision_ranks=args.ranks, llm_ranks=args.ranks,
                      probe_vision_ranks=[min(args.ranks), max(args.ranks)],
                      probe_llm_ranks=[min(args.ranks), max(args.ranks)],
                      probe_samples=args.probe_samples, probe_steps=args.probe_steps,
                      probe_batch=args.probe_batch, probe_lr=args.probe_lr, every=args.every,
                      min_r2=args.min_r2, contribution=args.contribution, jobs=args.jobs,
                      out=os.path.join(out, "mars"))


def main(argv=None) -> int:
    from megalora.umm.config import RunConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150, help="steps of a full run")
    add_mars_arguments(p, probe_samples=[16, 64], probe_batch=1)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    p.add_argument("overrides", nargs="*", help="section.field=value for the base config")
    args = p.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="mars_tiny_")
    base = RunConfig.from_yaml("umm_tiny", [
        "vision.enabled=true", "parallel.tensor_parallel=1", "parallel.sequence_parallel=false",
        f"train.steps={args.steps}", "train.save_every=0", "train.tensorboard=false",
        "train.log_every=1000000", *args.overrides]).to_dict()
    res = compare(base, args.ranks, [0], mars_config(args, out), out, args.jobs)
    text = markdown(res)
    write_text(os.path.join(out, "results.md"), text)
    print(f"\n{text}\n({out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

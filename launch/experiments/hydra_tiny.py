"""Uniform ranks vs HyDRA at the same parameter budget and steps on the tiny UMM with its
in-loop ViT (CPU, one process per run, seeds fixed).

    python launch/experiments/hydra_tiny.py              # the table in docs/experiments.md
    python launch/experiments/hydra_tiny.py --steps 60 --seeds 0

The variants are hydra_emojicap.py's, on the synthetic toy: ``uniform`` (every module at
``--rank``: the budget), ``masked`` (built at 2 x rank and masked to ``--rank``, never moved:
must reproduce ``uniform``), ``hydra`` (built at 2 x rank, reallocated every ``--every`` steps
until 70 % of training) and ``final`` (HyDRA's exported allocation trained from the start).
Results (``--out``): results.json, results.md (held-out text and image losses: means with 95 %
intervals, paired differences against uniform), differences.png, and the parameters HyDRA
ended with.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from _report import LOSSES, write_report
from _runs import grid, train_many
from hydra_emojicap import finals, params_line, variants


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--rank", type=int, default=4, help="the uniform rank = the budget")
    p.add_argument("--every", type=int, default=10, help="steps between HyDRA decisions")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    p.add_argument("overrides", nargs="*", help="section.field=value for the base config")
    args = p.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="hydra_tiny_")
    base = ["vision.enabled=true", "parallel.tensor_parallel=1",
            "parallel.sequence_parallel=false", f"train.steps={args.steps}",
            "train.save_every=0", "train.tensorboard=false", "train.log_every=1000000",
            *args.overrides]
    first = variants(args.rank, args.every)
    runs = grid("umm_tiny", base, first, args.seeds, out)
    trained = train_many(runs, out, args.jobs)
    trained.update(train_many(finals(out, args.seeds), out, args.jobs))
    names = [*first, "final"]
    write_report(out, names, args.seeds, trained, {}, reference="uniform",
                 title=f"HyDRA vs uniform rank {args.rank} on the tiny UMM ({args.steps} steps)",
                 command=" ".join(sys.argv), plot_keys=("image", "text"), metrics=LOSSES)
    params_line(out, names, args.seeds, trained, args.rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Uniform ranks vs HyDRA at the same parameter budget and steps on the tiny UMM with its
in-loop ViT (CPU, one process per run, seeds fixed).

    python launch/experiments/hydra_tiny.py              # the table in README.md
    python launch/experiments/hydra_tiny.py --steps 60 --seeds 0

Three runs per seed, all with scale alpha / r = 2 and the same base model and data:

* ``uniform``: every module at rank ``--rank`` (the budget);
* ``masked``: adapters built at 2 x rank and masked to ``--rank`` with HyDRA's schedule frozen
  from the start: a check that the masking setup itself changes nothing (it should reproduce
  ``uniform``: the first ranks of the factors are drawn identically);
* ``hydra``: built at 2 x rank, budget = ``--rank`` uniform, reallocated every ``--every``
  steps until 70 % of training;
* ``final``: HyDRA's exported final allocation (``hydra_ranks.yaml``) trained from the start
  with fixed ranks: is the allocation it found better, apart from the cost of moving there?

Printed: held-out text and image loss per run, their means over seeds, the budget and the
effective parameters HyDRA ended with.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

from _runs import train_many


def configs(args, out):
    from megalora.umm.config import RunConfig

    base = RunConfig.from_yaml("umm_tiny", [
        "vision.enabled=true", "parallel.tensor_parallel=1", "parallel.sequence_parallel=false",
        f"train.steps={args.steps}", "train.save_every=0", "train.tensorboard=false",
        "train.log_every=1000000", *args.overrides]).to_dict()
    r = args.rank
    runs = []
    for seed in args.seeds:
        for name in ("uniform", "masked", "hydra"):
            cfg = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
            built = r if name == "uniform" else 2 * r
            cfg["lora"] = {**base["lora"], "rank": built, "alpha": 2.0 * built}
            cfg["train"] = {**base["train"], "seed": seed,
                            "out_dir": os.path.join(out, f"{name}_s{seed}")}
            cfg["data"] = {**base["data"], "seed": seed}
            if name != "uniform":
                cfg["hydra"] = {**base["hydra"], "enabled": True, "budget_rank": r,
                                "every": args.every, "seed": seed,
                                "freeze": 0.7 if name == "hydra" else 1e-9}
            runs.append((f"{name}_s{seed}", cfg))
    return runs


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
    res = train_many(configs(args, out), out, args.jobs)
    import yaml

    finals = []
    for seed in args.seeds:
        with open(os.path.join(out, f"hydra_s{seed}", "hydra_ranks.yaml")) as fh:
            cfg = yaml.safe_load(fh)
        cfg["train"]["out_dir"] = os.path.join(out, f"final_s{seed}")
        finals.append((f"final_s{seed}", cfg))
    res.update(train_many(finals, out, args.jobs))
    names = ("uniform", "masked", "hydra", "final")
    print(f"\n{'run':>8} {'seed':>4} {'text':>8} {'image':>8} {'sum':>8} {'params':>8}")
    for name in names:
        for seed in args.seeds:
            x = res[f"{name}_s{seed}"]
            print(f"{name:>8} {seed:>4} {x['text']:>8.4f} {x['image']:>8.4f} {x['loss']:>8.4f} "
                  f"{x['hydra_params'] or '':>8}")
    print(f"\nmeans over seeds {args.seeds} ({args.steps} steps, budget = uniform rank "
          f"{args.rank}):")
    for name in names:
        m = {k: statistics.mean(res[f"{name}_s{s}"][k] for s in args.seeds)
             for k in ("text", "image", "loss")}
        print(f"{name:>8}  text {m['text']:.4f}  image {m['image']:.4f}  sum {m['loss']:.4f}")
    print(f"(logs, hydra.jsonl and hydra_allocation.png per run under {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

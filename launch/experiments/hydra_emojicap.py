"""HyDRA against uniform ranks at the same trainable-parameter budget, on EmojiCap's LoRA
recipe (the pretrained base adapted to Noto art; docs/pareto-emojicap.md#hydra).

    python launch/experiments/hydra_emojicap.py --out results/hydra_emojicap
    python launch/experiments/hydra_emojicap.py --steps 4 --seeds 0 1 --out /tmp/he  # CI's

Per seed, all at scale alpha / r = 2, from the same base, init and data order:
``uniform`` (every module at ``--rank``: the budget); ``masked`` (built at 2 x rank, masked to
``--rank``, never moved: must reproduce ``uniform``, a check of the setup); ``hydra`` (built
at 2 x rank, reallocated every ``--every`` steps until 70 % of training); ``final`` (HyDRA's
exported allocation, hydra_ranks.yaml, trained from the start with fixed ranks). Each adapter
is scored by ``megalora.umm.emojicap_metrics``; ``results.md`` gives means with 95 %
intervals and paired differences against ``uniform``.
"""

from __future__ import annotations

import argparse
import os
import sys

from _report import write_report, write_text
from _runs import grid, train_many
from pareto_emojicap import add_recipe_arguments, check_inputs, recipe_overrides, score_all


def variants(rank: int, every: int) -> dict:
    """The first stage's variants (``final`` follows from ``hydra``'s export)."""
    built = [f"lora.rank={2 * rank}", f"lora.alpha={4.0 * rank}",
             "hydra.enabled=true", f"hydra.budget_rank={rank}", f"hydra.every={every}",
             "hydra.seed={seed}"]
    return {"uniform": [f"lora.rank={rank}", f"lora.alpha={2.0 * rank}"],
            "masked": [*built, "hydra.freeze=1e-9"],
            "hydra": [*built, "hydra.freeze=0.7"]}


def finals(out: str, seeds) -> list:
    import yaml

    runs = []
    for seed in seeds:
        with open(os.path.join(out, f"hydra_s{seed}", "hydra_ranks.yaml")) as fh:
            cfg = yaml.safe_load(fh)
        cfg["train"]["out_dir"] = os.path.join(out, f"final_s{seed}")
        runs.append((f"final_s{seed}", cfg))
    return runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_recipe_arguments(p, "results/hydra_emojicap")
    p.add_argument("--rank", type=int, default=4, help="the uniform rank = the budget")
    p.add_argument("--every", type=int, default=10, help="steps between HyDRA decisions")
    args = p.parse_args(argv)
    check_inputs(args)
    first = variants(args.rank, args.every)
    runs = grid("emojicap_tiny", recipe_overrides(args) + ["pareto.mode=off"], first,
                args.seeds, args.out)
    trained = train_many(runs, args.out, args.jobs)
    second = finals(args.out, args.seeds)
    trained.update(train_many(second, args.out, args.jobs))
    scored = score_all(runs + second, args)
    names = [*first, "final"]
    write_report(args.out, names, args.seeds, trained, scored, reference="uniform",
                 title=f"HyDRA vs uniform rank {args.rank} on EmojiCap",
                 command=" ".join(sys.argv))
    params_line(args.out, names, args.seeds, trained, args.rank)
    return 0


def params_line(out: str, names, seeds, trained: dict, rank: int) -> None:
    """Appends to results.md the adapter parameters each variant ended with (HyDRA's)."""
    params = {n: sorted({trained[f"{n}_s{s}"]["hydra_params"] for s in seeds} - {None})
              for n in names}
    line = f"\nAdapter parameters HyDRA ended with (budget = uniform rank {rank}): {params}\n"
    path = os.path.join(out, "results.md")
    with open(path) as fh:
        write_text(path, fh.read() + line)
    print(line)


if __name__ == "__main__":
    sys.exit(main())

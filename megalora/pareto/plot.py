"""``megalora pareto-plot``: a run's Pareto history (out_dir/pareto.jsonl) as one PNG.

Four panels over the steps, one line per parameter group: the gradients' cosine, their norm
ratio (log scale), the weight on the last objective (``image``), and which rule fired. With
more than two objectives: the smallest pairwise cosine and the largest / smallest norm.
"""

from __future__ import annotations

import os

from megalora.atomic import atomic_savefig
from megalora.pareto.engine import read_history

_RULES = ("sum", "rescale", "pareto", "mgda", "pcgrad", "fixed")


def plot_history(path: str, out: str, max_groups: int = 12) -> str:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on cluster nodes
    import matplotlib.pyplot as plt

    rows = read_history(path)
    steps = [r["step"] for r in rows]
    groups = rows[0]["groups"]
    objectives = rows[0].get("objectives", ["text", "image"])
    two = len(objectives) == 2
    live = [g for g in range(len(groups)) if any(max(r["norms"][g]) > 0 for r in rows)]
    live = live[:max_groups]
    fig, axes = plt.subplots(4, 1, figsize=(9, 11), sharex=True)
    for g in live:
        axes[0].plot(steps, [r["cos"][g] for r in rows], label=groups[g])
        axes[1].plot(steps, [max(r["ratio"][g], 1e-12) for r in rows])
        axes[2].plot(steps, [r["weights"][g][-1] for r in rows])
        axes[3].scatter(steps, [_RULES.index(r["fired"][g]) for r in rows], s=8)
    axes[0].axhline(0.0, color="k", lw=0.5)
    axes[0].set_ylabel(f"cos({', '.join(objectives)})" if two else "min pairwise cos")
    axes[1].set_yscale("log")
    axes[1].set_ylabel(f"|g_{objectives[0]}| / |g_{objectives[1]}|" if two
                       else "max / min norm")
    axes[2].set_ylabel(f"weight on {objectives[-1]}")
    axes[3].set_yticks(range(len(_RULES)), _RULES)
    axes[3].set_ylabel("rule fired")
    axes[3].set_xlabel("step")
    axes[0].legend(fontsize=7, ncol=3)
    fig.suptitle(f"Pareto LoRA history: {path}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_savefig(fig, out, dpi=100)
    plt.close(fig)
    return out


def add_parser(sub) -> None:
    p = sub.add_parser("pareto-plot", help="plot a run's Pareto history (out_dir/pareto.jsonl)")
    p.add_argument("--run", required=True, help="train.out_dir of the run, or the .jsonl file")
    p.add_argument("--out", default=None, help="PNG path (default: <run>/pareto.png)")
    p.add_argument("--max-groups", type=int, default=12)


def run(args) -> int:
    out = args.out or os.path.join(args.run if os.path.isdir(args.run)
                                   else os.path.dirname(args.run), "pareto.png")
    print(f"wrote {plot_history(args.run, out, args.max_groups)}")
    return 0

"""HyDRA's outputs at the end of training: the final allocation as a run config the trainer
takes (per-module ``lora.rank_pattern``, with ``alpha_pattern`` keeping each module's scale, so
the exported adapters compute what the masked ones did), and a heatmap PNG of the allocation:
final ranks (layers x modules, one panel per layer stack) and every module's rank over the
decisions (``hydra.jsonl``)."""

from __future__ import annotations

import json
import os
from typing import Dict, List

import numpy as np

from megalora.atomic import atomic_savefig
from megalora.hydra.allocation import position


def rank_config(run, ranks: Dict[str, int], scales: Dict[str, float]) -> dict:
    """``run`` (a RunConfig) with per-module ranks and the same scale per module."""
    out = run.to_dict()
    lora = out["lora"]
    lora["rank_pattern"] = {**{n: int(k) for n, k in sorted(ranks.items())}}
    lora["alpha_pattern"] = {n: float(scales[n] * k) for n, k in sorted(ranks.items())}
    out["hydra"] = {**out["hydra"], "enabled": False}
    return out


def _grid(ranks: Dict[str, int]):
    """{stack: (layers x kinds array, kinds)} of the ranks."""
    stacks: Dict[str, Dict] = {}
    for n, k in ranks.items():
        stack, layer, kind = position(n)
        stacks.setdefault(stack, {})[(layer, kind)] = k
    out = {}
    for stack, cells in sorted(stacks.items()):
        kinds = sorted({kind for _, kind in cells})
        layers = max(layer for layer, _ in cells) + 1
        grid = np.full((layers, len(kinds)), np.nan)
        for (layer, kind), k in cells.items():
            grid[layer, kinds.index(kind)] = k
        out[stack or "model"] = (grid, kinds)
    return out


def heatmap(log: List[dict], out: str, budget_rank: int) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    final = _grid(log[-1]["ranks"])
    names = sorted(log[-1]["ranks"])
    fig, axes = plt.subplots(1, len(final) + 1, figsize=(5 * (len(final) + 1), 4.8))
    vmax = max(max(r["ranks"].values()) for r in log)
    for ax, (stack, (grid, kinds)) in zip(axes, final.items()):
        im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(kinds)), [k.replace("linear_", "") for k in kinds])
        ax.set_yticks(range(grid.shape[0]))
        ax.set_ylabel("layer")
        ax.set_title(f"{stack.rstrip('.')}: final ranks (uniform {budget_rank})")
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{int(v)}", ha="center", va="center", color="w", fontsize=8)
    over_time = np.array([[r["ranks"][n] for r in log] for n in names], dtype=float)
    ax = axes[-1]
    im = ax.imshow(over_time, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(log)), [str(r["step"]) for r in log], rotation=60, fontsize=7)
    ax.set_yticks(range(len(names)), [n.replace("decoder.layers.", "L").replace(
        "self_attention.", "").replace("mlp.", "").replace("linear_", "") for n in names],
        fontsize=6)
    ax.set_xlabel("step of the decision")
    ax.set_title("rank over training")
    fig.colorbar(im, ax=axes, shrink=0.8, label="rank")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_savefig(fig, out, dpi=100)
    plt.close(fig)
    return out


def read_log(out_dir: str) -> List[dict]:
    with open(os.path.join(out_dir, "hydra.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def finish(scheduler, run, rank0: bool) -> dict:
    """Export the final allocation and draw the heatmap (rank 0); every rank returns the
    summary."""
    import yaml

    from megalora.atomic import atomic_write_bytes
    from megalora.hydra import masking

    out_dir = run.train.out_dir
    params = masking.effective_parameters(scheduler.model, scheduler.pp_group)
    summary = {"ranks": dict(scheduler.ranks), "params": params, "budget": scheduler.budget,
               "config": os.path.join(out_dir, "hydra_ranks.yaml"),
               "plot": os.path.join(out_dir, "hydra_allocation.png")}
    scales = scheduler.scales()  # collective under PP: every rank
    if rank0:
        atomic_write_bytes(summary["config"], yaml.safe_dump(
            rank_config(run, scheduler.ranks, scales), sort_keys=False).encode())
        log = read_log(out_dir) if os.path.isfile(os.path.join(out_dir, "hydra.jsonl")) else []
        start = {"step": 0, "ranks": scheduler.initial_ranks}
        heatmap([start] + log, summary["plot"], scheduler.cfg.budget_rank_for(
            max(m.max_rank for m in scheduler.modules)))
    return summary

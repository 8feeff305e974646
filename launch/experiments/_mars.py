"""Shared by the MARS experiments: a full grid of (vision rank, LLM rank) runs against MARS's
probes, search and one full run of its pair, with both costs (optimizer steps, sequences, CPU
seconds) and the gap of MARS's pair to the grid's best within the budget."""

from __future__ import annotations

import os
import statistics
import sys
from typing import Dict, Sequence

from _runs import train_many


def grid_runs(base: dict, ranks: Sequence[int], seeds: Sequence[int], out: str) -> list:
    """One run config per (vision rank, LLM rank, seed): the base at those ranks (alpha = 2r),
    train.seed and data.seed = seed."""
    from megalora.mars import search as s

    runs = []
    for rv in ranks:
        for rl in ranks:
            for seed in seeds:
                cfg = s.rank_config(base, rv, rl)
                cfg["train"].update(seed=seed, out_dir=os.path.join(out, f"rv{rv}_rl{rl}_s{seed}"))
                cfg["data"]["seed"] = seed
                runs.append((f"rv{rv}_rl{rl}_s{seed}", cfg))
    return runs


def compare(base: dict, ranks: Sequence[int], seeds: Sequence[int], mars_cfg, out: str,
            jobs: int) -> Dict:
    """Train the grid (cached), run MARS (probes cached), and put them side by side; ``runs``:
    the grid's (key, config) pairs."""
    from megalora.mars import search as s
    from megalora.mars.cli import search

    budget = s.budget_from(mars_cfg.budget, base)
    runs = grid_runs(base, ranks, seeds, os.path.join(out, "full"))
    grid = train_many(runs, os.path.join(out, "full"), jobs)
    pairs = [(rv, rl) for rv in ranks for rl in ranks]
    params = {pr: s.adapter_parameters(base, *pr) for pr in pairs}
    loss = {pr: statistics.mean(grid[f"rv{pr[0]}_rl{pr[1]}_s{x}"]["loss"] for x in seeds)
            for pr in pairs}
    result = search(mars_cfg, base, progress=lambda m: print(m, file=sys.stderr))
    choice = (result["choice"]["r_v"], result["choice"]["r_l"])
    best = min((pr for pr in pairs if params[pr] <= budget), key=lambda pr: loss[pr])
    # MARS's own cost: its probes and one full run of its pair (the grid's first seed)
    final = grid[f"rv{choice[0]}_rl{choice[1]}_s{seeds[0]}"]
    kinds = ("steps", "sequences", "cpu_seconds")
    grid_cost = {k: sum(g[k] for g in grid.values()) for k in kinds}
    # what a practitioner's grid costs: every pair once (MARS's pair is charged one run too)
    one_seed = {k: sum(grid[f"rv{a}_rl{b}_s{seeds[0]}"][k] for a, b in pairs) for k in kinds}
    mars_cost = {k: result[f"probe_{k}"] + final[k] for k in kinds}
    return {"budget": budget, "runs": runs, "pairs": pairs, "params": params, "loss": loss,
            "grid": grid,
            "best": best, "choice": choice, "gap": loss[choice] / loss[best] - 1,
            "search": result, "grid_cost": grid_cost, "grid_cost_one_seed": one_seed,
            "mars_cost": mars_cost,
            "seeds": list(seeds)}


def _law(search: dict, name: str) -> str:
    from megalora.mars.search import exponents_note

    law = search.get(name)
    if not law:
        return f"{name}: not fitted ({search['convergence_problems'].get(name, '')})"
    q = law.get("quality") or {}
    values = ", ".join(f"{k} {v:.3g}" for k, v in law.items() if isinstance(v, (int, float)))
    text = f"{name}: {values}; R^2 {q.get('r2', float('nan')):.3f}"
    if name == "performance":
        text += f" ({exponents_note(law, search['probes'])})"
    return text


def _baselines(res: Dict) -> str:
    """The no-search baseline (the largest uniform rank within the budget) and how far MARS's
    choice stood from its runner-up in predicted loss (a near tie is a coin flip)."""
    uniform = [pr for pr in res["pairs"] if pr[0] == pr[1] and res["params"][pr] <= res["budget"]]
    text = ""
    if uniform:
        u = max(uniform)
        text = (f"Uniform ranks without a search: r_v=r_l={u[0]}, held-out "
                f"{res['loss'][u]:.4f} ({res['loss'][u] / res['loss'][res['best']] - 1:+.2%} vs "
                "the grid's best). ")
    pred = sorted(c["predicted_loss"] for c in res["search"]["candidates"] if c["within_budget"])
    if len(pred) > 1:
        text += (f"MARS's predicted loss beat its runner-up by {pred[1] - pred[0]:.2g} "
                 f"({(pred[1] - pred[0]) / pred[0]:.1e} relative).")
    return text


def markdown(res: Dict, extra: Dict[str, Dict] = None) -> str:
    """The grid (held-out loss per pair, mean over seeds, and any ``extra`` columns: title ->
    pair -> value), MARS's pair and fits, and both costs."""
    extra = extra or {}
    head = "| r_v | r_l | adapter parameters | held-out loss | " + \
        "".join(f"{t} | " for t in extra) + "within budget |"
    lines = [head, "|---" * (5 + len(extra)) + "|"]
    for pr in res["pairs"]:
        mark = " (MARS)" if pr == res["choice"] else ""
        mark += " (grid best)" if pr == res["best"] else ""
        cells = "".join(f"{extra[t][pr]:.4f} | " for t in extra)
        lines.append(f"| {pr[0]} | {pr[1]} | {res['params'][pr]:,} | {res['loss'][pr]:.4f}{mark}"
                     f" | {cells}{'yes' if res['params'][pr] <= res['budget'] else 'no'} |")
    sr, g, m = res["search"], res["grid_cost_one_seed"], res["mars_cost"]
    g_all = res["grid_cost"]
    lines += ["", f"Budget {res['budget']:,} adapter parameters; seeds {res['seeds']} (losses "
              "are their mean).",
              f"Grid's best within the budget: r_v={res['best'][0]}, r_l={res['best'][1]}, "
              f"held-out {res['loss'][res['best']]:.4f}.",
              f"MARS: r_v={res['choice'][0]}, r_l={res['choice'][1]}, held-out "
              f"{res['loss'][res['choice']]:.4f} ({res['gap']:+.2%} vs the grid's best); "
              f"{sr['choice']['why']}.",
              _baselines(res),
              f"Laws: {_law(sr, 'performance')}. {_law(sr, 'vision')}. {_law(sr, 'llm')}.", "",
              # CPU seconds summed over runs: wall time depends on --jobs and on the caches
              "| | optimizer steps | sequences | CPU s |", "|---|---|---|---|",
              f"| grid, every seed (this comparison's) | {g_all['steps']:,} | "
              f"{g_all['sequences']:,} | {g_all['cpu_seconds']:.0f} |",
              f"| grid, one seed (a practitioner's) | {g['steps']:,} | {g['sequences']:,} | "
              f"{g['cpu_seconds']:.0f} |",
              f"| MARS (probes + one full run) | {m['steps']:,} | {m['sequences']:,} | "
              f"{m['cpu_seconds']:.0f} |", "",
              f"Against the one-seed grid, MARS is {g['sequences'] / m['sequences']:.1f}x "
              "cheaper in sequences, "
              f"{g['steps'] / m['steps']:.1f}x in steps, "
              f"{g['cpu_seconds'] / m['cpu_seconds']:.1f}x in CPU time."]
    return "\n".join(lines) + "\n"

"""MARS vs a full 4x4 grid of (vision rank, LLM rank) on the tiny UMM with its in-loop ViT
(CPU, one process per run, seeds fixed).

    python launch/experiments/mars_tiny.py            # the table in README.md
    python launch/experiments/mars_tiny.py --steps 60 --jobs 2

The grid trains every pair of ``--ranks`` for ``--steps`` steps on the full data and measures
the held-out loss (text + image); MARS runs its probes (short, small-batch runs on data
subsets), fits the laws, picks a pair within the same parameter budget (``--budget``), and
its cost includes one full run of that pair. Printed: each pair's loss and parameters, the
grid's best pair within the budget, MARS's pair and fits, and both costs (steps, sequences,
CPU seconds).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from _runs import train_many


def main(argv=None) -> int:
    from megalora.mars import search as s
    from megalora.mars.cli import MarsConfig, search
    from megalora.umm.config import RunConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150, help="steps of a full run")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--budget", default="uniform:4")
    p.add_argument("--probe-steps", type=int, default=10)
    p.add_argument("--probe-samples", type=int, nargs="+", default=[16, 64])
    p.add_argument("--probe-lr", type=float, default=None, help="default: the config's lr")
    p.add_argument("--every", type=int, default=3, help="steps between a probe's evaluations")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    p.add_argument("overrides", nargs="*", help="section.field=value for the base config")
    args = p.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="mars_tiny_")
    base = RunConfig.from_yaml("umm_tiny", [
        "vision.enabled=true", "parallel.tensor_parallel=1", "parallel.sequence_parallel=false",
        f"train.steps={args.steps}", "train.save_every=0", "train.tensorboard=false",
        "train.log_every=1000000", *args.overrides]).to_dict()
    budget = s.budget_from(args.budget, base)

    def full_run(rv, rl):
        cfg = s.rank_config(base, rv, rl)
        cfg["train"]["out_dir"] = os.path.join(out, "full", f"rv{rv}_rl{rl}")
        return f"rv{rv}_rl{rl}", cfg

    pairs = [(rv, rl) for rv in args.ranks for rl in args.ranks]
    tick = time.time()
    grid = train_many([full_run(rv, rl) for rv, rl in pairs], os.path.join(out, "full"),
                      args.jobs)
    grid_wall = time.time() - tick
    params = {pr: s.adapter_parameters(base, *pr) for pr in pairs}

    cfg = MarsConfig(budget=args.budget, vision_ranks=args.ranks, llm_ranks=args.ranks,
                     probe_vision_ranks=[min(args.ranks), max(args.ranks)],
                     probe_llm_ranks=[min(args.ranks), max(args.ranks)],
                     probe_samples=args.probe_samples, probe_steps=args.probe_steps,
                     probe_batch=1, probe_lr=args.probe_lr, every=args.every, jobs=args.jobs,
                     out=os.path.join(out, "mars"))
    tick = time.time()
    result = search(cfg, base, progress=lambda m: print(m, file=sys.stderr))
    mars_wall = time.time() - tick
    choice = (result["choice"]["r_v"], result["choice"]["r_l"])
    final = grid[f"rv{choice[0]}_rl{choice[1]}"]  # MARS's final run = that grid run

    print(f"\n{'r_v':>4} {'r_l':>4} {'params':>8} {'held-out':>9}  budget")
    for pr in pairs:
        g = grid[f"rv{pr[0]}_rl{pr[1]}"]
        print(f"{pr[0]:>4} {pr[1]:>4} {params[pr]:>8,} {g['loss']:>9.4f}  "
              f"{'ok' if params[pr] <= budget else 'over'}")
    best = min((pr for pr in pairs if params[pr] <= budget),
               key=lambda pr: grid[f"rv{pr[0]}_rl{pr[1]}"]["loss"])
    best_loss = grid[f"rv{best[0]}_rl{best[1]}"]["loss"]
    gap = final["loss"] / best_loss - 1
    grid_cost = [sum(g[k] for g in grid.values()) for k in ("steps", "sequences", "cpu_seconds")]
    mars_cost = [result[f"probe_{k}"] + final[k] for k in ("steps", "sequences",
                                                           "cpu_seconds")]
    print(f"\nbudget {budget:,} adapter parameters; grid best within it: r_v={best[0]}, "
          f"r_l={best[1]}, held-out {best_loss:.4f}")
    print(f"MARS: r_v={choice[0]}, r_l={choice[1]}, held-out {final['loss']:.4f} "
          f"({gap:+.2%} vs the grid's best): {result['choice']['why']}")
    p = result["performance"]
    print(f"performance law: a_v {p['a_v']:.3g}, a_l {p['a_l']:.3g}, b {p['b']:.3g}, "
          f"R^2 {p['quality']['r2']:.3f}")
    print(f"{'':>6} {'steps':>8} {'sequences':>10} {'CPU s':>8} {'wall s':>7}")
    print(f"{'grid':>6} {grid_cost[0]:>8,} {grid_cost[1]:>10,} {grid_cost[2]:>8.0f} "
          f"{grid_wall:>7.0f}")
    print(f"{'MARS':>6} {mars_cost[0]:>8,} {mars_cost[1]:>10,} {mars_cost[2]:>8.0f} "
          f"{mars_wall:>7.0f}  (probes + one full run)")
    print(f"MARS is {grid_cost[1] / mars_cost[1]:.1f}x cheaper in sequences, "
          f"{grid_cost[0] / mars_cost[0]:.1f}x in steps, "
          f"{grid_cost[2] / mars_cost[2]:.1f}x in CPU time ({out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

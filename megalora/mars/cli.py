"""``megalora rank-search``: MARS end to end (probes -> fits -> prune -> predict -> config).

    megalora rank-search --config umm_tiny vision.enabled=true --budget uniform:4 --jobs 2

Writes to ``--out``: ``probes/*.json`` (the cache), ``search.json`` (fits, goodness of fit,
candidates, choice), ``ranks.yaml`` (the run config with the chosen ranks:
``megalora train --config <out>/ranks.yaml``), ``laws.png`` and ``candidates.png``.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class MarsConfig:
    """What ``megalora rank-search`` does; each field is one flag."""

    budget: str
    """Trainable adapter parameters allowed: a count or ``uniform:R``."""
    vision_ranks: List[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    """The vision ranks the search may choose (the menu a balanced rank snaps to)."""
    llm_ranks: List[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    """The LLM ranks the search may choose."""
    probe_vision_ranks: List[int] = field(default_factory=lambda: [1, 8])
    probe_llm_ranks: List[int] = field(default_factory=lambda: [2, 16])
    probe_samples: List[int] = field(default_factory=lambda: [32, 64, 128])
    """Data sizes (training samples: synthetic ones, or a subset of the dataset) of the probes;
    the full size is the config's."""
    probe_steps: int = 30
    """Steps per probe (convergence times beyond it are censored)."""
    probe_batch: Optional[int] = None
    """Micro-batch size of the probes (default: the config's)."""
    probe_lr: Optional[float] = None
    """Constant learning rate of the probes (default: the config's peak lr)."""
    every: int = 10
    """Steps between the probes' held-out evaluations (convergence times are multiples)."""
    fraction: float = 0.9
    """A group has converged when its loss contribution reaches this fraction of its peak
    (see megalora.mars.probes)."""
    contribution: str = "heldout"
    """Where a module group's loss contribution (its convergence time) is measured: ``heldout``
    or ``train`` (fixed training batches: when the group stops lowering the loss it is trained
    on, for data where an adapter never lowers the held-out loss; docs/pareto-emojicap.md)."""
    min_r2: float = 0.5
    """Convergence laws with a lower R^2 (log scale) are not trusted: the pair is then chosen by
    the performance law over every menu pair within the budget, and the report says why."""
    jobs: int = 1
    """Probe processes run at once."""
    out: str = "out/mars"

    def __post_init__(self) -> None:
        for name in ("vision_ranks", "llm_ranks", "probe_vision_ranks", "probe_llm_ranks",
                     "probe_samples"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"--{name.replace('_', '-')} needs positive integers, got "
                                 f"{values}")
        for name in ("probe_steps", "every", "jobs"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if 3 * self.every > self.probe_steps:
            raise ValueError(f"--every {self.every} leaves fewer than 3 evaluations in "
                             f"--probe-steps {self.probe_steps}")
        if not 0 <= self.min_r2 <= 1:
            raise ValueError(f"--min-r2 must be in [0, 1], got {self.min_r2}")
        from megalora.mars.probes import CONTRIBUTION_ON

        if self.contribution not in CONTRIBUTION_ON:
            raise ValueError(f"--contribution must be {' or '.join(CONTRIBUTION_ON)}, got "
                             f"{self.contribution!r}")
        if not 0 < self.fraction < 1:
            raise ValueError(f"--fraction must be in (0, 1), got {self.fraction}")

    def probe_specs(self):
        from megalora.mars.probes import ProbeSpec

        return [ProbeSpec(rv, rl, d, self.probe_steps, self.probe_batch, self.probe_lr,
                          self.contribution)
                for rv, rl, d in itertools.product(
            self.probe_vision_ranks, self.probe_llm_ranks, self.probe_samples)]


def check_base(run) -> None:
    if not run.vision.enabled:
        raise ValueError("rank-search chooses a vision rank and an LLM rank: enable the in-loop "
                         "vision encoder (vision.enabled=true)")
    if run.data.path and not run.data.eval_path:
        raise ValueError("rank-search needs held-out data for the probes' loss: with data.path "
                         "set data.eval_path too")
    if not run.data.path and not run.data.eval_samples:
        raise ValueError("rank-search needs held-out data for the probes' loss: synthetic data "
                         "with data.eval_samples > 0")


def search(cfg: MarsConfig, base: dict, progress=print) -> dict:
    """Probes (cached), fits, candidates and the choice; writes the outputs under cfg.out."""
    import yaml

    from megalora.atomic import atomic_write_bytes
    from megalora.mars import plot
    from megalora.mars import search as s
    from megalora.mars.probes import data_size, run_probes

    full = data_size(base)
    budget = s.budget_from(cfg.budget, base)
    records = run_probes(cfg.probe_specs(), base, cfg.out, jobs=cfg.jobs, every=cfg.every,
                         fraction=cfg.fraction, progress=progress)
    records = s.with_times(records, cfg.fraction)
    fits = s.fit_probes(records)
    count = functools.lru_cache(maxsize=None)(lambda rv, rl: s.adapter_parameters(base, rv, rl))
    problem = fits.balance_problem(cfg.min_r2)
    if problem:
        progress(f"not balancing the ranks: {problem}")
        cands, fallbacks = s.all_pairs(fits, cfg.vision_ranks, cfg.llm_ranks, full, count,
                                       budget), 0
    else:
        cands, fallbacks = s.candidates(fits, cfg.vision_ranks, cfg.llm_ranks, full, count,
                                        budget)
    uniform = sorted(set(cfg.vision_ranks) & set(cfg.llm_ranks))
    choice, why = s.choose(cands, budget, fits, uniform, full, count, problem)
    text = s.report(fits, cands, choice, why, budget, records)
    result = {**s.as_json(fits, cands, choice, why, budget), "fallbacks": fallbacks,
              "probes": records,
              "probe_sequences": sum(r["sequences"] for r in records),
              "probe_cpu_seconds": sum(r["cpu_seconds"] for r in records),
              "probe_steps": sum(r["steps"] for r in records)}
    os.makedirs(cfg.out, exist_ok=True)
    atomic_write_bytes(os.path.join(cfg.out, "search.json"),
                       json.dumps(result, indent=1).encode())
    ranks = s.rank_config(base, *choice)
    atomic_write_bytes(os.path.join(cfg.out, "ranks.yaml"),
                       yaml.safe_dump(ranks, sort_keys=False).encode())
    plot.laws(fits, records, os.path.join(cfg.out, "laws.png"))
    plot.candidates(cands, choice, os.path.join(cfg.out, "candidates.png"))
    progress(text)
    progress(f"wrote {cfg.out}/ranks.yaml (megalora train --config {cfg.out}/ranks.yaml), "
             "search.json, laws.png, candidates.png")
    result["report"] = text
    return result


def add_parser(sub) -> None:
    p = sub.add_parser("rank-search", help="MARS: choose vision and LLM LoRA ranks by dual "
                                           "scaling laws fitted to short probes")
    p.add_argument("--config", required=True, help="run config (path or launch/configs name)")
    p.add_argument("--budget", required=True, help="adapter parameters allowed: a count or "
                                                   "uniform:R (both modules at rank R)")
    defaults = MarsConfig(budget="1")
    for name in ("vision_ranks", "llm_ranks", "probe_vision_ranks", "probe_llm_ranks",
                 "probe_samples"):
        p.add_argument("--" + name.replace("_", "-"), type=int, nargs="+",
                       default=getattr(defaults, name))
    for name, kind in (("probe_steps", int), ("probe_batch", int), ("probe_lr", float),
                       ("every", int), ("min_r2", float), ("contribution", str),
                       ("fraction", float), ("jobs", int), ("out", str)):
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(defaults, name))
    p.add_argument("overrides", nargs="*", help="section.field=value for the base config")
    p.set_defaults(handler=run)


def run(args) -> int:
    import sys

    from megalora.mars.laws import FitError
    from megalora.umm.config import RunConfig

    try:
        base_run = RunConfig.from_yaml(args.config, args.overrides)
        check_base(base_run)
        cfg = MarsConfig(**{k: getattr(args, k) for k in MarsConfig.__dataclass_fields__})
        search(cfg, base_run.to_dict())
    except (FitError, ValueError, FileNotFoundError) as exc:
        print(f"megalora rank-search: {exc}", file=sys.stderr)
        return 2
    return 0

"""MARS: fit the laws to the probes, prune to balanced pairs, predict, choose within a budget.

The performance law falls in both ranks, so "the best predicted loss" alone always picks the
largest pair; the choice is made under a trainable-parameter budget (the adapter parameters
the trainer would build, counted exactly by ``megalora plan``'s model at TP = PP = 1), by
default that of a uniform-rank baseline.

The balance step trusts the convergence laws only when both fit (R^2 on the log scale at
least ``min_r2``). Otherwise the search says why and chooses by the performance law alone over
every menu pair within the budget: acting on a law that explains less than half of what was
measured would pick the vision rank at random (tiny UMM: LLM convergence R^2 0.26, vision
0.59, and its choice cost 1.85 % of held-out loss against the grid's best).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from megalora.mars.laws import (ConvergenceLaw, FitError, PerformanceLaw, balanced_vision_rank,
                                fit_convergence, fit_performance, snap)


@dataclass(frozen=True)
class Fits:
    performance: PerformanceLaw
    vision: Optional[ConvergenceLaw]
    """None when the vision group's convergence law could not be fitted (see ``problems``)."""
    llm: Optional[ConvergenceLaw]
    problems: Dict[str, str] = dataclasses.field(default_factory=dict)
    """Per group, why its convergence law could not be fitted."""

    def balance_problem(self, min_r2: float) -> Optional[str]:
        """Why the balanced vision rank cannot be trusted (None when it can)."""
        why = [f"{g} convergence: {self.problems[g]}" for g in ("vision", "llm")
               if g in self.problems]
        for group, law in (("vision", self.vision), ("llm", self.llm)):
            if law is not None and law.quality is not None and law.quality.r2 < min_r2:
                why.append(f"{group} convergence law R^2 {law.quality.r2:.2f} < {min_r2:g}")
        return "; ".join(why) or None


def with_times(records: Sequence[dict], fraction: float) -> List[dict]:
    """Records with t_vision / t_llm recomputed from their contribution curves for
    ``fraction`` (records without curves keep theirs)."""
    from megalora.mars.probes import convergence_step

    out = []
    for r in records:
        r = dict(r)
        for group in ("vision", "llm"):
            curve = r.get("contribution", {}).get(group)
            if curve:
                r[f"t_{group}"] = convergence_step(r["eval_steps"], curve, fraction)
        out.append(r)
    return out


def fit_probes(records: Sequence[dict]) -> Fits:
    """All three laws from probe records (see ``megalora.mars.probes``); censored convergence
    times are left out. A convergence law that cannot be fitted is None, with the reason in
    ``Fits.problems``; a performance law that cannot be fitted raises FitError."""
    perf = fit_performance([(r["r_v"], r["r_l"], r["samples"], r["loss"]) for r in records])
    conv, problems = {}, {}
    for group, rank in (("vision", "r_v"), ("llm", "r_l")):
        points = [(r[rank], r["samples"], r[f"t_{group}"]) for r in records
                  if r[f"t_{group}"] is not None]
        try:
            if not points:
                raise FitError("no probe settled")
            conv[group] = fit_convergence(points)
        except FitError as exc:
            conv[group] = None
            problems[group] = f"{exc} ({why_censored(records, group)})"
    return Fits(perf, conv["vision"], conv["llm"], problems)


def why_censored(records: Sequence[dict], group: str) -> str:
    """How many probes of ``group`` never settled, split by cause: a contribution that never
    lowered the loss (no convergence time exists; EmojiCap's vision adapters on held-out data)
    or one still rising at the probe's end."""
    from megalora.mars.probes import never_helps

    censored = [r for r in records if r[f"t_{group}"] is None]
    never = [r for r in censored if never_helps(r.get("contribution", {}).get(group) or [0.0])]
    parts = []
    if never:
        held_out = any(r.get("contribution_on", "heldout") == "heldout" for r in never)
        parts.append(f"{len(never)} never lowered the loss: their adapters made it worse" +
                     (" (measure on training batches: --contribution train)" if held_out
                      else ""))
    if len(censored) - len(never):
        parts.append(f"{len(censored) - len(never)} still rising or too short: lengthen "
                     "--probe-steps or lower --fraction")
    return f"{len(censored)} of {len(records)} probes never settled" + (
        ": " + "; ".join(parts) if parts else "")


def adapter_parameters(base: dict, r_v: int, r_l: int) -> int:
    """Trainable adapter parameters of ``base`` with the LLM at r_l and the vision encoder at
    r_v (exact: ``megalora plan``'s counts equal built models')."""
    from megalora.mars.probes import data_size, probe_overrides
    from megalora.umm.config import RunConfig
    from megalora.umm.plan import stage_counts

    cfg = probe_overrides(base, r_v, r_l, data_size(base), 1, "/nonexistent")
    return stage_counts(RunConfig.from_dict(cfg), tp=1, pp=1, stage=0).lora


@dataclass
class Candidate:
    r_v: int
    r_l: int
    r_v_balanced: float
    """The balanced vision rank before snapping (NaN: not from the balance)."""
    params: int
    predicted_loss: float
    t_vision: float
    t_llm: float
    within_budget: bool


def _times(fits: Fits, r_v: int, r_l: int, samples: int) -> Tuple[float, float]:
    return tuple(float(law.predict(r, samples)) if law is not None else math.nan
                 for law, r in ((fits.vision, r_v), (fits.llm, r_l)))


def candidates(fits: Fits, vision_menu: Sequence[int], llm_menu: Sequence[int],
               samples: int, count, budget: int) -> Tuple[List[Candidate], int]:
    """Prune: for each LLM rank the balanced vision rank, snapped to the menu on a log scale;
    when that pair is over the budget, the largest smaller vision rank that fits (the nearest
    to balance the budget allows). Deduplicated. Returns the candidates and how many LLM ranks
    had no balanced rank (fallback count)."""
    out: Dict[Tuple[int, int], Candidate] = {}
    fallbacks = 0
    for r_l in sorted(llm_menu):
        r_star = balanced_vision_rank(fits.vision, fits.llm, r_l, samples)
        if r_star is None:
            fallbacks += 1
            continue
        r_v = snap(r_star, vision_menu)
        if count(r_v, r_l) > budget:
            r_v = max((r for r in vision_menu if r <= r_v and count(r, r_l) <= budget),
                      default=r_v)
        if (r_v, r_l) in out:
            continue
        params = count(r_v, r_l)
        out[(r_v, r_l)] = Candidate(
            r_v, r_l, r_star, params, float(fits.performance.predict(r_v, r_l, samples)),
            *_times(fits, r_v, r_l, samples), params <= budget)
    return list(out.values()), fallbacks


def all_pairs(fits: Fits, vision_menu: Sequence[int], llm_menu: Sequence[int], samples: int,
              count, budget: int) -> List[Candidate]:
    """Every menu pair, scored by the performance law alone (no balance)."""
    out = []
    for r_l in sorted(llm_menu):
        for r_v in sorted(vision_menu):
            params = count(r_v, r_l)
            out.append(Candidate(r_v, r_l, math.nan, params,
                                 float(fits.performance.predict(r_v, r_l, samples)),
                                 *_times(fits, r_v, r_l, samples), params <= budget))
    return out


def choose(cands: Sequence[Candidate], budget: int, fits: Fits, uniform: Sequence[int],
           samples: int, count, balance_problem: Optional[str] = None
           ) -> Tuple[Tuple[int, int], str]:
    """The candidate with the best predicted loss within the budget (ties: fewer parameters).
    With ``balance_problem`` the candidates are every menu pair (``all_pairs``) and the reason
    is part of the answer; when pruning left no candidate (no balanced rank), the uniform pair
    (r, r) within the budget with the best predicted loss."""
    within = [c for c in cands if c.params <= budget]
    if within:
        best = min(within, key=lambda c: (c.predicted_loss, c.params))
        if balance_problem:
            return (best.r_v, best.r_l), ("best predicted loss of every menu pair within the "
                                          f"budget; balance not used: {balance_problem}")
        return (best.r_v, best.r_l), "best predicted loss within the budget"
    if cands:
        smallest = min(c.params for c in cands)
        raise FitError(f"no {'menu pair' if balance_problem else 'balanced candidate'} fits "
                       f"the budget of {budget:,} parameters (the smallest needs {smallest:,}); "
                       "raise --budget or add smaller ranks to the menus")
    pairs = [(r, r) for r in uniform if count(r, r) <= budget]
    if not pairs:
        raise FitError(f"no balanced rank and no uniform pair of the menus within the budget "
                       f"of {budget:,} parameters")
    best = min(pairs, key=lambda p: float(fits.performance.predict(p[0], p[1], samples)))
    return best, "fallback: no LLM rank had a balanced vision rank; best uniform pair"


def budget_from(spec: str, base: dict) -> int:
    """``--budget``: a parameter count (``120000``, ``1.2e5``) or ``uniform:R`` (the
    parameters of both modules at rank R)."""
    if spec.startswith("uniform:"):
        r = int(spec.split(":", 1)[1])
        if r < 1:
            raise ValueError(f"--budget {spec}: the rank must be positive")
        return adapter_parameters(base, r, r)
    try:
        value = float(spec)
    except ValueError:
        raise ValueError(f"--budget must be a parameter count or uniform:R, got {spec!r}") \
            from None
    if value <= 0:
        raise ValueError(f"--budget must be positive, got {spec}")
    return int(value)


def rank_config(base: dict, r_v: int, r_l: int) -> dict:
    """The base run config with the chosen ranks: what ``megalora train --config`` takes."""
    from megalora.mars.probes import data_size, probe_overrides

    chosen = probe_overrides(base, r_v, r_l, data_size(base),
                             base["train"]["steps"], base["train"]["out_dir"])
    out = json.loads(json.dumps(base))
    out["lora"] = chosen["lora"]  # only the ranks and alphas change; layout, data, train stay
    return out


def _law_line(name: str, law: Optional[ConvergenceLaw], problem: Optional[str]) -> str:
    if law is None:
        return f"{name} convergence: not fitted ({problem})"
    q = law.quality
    return (f"{name} convergence: t = {law.k:.4g} r^{law.gamma:.3f} D^{law.delta:.3f}   (R^2 log "
            f"{q.r2:.3f}, max rel. error {q.max_rel_error:.1%}, {q.n} probes)")


def exponents_note(law: dict, records: Sequence[dict]) -> str:
    """How well the probes pin each performance-law exponent down: *at a bound* of
    ``EXPONENT_BOUNDS`` (within a relative 1e-3), *flat* when over the probed range it moves
    the law's power term by less than 0.1 % (exponent x ln(max / min) < 1e-3: EmojiCap's
    a_v = 2e-5 over ranks 1-8), else *pinned*."""
    import math

    from megalora.mars.laws import EXPONENT_BOUNDS

    lo, hi = EXPONENT_BOUNDS
    groups: dict = {"at a bound": [], "flat": [], "pinned": []}
    for name, col in (("a_v", "r_v"), ("a_l", "r_l"), ("b", "samples")):
        values = [r[col] for r in records]
        span = math.log(max(values) / min(values))
        kind = ("at a bound" if law[name] <= lo * 1.001 or law[name] >= hi * 0.999 else
                "flat" if law[name] * span < 1e-3 else "pinned")
        groups[kind].append(name)
    return "exponents " + "; ".join(f"{k}: {', '.join(v) or 'none'}" for k, v in groups.items())


def report(fits: Fits, cands: Sequence[Candidate], choice, why: str, budget: int,
           records: Sequence[dict] = ()) -> str:
    p = fits.performance
    lines = [
        f"performance law: L = {p.A:.4g} / (r_v^{p.a_v:.3g} r_l^{p.a_l:.3g} D^{p.b:.3g}) + "
        f"{p.E:.4g}   (R^2 {p.quality.r2:.3f}, max rel. error {p.quality.max_rel_error:.1%}, "
        f"{p.quality.n} probes)" +
        (f"; {exponents_note(dataclasses.asdict(p), records)}" if records else ""),
        _law_line("vision", fits.vision, fits.problems.get("vision")),
        _law_line("LLM", fits.llm, fits.problems.get("llm")),
        f"budget: {budget:,} trainable adapter parameters",
        f"{'r_l':>5} {'r_v*':>7} {'r_v':>4} {'params':>10} {'pred. loss':>10} {'t_v':>7} "
        f"{'t_l':>7}  budget",
    ]
    for c in cands:
        lines.append(f"{c.r_l:>5} {c.r_v_balanced:>7.2f} {c.r_v:>4} {c.params:>10,} "
                     f"{c.predicted_loss:>10.4f} {c.t_vision:>7.1f} {c.t_llm:>7.1f}  "
                     f"{'ok' if c.within_budget else 'over'}")
    lines.append(f"chosen: r_v={choice[0]}, r_l={choice[1]} ({why})")
    return "\n".join(lines)


def as_json(fits: Fits, cands, choice, why, budget) -> dict:
    def law(x):
        return None if x is None else dataclasses.asdict(x)

    return {"performance": law(fits.performance), "vision": law(fits.vision),
            "llm": law(fits.llm), "convergence_problems": fits.problems,
            "candidates": [dataclasses.asdict(c) for c in cands],
            "choice": {"r_v": choice[0], "r_l": choice[1], "why": why}, "budget": budget}

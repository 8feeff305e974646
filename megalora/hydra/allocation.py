"""Hierarchical rank allocations: a few knobs -> one integer rank per (layer, module) under a
parameter budget.

A configuration ``Knobs(slope, attention, qkv, fc1)`` describes an allocation the way HyDRA's
two levels do (research notes §2.2, a reconstruction):

* coarse, across layers: depth weight w(l) = 1 + slope (2 l / (L - 1) - 1) within each layer
  stack (the LLM's decoder and the vision encoder are separate stacks), so slope > 0 gives deep
  layers more rank;
* fine, within a layer: attention vs MLP share (``attention``), and inside them the QKV vs
  output projection share (``qkv``) and fc1 vs fc2 share (``fc1``); 0.5 is neutral.

A module's rank is lambda x its weight, clipped to [r_min, its built rank], with lambda the
largest value whose clipped ranks fit the budget (bisection: the cost is monotone in lambda),
then rounded down and topped up one rank at a time (largest fractional part first) while the
budget allows. The result never exceeds the budget, and the neutral knobs with the budget of a
uniform rank r give exactly r everywhere (when r <= every built rank).
"""

from __future__ import annotations

import math
import re
from dataclasses import astuple, dataclass
from typing import Dict, List, NamedTuple, Sequence

ATTENTION = ("linear_qkv", "linear_proj")
MLP = ("linear_fc1", "linear_fc2")
_LAYER = re.compile(r"^(.*?)layers\.(\d+)\.")


@dataclass(frozen=True)
class Knobs:
    slope: float = 0.0
    """Depth profile in [-1, 1]: > 0 gives deeper layers more rank."""
    attention: float = 0.5
    """Share of attention (QKV, output projection) vs MLP in (0, 1)."""
    qkv: float = 0.5
    """Within attention: QKV vs the output projection, in (0, 1)."""
    fc1: float = 0.5
    """Within the MLP: fc1 vs fc2, in (0, 1)."""

    def __post_init__(self):
        if not -1.0 <= self.slope <= 1.0:
            raise ValueError(f"Knobs.slope={self.slope} must be in [-1, 1]")
        for name in ("attention", "qkv", "fc1"):
            v = getattr(self, name)
            if not 0.0 < v < 1.0:
                raise ValueError(f"Knobs.{name}={v} must be in (0, 1)")

    def vector(self) -> List[float]:
        return list(astuple(self))

    @staticmethod
    def clipped(slope: float, attention: float, qkv: float, fc1: float) -> "Knobs":
        """The nearest knobs within the search range: slope in [-0.75, 0.75], shares in
        [0.15, 0.85] (at most about 5x or 1/5 of the uniform rank per module; wider ranges
        starved whole module kinds to rank 1 in a first tiny-UMM run)."""
        share = lambda v: min(0.85, max(0.15, v))  # noqa: E731
        return Knobs(min(0.75, max(-0.75, slope)), share(attention), share(qkv), share(fc1))


class Module(NamedTuple):
    name: str
    """Canonical name (global layer indices)."""
    cost: int
    """Parameters per rank: in + K out on full shapes."""
    max_rank: int
    """The built rank (a mask cannot exceed it)."""


def position(name: str):
    """(stack, layer index, module kind) of a canonical module name; modules outside a layer
    stack are layer 0 of a stack of their own."""
    m = _LAYER.match(name)
    kind = name.rsplit(".", 1)[-1]
    if not m:
        return name, 0, kind
    return m.group(1), int(m.group(2)), kind


def weights(knobs: Knobs, names: Sequence[str]) -> Dict[str, float]:
    pos = {n: position(n) for n in names}
    depth: Dict[str, int] = {}
    for stack, layer, _ in pos.values():
        depth[stack] = max(depth.get(stack, 0), layer + 1)
    out = {}
    for n, (stack, layer, kind) in pos.items():
        span = depth[stack] - 1
        w = 1.0 + knobs.slope * (2.0 * layer / span - 1.0) if span else 1.0
        if kind in ATTENTION:
            w *= 2 * knobs.attention * 2 * (knobs.qkv if kind == "linear_qkv" else 1 - knobs.qkv)
        elif kind in MLP:
            w *= 2 * (1 - knobs.attention) * 2 * (knobs.fc1 if kind == "linear_fc1"
                                                 else 1 - knobs.fc1)
        out[n] = max(w, 1e-6)
    return out


def uniform_budget(modules: Sequence[Module], rank: int) -> int:
    return rank * sum(m.cost for m in modules)


def ranks_for(knobs: Knobs, modules: Sequence[Module], budget: int, r_min: int = 1
              ) -> Dict[str, int]:
    """Integer ranks for every module, within ``budget`` (see the module docstring)."""
    if not modules:
        return {}
    floor_cost = sum(min(r_min, m.max_rank) * m.cost for m in modules)
    if floor_cost > budget:
        raise ValueError(f"budget {budget:,} is below the {floor_cost:,} parameters of every "
                         f"module at hydra.r_min={r_min}: raise the budget or lower r_min")
    w = weights(knobs, [m.name for m in modules])
    lo_r = {m.name: min(r_min, m.max_rank) for m in modules}

    def real(lam):
        return {m.name: min(m.max_rank, max(lo_r[m.name], lam * w[m.name])) for m in modules}

    def cost(r):
        return sum(r[m.name] * m.cost for m in modules)

    lo, hi = 0.0, max(m.max_rank / w[m.name] for m in modules)
    if cost(real(hi)) <= budget:
        lo = hi
    else:
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if cost(real(mid)) <= budget else (lo, mid)
    target = real(lo)
    ranks = {n: int(math.floor(v + 1e-9)) for n, v in target.items()}
    left = budget - cost(ranks)
    order = sorted(modules, key=lambda m: (-(target[m.name] - ranks[m.name]), m.name))
    grew = True
    while grew:  # top up, largest remainder first, while a rank still fits
        grew = False
        for m in order:
            if ranks[m.name] < m.max_rank and m.cost <= left:
                ranks[m.name] += 1
                left -= m.cost
                grew = True
                if left < min(x.cost for x in modules):
                    return ranks
        order = sorted(order, key=lambda m: (ranks[m.name] / w[m.name], m.name))
    return ranks


def parameters(ranks: Dict[str, int], modules: Sequence[Module]) -> int:
    cost = {m.name: m.cost for m in modules}
    return sum(k * cost[n] for n, k in ranks.items())


def step_toward(current: Dict[str, int], target: Dict[str, int], modules: Sequence[Module],
                budget: int, max_change: int) -> Dict[str, int]:
    """Move each module's rank from ``current`` toward ``target`` by at most ``max_change``
    (0: all the way): decreases first, then increases, largest gap first, while the budget
    allows. Within the budget whenever ``current`` is. Gradual moves keep truncations small
    (one rank drops the smallest singular direction of a module's update)."""
    limit = max_change if max_change > 0 else 10 ** 9
    out = {n: max(target[n], k - limit) if target[n] < k else k for n, k in current.items()}
    cost = {m.name: m.cost for m in modules}
    left = budget - sum(out[n] * cost[n] for n in out)
    for n in sorted(out, key=lambda n: (-(target[n] - out[n]), n)):
        want = min(target[n], current[n] + limit) - out[n]
        if want > 0:
            grow = min(want, left // cost[n])
            out[n] += grow
            left -= grow * cost[n]
    return out

"""Combination weights of K objective gradients from their Gram matrix, per parameter group.

Every rule returns weights w (one per objective) so that the update direction is
d = sum_k w_k g_k; only the K x K Gram matrix M = [<g_i, g_j>] is needed, never the gradients.

- ``min_norm_weights``: MGDA's min-norm point of the convex hull, argmin_{a in simplex} a'Ma.
  K = 1, 2 in closed form; K >= 3 exactly, by enumerating the 2^K - 1 supports: on each, the
  stationary point of a'Ma with sum a = 1 solves one (K+1) x (K+1) bordered KKT system (all
  supports in one batched float64 solve, after scaling each gradient to unit norm so that
  norms spread over 1e4 cost no accuracy). Supports whose system is singular (affinely
  dependent gradients, e.g. rank-deficient M) are skipped: an optimum always lies on a
  support whose system is regular (a vertex of the optimal set), so nothing is lost. Of the
  candidates that pass the check below, the one with the lowest a'Ma is returned (ties: the
  first support in enumeration order, so the result is deterministic when the minimiser is
  not unique). Cost: 2^K small solves, ~1 ms per call for K = 3 and ~2 ms for K = 8 on one
  CPU thread; K > ``MAX_EXACT_K`` is refused (the trainer has K <= 3).
- Every result is checked (``check_min_norm``): a in the simplex and, for every objective j,
  (Ma)_j >= a'Ma - tol_j, i.e. <d, g_j> >= |d|^2 (MGDA's common-descent property, which is
  also the KKT condition and bounds a'Ma - min by 2 max_j tol_j). tol_j = 64 K eps N (|g_j| +
  sum_i a_i |g_i|), N the largest gradient norm: float64 rounding of such inner products. A
  failure raises (a bug), it never returns a wrong point.
- ``pcgrad_weights``: PCGrad (Yu et al. 2020) in coefficient form: each projected gradient is a
  combination of the original ones, so <pc_i, g_j> = c_i' M e_j.
- ``integrate``: Pareto LoRA's rule per group: objectives conflict (some cosine below
  ``conflict``, 0 in the paper) -> the MGDA combination; else the norms differ by more than
  ``tau`` -> rescale each to the mean norm; else the plain sum. Then (``restore``) scale so
  the direction is not shorter than the plain sum, except at a Pareto-stationary group
  (below). Baselines: ``sum`` (vanilla LoRA), ``mgda`` everywhere, ``pcgrad``, ``fixed``,
  ``balance`` (the rescale every step); ``gradnorm``'s weights come from the engine.
MGDA weights sum to 1; they are multiplied by K so that they are on the scale of the plain sum
(weights 1), as MMPareto's 2 x (k_1, k_2) does for two objectives.

Restore at a Pareto-stationary group. When the combined direction is ~0 relative to the
gradients, |d|^2 <= ``STATIONARY_RTOL`` * N * sum_k |w_k| |g_k| (the gradients cancel: some
convex combination of them is ~0), the sign of <d, g_k> is decided by rounding, not by the
gradients (production Gram matrices come from float32 inner products, relative error ~1e-7),
and scaling d up to the plain sum's norm would move the group along noise and can raise
objectives. There is no restore then: the weights stay K * a (``restore=False``'s) and the
group takes the ~0 step that a Pareto-stationary point calls for. Above the threshold |d|^2 is
far larger than the check's tolerance (for norms spread by less than ~1e7), so the restored
direction keeps <d, g_k> > 0 for every k (``stationary``).
"""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import torch

RULES = ("pareto", "sum", "mgda", "pcgrad", "fixed", "balance", "gradnorm")
FIRED = ("pareto", "rescale", "sum", "mgda", "pcgrad", "fixed", "balance", "gradnorm")
"""What ``integrate`` reports per group: the rule that produced its weights."""


def _as_gram(m) -> torch.Tensor:
    m = torch.as_tensor(m, dtype=torch.float64)
    if m.dim() != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 1:
        raise ValueError(f"a Gram matrix must be K x K with K >= 1, got shape {tuple(m.shape)}")
    if not torch.isfinite(m).all():
        raise ValueError("the Gram matrix has inf/nan entries (inf/nan gradients?)")
    return 0.5 * (m + m.t())


def min_norm_2(g11: float, g12: float, g22: float) -> float:
    """Weight a on g1 minimising ||a g1 + (1 - a) g2||^2 over a in [0, 1] (closed form)."""
    if g12 >= g11:
        return 1.0
    if g12 >= g22:
        return 0.0
    return float((g22 - g12) / (g11 + g22 - 2.0 * g12))


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection onto {a >= 0, sum a = 1} (sort-based, Duchi et al. 2008)."""
    u, _ = torch.sort(v, descending=True)
    css = torch.cumsum(u, 0) - 1.0
    idx = torch.arange(1, v.numel() + 1, dtype=v.dtype)
    rho = int(torch.nonzero(u - css / idx > 0).max())
    return (v - css[rho] / (rho + 1)).clamp_min(0.0)


MAX_EXACT_K = 20
"""Largest K ``min_norm_weights`` accepts: it enumerates 2^K - 1 supports (K = 20: ~1e6)."""
STATIONARY_RTOL = 1e-6
"""|d|^2 below this times N * sum_k |w_k| |g_k|: a Pareto-stationary group, not restored."""
_KKT_C = 64.0  # certificate tolerance in units of K * eps * (inner-product scale)
_NEG_TOL = 1e-9  # weights this negative are rounding of a zero weight; the check has the last word
_CHUNK = 4096  # supports per batched solve: bounds memory at ~(K+1)^2 * 32 KiB


def _row_scales(m: torch.Tensor) -> torch.Tensor:
    """s_j = N |g_j| (N the largest norm): the size of any <g_i, g_j>, hence of the rounding in
    (Ma)_j; max |M_ji| guards inputs that are not quite a Gram matrix (float32 noise)."""
    n = m.diagonal().clamp_min(0).sqrt()
    return torch.maximum(n * n.max(), m.abs().amax(1))


def _kkt_excess(m: torch.Tensor, a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """For candidates a [C, K]: (a'Ma - (Ma)_j - tol_j [C, K], a'Ma [C]); a candidate is
    certified when every entry is <= 0 (the MGDA property up to rounding)."""
    ma = a @ m  # M is symmetric
    obj = (a * ma).sum(1)
    s = _row_scales(m)
    # rounding of (Ma)_j scales with s_j, that of a'Ma (an a-weighted mean) with a's
    tol = _KKT_C * m.shape[0] * torch.finfo(torch.float64).eps * (s + (a @ s).unsqueeze(1))
    return obj.unsqueeze(1) - ma - tol, obj


def check_min_norm(m, a) -> None:
    """Raise RuntimeError unless ``a`` is, up to float64 rounding, the min-norm point of the
    Gram matrix ``m``: a >= 0, sum a = 1 and (Ma)_j >= a'Ma for every j (KKT, i.e. the MGDA
    property <d, g_j> >= |d|^2 of d = sum_i a_i g_i)."""
    _check(_as_gram(m), torch.as_tensor(a, dtype=torch.float64))


def _check(m: torch.Tensor, a: torch.Tensor) -> None:
    if (a.shape != (m.shape[0],) or not torch.isfinite(a).all() or (a < 0).any()
            or abs(float(a.sum()) - 1.0) > 1e-12):
        raise RuntimeError(f"min-norm weights {a.tolist()} are not in the simplex (a bug)")
    excess, _ = _kkt_excess(m, a.unsqueeze(0))
    if (excess > 0).any():
        raise RuntimeError(f"min-norm weights {a.tolist()} fail the KKT / MGDA check "
                           f"(a'Ma - (Ma)_j - tol_j = {excess[0].tolist()}) on the Gram "
                           f"matrix {m.tolist()} (a bug)")


@functools.lru_cache(maxsize=32)
def _supports(k: int, start: int, stop: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Supports number start..stop-1 (bit j of the number: j in it), as the constant parts of
    their bordered systems: (masks [n, K] bool, masks of M's entries [n, K, K], identity rows
    off the support [n, K+1, K+1] with the border's corner 0). Cached: read-only."""
    ids = torch.arange(start, stop)
    mask = ((ids.unsqueeze(1) >> torch.arange(k)) & 1) == 1
    pad = torch.zeros(len(ids), k + 1, k + 1, dtype=torch.float64)
    pad[:, :k, :k] = torch.diag_embed((~mask).double())
    return mask, mask.unsqueeze(2) & mask.unsqueeze(1), pad


def _support_points(ms: torch.Tensor, inv: torch.Tensor,
                    supports: Tuple[torch.Tensor, ...]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stationary point of a'Ma subject to sum a = 1, a = 0 off the support, for each support.

    Solved in the unit-norm variables y = |g| * a (``ms`` = diag(inv) M diag(inv), inv = 1/|g|):
    [[ms_SS, c_S], [c_S', 0]] [y; -lambda] = [0; 1] with c = inv, scaled to max 1 per support
    (the scale of lambda and of sum a is free: a is normalised after). Entries off the support
    get an identity row, so every support fits one batched (K+1)^2 solve.
    Returns (a [n, K] in the simplex, usable [n] bool: regular system, a >= 0 to rounding)."""
    mask, both, pad = supports
    n, k = mask.shape
    bordered = pad.clone()
    bordered[:, :k, :k] += torch.where(both, ms, 0.0)
    c = torch.where(mask, inv, 0.0)
    c = c / c.amax(1, keepdim=True)
    bordered[:, :k, k] = c
    bordered[:, k, :k] = c
    rhs = torch.zeros(n, k + 1, dtype=torch.float64)
    rhs[:, k] = 1.0
    sol, info = torch.linalg.solve_ex(bordered, rhs)
    a = torch.where(mask, sol[:, :k] * inv, 0.0)
    total = a.sum(1, keepdim=True)
    usable = (info == 0) & torch.isfinite(a).all(1) & (total[:, 0] > 0)
    a = a / torch.where(usable.unsqueeze(1), total, 1.0)
    usable &= (a >= -_NEG_TOL).all(1)
    a = a.clamp_min(0.0)
    return a / a.sum(1, keepdim=True).clamp_min(1e-300), usable


def _min_norm_exact(m: torch.Tensor) -> torch.Tensor:
    """The certified support point with the lowest a'Ma over all 2^K - 1 supports."""
    k = m.shape[0]
    if k > MAX_EXACT_K:
        raise ValueError(f"min_norm_weights enumerates 2^K supports; K = {k} objectives is "
                         f"more than the {MAX_EXACT_K} it accepts")
    n = m.diagonal().clamp_min(0).sqrt()
    inv = torch.where(n > 0, 1.0 / n.clamp_min(1e-300), torch.ones_like(n))
    ms = m * inv.unsqueeze(1) * inv.unsqueeze(0)
    best, best_obj = None, float("inf")
    for start in range(1, 2 ** k, _CHUNK):
        a, usable = _support_points(ms, inv, _supports(k, start, min(start + _CHUNK, 2 ** k)))
        a = a[usable]
        excess, obj = _kkt_excess(m, a)
        obj = torch.where((excess <= 0).all(1), obj, torch.inf)
        if a.shape[0] and float(obj.min()) < best_obj:
            i = int(torch.argmin(obj))  # the first minimum: deterministic ties
            best, best_obj = a[i], float(obj[i])
    if best is None:  # impossible in exact arithmetic: the optimum's support is regular
        raise RuntimeError(f"no support of the Gram matrix {m.tolist()} passed the KKT check "
                           f"(a bug)")
    return best


def min_norm_weights(m) -> torch.Tensor:
    """argmin over the simplex of a'Ma (MGDA); [K] float64, sums to 1, checked (KKT)."""
    m = _as_gram(m)
    k = m.shape[0]
    if k == 1:
        a = torch.ones(1, dtype=torch.float64)
    elif k == 2:
        x = min_norm_2(float(m[0, 0]), float(m[0, 1]), float(m[1, 1]))
        a = torch.tensor([x, 1.0 - x], dtype=torch.float64)
    else:
        a = _min_norm_exact(m)
    _check(m, a)
    return a


def pcgrad_weights(m, order: Optional[Sequence[Sequence[int]]] = None) -> torch.Tensor:
    """PCGrad's final gradient sum_i pc_i as weights on the original gradients. ``order[i]``:
    the objectives pc_i is projected against, in order (default: 0..K-1; PCGrad shuffles)."""
    m = _as_gram(m)
    k = m.shape[0]
    coef = torch.eye(k, dtype=torch.float64)
    for i in range(k):
        for j in (order[i] if order is not None else range(k)):
            dot = coef[i] @ m[:, j]
            if dot < 0 and m[j, j] > 0:
                coef[i, j] -= dot / m[j, j]
    return coef.sum(0)


def _norms(m: torch.Tensor) -> torch.Tensor:
    return m.diagonal().clamp_min(0).sqrt()


def conflicts(m: torch.Tensor, threshold: float = 0.0, eps: float = 1e-12) -> bool:
    """Some pair of (non-zero) objective gradients has a cosine below ``threshold`` (0: a
    negative inner product, the paper's test)."""
    n = _norms(m)
    cos = m / (n.unsqueeze(0) * n.unsqueeze(1)).clamp_min(eps)
    return bool((cos < threshold).any())


def norm_ratio(m: torch.Tensor, eps: float = 1e-30) -> float:
    """Largest over smallest norm among the objectives with a non-zero gradient (1 if < 2)."""
    n = _norms(m)
    n = n[n > eps]
    return float(n.max() / n.min()) if n.numel() >= 2 else 1.0


def stationary(m: torch.Tensor, w: torch.Tensor) -> bool:
    """d = sum_k w_k g_k is ~0 for the gradients' scale (they cancel): |d|^2 <=
    STATIONARY_RTOL * N * sum_k |w_k| |g_k|, N the largest norm. Below that, rounding (float32
    Gram matrices: ~1e-7 relative) decides the sign of <d, g_k>, so d must not be scaled up."""
    n = _norms(m)
    return float(w @ m @ w) <= STATIONARY_RTOL * float(n.max()) * float(w.abs() @ n)


def integrate_one(m, rule: str = "pareto", tau: float = 10.0, restore: bool = True,
                  fixed: Optional[Sequence[float]] = None,
                  order: Optional[Sequence[Sequence[int]]] = None, *,
                  conflict: float = 0.0) -> Tuple[torch.Tensor, str]:
    """(weights [K] float64, the rule that fired) for one group's Gram matrix ``m``;
    ``conflict``: the cosine below which rule ``pareto`` takes MGDA's combination."""
    m = _as_gram(m)
    k = m.shape[0]
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {RULES}")
    if rule == "fixed":
        if fixed is None or len(fixed) != k:
            raise ValueError(f"rule 'fixed' needs {k} weights, got {fixed!r}")
        return torch.tensor([float(x) for x in fixed], dtype=torch.float64), "fixed"
    if rule == "gradnorm":
        raise ValueError("rule 'gradnorm' learns its weights over steps: the Pareto engine "
                         "supplies them (megalora.pareto.gradnorm), not the Gram matrix alone")
    ones = torch.ones(k, dtype=torch.float64)
    if rule == "sum":
        return ones, "sum"
    if rule == "pcgrad":
        return pcgrad_weights(m, order), "pcgrad"
    if rule == "mgda" or (rule == "pareto" and conflicts(m, conflict)):
        w, fired = k * min_norm_weights(m), "mgda" if rule == "mgda" else "pareto"
    elif rule == "balance" or norm_ratio(m) > tau:
        n = _norms(m)
        live = n > 1e-30
        w = torch.where(live, n[live].mean() / n.clamp_min(1e-300), ones)
        fired = "balance" if rule == "balance" else "rescale"
    else:
        return ones, "sum"
    if restore and not stationary(m, w):
        plain, mine = float(ones @ m @ ones), float(w @ m @ w)
        if plain > mine:
            w = w * (plain / mine) ** 0.5
    return w, fired


def integrate(gram, rule: str = "pareto", tau: float = 10.0, restore: bool = True,
              fixed: Optional[Sequence[float]] = None,
              orders: Optional[List[Sequence[Sequence[int]]]] = None, *,
              conflict: float = 0.0) -> Tuple[torch.Tensor, List[str]]:
    """``integrate_one`` for every group of ``gram`` [G, K, K]: ([G, K] weights, G rule names)."""
    gram = torch.as_tensor(gram, dtype=torch.float64)
    if gram.dim() != 3:
        raise ValueError(f"gram must be [groups, K, K], got shape {tuple(gram.shape)}")
    out, fired = [], []
    for g in range(gram.shape[0]):
        w, f = integrate_one(gram[g], rule, tau, restore, fixed,
                             orders[g] if orders is not None else None, conflict=conflict)
        out.append(w)
        fired.append(f)
    return torch.stack(out), fired

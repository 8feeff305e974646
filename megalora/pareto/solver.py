"""Combination weights of K objective gradients from their Gram matrix, per parameter group.

Every rule returns weights w (one per objective) so that the update direction is
d = sum_k w_k g_k; only the K x K Gram matrix M = [<g_i, g_j>] is needed, never the gradients.

- ``min_norm_weights``: MGDA's min-norm point of the convex hull, argmin_{a in simplex} a'Ma.
  K = 2 in closed form; K > 2 by projected gradient descent on the simplex (step 1/L) and then
  an exact solve of the KKT system on the support it found (machine precision where the support
  is right, which the KKT check confirms; otherwise the iterate is kept).
- ``pcgrad_weights``: PCGrad (Yu et al. 2020) in coefficient form: each projected gradient is a
  combination of the original ones, so <pc_i, g_j> = c_i' M e_j.
- ``integrate``: Pareto LoRA's rule per group: objectives conflict (some cosine < 0) -> the
  MGDA combination; else the norms differ by more than ``tau`` -> rescale each to the mean
  norm; else the plain sum. Then (``restore``) scale so the direction is not shorter than the
  plain sum. Baselines: ``sum`` (vanilla LoRA), ``mgda`` everywhere, ``pcgrad``, ``fixed``.
MGDA weights sum to 1; they are multiplied by K so that they are on the scale of the plain sum
(weights 1), as MMPareto's 2 x (k_1, k_2) does for two objectives.
"""

from __future__ import annotations

import itertools
from typing import List, Optional, Sequence, Tuple

import torch

RULES = ("pareto", "sum", "mgda", "pcgrad", "fixed")
FIRED = ("pareto", "rescale", "sum", "mgda", "pcgrad", "fixed")
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


def _kkt_polish(m: torch.Tensor, a: torch.Tensor, tol: float) -> torch.Tensor:
    """Solve min a'Ma, sum a = 1 exactly on the support of ``a``; keep it if it is feasible and
    optimal (every coordinate's gradient (Ma)_j >= a'Ma, with equality on the support)."""
    support = (a > tol).nonzero().flatten()
    sub = m[support][:, support]
    ones = torch.ones(len(support), dtype=m.dtype)
    try:
        x = torch.linalg.solve(sub, ones)
    except RuntimeError:  # singular on the support: several optima, the iterate is one
        return a
    if x.sum() <= 0:
        return a
    cand = torch.zeros_like(a)
    cand[support] = x / x.sum()
    value = cand @ m @ cand
    scale = max(float(m.diagonal().abs().max()), 1e-300)
    if (cand >= 0).all() and ((m @ cand) >= value - 1e-9 * scale).all():
        return cand
    return a


def min_norm_weights(m, max_iter: int = 5000, tol: float = 1e-14) -> torch.Tensor:
    """argmin over the simplex of a'Ma (MGDA); [K] float64, sums to 1."""
    m = _as_gram(m)
    k = m.shape[0]
    if k == 1:
        return torch.ones(1, dtype=torch.float64)
    if k == 2:
        a = min_norm_2(float(m[0, 0]), float(m[0, 1]), float(m[1, 1]))
        return torch.tensor([a, 1.0 - a], dtype=torch.float64)
    # start at the best pair (as MGDA's solver does), then projected gradient with step 1/L
    best, a = None, None
    for i, j in itertools.combinations(range(k), 2):
        x = min_norm_2(float(m[i, i]), float(m[i, j]), float(m[j, j]))
        cand = torch.zeros(k, dtype=torch.float64)
        cand[i], cand[j] = x, 1.0 - x
        value = float(cand @ m @ cand)
        if best is None or value < best:
            best, a = value, cand
    lipschitz = float(torch.linalg.eigvalsh(m).max())
    if lipschitz <= 0:
        return a
    for _ in range(max_iter):
        nxt = project_simplex(a - (m @ a) / lipschitz)
        if float((nxt - a).abs().sum()) < tol:
            a = nxt
            break
        a = nxt
    return _kkt_polish(m, a, 1e-10)


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


def conflicts(m: torch.Tensor, eps: float = 1e-12) -> bool:
    """Some pair of (non-zero) objective gradients has a negative inner product."""
    n = _norms(m)
    cos = m / (n.unsqueeze(0) * n.unsqueeze(1)).clamp_min(eps)
    return bool((cos < 0).any())


def norm_ratio(m: torch.Tensor, eps: float = 1e-30) -> float:
    """Largest over smallest norm among the objectives with a non-zero gradient (1 if < 2)."""
    n = _norms(m)
    n = n[n > eps]
    return float(n.max() / n.min()) if n.numel() >= 2 else 1.0


def integrate_one(m, rule: str = "pareto", tau: float = 10.0, restore: bool = True,
                  fixed: Optional[Sequence[float]] = None,
                  order: Optional[Sequence[Sequence[int]]] = None) -> Tuple[torch.Tensor, str]:
    """(weights [K] float64, the rule that fired) for one group's Gram matrix ``m``."""
    m = _as_gram(m)
    k = m.shape[0]
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {RULES}")
    if rule == "fixed":
        if fixed is None or len(fixed) != k:
            raise ValueError(f"rule 'fixed' needs {k} weights, got {fixed!r}")
        return torch.tensor([float(x) for x in fixed], dtype=torch.float64), "fixed"
    ones = torch.ones(k, dtype=torch.float64)
    if rule == "sum":
        return ones, "sum"
    if rule == "pcgrad":
        return pcgrad_weights(m, order), "pcgrad"
    if rule == "mgda" or conflicts(m):
        w, fired = k * min_norm_weights(m), "mgda" if rule == "mgda" else "pareto"
    elif norm_ratio(m) > tau:
        n = _norms(m)
        live = n > 1e-30
        w = torch.where(live, n[live].mean() / n.clamp_min(1e-300), ones)
        fired = "rescale"
    else:
        return ones, "sum"
    if restore:
        plain, mine = float(ones @ m @ ones), float(w @ m @ w)
        if mine > 0 and plain > mine:
            w = w * (plain / mine) ** 0.5
    return w, fired


def integrate(gram, rule: str = "pareto", tau: float = 10.0, restore: bool = True,
              fixed: Optional[Sequence[float]] = None,
              orders: Optional[List[Sequence[Sequence[int]]]] = None
              ) -> Tuple[torch.Tensor, List[str]]:
    """``integrate_one`` for every group of ``gram`` [G, K, K]: ([G, K] weights, G rule names)."""
    gram = torch.as_tensor(gram, dtype=torch.float64)
    if gram.dim() != 3:
        raise ValueError(f"gram must be [groups, K, K], got shape {tuple(gram.shape)}")
    out, fired = [], []
    for g in range(gram.shape[0]):
        w, f = integrate_one(gram[g], rule, tau, restore, fixed,
                             orders[g] if orders is not None else None)
        out.append(w)
        fired.append(f)
    return torch.stack(out), fired

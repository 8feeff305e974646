"""MARS's two scaling laws, fitted with scipy, and the balance between modules.

Performance law (validation loss of a rank pair at data size D):

    L(r_v, r_l, D) = A / (r_v^a_v  r_l^a_l  D^b) + E          A, E, a_v, a_l, b > 0

Convergence law (steps module m needs to converge at rank r and data size D):

    t_m(r, D) = k_m r^gamma_m D^delta_m                        k_m > 0, gamma, delta free

Both are fitted as in the MARS reference code: mean Huber loss of the residuals, L-BFGS-B from
a grid of starting points, the best converged fit kept. Two choices of ours, for conditioning:
the performance law's A and E are fitted through their logarithms (so positivity is the
parameterisation, not a bound) with residuals relative to the observed loss; the convergence
law is fitted on log t (a multiplicative law: its Huber loss then treats a 10 % miss the same
at 20 steps and at 2000). Goodness of fit: R^2 and the largest relative error on the probes.

Balance (``t_v = t_l``), solved for the vision rank given the LLM rank:

    r_v* = (k_l / k_v  D^(delta_l - delta_v)  r_l^gamma_l)^(1 / gamma_v)

(the reference code's ``r_l^(gamma_l/gamma_v)`` is the special case k_v = k_l, delta_v =
delta_l). It has no real solution when gamma_v is ~0; ``balanced_vision_rank`` returns None.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np


class FitError(ValueError):
    """Probe data that cannot determine a law (too few points, non-positive values, one rank)."""


@dataclass(frozen=True)
class FitQuality:
    r2: float
    """Coefficient of determination on the fitted scale (loss; log steps)."""
    max_rel_error: float
    """Largest |prediction - observation| / observation over the probes."""
    n: int


@dataclass(frozen=True)
class PerformanceLaw:
    A: float
    E: float
    a_v: float
    a_l: float
    b: float
    quality: Optional[FitQuality] = None

    def predict(self, r_v, r_l, d):
        r_v, r_l, d = (np.asarray(x, dtype=np.float64) for x in (r_v, r_l, d))
        return self.A / (r_v ** self.a_v * r_l ** self.a_l * d ** self.b) + self.E


@dataclass(frozen=True)
class ConvergenceLaw:
    k: float
    gamma: float
    delta: float
    quality: Optional[FitQuality] = None

    def predict(self, r, d):
        r, d = np.asarray(r, dtype=np.float64), np.asarray(d, dtype=np.float64)
        return self.k * r ** self.gamma * d ** self.delta


EXPONENT_BOUNDS = (1e-9, 5.0)
"""Where the performance law's exponents a_v, a_l and b may lie (a fit at a bound says the
data did not pin that exponent down)."""


def _huber(residual: np.ndarray, delta: float) -> float:
    a = np.abs(residual)
    return float(np.mean(np.where(a <= delta, 0.5 * a * a, delta * (a - 0.5 * delta))))


def _check(points: np.ndarray, columns: int, what: str, min_points: int) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != columns:
        raise FitError(f"{what}: expected rows of {columns} numbers, got shape {points.shape}")
    if len(points) < min_points:
        raise FitError(f"{what}: {len(points)} probes, need at least {min_points} (one more "
                       "than the law's parameters); add ranks or data sizes to the grid")
    if not np.all(np.isfinite(points)) or np.any(points <= 0):
        bad = points[~np.all(np.isfinite(points) & (points > 0), axis=1)][0]
        raise FitError(f"{what}: every rank, data size and observation must be a positive "
                       f"number, got the row {bad.tolist()}")
    return points


def _distinct(points: np.ndarray, column: int, what: str, name: str) -> None:
    if len(np.unique(points[:, column])) < 2:
        raise FitError(f"{what}: all probes have the same {name}; its exponent is not "
                       f"determined (use at least two values of {name})")


def _minimize(objective, starts, bounds=None, options=None):
    from scipy.optimize import minimize

    best = None
    for x0 in starts:
        res = minimize(objective, np.asarray(x0, dtype=np.float64), method="L-BFGS-B",
                       bounds=bounds, options=options or {"maxiter": 5000, "ftol": 1e-12,
                                                          "gtol": 1e-10})
        if np.isfinite(res.fun) and (best is None or res.fun < best.fun):
            best = res
    if best is None:
        raise FitError("no starting point gave a finite fit")
    return best


def _quality(pred: np.ndarray, obs: np.ndarray, fitted_scale) -> FitQuality:
    p, o = fitted_scale(pred), fitted_scale(obs)
    ss_res, ss_tot = float(np.sum((p - o) ** 2)), float(np.sum((o - o.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
    return FitQuality(r2=r2, max_rel_error=float(np.max(np.abs(pred - obs) / obs)),
                      n=len(obs))


def fit_performance(points: Sequence[Tuple[float, float, float, float]],
                    huber_delta: float = 1e-2) -> PerformanceLaw:
    """``points``: rows (r_v, r_l, D, loss)."""
    what = "performance law"
    pts = _check(points, 4, what, 6)
    for col, name in ((0, "vision rank"), (1, "LLM rank"), (2, "data size")):
        _distinct(pts, col, what, name)
    rv, rl, d, loss = pts.T
    lrv, lrl, ld = np.log(rv), np.log(rl), np.log(d)

    def objective(x):
        log_a, log_e, a_v, a_l, b = x
        with np.errstate(over="ignore", invalid="ignore"):
            pred = np.exp(log_a - a_v * lrv - a_l * lrl - b * ld) + np.exp(log_e)
        if not np.all(np.isfinite(pred)):
            return 1e12
        return _huber((pred - loss) / loss, huber_delta)

    lo = float(loss.min())
    starts = [(math.log(max(float(loss.max()) - e * lo, 1e-6)) + g * ld.mean(), math.log(e * lo),
               av, al, g)
              for e, av, al, g in itertools.product((0.3, 0.8), (0.1, 0.4), (0.1, 0.4),
                                                     (0.15, 0.5))]
    bounds = [(None, None), (None, None), *[EXPONENT_BOUNDS] * 3]
    res = _minimize(objective, starts, bounds)
    log_a, log_e, a_v, a_l, b = res.x
    law = PerformanceLaw(math.exp(log_a), math.exp(log_e), a_v, a_l, b)
    quality = _quality(law.predict(rv, rl, d), loss, lambda x: x)
    return PerformanceLaw(law.A, law.E, a_v, a_l, b, quality)


def fit_convergence(points: Sequence[Tuple[float, float, float]],
                    huber_delta: float = 0.1) -> ConvergenceLaw:
    """``points``: rows (r, D, steps)."""
    what = "convergence law"
    pts = _check(points, 3, what, 4)
    _distinct(pts, 0, what, "rank")
    _distinct(pts, 1, what, "data size")
    r, d, t = pts.T
    lr, ld, lt = np.log(r), np.log(d), np.log(t)

    def objective(x):
        return _huber(x[0] + x[1] * lr + x[2] * ld - lt, huber_delta)

    starts = [(math.log(k), g, dl) for k, g, dl in
              itertools.product((1.0, 100.0, 5000.0), (-1.0, 0.1, 0.5, 1.5), (-0.5, 0.1, 1.0))]
    res = _minimize(objective, starts)
    law = ConvergenceLaw(math.exp(res.x[0]), float(res.x[1]), float(res.x[2]))
    quality = _quality(law.predict(r, d), t, np.log)
    return ConvergenceLaw(law.k, law.gamma, law.delta, quality)


def balanced_vision_rank(vision: ConvergenceLaw, llm: ConvergenceLaw, r_l: float,
                         d: float) -> Optional[float]:
    """The vision rank whose convergence time equals the LLM's at rank ``r_l`` (closed form);
    None when there is no finite positive solution (gamma_v ~ 0)."""
    if abs(vision.gamma) < 1e-6:
        return None
    log_r = (math.log(llm.k / vision.k) + (llm.delta - vision.delta) * math.log(d)
             + llm.gamma * math.log(r_l)) / vision.gamma
    if not math.isfinite(log_r) or abs(log_r) > 700:
        return None
    return math.exp(log_r)


def snap(value: float, menu: Sequence[int]) -> int:
    """The menu entry nearest to ``value`` on a log scale (ranks are chosen in powers of 2)."""
    return min(menu, key=lambda r: (abs(math.log(r) - math.log(value)), r))

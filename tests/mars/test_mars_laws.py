"""MARS's law fitting against data generated from known laws (with noise), the balance's closed
form against a numeric solve, pruning/choice under a budget, and the clear errors for inputs
that cannot determine a law."""

import itertools
import math

import numpy as np
import pytest

from megalora.mars.laws import (ConvergenceLaw, FitError, FitQuality, PerformanceLaw,
                                balanced_vision_rank, fit_convergence, fit_performance, snap)
from megalora.mars.search import Fits, all_pairs, candidates, choose

RANKS = (1, 2, 4, 8, 16)
SIZES = (32, 64, 128, 256, 512)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_performance_law_recovers_exponents(seed):
    """1 % multiplicative noise: exponents within 0.03, E within 3 %."""
    rng = np.random.default_rng(seed)
    true = PerformanceLaw(A=rng.uniform(5, 50), E=rng.uniform(0.2, 1.0),
                          a_v=rng.uniform(0.05, 0.4), a_l=rng.uniform(0.1, 0.6),
                          b=rng.uniform(0.1, 0.5))
    points = [(rv, rl, d, float(true.predict(rv, rl, d)) * (1 + 0.01 * rng.standard_normal()))
              for rv, rl, d in itertools.product((1, 4, 16), (2, 8, 32), (32, 128, 512))]
    fit = fit_performance(points)
    assert abs(fit.a_v - true.a_v) < 0.03 and abs(fit.a_l - true.a_l) < 0.03
    assert abs(fit.b - true.b) < 0.03 and abs(fit.E - true.E) / true.E < 0.03
    assert fit.quality.r2 > 0.98 and fit.quality.max_rel_error < 0.05 and fit.quality.n == 27


@pytest.mark.parametrize("gamma, delta", [(0.6, 0.4), (-0.3, 0.8), (1.2, -0.2)])
def test_convergence_law_recovers_exponents(gamma, delta):
    """5 % multiplicative noise and one 3x outlier (Huber): exponents within 0.05."""
    rng = np.random.default_rng(7)
    true = ConvergenceLaw(k=3.0, gamma=gamma, delta=delta)
    points = [(r, d, float(true.predict(r, d)) * math.exp(0.05 * rng.standard_normal()))
              for r, d in itertools.product(RANKS, SIZES)]
    points[3] = (points[3][0], points[3][1], points[3][2] * 3.0)  # one bad probe
    fit = fit_convergence(points)
    assert abs(fit.gamma - gamma) < 0.05 and abs(fit.delta - delta) < 0.05
    assert abs(math.log(fit.k / true.k)) < 0.3
    assert fit.quality.n == len(points)


def test_noise_free_fits_are_exact():
    true = ConvergenceLaw(k=12.0, gamma=0.7, delta=0.3)
    fit = fit_convergence([(r, d, float(true.predict(r, d))) for r in RANKS for d in SIZES])
    assert fit.gamma == pytest.approx(0.7, abs=1e-5) and fit.delta == pytest.approx(0.3, abs=1e-5)
    assert fit.quality.r2 == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("d", [32.0, 1000.0])
def test_balance_closed_form_matches_numeric_solve(d):
    from scipy.optimize import brentq

    vision = ConvergenceLaw(k=40.0, gamma=0.8, delta=0.2)
    llm = ConvergenceLaw(k=15.0, gamma=0.5, delta=0.45)
    for r_l in (1, 4, 16, 64):
        closed = balanced_vision_rank(vision, llm, r_l, d)
        t_l = float(llm.predict(r_l, d))
        numeric = brentq(lambda r, t_l=t_l: float(vision.predict(r, d)) - t_l, 1e-9, 1e9,
                         xtol=1e-14, rtol=1e-13)
        assert closed == pytest.approx(numeric, rel=1e-9)
        assert float(vision.predict(closed, d)) == pytest.approx(t_l, rel=1e-9)
    # the reference code's simplification: k_v = k_l and delta_v = delta_l
    same = ConvergenceLaw(k=15.0, gamma=0.8, delta=0.45)
    assert balanced_vision_rank(same, llm, 16, d) == pytest.approx(16 ** (0.5 / 0.8))
    assert balanced_vision_rank(ConvergenceLaw(1.0, 0.0, 0.1), llm, 4, d) is None


def test_snap_and_choice_under_budget():
    assert snap(5.0, [1, 2, 4, 8]) == 4 and snap(6.0, [1, 2, 4, 8]) == 8  # log scale
    perf = PerformanceLaw(A=10.0, E=0.5, a_v=0.2, a_l=0.3, b=0.3)
    fits = Fits(perf, ConvergenceLaw(10.0, 1.0, 0.0), ConvergenceLaw(10.0, 1.0, 0.0))
    count = lambda rv, rl: 100 * rv + 300 * rl  # noqa: E731
    cands, fallbacks = candidates(fits, [1, 2, 4, 8], [1, 2, 4, 8], 100, count, budget=1700)
    assert fallbacks == 0 and [(c.r_v, c.r_l) for c in cands] == [(1, 1), (2, 2), (4, 4), (8, 8)]
    assert [c.within_budget for c in cands] == [True, True, True, False]
    assert choose(cands, 1700, fits, [1, 2, 4, 8], 100, count)[0] == (4, 4)  # largest within
    with pytest.raises(FitError, match="smallest needs 400"):
        choose(cands, 100, fits, [1, 2, 4, 8], 100, count)
    # nothing balanced: the best uniform pair within the budget, never one over it
    assert choose([], 1700, fits, [1, 2, 4, 8], 100, count)[0] == (4, 4)
    with pytest.raises(FitError, match="no uniform pair"):
        choose([], 300, fits, [1, 2, 4, 8], 100, count)


def test_over_budget_balance_is_clipped_to_the_budget():
    perf = PerformanceLaw(A=10.0, E=0.5, a_v=0.2, a_l=0.3, b=0.3)
    # t_v = 10 r_v, t_l = 20 r_l: the balanced vision rank is 2 r_l
    fits = Fits(perf, ConvergenceLaw(10.0, 1.0, 0.0), ConvergenceLaw(20.0, 1.0, 0.0))
    count = lambda rv, rl: 100 * rv + 300 * rl  # noqa: E731
    cands, _ = candidates(fits, [1, 2, 4, 8], [1, 2, 4, 8], 100, count, budget=1700)
    # (8, 4) needs 2,000 -> the largest smaller vision rank that fits, 4; (8, 8) cannot fit
    assert [(c.r_v, c.r_l) for c in cands] == [(2, 1), (4, 2), (4, 4), (8, 8)]
    assert [c.within_budget for c in cands] == [True, True, True, False]
    assert cands[2].r_v_balanced == pytest.approx(8.0)
    assert choose(cands, 1700, fits, [1, 2, 4, 8], 100, count)[0] == (4, 4)


def test_untrusted_balance_chooses_by_the_performance_law_over_every_pair():
    perf = PerformanceLaw(A=10.0, E=0.5, a_v=0.2, a_l=0.3, b=0.3)
    good, poor = FitQuality(0.9, 0.05, 6), FitQuality(0.3, 0.4, 6)
    trusted = Fits(perf, ConvergenceLaw(10.0, 1.0, 0.0, good), ConvergenceLaw(20.0, 1.0, 0.0, good))
    assert trusted.balance_problem(0.5) is None
    weak = Fits(perf, trusted.vision, ConvergenceLaw(20.0, 1.0, 0.0, poor))
    assert weak.balance_problem(0.5) == "llm convergence law R^2 0.30 < 0.5"
    assert weak.balance_problem(0.2) is None
    missing = Fits(perf, None, trusted.llm, {"vision": "4 probes, need at least 4"})
    assert missing.balance_problem(0.5) == "vision convergence: 4 probes, need at least 4"
    menu, count = [1, 2, 4, 8], (lambda rv, rl: 100 * rv + 300 * rl)  # noqa: E731
    cands = all_pairs(weak, menu, menu, 100, count, budget=1700)
    assert len(cands) == 16 and all(math.isnan(c.r_v_balanced) for c in cands)
    brute = min(((float(perf.predict(rv, rl, 100)), rv, rl) for rv, rl in
                 itertools.product(menu, menu) if count(rv, rl) <= 1500))
    choice, why = choose(cands, 1500, weak, menu, 100, count, weak.balance_problem(0.5))
    assert choice == brute[1:] == (8, 2) and "balance not used: llm convergence law R^2" in why
    with pytest.raises(FitError, match="no menu pair fits the budget of 300"):
        choose(cands, 300, weak, menu, 100, count, "x")


@pytest.mark.parametrize("points, message", [
    ([(1, 2, 32, 1.0)] * 3, "3 probes, need at least 6"),
    ([(1, 2, d, 1.0) for d in SIZES] + [(2, 2, 32, 1.0)], "same LLM rank"),
    ([(1, 2, 32, 1.0), (2, 4, 32, -1.0)] + [(r, r, 64, 1.0) for r in RANKS], "positive number"),
    ([(1, 2, 32, 1.0), (2, 4, 32, float("nan"))] + [(r, r, 64, 1.0) for r in RANKS],
     "positive number"),
])
def test_performance_fit_errors(points, message):
    with pytest.raises(FitError, match=message):
        fit_performance(points)


def test_convergence_fit_errors():
    with pytest.raises(FitError, match="need at least 4"):
        fit_convergence([(1, 32, 10.0), (2, 64, 12.0)])
    with pytest.raises(FitError, match="same data size"):
        fit_convergence([(r, 32, 10.0) for r in RANKS])
    with pytest.raises(FitError, match="same rank"):
        fit_convergence([(4, d, 10.0) for d in SIZES])
    with pytest.raises(FitError, match="rows of 3 numbers"):
        fit_convergence([(1, 2), (3, 4), (5, 6), (7, 8)])
    with pytest.raises(FitError, match="positive number"):
        fit_convergence([(0, 32, 10.0), (1, 64, 10.0), (2, 32, 3.0), (4, 64, 1.0)])

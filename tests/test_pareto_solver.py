"""Pareto LoRA's weight rules against independent references: scipy's QP solver for the
min-norm point, explicit vector PCGrad, and closed forms for the rules."""

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from megalora.pareto.solver import (integrate, integrate_one, min_norm_2, min_norm_weights,
                                    pcgrad_weights, project_simplex)


def _grads(k, d, seed, conflict=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((k, d)) * rng.uniform(0.1, 10.0, (k, 1))
    if not conflict:
        x = np.abs(x)
    return torch.from_numpy(x)


def _qp(m):
    """scipy SLSQP on min a'Ma, a >= 0, sum a = 1 (the reference)."""
    k = m.shape[0]
    res = minimize(lambda a: a @ m @ a, np.full(k, 1.0 / k), jac=lambda a: 2 * m @ a,
                   bounds=[(0.0, 1.0)] * k, method="SLSQP",
                   constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1.0,
                                 "jac": lambda a: np.ones_like(a)}],
                   options={"ftol": 1e-16, "maxiter": 1000})
    assert res.success, res.message
    return res.x


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("seed", range(8))
def test_min_norm_weights_agree_with_scipy_qp(k, seed):
    g = _grads(k, 40, seed + 100 * k)
    g = g / g.norm(dim=1, keepdim=True)  # well-scaled, so the QP's tolerance means 1e-6 in a
    m = (g @ g.t()).numpy()
    ours = min_norm_weights(m).numpy()
    ref = _qp(m)
    assert abs(ours.sum() - 1) < 1e-12 and (ours >= 0).all()
    assert np.abs(ours - ref).max() < 1e-6, (ours, ref)
    assert ours @ m @ ours <= ref @ m @ ref + 1e-12


@pytest.mark.parametrize("k", [2, 3, 5])
def test_mgda_direction_does_not_increase_any_objective(k):
    for seed in range(10):
        g = _grads(k, 30, seed)
        a = min_norm_weights(g @ g.t())
        d = a @ g
        # KKT of the min-norm problem: <d, g_k> >= |d|^2 >= 0 for every objective
        assert ((g @ d) >= (d @ d) * (1 - 1e-9) - 1e-12).all(), (g @ d, d @ d)


def test_min_norm_degenerate_cases():
    assert min_norm_2(1.0, 2.0, 5.0) == 1.0          # g1 is the min-norm point
    assert min_norm_2(5.0, 2.0, 1.0) == 0.0
    assert abs(min_norm_2(1.0, -1.0, 1.0) - 0.5) < 1e-15
    g = _grads(5, 3, 0)                               # 5 gradients in 3 dims: singular M
    m = g @ g.t()
    a = min_norm_weights(m)
    ref = _qp(m.numpy())
    assert float(a @ m @ a) <= float(ref @ m.numpy() @ ref) + 1e-9
    assert torch.equal(min_norm_weights(torch.ones(1, 1)), torch.ones(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="inf/nan"):
        min_norm_weights(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="K x K"):
        min_norm_weights(torch.ones(2, 3))


def test_project_simplex_matches_qp():
    rng = np.random.default_rng(0)
    for _ in range(20):
        v = rng.standard_normal(5) * 3
        ours = project_simplex(torch.from_numpy(v)).numpy()
        ref = minimize(lambda a: ((a - v) ** 2).sum(), np.full(5, 0.2), method="SLSQP",
                       bounds=[(0, 1)] * 5, constraints=[{"type": "eq",
                                                          "fun": lambda a: a.sum() - 1}],
                       options={"ftol": 1e-14}).x
        assert np.abs(ours - ref).max() < 1e-6


def _pcgrad_vectors(g, order):
    pc = g.clone()
    for i in range(len(g)):
        for j in order[i]:
            dot = pc[i] @ g[j]
            if dot < 0:
                pc[i] = pc[i] - dot / (g[j] @ g[j]) * g[j]
    return pc.sum(0)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_pcgrad_weights_reproduce_vector_pcgrad(k):
    for seed in range(5):
        g = _grads(k, 20, seed)
        order = [list(np.random.default_rng(seed + i).permutation(k)) for i in range(k)]
        w = pcgrad_weights(g @ g.t(), order)
        assert torch.allclose(w @ g, _pcgrad_vectors(g, order), rtol=1e-10, atol=1e-12)


def test_integrate_rules_fire_as_specified():
    # conflict: the MGDA combination x K, then restored to the plain sum's norm
    g = torch.tensor([[1.0, 0.0], [-0.5, 1.0]], dtype=torch.float64)
    m = g @ g.t()
    w, fired = integrate_one(m, "pareto", restore=False)
    assert fired == "pareto"
    assert torch.allclose(w, 2 * min_norm_weights(m))
    w_r, _ = integrate_one(m, "pareto", restore=True)
    plain = g.sum(0).norm()
    assert abs(float((w_r @ g).norm()) - max(float(plain), float((w @ g).norm()))) < 1e-12
    # aligned, norms 1 and 100 > tau: each rescaled to the mean norm 50.5
    g = torch.tensor([[1.0, 0.0], [100.0, 10.0]], dtype=torch.float64)
    w, fired = integrate_one(g @ g.t(), "pareto", tau=10.0, restore=False)
    assert fired == "rescale"
    assert torch.allclose((w.unsqueeze(1) * g).norm(dim=1),
                          torch.full((2,), 0.5 * (1.0 + float(g[1].norm())),
                                     dtype=torch.float64))
    # aligned and balanced: the plain sum
    w, fired = integrate_one(g @ g.t(), "pareto", tau=1000.0)
    assert fired == "sum" and torch.equal(w, torch.ones(2, dtype=torch.float64))
    # a zero gradient (e.g. a group only text reaches) neither conflicts nor rescales
    m = torch.tensor([[4.0, 0.0], [0.0, 0.0]])
    assert integrate_one(m, "pareto", tau=2.0)[1] == "sum"
    w, fired = integrate_one(m, "fixed", fixed=[1.0, 0.25])
    assert fired == "fixed" and w.tolist() == [1.0, 0.25]


def test_integrate_per_group_and_errors():
    grams = torch.stack([torch.tensor([[1.0, -0.5], [-0.5, 1.0]]), torch.eye(2)])
    w, fired = integrate(grams, "pareto")
    assert fired == ["pareto", "sum"] and w.shape == (2, 2)
    assert integrate(grams, "mgda")[1] == ["mgda", "mgda"]
    with pytest.raises(ValueError, match="unknown rule"):
        integrate(grams, "nash")
    with pytest.raises(ValueError, match="needs 2 weights"):
        integrate(grams, "fixed", fixed=[1.0])
    with pytest.raises(ValueError, match=r"\[groups, K, K\]"):
        integrate(torch.eye(2), "sum")


def test_pareto_plot_writes_a_png(tmp_path):
    import json

    from megalora.cli import main

    rows = [{"step": s, "groups": ["layer0", "layer1", "vision", "other"],
             "norms": [[1.0, 0.1], [2.0, 0.5], [0, 0], [0, 0]], "cos": [-0.2, 0.3, 0, 0],
             "ratio": [10.0, 4.0, 1, 1], "weights": [[0.4, 1.6], [1, 1], [1, 1], [1, 1]],
             "fired": ["pareto", "sum", "sum", "sum"]} for s in (1, 2, 3)]
    (tmp_path / "pareto.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["pareto-plot", "--run", str(tmp_path)]) == 0
    png = (tmp_path / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    with pytest.raises(FileNotFoundError, match="pareto.mode=exact"):
        main(["pareto-plot", "--run", str(tmp_path / "nothing")])

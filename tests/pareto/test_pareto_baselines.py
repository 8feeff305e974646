"""The Pareto LoRA paper's baselines: ``balance`` (every group rescaled to equal norms every
step) against its closed form, and GradNorm's learned weights against an independent
implementation with torch.optim.Adam on a softmax parameter (LibMTL's form); in the trainer,
GradNorm at TP=2+SP equals one process and resumes exactly."""

import json

import pytest
import torch

from megalora.pareto.gradnorm import GradNormWeights
from megalora.pareto.solver import integrate_one


def test_balance_rescales_every_objective_to_the_mean_norm():
    # conflicting and imbalanced: balance never takes the MGDA branch
    g = torch.tensor([[3.0, 1.0, 0.0], [-0.2, 0.1, 0.5]], dtype=torch.float64)
    w, fired = integrate_one(g @ g.t(), "balance", restore=False)
    assert fired == "balance"
    mean = float(g.norm(dim=1).mean())
    assert torch.allclose((w.unsqueeze(1) * g).norm(dim=1),
                          torch.full((2,), mean, dtype=torch.float64), rtol=1e-12)
    # restored: the same direction, scaled up to the plain sum's norm when shorter
    w_r, _ = integrate_one(g @ g.t(), "balance", restore=True)
    d, d_r = w @ g, w_r @ g
    assert abs(float(d_r.norm()) - max(float(d.norm()), float(g.sum(0).norm()))) < 1e-12
    assert float(torch.nn.functional.cosine_similarity(d, d_r, dim=0)) > 1 - 1e-12
    # balanced norms ratio 1 < any tau: pareto sums, balance still rescales (to weights 1)
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    w, fired = integrate_one(g @ g.t(), "balance")
    assert fired == "balance" and torch.allclose(w, torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="engine supplies them"):
        integrate_one(g @ g.t(), "gradnorm")


def _libmtl_gradnorm(norms, losses, alpha, lr):
    """LibMTL's GradNorm step by step (torch.optim.Adam, an nn.Parameter, softmax weights)."""
    k = len(norms[0])
    scale = torch.nn.Parameter(torch.zeros(k, dtype=torch.float64))
    opt = torch.optim.Adam([scale], lr=lr)
    used, first = [], torch.tensor(losses[0], dtype=torch.float64)
    for n, loss in zip(norms, losses):
        w = k * torch.softmax(scale, 0)
        used.append(w.detach().clone())
        g = w * torch.tensor(n, dtype=torch.float64)
        r = torch.tensor(loss, dtype=torch.float64) / first
        target = (g.mean() * (r / r.mean()) ** alpha).detach()
        opt.zero_grad()
        (g - target).abs().sum().backward()
        opt.step()
    return used


@pytest.mark.parametrize("k", [2, 3])
def test_gradnorm_weights_match_an_adam_reference(k):
    gen = torch.Generator().manual_seed(k)
    norms = (torch.rand(30, k, generator=gen, dtype=torch.float64) * 5 + 0.1).tolist()
    losses = (torch.rand(30, k, generator=gen, dtype=torch.float64) + 0.2).tolist()
    ref = _libmtl_gradnorm(norms, losses, 1.5, 0.05)
    mine = GradNormWeights(k, 1.5, 0.05)
    got = []
    for i, (n, loss) in enumerate(zip(norms, losses)):
        if i == 13:  # a resume through JSON (the trainer's state.json) continues exactly
            state = json.loads(json.dumps(mine.state_dict()))
            mine = GradNormWeights(k, 1.5, 0.05)
            mine.load_state_dict(state)
        got.append(mine.step(n, loss))
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14), (a, b)
    assert abs(float(got[-1].sum()) - k) < 1e-12 and float(got[-1].std()) > 1e-3
    with pytest.raises(ValueError, match="finite"):
        mine.step([1.0] * k, [float("nan")] * k)


def test_gradnorm_raises_the_weight_of_the_weaker_gradient():
    """Equal training rates: GradNorm equalises w_k |g_k|, so the objective with the smaller
    gradient gets the larger weight (text's gradients are the larger ones on EmojiCap)."""
    gn = GradNormWeights(2, 1.5, 0.05)
    for _ in range(200):
        w = gn.step([4.0, 1.0], [1.0, 1.0])
    assert w[1] > 3 * w[0] and abs(float(w[0] * 4.0 - w[1] * 1.0)) < 0.2

"""The plain-PyTorch reference against independent formulas (float64, per-token loops, uint32)."""

import pytest
import torch

from megalora.reference import (DropoutSpec, dropout_scale_ref, dropout_uniform_ref,
                                lora_expand_ref, lora_shrink_ref, multi_b_lora_ref,
                                router_weights_ref)

M32 = 0xFFFFFFFF


def _fmix(h):
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def _uniform_python(seed, t, j):
    """The documented hash with native Python ints: an independent uint32 implementation."""
    row = _fmix((seed & M32) ^ ((t * 0x9E3779B1) & M32))
    h = _fmix(row ^ ((j * 0x85EBCA77) & M32))
    return (h >> 8) / 2 ** 24


def test_dropout_hash_matches_uint32_python():
    seeds = [0, 1, 2 ** 31 - 1, 0xDEADBEEF]
    tokens = torch.tensor([0, 1, 7, 4095, 2 ** 20 + 3, 2 ** 31 - 5])
    features = torch.tensor([0, 1, 95, 6655, 2 ** 16 + 9])
    for seed in seeds:
        got = dropout_uniform_ref(seed, tokens, features)
        want = torch.tensor([[_uniform_python(seed, int(t), int(j)) for j in features]
                             for t in tokens], dtype=torch.float32)
        assert torch.equal(got, want)


def test_dropout_blocks_tile_the_global_grid():
    """A block computed with offsets equals the same block of the whole grid (TP/SP invariance)."""
    spec = DropoutSpec(probs=(0.3,), seed=77)
    full = dropout_scale_ref(spec, 24, 40)
    block = dropout_scale_ref(DropoutSpec(probs=(0.3,), seed=77, token_offset=12,
                                          feature_offset=20), 12, 20)
    assert torch.equal(block, full[12:, 20:])


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_fraction_and_scale(p):
    scale = dropout_scale_ref(DropoutSpec(probs=(p,), seed=3), 200, 500)
    kept = (scale > 0).double().mean().item()
    n = scale.numel()
    assert abs(kept - (1 - p)) < 5 * ((p * (1 - p) / n) ** 0.5)  # 5 sigma binomial
    assert torch.allclose(scale[scale > 0], torch.tensor(1 / (1 - p)))


def test_per_head_dropout_probabilities():
    ids = torch.tensor([0, 1] * 300)
    scale = dropout_scale_ref(DropoutSpec(probs=(0.2, 0.6), seed=5), 600, 400, head_ids=ids)
    keep0 = (scale[ids == 0] > 0).double().mean().item()
    keep1 = (scale[ids == 1] > 0).double().mean().item()
    assert abs(keep0 - 0.8) < 0.01 and abs(keep1 - 0.4) < 0.01
    # head -1 tokens: probability of head 0 (their adapter output is zero anyway)
    with pytest.raises(ValueError, match="per-token head ids"):
        dropout_scale_ref(DropoutSpec(probs=(0.2, 0.6), seed=5), 4, 4)


def test_router_weights_topk_renormalised():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 5, generator=g, dtype=torch.float64)
    dense = router_weights_ref(logits)
    want = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    assert torch.allclose(dense.double(), want, atol=1e-6)
    top2 = router_weights_ref(logits, 2)
    assert torch.allclose(top2.sum(-1), torch.ones(50, dtype=top2.dtype))
    assert ((top2 > 0).sum(-1) == 2).all()
    for t in range(50):
        idx = want[t].argsort(descending=True)[:2]
        expected = want[t, idx] / want[t, idx].sum()
        assert torch.allclose(top2[t, idx].double(), expected, atol=1e-6)


def test_expand_head_ids_equals_one_hot_dense():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(23, 3, generator=g, dtype=torch.float64)
    b = torch.randn(3, 17, 3, generator=g, dtype=torch.float64)
    ids = torch.randint(-1, 3, (23,), generator=g)
    y = lora_expand_ref(s, b, 0.5, head_ids=ids)
    one_hot = torch.zeros(23, 3, dtype=torch.float64)
    one_hot[ids >= 0, ids[ids >= 0]] = 1.0
    dense = lora_expand_ref(s, b, 0.5, weights=one_hot)
    assert torch.allclose(y, dense, atol=1e-14)
    assert (y[ids == -1] == 0).all()
    with pytest.raises(ValueError, match="head_ids or weights"):
        lora_expand_ref(s, b, 1.0)


def _per_token_loop(x, w, bias, a, b, scale, ids=None, router=None, top_k=None, keep=None):
    """y[t] = W x_t + bias + scale * sum_k g_tk B_k A (keep_t * x_t), one token at a time."""
    out = []
    for t in range(x.shape[0]):
        xt = x[t] if keep is None else x[t] * keep[t]
        if router is not None:
            g = router_weights_ref((x[t] @ router.t())[None], top_k)[0].double()
        else:
            g = torch.zeros(b.shape[0], dtype=torch.float64)
            if ids is None:
                g[0] = 1.0
            elif ids[t] >= 0:
                g[ids[t]] = 1.0
        delta = sum(g[k] * (b[k] @ (a @ xt)) for k in range(b.shape[0]))
        out.append(w @ x[t] + bias + scale * delta)
    return torch.stack(out)


@pytest.mark.parametrize("mode", ["single", "modality", "router", "router_top1"])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_multi_b_lora_ref_matches_per_token_loop(mode, dropout):
    g = torch.Generator().manual_seed(2)
    T, din, dout, r, K = 13, 96, 40, 3, 3
    f64 = dict(generator=g, dtype=torch.float64)
    x, w, bias = torch.randn(T, din, **f64), torch.randn(dout, din, **f64), torch.randn(dout, **f64)
    a, b = torch.randn(r, din, **f64), torch.randn(K if mode != "single" else 1, dout, r, **f64)
    ids = torch.randint(-1, K, (T,), generator=g) if mode == "modality" else None
    router = torch.randn(K, din, **f64) if mode.startswith("router") else None
    top_k = 1 if mode == "router_top1" else None
    spec = DropoutSpec(probs=(dropout,), seed=11) if dropout else None
    got = multi_b_lora_ref(x, w, bias, a, b, 0.7, head_ids=ids, router=router, top_k=top_k,
                           dropout=spec)
    keep = dropout_scale_ref(spec, T, din).double() if spec else None
    want = _per_token_loop(x, w, bias, a, b, 0.7, ids, router, top_k, keep)
    assert torch.allclose(got, want, atol=1e-12)


def test_reference_gradients_gradcheck():
    g = torch.Generator().manual_seed(3)
    f64 = dict(generator=g, dtype=torch.float64)
    x = torch.randn(7, 10, **f64).requires_grad_()
    a = torch.randn(3, 10, **f64).requires_grad_()
    b = torch.randn(2, 6, 3, **f64).requires_grad_()
    logits = torch.randn(7, 2, **f64).requires_grad_()
    spec = DropoutSpec(probs=(0.3,), seed=1)

    def fn(x, a, b, logits):
        s = lora_shrink_ref(x, a, spec)
        return lora_expand_ref(s, b, 1.3, weights=router_weights_ref(logits).double())

    assert torch.autograd.gradcheck(fn, (x, a, b, logits))

"""The Transformer Engine path: LayerNorm-linear adapters read the post-norm activation."""

import pytest
import torch
import torch.nn.functional as F

import megalora
from fake_te import FakeTELayerNormColumnParallelLinear, FakeTELinearDuplicated
from megalora.base_layers import register_base_layer
from megalora.reference import lora_expand_ref, lora_shrink_ref
from megalora.sharding import FactorSharding, shard, unshard
from megalora.testing.dist import run_distributed

S, B, DIN, DOUT, R, K = 6, 2, 32, 24, 4, 2


def _tensors():
    g = torch.Generator().manual_seed(0)
    f = dict(generator=g, dtype=torch.float64)
    return {"x": torch.randn(S, B, DIN, **f), "w": torch.randn(DOUT, DIN, **f),
            "bias": torch.randn(DOUT, **f), "A": torch.randn(R, DIN, **f),
            "B": torch.randn(K, DOUT, R, **f), "ids": torch.randint(-1, K, (B, S), generator=g),
            "dy": torch.randn(S, B, DOUT, **f)}


def _reference(t):
    x = t["x"].clone().requires_grad_()
    a, b = t["A"].clone().requires_grad_(), t["B"].clone().requires_grad_()
    ln = F.layer_norm(x, (DIN,)).reshape(-1, DIN)
    y = ln @ t["w"].t() + t["bias"] + lora_expand_ref(lora_shrink_ref(ln, a), b, 0.5,
                                                       head_ids=t["ids"].t().reshape(-1))
    y = y.reshape(S, B, DOUT)
    (y * t["dy"]).sum().backward()
    return {"out": y.detach(), "x": x.grad, "A": a.grad, "B": b.grad}


def _run(t, tp_group, tp, rank, sp, skip_bias_add, want_ln):
    register_base_layer(FakeTELayerNormColumnParallelLinear, "column", "te_ln")
    layer = FakeTELayerNormColumnParallelLinear(DIN, DOUT, tp_group, sp,
                                                skip_bias_add=skip_bias_add,
                                                return_layernorm_output=want_ln)
    with torch.no_grad():
        layer.weight.copy_(shard(t["w"], FactorSharding(0), rank, tp))
        layer.bias.copy_(shard(t["bias"], FactorSharding(0), rank, tp))
    holder = torch.nn.ModuleDict({"linear_qkv": layer})
    megalora.apply_lora(holder, megalora.LoRAConfig(rank=R, alpha=2.0, num_heads=K,
                                                    routing="modality",
                                                    target_modules=("linear_qkv",)))
    with torch.no_grad():
        layer.lora_A.copy_(t["A"])
        layer.lora_B.copy_(shard(t["B"], FactorSharding(1), rank, tp))
    megalora.set_head_ids(holder, t["ids"])
    n = S // tp if sp and tp > 1 else S
    x = t["x"][rank * n:(rank + 1) * n].clone().requires_grad_() if n < S else \
        t["x"].clone().requires_grad_()
    result = layer(x)
    if skip_bias_add and want_ln:
        out, bias, ln = result
    elif skip_bias_add:
        (out, bias), ln = result, None
    elif want_ln:
        (out, ln), bias = result
    else:
        out, bias = result
        ln = None
    assert (ln is not None) == want_ln  # the caller gets TE's tuple shape back unchanged
    if bias is not None:
        out = out + bias
    (out * shard(t["dy"], FactorSharding(2), rank, tp)).sum().backward()
    megalora.finalize_lora_grads(holder)
    return {"out": out.detach(), "x": x.grad, "A": layer.lora_A.grad, "B": layer.lora_B.grad}


@pytest.mark.parametrize("skip_bias_add", [False, True])
@pytest.mark.parametrize("want_ln", [False, True])
def test_te_layernorm_column_tp1(megatron_world1, skip_bias_add, want_ln):
    t = _tensors()
    got = _run(t, None, 1, 0, False, skip_bias_add, want_ln)
    for key, ref in _reference(t).items():
        assert torch.allclose(got[key], ref, atol=1e-12, rtol=1e-12), key


def _tp2(rank, world, sp):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    return _run(_tensors(), ps.get_tensor_model_parallel_group(), 2, rank, sp, True, False)


@pytest.mark.slow
@pytest.mark.parametrize("sp", [False, True])
def test_te_layernorm_column_tp2(sp):
    t = _tensors()
    ref = _reference(t)
    res = run_distributed(2, _tp2, (sp,))
    out = unshard([r["out"] for r in res], FactorSharding(2))
    assert torch.allclose(out, ref["out"], atol=1e-12)
    x_grad = torch.cat([r["x"] for r in res]) if sp else res[0]["x"]
    assert torch.allclose(x_grad, ref["x"], atol=1e-12)
    for r in res:
        assert torch.allclose(r["A"], ref["A"], atol=1e-12)
    assert torch.allclose(unshard([r["B"] for r in res], FactorSharding(1)), ref["B"], atol=1e-12)


def _duplicated(t, tp_group, tp, rank, sp):
    """A replicated base (MLA-style down-projection): every factor replicated; under SP each
    rank adapts its own sequence shard and the factors' partial gradients are summed."""
    register_base_layer(FakeTELinearDuplicated, "duplicated", "te")
    layer = FakeTELinearDuplicated(DIN, DOUT, tp_group, sp)
    with torch.no_grad():
        layer.weight.copy_(t["w"])
    holder = torch.nn.ModuleDict({"linear_q_down_proj": layer})
    megalora.apply_lora(holder, megalora.LoRAConfig(
        rank=R, alpha=2.0, num_heads=K, routing="modality", dropout=0.5,
        target_modules=("linear_q_down_proj",)))
    with torch.no_grad():
        layer.lora_A.copy_(t["A"])
        layer.lora_B.copy_(t["B"])
    megalora.set_head_ids(holder, t["ids"])
    n = S // tp if sp else S
    x = t["x"][rank * n:(rank + 1) * n].clone().requires_grad_()
    out, _ = layer(x)
    (out * t["dy"][rank * n:(rank + 1) * n]).sum().backward()
    megalora.finalize_lora_grads(holder)
    from megalora.runtime import layer_dropout_seed
    seed = layer_dropout_seed(layer._lora_runtime.seed, layer._lora_name_hash, 0)
    return {"out": out.detach(), "x": x.grad, "A": layer.lora_A.grad, "B": layer.lora_B.grad,
            "seed": seed}


def _duplicated_reference(t, seed):
    from megalora.reference import DropoutSpec

    x = t["x"].clone().requires_grad_()
    a, b = t["A"].clone().requires_grad_(), t["B"].clone().requires_grad_()
    flat = x.reshape(-1, DIN)
    y = flat @ t["w"].t() + lora_expand_ref(lora_shrink_ref(flat, a, DropoutSpec((0.5,), seed)),
                                            b, 0.5, head_ids=t["ids"].t().reshape(-1))
    y = y.reshape(S, B, DOUT)
    (y * t["dy"]).sum().backward()
    return {"out": y.detach(), "x": x.grad, "A": a.grad, "B": b.grad}


def test_duplicated_linear_tp1(megatron_world1):
    t = _tensors()
    got = _duplicated(t, None, 1, 0, False)
    for key, ref in _duplicated_reference(t, got["seed"]).items():
        assert torch.allclose(got[key], ref, atol=1e-12), key


def _dup_tp2(rank, world):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    return _duplicated(_tensors(), ps.get_tensor_model_parallel_group(), 2, rank, True)


@pytest.mark.slow
def test_duplicated_linear_tp2_sequence_parallel():
    t = _tensors()
    res = run_distributed(2, _dup_tp2)
    ref = _duplicated_reference(t, res[0]["seed"])
    assert torch.allclose(torch.cat([r["out"] for r in res]), ref["out"], atol=1e-12)
    assert torch.allclose(torch.cat([r["x"] for r in res]), ref["x"], atol=1e-12)
    for r in res:
        assert torch.allclose(r["A"], ref["A"], atol=1e-12)
        assert torch.allclose(r["B"], ref["B"], atol=1e-12)


def test_real_transformer_engine_layers():
    te = pytest.importorskip("transformer_engine",
                             reason="transformer-engine is not installed: real-TE test skipped "
                                    "(the TE code path is covered by the contract double above)")
    if not torch.cuda.is_available():
        pytest.skip("transformer-engine needs a CUDA GPU: real-TE test skipped")
    from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear

    del te
    assert megalora.base_layers.lookup_class(TELayerNormColumnParallelLinear) == \
        ("column", "te_ln")

"""Adapted Column/RowParallelLinear against the float64 reference, at TP=1 and TP=2 (+SP).

Integer-valued inputs and weights (scale 1, dropout p=0.5) make every sum exact, so TP results
must equal the single-process reference bit for bit; the router's softmax is not integer, so
router cases use a float64 tolerance.
"""

import dataclasses

import pytest
import torch

from layer_cases import LayerCase, build, make_tensors, reference, run_layer
from megalora.testing.dist import run_distributed

TRITON = dict(backend="triton", dtype=torch.float32)  # integer inputs stay exact in fp32

CASES = [
    LayerCase("column"), LayerCase("row"),
    LayerCase("column", "modality", heads=3), LayerCase("row", "modality", heads=3),
    LayerCase("column", "modality", heads=2, dropout=0.5),
    LayerCase("row", "modality", heads=2, dropout=0.5),
    LayerCase("column", "router", heads=2, integer=False),
    LayerCase("row", "router", heads=3, top_k=2, integer=False, dropout=0.5),
    LayerCase("column", "single", stride=2),
    LayerCase("column", "modality", heads=2, stride=2, dropout=0.5),
    LayerCase("column", "modality", heads=3, dropout=0.5, **TRITON),
    LayerCase("row", "modality", heads=2, dropout=0.5, **TRITON),
    LayerCase("column", "router", heads=3, top_k=2, integer=False, **TRITON),
    LayerCase("row", "single", **TRITON),
]


def _id(case):
    return f"{case.kind}-{case.routing}{case.heads}-p{case.dropout}-s{case.stride}" + (
        f"-top{case.top_k}" if case.top_k else "") + f"-{case.backend}"


def _compare(got: dict, want: dict, exact: bool, what: str, same_precision=None):
    """Exact for integer cases; float64 layers within 1e-12; other dtypes within twice the error
    of the same layer on the torch backend in the same dtype (``same_precision``)."""
    for key, ref in want.items():
        if exact:
            assert torch.equal(got[key], ref), f"{what}: {key} differs (max " \
                f"{(got[key] - ref).abs().max().item():.3e})"
        elif same_precision is None:
            assert torch.allclose(got[key], ref, rtol=1e-12, atol=1e-12), f"{what}: {key}"
        else:
            err = (got[key] - ref).abs().max().item()
            pt_err = (same_precision[key] - ref).abs().max().item()
            assert err <= 2 * pt_err + 1e-12, f"{what}: {key} error {err:.3e} > 2 x {pt_err:.3e}"


def _same_precision(case, t, tp, sp):
    if case.integer or case.dtype == torch.float64:
        return None
    return run_layer(dataclasses.replace(case, backend="torch"), t, tp=tp, sp=sp)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_layer_matches_reference_tp1(megatron_world1, case):
    t = make_tensors(case)
    got = run_layer(case, t, tp=1, sp=False)
    want = reference(case, t, got["dropout_seed"])
    _compare(got, want, case.integer, _id(case), _same_precision(case, t, 1, False))


def test_odd_token_count_and_base_frozen(megatron_world1):
    case = LayerCase("column", "modality", heads=2, seq=5, batch=3, dropout=0.5)
    t = make_tensors(case)
    holder, layer, report = build(case, t, 1, False)
    weight_before = layer.weight.detach().clone()
    got = run_layer(case, t, 1, False, holder, layer)
    _compare(got, reference(case, t, got["dropout_seed"]), True, "odd tokens")
    assert layer.weight.grad is None and layer.bias.grad is None
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert torch.equal(layer.weight, weight_before)
    trainable = {n for n, p in holder.named_parameters() if p.requires_grad}
    assert trainable == {"linear_fc1.lora_A", "linear_fc1.lora_B"}
    assert report.trainable_params == 3 * 96 + 2 * 40 * 3


def test_unrouted_tokens_get_exactly_the_base_output(megatron_world1):
    case = LayerCase("row", "modality", heads=2)
    t = make_tensors(case)
    t["ids"][:] = -1
    got = run_layer(case, t, 1, False)
    base = (t["x"] @ t["w"].t() + t["bias"])
    assert torch.equal(got["out"], base)
    assert not got["lora_A"].any() and not got["lora_B"].any()


def test_bf16_adapter_within_bf16_error(megatron_world1):
    """Adapter params in bf16 on a float64 base: error bounded like a bf16 PyTorch LoRA."""
    import megalora
    from layer_cases import lora_config
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    case = LayerCase("column", "modality", heads=2, integer=False)
    t = make_tensors(case)
    cfg = ModelParallelConfig(params_dtype=torch.float64, use_cpu_initialization=True)
    base = ColumnParallelLinear(96, 40, config=cfg, init_method=torch.nn.init.zeros_, bias=True,
                                gather_output=False)
    with torch.no_grad():
        base.weight.copy_(t["w"])
        base.bias.copy_(t["bias"])
    holder = torch.nn.ModuleDict({"linear_fc1": base})
    megalora.apply_lora(holder, lora_config(case, dtype="bfloat16"))
    layer = holder["linear_fc1"]
    assert layer.lora_A.dtype == torch.bfloat16
    with torch.no_grad():
        layer.lora_A.copy_(t["lora_A"])
        layer.lora_B.copy_(t["lora_B"])
    megalora.set_head_ids(holder, t["ids"])
    out, _ = layer(t["x"])
    want = reference(case, t, None)["out"]
    # same-precision PyTorch: the bf16 LoRA term computed from bf16-rounded factors
    a16, b16 = t["lora_A"].bfloat16(), t["lora_B"].bfloat16()
    s = (t["x"].reshape(-1, 96).bfloat16() @ a16.t())
    ids = t["ids"].t().reshape(-1)
    pt = torch.zeros(21, 40, dtype=torch.bfloat16)
    for k in range(2):
        pt[ids == k] = s[ids == k] @ b16[k].t()
    pt = (t["x"].reshape(-1, 96) @ t["w"].t() + t["bias"]) + pt.double()
    pt_err = (pt - want.reshape(-1, 40)).abs().max().item()
    err = (out.reshape(-1, 40) - want.reshape(-1, 40)).abs().max().item()
    assert err <= 2 * pt_err + 1e-12, (err, pt_err)


def _tp2_worker(rank, world):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    results = {}
    for case in CASES:
        case = case.with_tp_shapes()
        t = make_tensors(case)
        for sp in (False, True):
            results[(_id(case), sp)] = run_layer(case, t, tp=2, sp=sp)
            results[(_id(case), sp, "pt")] = _same_precision(case, t, 2, sp)
    return results


@pytest.mark.slow
def test_layers_tp2_and_sequence_parallel_equal_single_process():
    results = run_distributed(2, _tp2_worker)
    for case in CASES:
        case = case.with_tp_shapes()
        t = make_tensors(case)
        for sp in (False, True):
            got0, got1 = results[0][(_id(case), sp)], results[1][(_id(case), sp)]
            pt0, pt1 = results[0][(_id(case), sp, "pt")], results[1][(_id(case), sp, "pt")]
            want = reference(case, t, got0["dropout_seed"])
            _compare(got0, want, case.integer, f"{_id(case)} sp={sp} rank0", pt0)
            _compare(got1, want, case.integer, f"{_id(case)} sp={sp} rank1", pt1)

"""lora_shrink / lora_expand through their autograd Functions on the ``triton`` backend, against
the float64 reference and the same-precision PyTorch reference (outputs and every gradient).

Without a GPU the kernels run under TRITON_INTERPRET=1 (set by conftest), hence small shapes.
"""

import pytest
import torch

from kernel_cases import CASES, DEVICE, DTYPES, check_rule, make_inputs
from megalora import ops
from megalora.reference import DropoutSpec, router_weights_ref


def _run(case, inputs, dtype, backend, deterministic=False):
    """y = expand(shrink(x)) with routing; returns y and the grads of x, A, B, router logits."""
    x = inputs["x"].to(dtype).clone().requires_grad_()
    a = inputs["a"].to(dtype).clone().requires_grad_()
    b = inputs["b"].to(dtype).clone().requires_grad_()
    logits = inputs["logits"].to(dtype).clone().requires_grad_()
    ids = inputs["ids"] if case.routing in ("ids", "contiguous") else None
    spec = DropoutSpec(case.dropout, seed=11, token_offset=5, feature_offset=2) \
        if any(case.dropout) else None
    s = ops.lora_shrink(x, a, spec, ids, backend=backend)
    weights = None
    if case.routing.startswith("router"):
        weights = router_weights_ref(logits, 1 if case.routing == "router_top1" else None)
        weights = weights.to(dtype) if dtype == torch.float64 else weights
    y = ops.lora_expand(s, b, inputs["scale"], ids, weights, backend=backend,
                        deterministic=deterministic)
    (y.to(torch.float64) * inputs["dy"]).sum().backward()
    out = {"y": y.detach(), "dx": x.grad, "dA": a.grad, "dB": b.grad}
    if weights is not None:
        out["dlogits"] = logits.grad
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_ops_within_twice_torch_error(case, dtype):
    inputs = make_inputs(case, dtype)
    ref = _run(case, inputs, torch.float64, "torch")
    pt = _run(case, inputs, dtype, "torch")
    for deterministic in (False, True):
        got = _run(case, inputs, dtype, "triton", deterministic)
        for key in ref:
            check_rule(got[key], pt[key], ref[key], f"{key} det={deterministic}")


@pytest.mark.parametrize("case", [CASES[3], CASES[5]], ids=lambda c: c.id)
def test_deterministic_mode_is_bitwise_repeatable(case):
    inputs = make_inputs(case, torch.bfloat16)
    first = _run(case, inputs, torch.bfloat16, "triton", deterministic=True)
    second = _run(case, inputs, torch.bfloat16, "triton", deterministic=True)
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_head_da_split_sums_to_da(dtype):
    """The per-head dA split (fp32 sink) and dA, each within the 2x rule of the same-precision
    PyTorch reference; the heads' shares add up to dA."""
    from megalora.reference import lora_shrink_backward_ref

    case = CASES[3]
    inputs = make_inputs(case, dtype)
    x, a = inputs["x"].to(dtype), inputs["a"].to(dtype).requires_grad_()
    ids = inputs["ids"]
    spec = DropoutSpec(case.dropout, seed=3)
    sink = torch.zeros((case.heads,) + tuple(a.shape))
    g = torch.Generator().manual_seed(1)
    ds = torch.randn(case.tokens, case.rank, generator=g, dtype=torch.float64)
    ds = ds.to(dtype).to(torch.float64).to(DEVICE)  # rounded: every path sees the same numbers
    ds[ids < 0] = 0.0  # what lora_expand's backward gives unrouted tokens
    s = ops.lora_shrink(x, a, spec, ids, backend="triton", split_sink=sink)
    s.backward(ds.to(dtype))
    _, da_ref, split_ref = lora_shrink_backward_ref(ds, inputs["x"], inputs["a"], spec, ids,
                                                    case.heads)
    _, da_pt, split_pt = lora_shrink_backward_ref(ds.to(dtype), x, a.detach(), spec, ids,
                                                  case.heads)
    check_rule(sink, split_pt, split_ref, "dA split")
    check_rule(a.grad, da_pt, da_ref, "dA")
    check_rule(sink.sum(0), split_pt.sum(0), da_ref, "sum of the dA split")


def test_routing_and_dtype_errors():
    case = CASES[2]
    inputs = make_inputs(case, torch.float32)
    with pytest.raises(ValueError, match="need head_ids or weights"):
        ops.lora_expand(inputs["x"][:, :5].float(), inputs["b"].float(), 1.0, backend="triton")
    with pytest.raises(RuntimeError, match="kernels take float16/bfloat16/float32"):
        ops.lora_shrink(inputs["x"], inputs["a"], backend="triton")


def test_auto_picks_torch_on_cpu_and_says_why(caplog):
    import logging

    ops._announced.clear()
    with caplog.at_level(logging.DEBUG, logger="megalora"):
        name = ops.resolve_backend("auto", torch.device("cpu"), torch.float32)
    assert name == "torch"
    assert "runs on the 'torch' path: plain-PyTorch reference (cpu tensors)" in caplog.text

"""HyDRA's rank masking and SVD truncation (megalora.hydra.masking).

* An adapter built at rank R and masked to rank k computes exactly (integer inputs: bit for
  bit) what an adapter built at rank k with the first k ranks of its factors computes: output,
  input gradient and factor gradients; the masked ranks' gradients are exactly zero.
* truncate_ gives the best rank-k approximation of the stacked update [B_h A]_h (float64 SVD of
  the full matrix as reference), at TP=1 and at TP=2 with and without sequence parallelism;
  switching ranks on again afterwards leaves the output unchanged.
* The effective parameter count is the same on every TP rank and sums over pipeline stages.
"""

import dataclasses

import pytest
import torch

from layer_cases import LayerCase, build, make_tensors, run_layer
from megalora.hydra import masking
from megalora.testing.dist import run_distributed

MASK_CASES = [
    LayerCase("column", rank=6), LayerCase("row", rank=6),
    LayerCase("column", "modality", heads=3, rank=6, dropout=0.5),
    LayerCase("row", "modality", heads=2, rank=6, stride=1),
    LayerCase("column", "single", rank=6, stride=2),
    LayerCase("column", "router", heads=2, rank=6, integer=False),
    LayerCase("column", "modality", heads=2, rank=6, backend="triton", dtype=torch.float32),
]
K = 3


def _id(case):
    return f"{case.kind}-{case.routing}{case.heads}-s{case.stride}-{case.backend}"


def _masked_and_small(case, tp=1, sp=False):
    t = make_tensors(case)
    holder, layer, _ = build(case, t, tp, sp)
    masking.set_rank(layer, K)
    big = run_layer(case, t, tp, sp, holder, layer)
    small_case = dataclasses.replace(case, rank=K)
    small_t = dict(t, lora_A=t["lora_A"][:K].clone(), lora_B=t["lora_B"][..., :K].clone())
    small = run_layer(small_case, small_t, tp, sp)
    return big, small


def _check_masked_equals_small(big, small, exact):
    def same(a, b, what):
        if exact:
            assert torch.equal(a, b), f"{what}: max diff {(a - b).abs().max().item():.3e}"
        else:
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), what

    same(big["out"], small["out"], "output")
    same(big["x.grad"], small["x.grad"], "input grad")
    same(big["lora_A"][:K], small["lora_A"], "A grad")
    same(big["lora_B"][..., :K], small["lora_B"], "B grad")
    assert not big["lora_A"][K:].any() and not big["lora_B"][..., K:].any(), "masked grads"
    if "lora_router" in small:
        same(big["lora_router"], small["lora_router"], "router grad")


@pytest.mark.parametrize("case", MASK_CASES, ids=_id)
def test_masked_rank_equals_a_smaller_adapter(megatron_world1, case):
    big, small = _masked_and_small(case)
    _check_masked_equals_small(big, small, case.integer)


def test_rank_errors_and_merge_follow_the_mask(megatron_world1):
    case = LayerCase("column", "modality", heads=2, rank=6, integer=False)
    t = make_tensors(case)
    _, layer, _ = build(case, t, 1, False)
    with pytest.raises(ValueError, match=r"rank 7 is outside \[0, 6\].*lora.rank=6"):
        masking.set_rank(layer, 7)
    masking.set_rank(layer, 2)
    assert masking.get_rank(layer) == 2
    want = t["lora_B"][1][:, :2] @ t["lora_A"][:2]  # scale 1
    assert torch.allclose(layer.lora_delta_weight(1), want, rtol=1e-12, atol=1e-12)


def _full(param, spec, group, tp):
    import torch.distributed as dist

    from megalora.sharding import unshard

    if spec.dim is None or tp == 1:
        return param.detach().double().clone()
    pieces = [torch.empty_like(param) for _ in range(tp)]
    dist.all_gather(pieces, param.detach().contiguous(), group=group)
    return unshard([p.double() for p in pieces], spec)


TRUNC_CASES = [LayerCase("column", "modality", heads=3, rank=6, integer=False, seq=10),
               LayerCase("row", "single", rank=6, integer=False, seq=10),
               LayerCase("column", "single", rank=6, stride=2, integer=False, seq=10)]


def _truncate_all(tp, sp):
    """Per case: truncate to K, full factors after, singular values, output before/after
    switching the masked ranks back on, and the effective parameter count."""
    from megalora.sharding import factor_shardings

    out = {}
    for case in TRUNC_CASES:
        t = make_tensors(case)
        holder, layer, _ = build(case, t, tp, sp)
        sv = masking.truncate_(layer, K, seed=1)
        base, specs = layer.lora_base_split, factor_shardings(layer.lora_base_split)
        full = {n: _full(getattr(layer, n), specs[n], base.tp_group, tp)
                for n in ("lora_A", "lora_B")}
        params_k = masking.effective_parameters(holder)
        at_k = run_layer(case, t, tp, sp, holder, layer)["out"]
        masking.set_rank(layer, case.rank)  # the re-seeded ranks have B = 0: no change
        at_r = run_layer(case, t, tp, sp, holder, layer)["out"]
        out[(_id(case), sp)] = dict(full, sv=sv, params=params_k, at_k=at_k, at_r=at_r)
    return out


def _tp2_worker(rank, world):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    return {**_truncate_all(2, False), **_truncate_all(2, True)}


def _check_truncation(got, case):
    t = make_tensors(case)
    stacked = torch.cat([t["lora_B"][h] @ t["lora_A"] for h in range(case.heads)])
    u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    best = u[:, :K] @ torch.diag(s[:K]) @ vh[:K]
    a, b = got["lora_A"], got["lora_B"]
    new = torch.cat([b[h] @ a for h in range(case.heads)])
    assert torch.allclose(got["sv"][:K], s[:K], rtol=1e-10)
    assert torch.allclose(new, best, rtol=1e-9, atol=1e-9 * s[0].item())
    assert not b[..., K:].any()  # switched-off ranks: B exactly zero
    bs = b[..., :K].reshape(-1, K)
    assert torch.allclose(bs.t() @ bs, torch.diag(s[:K]), atol=1e-9 * s[0].item())  # balanced
    assert torch.allclose(a[:K] @ a[:K].t(), torch.diag(s[:K]), atol=1e-9 * s[0].item())
    assert torch.equal(got["at_k"], got["at_r"])
    lay_in, lay_out = case.din, case.dout
    assert got["params"] == K * (lay_in + case.heads * lay_out)


def test_truncation_is_the_best_rank_k_approximation_tp1(megatron_world1):
    got = _truncate_all(1, False)
    for case in TRUNC_CASES:
        _check_truncation(got[(_id(case), False)], case)


@pytest.mark.slow
def test_truncation_and_count_at_tp2_and_sequence_parallel():
    results = run_distributed(2, _tp2_worker)
    for case in TRUNC_CASES:
        for sp in (False, True):
            for r in (0, 1):
                _check_truncation(results[r][(_id(case), sp)], case)
            for key in ("lora_A", "lora_B", "sv"):  # both TP ranks agree exactly
                assert torch.equal(results[0][(_id(case), sp)][key],
                                   results[1][(_id(case), sp)][key]), key


# the tiny GPT's adapted modules: (in, out) on full shapes
GPT_DIMS = {"linear_qkv": (64, 192), "linear_proj": (64, 64), "linear_fc1": (64, 256),
            "linear_fc2": (256, 64)}


def _gpt_rank(name):
    layer = int(name.split("decoder.layers.")[1].split(".")[0])
    return (3 * layer + len(name.rsplit(".", 1)[-1])) % 7  # 0..6, varied over layers/modules


def _gpt_count_worker(rank, world):
    import megalora
    from megalora.testing.tiny_gpt import TinyGPTShape, build_tiny_gpt, tiny_gpt_config
    from megatron.core import parallel_state as ps

    out = {}
    for tp, pp in ((1, 2), (2, 1)):
        ps.initialize_model_parallel(tensor_model_parallel_size=tp,
                                     pipeline_model_parallel_size=pp)
        shape = TinyGPTShape()
        model = build_tiny_gpt(shape, tiny_gpt_config(shape, tp, pp), seed=0)
        megalora.apply_lora(model, megalora.LoRAConfig(rank=6, alpha=6.0))
        for name, m in masking.adapted_modules(model):
            masking.set_rank(m, _gpt_rank(name))
        out[(tp, pp)] = (masking.effective_parameters(
            model, ps.get_pipeline_model_parallel_group()), masking.allocation(model))
        ps.destroy_model_parallel()
    return out


@pytest.mark.slow
def test_effective_parameters_sum_over_stages_and_agree_over_tp():
    results = run_distributed(2, _gpt_count_worker)
    names = [f"decoder.layers.{i}.self_attention.{m}" for i in range(4)
             for m in ("linear_qkv", "linear_proj")] + \
        [f"decoder.layers.{i}.mlp.{m}" for i in range(4) for m in ("linear_fc1", "linear_fc2")]
    want = sum(_gpt_rank(n) * sum(GPT_DIMS[n.rsplit(".", 1)[-1]]) for n in names)
    for r in (0, 1):
        for layout in ((1, 2), (2, 1)):
            assert results[r][layout][0] == want, (r, layout)
    # each pipeline stage holds its own layers under their global names
    stage0, stage1 = results[0][(1, 2)][1], results[1][(1, 2)][1]
    assert sorted(stage0) == sorted(n for n in names if int(n.split(".")[2]) < 2)
    assert sorted({**stage0, **stage1}) == sorted(names)
    assert results[0][(2, 1)][1] == results[1][(2, 1)][1] == {**stage0, **stage1}


def test_reset_optimizer_copies_masters_and_zeroes_moments():
    from megalora.umm.optim import AdapterOptimizer

    model = torch.nn.Linear(4, 3).to(torch.bfloat16)  # low-precision params: fp32 masters
    opt = AdapterOptimizer(model, lr=0.1)
    plain = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])
    for o, params in ((opt.opt, opt.masters), (plain, plain.param_groups[0]["params"])):
        for p in params:
            o.state[p] = {"exp_avg": torch.ones_like(p), "exp_avg_sq": torch.ones_like(p),
                          "step": torch.tensor(3.0)}
    with torch.no_grad():
        model.weight.fill_(0.5)  # a truncation rewrote the model's parameter
    assert masking.reset_optimizer(opt, [model.weight]) == 1
    master = opt.masters[0]
    assert torch.equal(master, torch.full((3, 4), 0.5)) and master.dtype == torch.float32
    assert not opt.opt.state[master]["exp_avg"].any() and opt.opt.state[master]["step"] == 3
    assert opt.opt.state[opt.masters[1]]["exp_avg"].all()  # the bias was not touched
    p = plain.param_groups[0]["params"][0]
    assert masking.reset_optimizer(plain, [p]) == 1 and not plain.state[p]["exp_avg_sq"].any()

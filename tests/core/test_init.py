"""The same seed gives the same full A, B and router at TP=1, 2, 4 and any PP split."""

import pytest
import torch

import megalora
from megalora.testing.dist import run_distributed

pytestmark = pytest.mark.slow  # spawns gloo worlds of up to 4 processes

LAYOUTS = [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (1, 4)]


def _init_states(rank, world):
    from megatron.core import parallel_state as ps

    from megalora.testing.tiny_gpt import TinyGPTShape, build_tiny_gpt, tiny_gpt_config

    out = {}
    for tp, pp in LAYOUTS:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp,
                                     pipeline_model_parallel_size=pp)
        shape = TinyGPTShape(swiglu=True)
        model = build_tiny_gpt(shape, tiny_gpt_config(shape, tp, pp), seed=0)
        for routing, cfg in {"router": dict(num_heads=2, routing="router"),
                             "gaussian": dict(init_a="gaussian")}.items():
            cfg = megalora.LoRAConfig(rank=4, seed=5, init_b="gaussian", **cfg)
            fresh = build_tiny_gpt(shape, tiny_gpt_config(shape, tp, pp), seed=0) \
                if routing == "gaussian" else model
            megalora.apply_lora(fresh, cfg)
            out[(tp, pp, routing)] = megalora.adapter_state(fresh)
        ps.destroy_model_parallel()
    return out


def test_init_is_layout_invariant():
    results = run_distributed(4, _init_states)
    for routing in ("router", "gaussian"):
        ref = results[0][(1, 1, routing)]
        assert len(ref) == 4 * 4 * (3 if routing == "router" else 2)
        for tp, pp in LAYOUTS:
            merged = {}
            for r in results:
                merged.update(r[(tp, pp, routing)])
            assert sorted(merged) == sorted(ref)
            for key in ref:
                assert torch.equal(merged[key], ref[key]), (tp, pp, routing, key)
    a = results[0][(1, 1, "router")]["decoder.layers.0.self_attention.linear_qkv.lora_A"]
    bound = 1 / 64 ** 0.5  # kaiming-uniform over the global fan-in
    assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound

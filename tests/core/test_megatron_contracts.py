"""Megatron's own machinery sees the adapters correctly: finalize_model_grads sums the partial
gradients of replicated factors under SP, grad-norm counts each factor once, and
sharded_state_dict describes the true TP split (including SwiGLU fc1's strided B)."""

import math

import pytest
import torch

import megalora
from gpt_cases import lora_step
from megalora.testing.dist import run_distributed

pytestmark = pytest.mark.slow  # spawns gloo worlds


def _grads_and_norm(rank, world):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import (
        _allreduce_non_tensor_model_parallel_grads)
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    from gpt_cases import batches
    from megalora.grads import full_lora_grads
    from megalora.testing.tiny_gpt import (TinyGPTShape, build_tiny_gpt, forward_backward,
                                           tiny_gpt_config)

    ref = lora_step(1, 1, False, "modality")["grads"]  # TP=1 (world of 2 = data parallel)
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    shape = TinyGPTShape()
    cfg = tiny_gpt_config(shape, 2, 1, True, dtype=torch.float64)
    model = build_tiny_gpt(shape, cfg, seed=7)
    from gpt_cases import VARIANTS
    megalora.apply_lora(model, megalora.LoRAConfig(**VARIANTS["modality"]))
    forward_backward(model, batches(), cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # what Megatron's DDP does: gradients live in main_grad
        p.main_grad, p.grad = p.grad, None
    model.ddp_config = DistributedDataParallelConfig()
    _allreduce_non_tensor_model_parallel_grads([model], cfg)
    grads = full_lora_grads(model)
    counted = [p.main_grad for p in params if param_is_not_tensor_parallel_duplicate(p)]
    norm = get_grad_norm_fp32(counted, grad_stats_parallel_group=ps.get_model_parallel_group())
    naive = get_grad_norm_fp32([p.main_grad for p in params],
                               grad_stats_parallel_group=ps.get_model_parallel_group())
    return {"ref": ref, "grads": grads, "norm": float(norm), "naive": float(naive)}


def test_finalize_model_grads_and_grad_norm_count_factors_once():
    for res in run_distributed(2, _grads_and_norm):
        ref = res["ref"]
        for key, value in ref.items():
            assert torch.allclose(res["grads"][key], value, rtol=1e-6,
                                  atol=1e-6 * value.abs().max().item()), key
        ref_norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in ref.values()))
        assert res["norm"] == pytest.approx(ref_norm, rel=1e-6)
        assert res["naive"] > res["norm"] * 1.01  # counting replicas TP times would inflate it


def _sharded_pieces(rank, world):
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from megalora.testing.tiny_gpt import TinyGPTShape, build_tiny_gpt, tiny_gpt_config

    shape = TinyGPTShape(swiglu=True)
    cfg = megalora.LoRAConfig(rank=4, num_heads=2, routing="router", init_b="gaussian")
    ps.initialize_model_parallel()
    single = build_tiny_gpt(shape, tiny_gpt_config(shape), seed=0)
    megalora.apply_lora(single, cfg)
    full = megalora.adapter_state(single)
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    model = build_tiny_gpt(shape, tiny_gpt_config(shape, 2, 1, True), seed=0)
    megalora.apply_lora(model, cfg)
    pieces = []
    for key, item in model.sharded_state_dict().items():
        if "lora_" not in key:
            continue
        if isinstance(item, ShardedTensorFactory):
            item = item.build()
        for sh in item if isinstance(item, list) else [item]:
            assert isinstance(sh, ShardedTensor)
            pieces.append((sh.key, tuple(sh.global_shape), tuple(sh.global_offset),
                           sh.replica_id, sh.data.detach().clone()))
    return {"full": full, "pieces": pieces}


def test_sharded_state_dict_describes_the_real_split():
    results = run_distributed(2, _sharded_pieces)
    full = results[0]["full"]
    assembled, covered = {}, {}
    for res in results:
        for key, gshape, offset, replica, data in res["pieces"]:
            if any(replica if isinstance(replica, tuple) else (replica,)):
                continue  # a non-main replica: not written
            out = assembled.setdefault(key, torch.full(gshape, float("nan"), dtype=data.dtype))
            cover = covered.setdefault(key, torch.zeros(gshape, dtype=torch.int))
            idx = tuple(slice(o, o + n) for o, n in zip(offset, (1,) * (len(gshape) -
                        data.dim()) + tuple(data.shape)))
            out[idx] = data.reshape(out[idx].shape)
            cover[idx] += 1
    assert len(assembled) == 3 * 4  # A, B, router of qkv/proj/fc1/fc2, layers stacked
    for key, value in assembled.items():
        assert (covered[key] == 1).all(), f"{key}: not covered exactly once by main replicas"
        module, factor = key.rsplit(".", 1)
        for layer in range(4):
            name = module.replace("decoder.layers.", f"decoder.layers.{layer}.") + "." + factor
            assert torch.equal(value[layer], full[name]), name

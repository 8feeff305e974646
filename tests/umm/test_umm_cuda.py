"""One UMM training step on a CUDA GPU equals the CPU reference (``make gpu-check``).

The tiny UMM (TP=1, 2-head modality-routed LoRA with Gaussian B and dropout, so that every
adapter gradient is non-zero) takes one forward/backward of two micro-batches on the CPU in
float64 (the reference), on the CPU in float32 and on the GPU in float32 (TF32 off), each in a
process of its own. The GPU's losses and every adapter gradient are within the 2x rule: its
error against float64 at most twice the CPU float32 error (plus a floor for values that float32
gets exactly). Skipped without a GPU: CI has none; the GPU check runs it.
"""

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from helpers import LAUNCH_VARS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check runs it)")]

OVERRIDES = ["parallel.tensor_parallel=1", "parallel.sequence_parallel=false",
             "train.bf16=false", "lora.init_b=gaussian", "lora.dropout=0.1"]


def _one_step(device: str, dtype: str):
    """(initial adapter and base parameters, loss scalars, full adapter gradients) on CPU."""
    for name in LAUNCH_VARS:
        os.environ.pop(name, None)  # a world of one, with a port of its own
    import megalora
    from megalora.grads import full_lora_grads
    from megalora.umm.config import RunConfig
    from megalora.umm.optim import loss_scalars
    from megalora.umm.session import (build_datasets, build_model, build_streams,
                                      forward_backward, parallel_session)

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    run = RunConfig.from_yaml("launch/configs/umm_tiny.yaml",
                              OVERRIDES + [f"train.device={device}"])
    with parallel_session(run) as dev:
        torch.manual_seed(run.train.seed)
        model, _ = build_model(run, dev)
        model.to(getattr(torch, dtype))
        initial = {k: v.detach().double().cpu() for k, v in model.state_dict().items()
                   if torch.is_tensor(v) and v.is_floating_point()}
        stream, _ = build_streams(run, *build_datasets(run))
        batches = [stream.next_batch().to(dev) for _ in range(run.train.num_microbatches)]
        stats = loss_scalars(forward_backward(model, run, batches))
        megalora.finalize_lora_grads(model)
        grads = {k: v.double().cpu() for k, v in full_lora_grads(model).items()}
    return initial, stats, grads


def _in_process(*args):
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_one_step, *args).result(timeout=600)


def test_one_training_step_on_cuda_matches_the_cpu_reference():
    ref_init, ref_stats, ref_grads = _in_process("cpu", "float64")
    cpu_init, cpu_stats, cpu_grads = _in_process("cpu", "float32")
    gpu_init, gpu_stats, gpu_grads = _in_process("cuda", "float32")
    assert sorted(gpu_init) == sorted(ref_init)
    for key in ref_init:  # the deterministic init is the same on both devices
        assert torch.equal(gpu_init[key], cpu_init[key]), key
    for key in ("text", "image", "loss"):
        # the loss reports are accumulated in float32 whatever the model's dtype (the float64
        # and float32 CPU runs print the same text loss), so the rule's budget can be 0 there:
        # the floor is float32 summation over a few hundred tokens
        err, budget = abs(gpu_stats[key] - ref_stats[key]), abs(cpu_stats[key] - ref_stats[key])
        assert err <= 2 * budget + 1e-5 * abs(ref_stats[key]), (key, gpu_stats, cpu_stats,
                                                                ref_stats)
    assert sorted(gpu_grads) == sorted(ref_grads) and gpu_grads
    for key, ref in ref_grads.items():
        assert ref.abs().max() > 0, key  # every adapter gets a gradient
        err = (gpu_grads[key] - ref).abs().max().item()
        budget = (cpu_grads[key] - ref).abs().max().item()
        assert err <= 2 * budget + 1e-6 * ref.abs().max().item(), (key, err, budget)

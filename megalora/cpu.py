"""Run real megatron-core models and schedules on CPU with gloo: the trainer's CPU runs (the
main job, dry runs, MARS probes, HF export without a GPU) and the tests.

megatron-core assumes CUDA in a handful of places. ``cpu_megatron()`` redirects exactly those,
only while its context is open (nothing happens at import), and restores them on exit:

1. ``megatron/core/utils.py`` ``GlobalMemoryBuffer.get_tensor`` allocates its buffer with
   ``device=torch.cuda.current_device()`` (attention scores use it): allocate on the CPU instead.
2. ``megatron/core/tensor_parallel/random.py`` ``CudaRNGStatesTracker.fork`` swaps CUDA RNG states
   around attention/hidden dropout: becomes a null context (dropout then draws from the CPU
   generator, which Megatron's recompute saves and restores anyway).
3. ``megatron/core/pipeline_parallel/schedules.py``
   ``total_num_tokens = torch.zeros([], dtype=torch.int, device="cuda")``: the module sees a
   ``torch`` whose ``zeros`` ignores ``device``.
4. ``megatron/core/pipeline_parallel/p2p_communication.py`` allocates shape/recv buffers on
   ``torch.cuda.current_device()`` and calls ``torch.cuda.synchronize()``: the module sees a
   ``torch.cuda`` whose ``current_device`` is the CPU and whose ``synchronize`` does nothing.

Six more, needed only by features those four do not reach:

5. sequence parallelism: ``megatron/core/tensor_parallel/mappings.py`` (``_gather_along_first_dim``,
   ``_reduce_scatter_along_first_dim``) and ``tensor_parallel/layers.py`` (the SP all-gather in
   ``LinearWithFrozenWeight`` and friends) allocate with ``device=torch.cuda.current_device()``:
   those modules see the same CPU ``torch.cuda`` as in 4.
6. activation recompute: ``random._get_cuda_rng_state`` / ``_set_cuda_rng_state`` (called by
   ``CheckpointFunction``) read and write the CUDA generator: a placeholder state / no-op.
7. RoPE: ``megatron/core/models/common/embeddings/rotary_pos_embedding.py`` moves its
   frequencies to ``torch.cuda.current_device()`` in ``get_emb``: the module sees the CPU
   ``torch.cuda`` of 4.
8. vision: ``megatron/core/models/vision/clip_vit_model.py`` builds its position ids with
   ``torch.arange(...).cuda()`` in ``CLIPViTModel.__init__``: ``Tensor.cuda`` returns the tensor
   itself (a CPU-only process could not move anything to a GPU anyway).
9. Megatron's DDP and optimizer: ``distributed/param_and_grad_buffer.py``,
   ``distributed/distributed_data_parallel.py`` and ``optimizer/optimizer.py`` allocate buffers
   and flags with ``device="cuda"`` / ``torch.cuda.current_device()``: those modules see the CPU
   ``torch`` of 3/4; and ``optimizer.clip_grad_by_total_norm_fp32`` (it asserts
   ``torch.cuda.FloatTensor`` gradients) becomes the same scaling without the assertion.
10. grad-norm: ``megatron/core/optimizer/clip_grads.py`` builds its accumulators with
   ``device='cuda'`` and, without apex/TE, its l2-norm is ``megatron/core/utils.py``
   ``local_multi_tensor_l2_norm``, which returns ``torch.tensor(..., device="cuda")``: the module
   sees a ``torch`` whose allocations ignore ``device`` and the same l2-norm on the CPU.

Local GPT specs also need an SP-capable norm without apex: ``cpu_gpt_block_spec`` supplies one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import types
from typing import Iterator, List, Tuple

import torch


class _CudaShim(types.SimpleNamespace):
    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _DeviceAgnosticTorch(types.ModuleType):
    """``torch`` as seen by one Megatron module: allocations ignore ``device``; ``cuda`` is CPU."""

    def __init__(self):
        super().__init__("megalora_cpu_torch")
        self.cuda = _CudaShim(current_device=lambda: torch.device("cpu"),
                              synchronize=lambda *a, **k: None)

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in ("zeros", "empty", "tensor", "ones"):
            return lambda *a, device=None, **k: attr(*a, **k)
        return attr


def _cpu_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """``local_multi_tensor_l2_norm`` with its result left on the CPU."""
    norms = [torch.norm(t.float()) for t in tensor_lists[0]]
    total = torch.norm(torch.stack(norms)) if norms else torch.zeros(())
    return total.reshape(1), None


def _cpu_clip(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """``clip_grad_by_total_norm_fp32`` without its CUDA-tensor assertion."""
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0:
        for param in parameters:
            grad = getattr(param, "decoupled_grad" if use_decoupled_grad else "grad", None)
            if grad is not None:
                grad.detach().mul_(coeff)


def _patches() -> List[Tuple[object, str, object]]:
    utils = importlib.import_module("megatron.core.utils")
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    schedules = importlib.import_module("megatron.core.pipeline_parallel.schedules")
    p2p = importlib.import_module("megatron.core.pipeline_parallel.p2p_communication")
    clip = importlib.import_module("megatron.core.optimizer.clip_grads")
    mappings = importlib.import_module("megatron.core.tensor_parallel.mappings")
    layers = importlib.import_module("megatron.core.tensor_parallel.layers")
    rope = importlib.import_module("megatron.core.models.common.embeddings.rotary_pos_embedding")
    ddp = [importlib.import_module(f"megatron.core.{name}") for name in (
        "distributed.param_and_grad_buffer", "distributed.distributed_data_parallel",
        "optimizer.optimizer")]

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        return torch.empty(tensor_shape, dtype=dtype)

    return [
        (utils.GlobalMemoryBuffer, "get_tensor", get_tensor),                       # 1
        (random.CudaRNGStatesTracker, "fork",
         lambda self, name=None: contextlib.nullcontext()),                         # 2
        (schedules, "torch", _DeviceAgnosticTorch()),                               # 3
        (p2p, "torch", _DeviceAgnosticTorch()),                                     # 4
        (mappings, "torch", _DeviceAgnosticTorch()),                                # 5
        (layers, "torch", _DeviceAgnosticTorch()),                                  # 5
        (random, "_get_cuda_rng_state", lambda *a, **k: torch.zeros(1)),            # 6
        (random, "_set_cuda_rng_state", lambda *a, **k: None),                      # 6
        (rope, "torch", _DeviceAgnosticTorch()),                                    # 7
        (torch.Tensor, "cuda", lambda self, *a, **k: self),                         # 8
        (ddp[2], "clip_grad_by_total_norm_fp32", _cpu_clip),                        # 9
        (clip, "torch", _DeviceAgnosticTorch()),                                    # 10
        (clip, "l2_norm_impl", _cpu_l2_norm),                                       # 10
    ] + [(module, "torch", _DeviceAgnosticTorch()) for module in ddp]              # 9


_active = 0
_saved: List[Tuple[object, str, object]] = []


@contextlib.contextmanager
def cpu_megatron() -> Iterator[None]:
    """Apply the redirections above for the duration of the block (re-entrant)."""
    global _active, _saved
    if _active == 0:
        _saved = []
        for owner, name, value in _patches():
            _saved.append((owner, name, owner.__dict__.get(name, getattr(owner, name))))
            setattr(owner, name, value)
    _active += 1
    try:
        yield
    finally:
        _active -= 1
        if _active == 0:
            for owner, name, value in reversed(_saved):
                setattr(owner, name, value)
            _saved = []


class SequenceParallelTorchNorm:
    """``WrappedTorchNorm`` without its sequence-parallel assertion (apex is absent on CPU).

    Under SP a norm just runs on the local sequence shard; its weight gradient is then partial,
    so the parameters carry ``sequence_parallel`` like Megatron's fused norms do.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"SequenceParallelTorchNorm: unsupported normalization "
                             f"{config.normalization!r} (LayerNorm or RMSNorm)")
        norm = norm.to(config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def cpu_gpt_block_spec(config, layer_spec=None, vp_stage=None, pp_rank=None):
    """A ``TransformerBlockSubmodules`` for a local (non-TE) GPT with SP-capable torch norms.

    ``layer_spec`` defaults to ``get_gpt_layer_local_spec()`` (or its MoE-free equivalent).
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                             get_num_layers_to_build)

    spec = layer_spec if layer_spec is not None else get_gpt_layer_local_spec(
        normalization=config.normalization)
    subs = dataclasses.replace(spec.submodules, input_layernorm=SequenceParallelTorchNorm,
                               pre_mlp_layernorm=SequenceParallelTorchNorm)
    spec = dataclasses.replace(spec, submodules=subs)
    num = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[spec] * num,
                                      layer_norm=SequenceParallelTorchNorm)

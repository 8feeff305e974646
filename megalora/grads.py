"""Adapter gradients between backward and the optimizer step.

- ``lora_parameters(model)`` lists every adapter parameter with what a gradient reduction needs
  to know (which layer, which factor, whether it is TP-sharded). Per-objective gradient methods
  (Pareto LoRA) take their per-modality gradients here, after the data-parallel reduction and
  before ``optimizer.step``.
- ``finalize_lora_grads(model)`` does the one TP reduction the factors' split needs (SUM of the
  partial gradients of replicated factors under sequence parallelism) for training loops that do
  not use Megatron's DDP + ``finalize_model_grads``, which already does it from the parameters'
  ``sequence_parallel`` flag. Do not run both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megalora.inject import ModelLike, lora_modules
from megalora.sharding import factor_shardings


@dataclass
class LoRAParam:
    """One adapter parameter and its place in the model."""

    name: str
    """Canonical key, e.g. ``decoder.layers.0.self_attention.linear_qkv.lora_A``."""
    module: str
    factor: str
    """``lora_A``, ``lora_B`` or ``lora_router``."""
    param: torch.nn.Parameter
    tp_sharded: bool
    """True: each TP rank holds a different slice (norms/inner products sum over TP).
    False: replicated over TP (count it once)."""
    tp_group: Optional[dist.ProcessGroup]


def lora_parameters(model: ModelLike) -> List[LoRAParam]:
    """All adapter parameters of ``model`` with their sharding metadata, in module order."""
    out = []
    for layer in lora_modules(model):
        specs = factor_shardings(layer.lora_base_split)
        for factor, param in layer.lora_parameters().items():
            out.append(LoRAParam(name=f"{layer.lora_name}.{factor}", module=layer.lora_name,
                                 factor=factor, param=param,
                                 tp_sharded=specs[factor].dim is not None
                                 and layer.lora_base_split.tp_size > 1,
                                 tp_group=layer.lora_base_split.tp_group))
    return out


def grad_of(param: torch.nn.Parameter) -> Optional[torch.Tensor]:
    """The parameter's gradient: Megatron DDP's ``main_grad`` when it has one, else ``grad``."""
    main = getattr(param, "main_grad", None)
    return main if main is not None else param.grad


def _all_finite(tensors: List[torch.Tensor], group=None) -> bool:
    """Every tensor of every rank of ``group`` is finite (a collective; one host sync)."""
    device = tensors[0].device if tensors else torch.device("cpu")
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    ok = torch.ones((), dtype=torch.bool, device=device)
    for t in tensors:
        ok &= torch.isfinite(t).all().to(device)
    bad = (~ok).to(torch.float32).reshape(1)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
    return bool(bad.item() == 0.0)


def grads_finite(model: ModelLike, group=None) -> bool:
    """No adapter gradient (``main_grad`` or ``grad``) holds inf/nan on any rank of ``group``
    (default: the world). A collective: every rank must call it."""
    grads = [g for item in lora_parameters(model) if (g := grad_of(item.param)) is not None]
    return _all_finite(grads, group)


def params_finite(model: ModelLike, group=None) -> bool:
    """No adapter parameter holds inf/nan on any rank of ``group``. A collective."""
    return _all_finite([item.param for item in lora_parameters(model)], group)


def finalize_lora_grads(model: ModelLike) -> int:
    """SUM over TP the gradients of factors flagged ``sequence_parallel`` (one coalesced
    all-reduce per TP group), and their per-head ``grad_split`` buffers if any. Returns how
    many tensors were reduced."""
    by_group = {}
    for item in lora_parameters(model):
        grad = grad_of(item.param)
        if grad is None or not getattr(item.param, "sequence_parallel", False):
            continue
        for tensor in (grad, getattr(item.param, "grad_split", None)):
            if tensor is not None:  # one coalesced all-reduce per (TP group, dtype)
                key = (id(item.tp_group), tensor.dtype)
                by_group.setdefault(key, (item.tp_group, []))[1].append(tensor)
    count = 0
    for group, grads in by_group.values():
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=group)
        for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(synced)
        count += len(grads)
    return count


def full_lora_grads(model: ModelLike) -> dict:
    """Full-size adapter gradients of this stage's layers by canonical key (collective over TP;
    for tests, logging and per-objective analysis). Missing gradients are skipped."""
    from megalora.adapter_file import gather_full

    out = {}
    for layer in lora_modules(model):
        specs = factor_shardings(layer.lora_base_split)
        for factor, param in layer.lora_parameters().items():
            grad = grad_of(param)
            if grad is not None:
                out[f"{layer.lora_name}.{factor}"] = gather_full(grad, specs[factor],
                                                                  layer.lora_base_split)
    return out


def enable_grad_split(model: ModelLike) -> int:
    """Give every modality-routed adapter's A a per-head gradient buffer ``lora_A.grad_split``
    [K, r, d_in(/TP)] fp32: each backward adds head k's share of dA (the tokens routed to k)
    into row k, computed in the same pass as dA. Zero it with ``zero_grad_split``; it is
    summed over TP like the gradient itself by ``finalize_lora_grads``. Returns the count."""
    count = 0
    for layer in lora_modules(model):
        if layer.lora_settings.routing != "modality":
            continue
        a = layer.lora_A
        a.grad_split = torch.zeros((layer.lora_settings.num_heads,) + tuple(a.shape),
                                   dtype=torch.float32, device=a.device)
        count += 1
    return count


def zero_grad_split(model: ModelLike) -> None:
    """Zero the per-head dA buffers made by ``enable_grad_split``."""
    for layer in lora_modules(model):
        split = getattr(layer.lora_A, "grad_split", None)
        if split is not None:
            split.zero_()

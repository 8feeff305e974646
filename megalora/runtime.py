"""Per-batch state the adapted layers read: per-token head ids and the dropout counter.

Megatron's forward passes hidden states only, so routing information reaches the linears through
one ``LoRARuntime`` per model chunk, shared by that chunk's adapted layers:

    megalora.set_head_ids(model, modality_ids)   # [batch, seq] ints, before model(...)

Recompute-safe: under Megatron's activation recompute a layer's forward runs again during
backward, after later microbatches have changed the runtime. Each layer therefore remembers the
state it used in the first (no-grad) checkpointed pass, first in first out, and replays it in the
recompute pass; backward visits microbatches in forward order in every Megatron schedule.
"""

from __future__ import annotations

import collections
import importlib
from typing import Iterable, List, Optional, Tuple, Union

import torch

from megalora.reference import fmix32_int

try:  # megatron-core's recompute flag (set inside CheckpointFunction forward and backward)
    from megatron.core.tensor_parallel.random import is_checkpointing as _mcore_is_checkpointing
except Exception:  # pragma: no cover - older/newer megatron-core
    def _mcore_is_checkpointing() -> bool:
        return False

State = Tuple[Optional[torch.Tensor], int]


class LoRARuntime:
    """Routing and dropout state for one model chunk."""

    def __init__(self, seed: int, num_heads: int, routing: str):
        self.seed = int(seed)
        self.num_heads = num_heads
        self.routing = routing
        self.head_ids: Optional[torch.Tensor] = None
        """[s, b] int64, contiguous (Megatron's activation order), or None. Kept 2-D so each
        layer can check the [s, b] order against its input, not only the token count."""
        self.forward_count = 0
        """Training-mode forwards of the chunk so far: each one gets fresh dropout masks."""
        self._on_device = {}  # head ids copied once per device, not once per layer

    def head_ids_on(self, head_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``head_ids`` on ``device``; the copy of the current ids is shared by all layers."""
        if head_ids.device == device:
            return head_ids
        cached = self._on_device.get(device)
        if cached is None or cached[0] is not head_ids:
            cached = (head_ids, head_ids.to(device, non_blocking=True))
            self._on_device[device] = cached
        return cached[1]

    def on_chunk_forward(self, module, args) -> None:
        """Forward pre-hook on the chunk root: one tick per training forward."""
        if module.training:
            self.forward_count += 1

    def state(self) -> State:
        return self.head_ids, self.forward_count

    def set_head_ids(self, head_ids: Optional[torch.Tensor]) -> None:
        if head_ids is None:
            self.head_ids = None
            self._on_device.clear()
            return
        if self.routing != "modality":
            raise ValueError(f"set_head_ids: these adapters use routing={self.routing!r}; "
                             "per-token head ids are only read with routing='modality' "
                             "(LoRAConfig.routing)")
        if head_ids.dim() != 2:
            raise ValueError(f"head ids must be [batch, seq] like the token ids, got shape "
                             f"{tuple(head_ids.shape)}")
        if head_ids.dtype.is_floating_point or head_ids.dtype == torch.bool:
            raise ValueError(f"head ids must be an integer tensor, got {head_ids.dtype}")
        if head_ids.device.type == "cpu" and head_ids.numel():  # free to check on the host
            lo, hi = int(head_ids.min()), int(head_ids.max())
            if lo < -1 or hi >= self.num_heads:
                raise ValueError(f"head ids must be in [-1, {self.num_heads - 1}] (num_heads="
                                 f"{self.num_heads}; -1 = no adapter), got values in [{lo}, {hi}]")
        self.head_ids = head_ids.t().to(torch.int64).contiguous()
        self._on_device.clear()


class LayerStateTape:
    """Remembers the runtime state of a layer's checkpointed forwards for their recompute."""

    def __init__(self):
        self._tape = collections.deque()

    def resolve(self, current: State) -> State:
        if not _mcore_is_checkpointing():
            return current
        if torch.is_grad_enabled():  # recompute pass inside backward
            return self._tape.popleft() if self._tape else current
        self._tape.append(current)  # first pass inside CheckpointFunction.forward (no grad)
        return current

    def clear(self) -> None:
        self._tape.clear()


def layer_dropout_seed(runtime_seed: int, name_hash: int, forward_count: int) -> int:
    """Per-layer, per-forward dropout seed; the same at any TP/PP layout."""
    return fmix32_int(fmix32_int(runtime_seed ^ name_hash) ^ fmix32_int(forward_count + 1))


_WRAPPERS: Optional[Tuple[Tuple[type, ...], Tuple[type, ...]]] = None


def _wrapper_types() -> Tuple[Tuple[type, ...], Tuple[type, ...]]:
    """(data-parallel wrappers, all wrappers that hold the real model in ``.module``).

    Imported lazily: megatron's distributed package is heavy and may be absent."""
    global _WRAPPERS
    if _WRAPPERS is None:
        data_parallel: List[type] = [torch.nn.parallel.DistributedDataParallel]
        other: List[type] = []
        for module, name, kind in (
                ("torch.distributed.fsdp", "FullyShardedDataParallel", data_parallel),
                ("megatron.core.distributed", "DistributedDataParallel", data_parallel),
                ("megatron.core.distributed", "TorchFullyShardedDataParallel", data_parallel),
                ("megatron.core.distributed.fsdp.mcore_fsdp_adapter", "FullyShardedDataParallel",
                 data_parallel),
                ("megatron.core.transformer.module", "Float16Module", other)):
            try:
                kind.append(getattr(importlib.import_module(module), name))
            except Exception:  # absent in this torch / megatron-core build
                pass
        _WRAPPERS = (tuple(data_parallel), tuple(data_parallel + other))
    return _WRAPPERS


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / FSDP / Float16Module wrappers (``module`` itself if unwrapped)."""
    wrappers = _wrapper_types()[1]
    while isinstance(module, wrappers) and isinstance(getattr(module, "module", None),
                                                      torch.nn.Module):
        module = module.module
    return module


def data_parallel_wrapper(model) -> Optional[str]:
    """The class name of a data-parallel wrapper around or inside ``model`` (or its chunks),
    including modules sharded in place by FSDP2's ``fully_shard``; None when there is none."""
    dp = _wrapper_types()[0]
    try:
        from torch.distributed.fsdp import FSDPModule
        dp = dp + (FSDPModule,)
    except Exception:  # pragma: no cover - older torch
        pass
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, dp):
                return f"{type(module).__module__}.{type(module).__name__}"
    return None


def model_chunks(model) -> List[torch.nn.Module]:
    """The model chunks of ``model`` (one module or a list of virtual-pipeline chunks), each
    unwrapped from DDP / FSDP / Float16Module: attributes ``apply_lora`` set on a chunk (its
    config) are found through the wrapper the trainer runs."""
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    return [unwrap(c) for c in chunks]


_chunks = model_chunks  # the old private name, kept for callers outside this package


def runtimes(model: Union[torch.nn.Module, Iterable[torch.nn.Module]]) -> List[LoRARuntime]:
    """The distinct runtimes of a model (or list of chunks), in module order."""
    found: List[LoRARuntime] = []
    for chunk in model_chunks(model):
        for module in chunk.modules():
            rt = getattr(module, "_lora_runtime", None)
            if rt is not None and all(rt is not r for r in found):
                found.append(rt)
    return found


def set_head_ids(model, head_ids: Optional[torch.Tensor]) -> None:
    """Give the adapted layers of ``model`` the per-token B-head ids of the next forward.

    ``head_ids``: [batch, seq] integers like the token ids (modality: text=0, image=1, ...;
    -1 = no adapter for that token), or None to clear. Call it in the forward-step function,
    for the chunk being run, before ``model(...)``. Values are range-checked when the tensor is
    on the CPU (on GPU that would cost a host sync each microbatch).
    """
    found = runtimes(model)
    if not found:
        raise ValueError("set_head_ids: the model has no LoRA layers; call megalora.apply_lora "
                         "first")
    for rt in found:
        rt.set_head_ids(head_ids)

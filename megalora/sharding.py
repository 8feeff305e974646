"""How the LoRA factors are split over TP (comm-optimal), and full <-> local conversion.

Global shapes: A [r, in], B [K, out, r], router R [K, in].

| base kind  | A                | B                    | R                | grad partial under SP |
|------------|------------------|----------------------|------------------|-----------------------|
| column     | replicated       | split on out (dim 1) | replicated       | A, R                  |
| row        | split on in (1)  | replicated           | split on in (1)  | B                     |
| duplicated | replicated       | replicated           | replicated       | all                   |

Only the rank-r activation (plus K router logits) crosses TP ranks. Under sequence parallelism a
replicated factor sees only this rank's tokens, so its gradient is a partial sum: it carries
``sequence_parallel=True`` and is SUM-reduced over TP once per step (Megatron's
``finalize_model_grads`` or ``megalora.finalize_lora_grads``). Replicated factors are marked
``tensor_model_parallel=False`` so grad-norm counts them once.

Splits honour Megatron's partition stride: with stride s, dim is cut into s*TP equal chunks and
rank i holds chunks i, i+TP, ... (a SwiGLU fc1 keeps [gate_i; up_i] on rank i).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from megalora.base_layers import BaseLinearSplit

FACTORS = ("lora_A", "lora_B", "lora_router")


@dataclass(frozen=True)
class FactorSharding:
    """How one factor tensor is split over TP."""

    dim: Optional[int]
    """Split dim of the global tensor, None when replicated."""
    stride: int = 1
    partial_grad_under_sp: bool = False
    """Its gradient is a per-rank partial sum when sequence parallelism is on."""


def factor_shardings(base: BaseLinearSplit) -> Dict[str, FactorSharding]:
    """The table above, for one base layer."""
    sp = base.sequence_parallel
    if base.kind == "column":
        return {"lora_A": FactorSharding(None, 1, sp),
                "lora_B": FactorSharding(1, base.out_stride, False),
                "lora_router": FactorSharding(None, 1, sp)}
    if base.kind == "row":
        return {"lora_A": FactorSharding(1, 1, False),
                "lora_B": FactorSharding(None, 1, sp),
                "lora_router": FactorSharding(1, 1, False)}
    return {name: FactorSharding(None, 1, sp) for name in FACTORS}


def global_shapes(base: BaseLinearSplit, rank: int, num_heads: int) -> Dict[str, tuple]:
    """Full (unsharded) shapes of the factors of one adapted layer."""
    return {"lora_A": (rank, base.in_features),
            "lora_B": (num_heads, base.out_features, rank),
            "lora_router": (num_heads, base.in_features)}


def _chunk_ids(rank: int, world: int, stride: int) -> List[int]:
    return [rank + i * world for i in range(stride)]


def shard(full: torch.Tensor, spec: FactorSharding, rank: int, world: int) -> torch.Tensor:
    """This rank's piece of ``full`` (a contiguous copy)."""
    if spec.dim is None or world == 1:
        return full.clone()
    size = full.shape[spec.dim]
    if size % (world * spec.stride):
        raise ValueError(f"cannot split dim {spec.dim} of size {size} into {world} TP ranks x "
                         f"stride {spec.stride}")
    chunks = full.chunk(world * spec.stride, dim=spec.dim)
    return torch.cat([chunks[i] for i in _chunk_ids(rank, world, spec.stride)],
                     dim=spec.dim).contiguous()


def unshard(pieces: List[torch.Tensor], spec: FactorSharding) -> torch.Tensor:
    """Inverse of ``shard``: the full tensor from every rank's piece, in rank order."""
    world = len(pieces)
    if spec.dim is None or world == 1:
        return pieces[0]
    ordered: List[Optional[torch.Tensor]] = [None] * (world * spec.stride)
    for rank, piece in enumerate(pieces):
        for i, chunk in enumerate(piece.chunk(spec.stride, dim=spec.dim)):
            ordered[_chunk_ids(rank, world, spec.stride)[i]] = chunk
    return torch.cat(ordered, dim=spec.dim)


def set_parallel_attributes(param: torch.nn.Parameter, spec: FactorSharding,
                            base: BaseLinearSplit) -> None:
    """The attributes Megatron's DDP, finalize_model_grads, grad-norm and checkpointing read."""
    sharded = spec.dim is not None and base.tp_size > 1
    param.tensor_model_parallel = sharded
    param.partition_dim = spec.dim if sharded else -1
    param.partition_stride = spec.stride if sharded else 1
    # finalize_model_grads SUMs params flagged sequence_parallel over TP when SP is on.
    param.sequence_parallel = bool(spec.partial_grad_under_sp and base.sequence_parallel)
    param.allreduce = True  # data-parallel all-reduce as usual (not an expert param)

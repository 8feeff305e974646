"""Megatron dist-checkpointing for adapters: ``sharded_state_dict`` entries with the right split.

For a whole model saved with Megatron's own ``dist_checkpointing``. The other two kinds of
checkpoint are megalora's adapter file, the adapter alone (``megalora.adapter_file``), and the
trainer's run checkpoints (``megalora.umm.run_checkpoint``).

The base layer's own ``sharded_state_dict`` builds entries from ``state_dict()``, which now also
holds ``lora_*``; it would label them replicated. They are replaced here by ShardedTensors that
follow the factor's real TP split (including Megatron's partition stride, e.g. SwiGLU fc1's
[gate_i; up_i] rows of B), so a dist-checkpoint saved at one TP size loads at another.
"""

from __future__ import annotations

from typing import Dict

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.parallel_state import get_data_parallel_rank
from megatron.core.transformer.utils import (make_sharded_tensor_for_checkpoint,
                                             make_tp_sharded_tensor_for_checkpoint)

from megalora.comm import group_rank
from megalora.sharding import factor_shardings


def _strided_factory(key, tensor, axis, stride, base_split, sharded_offsets, replica_id):
    """A factory that saves each of the ``stride`` local chunks at its global fragment."""
    prepend = len(sharded_offsets)
    tp, rank = base_split.tp_size, base_split.tp_rank

    @torch.no_grad()
    def build(key, t, replica_id, flattened_range):
        chunks = torch.chunk(t, stride, dim=axis)
        return [ShardedTensor.from_rank_offsets(
            key, chunk.contiguous(), *sharded_offsets,
            (axis + prepend, rank + i * tp, tp * stride),
            replica_id=replica_id, prepend_axis_num=prepend) for i, chunk in enumerate(chunks)]

    def merge(parts):
        with torch.no_grad():
            return torch.cat(parts, dim=axis)

    return ShardedTensorFactory(key, tensor, build, merge, replica_id)


def adapter_sharded_state_dict(layer, base: Dict, prefix: str, sharded_offsets, metadata) -> Dict:
    """``base`` with the layer's adapter entries replaced by correctly sharded ones."""
    base_split = layer.lora_base_split
    shardings = factor_shardings(base_split)
    dp_rank = get_data_parallel_rank(with_context_parallel=True)
    dp_group = (metadata or {}).get("dp_cp_group")
    for name, param in layer.lora_parameters().items():
        key = f"{prefix}{name}"
        spec = shardings[name]
        if spec.dim is None or base_split.tp_size == 1:
            base[key] = make_sharded_tensor_for_checkpoint(
                param, key, prepend_offsets=sharded_offsets, tp_group=base_split.tp_group,
                dp_cp_group=dp_group)
        elif spec.stride == 1:
            base[key] = make_tp_sharded_tensor_for_checkpoint(
                param, key, spec.dim, prepend_offsets=sharded_offsets, tp_group=base_split.tp_group,
                dp_cp_group=dp_group)
        else:
            replica = (0, 0, dp_rank if dp_group is None else group_rank(dp_group))
            base[key] = _strided_factory(key, param, spec.dim, spec.stride, base_split,
                                         sharded_offsets, replica)
    return base

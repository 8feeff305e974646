"""A base model initialised the same way at any TP/PP layout (for random bases: tests, dry
runs, the tiny demo models; a real run imports a checkpoint over it).

Megatron's own init draws in construction order, which differs between pipeline stages and
tensor-parallel ranks. ``init_base_deterministic`` draws each parameter at full size from a
generator keyed by (seed, canonical name) and keeps this rank's slice, so the same seed gives
the same full model at TP=1, TP=2, PP=2, ...
"""

from __future__ import annotations

import zlib

import torch

from megalora.inject import canonical_names
from megalora.sharding import FactorSharding, shard


@torch.no_grad()
def init_base_deterministic(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Draw each parameter at full size from a generator keyed by its canonical name, then keep
    this rank's TP slice (Megatron's partition dim and stride). Norm weights stay at 1."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    rank = ps.get_tensor_model_parallel_rank()
    names = canonical_names(model)
    modules = dict(model.named_modules())
    norms = (torch.nn.LayerNorm, torch.nn.RMSNorm)
    for path, param in model.named_parameters():
        module_path, leaf = path.rsplit(".", 1)
        last = module_path.rsplit(".", 1)[-1]
        if isinstance(modules[module_path], norms) or "norm" in last or last.startswith("ln_"):
            continue
        sharded = getattr(param, "tensor_model_parallel", False) and tp > 1
        dim = getattr(param, "partition_dim", 0) if sharded else None
        spec = FactorSharding(dim, getattr(param, "partition_stride", 1) if sharded else 1)
        full_shape = list(param.shape)
        if dim is not None:
            full_shape[dim] *= tp
        key = f"{seed}:{names[module_path]}.{leaf}"
        gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        scale = std if leaf == "weight" else std / 2
        full = torch.randn(full_shape, generator=gen, dtype=torch.float64) * scale
        param.copy_(shard(full, spec, rank, tp).to(param.dtype))

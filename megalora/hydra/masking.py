"""Rank masking inside a fixed maximum rank, SVD truncation, and the effective parameter count.

HyDRA changes a module's rank without reallocating tensors: the adapter keeps its built rank
R (``lora.rank``; the factors A [R, in], B [K, out, R]) and a 0/1 mask over the R ranks
multiplies the rank-R activations ``z = x A^T`` (``LoRAMixin._lora_add``). Ranks are always a
prefix: rank k means ranks 0..k-1 are on. The rank dimension is never TP-sharded (A is split
on ``in`` for row layers, B on ``out`` for column layers), so the mask is the same on every TP
rank and optimizer state and sharding stay valid.

* A module at rank k computes exactly what an adapter built at rank k would with the first k
  rows of A, the first k columns of B and the **same scale**: the scale is not re-derived from
  k (as in AdaLoRA), so shrinking by truncation keeps the trained update's leading part.
* Masked ranks get zero gradients in both factors (their activations are zero), and
  ``truncate_`` re-seeds the masked rows of A (B stays zero there) so a rank that is switched on
  later starts like a fresh LoRA rank: no change to the output, non-zero gradient for B.
* ``truncate_(module, k)``: the best rank-k approximation (Eckart-Young) of the active update
  scale * B A, computed from two R x R Gram matrices (all-reduced over TP where the factor is
  sharded) and an R x R SVD, so no full weight is ever gathered; the new factors are balanced
  (B' = Q_B U_k S_k^1/2, A' = S_k^1/2 V_k^T Q_A^T) and shared-A multi-B adapters are
  truncated jointly over their stacked heads.
* ``effective_parameters``: sum over modules of k (in + K out) on full (unsharded) shapes,
  summed over pipeline stages (an all-reduce over the PP group); every TP rank counts the same.
"""

from __future__ import annotations

import math
import zlib
from typing import Dict, Iterator, Tuple

import torch
import torch.distributed as dist

from megalora.layers import LoRAMixin
from megalora.sharding import factor_shardings


def adapted_modules(model) -> Iterator[Tuple[str, LoRAMixin]]:
    """(canonical name, module) of every adapted layer of this stage, in model order: layer
    indices are global under pipeline parallelism (``megalora.inject.canonical_names``)."""
    for _, m in model.named_modules():
        if isinstance(m, LoRAMixin) and m._lora_ready:
            yield m.lora_name, m


def max_rank(module: LoRAMixin) -> int:
    return module.lora_settings.rank


def get_rank(module: LoRAMixin) -> int:
    """The module's active rank (its built rank when unmasked)."""
    if module.lora_rank_mask is None:
        return max_rank(module)
    return int(module.lora_rank_mask.sum().item())


@torch.no_grad()
def start_at(module: LoRAMixin, k: int) -> None:
    """The first allocation of a freshly built adapter: rank k, with B zero beyond it, so that
    switching a rank on later leaves the output unchanged (any init_b)."""
    set_rank(module, k)
    module.lora_B[..., k:] = 0


def set_rank(module: LoRAMixin, k: int) -> None:
    """Switch on ranks 0..k-1 only (0 <= k <= built rank). No weights change."""
    r = max_rank(module)
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= r:
        raise ValueError(f"{module.lora_name}: rank {k!r} is outside [0, {r}] (the adapter is "
                         f"built at lora.rank={r}; build it larger to allow more)")
    mask = torch.zeros(r, dtype=module.lora_A.dtype, device=module.lora_A.device)
    mask[:k] = 1
    module.lora_rank_mask = mask


def rank_cost(module: LoRAMixin) -> int:
    """Trainable parameters one rank adds to the module, on full shapes: in + K out."""
    base, s = module.lora_base_split, module.lora_settings
    return base.in_features + s.num_heads * base.out_features


def effective_parameters(model, pp_group=None) -> int:
    """Adapter parameters at the active ranks (rank-independent router weights excluded), over
    every pipeline stage when ``pp_group`` is given."""
    modules = [m for _, m in adapted_modules(model)]
    total = sum(get_rank(m) * rank_cost(m) for m in modules)
    if pp_group is not None and dist.is_initialized() and dist.get_world_size(pp_group) > 1:
        device = modules[0].lora_A.device if modules else torch.device("cpu")  # NCCL: CUDA
        t = torch.tensor([total], dtype=torch.float64, device=device)
        dist.all_reduce(t, group=pp_group)
        total = int(t.item())
    return total


def allocation(model) -> Dict[str, int]:
    """This stage's active rank per module."""
    return {name: get_rank(m) for name, m in adapted_modules(model)}


def _gram(x: torch.Tensor, sharded: bool, group) -> torch.Tensor:
    """x^T x ([n, R] -> [R, R]) summed over the TP ranks that hold pieces of x's rows."""
    g = x.t() @ x
    if sharded and group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(g, group=group)
    return g


def _root(gram: torch.Tensor, rtol: float = 1e-12) -> Tuple[torch.Tensor, torch.Tensor]:
    """(R, R^+) with R^T R = gram and R^+ the pseudo-inverse (eigenvalues below rtol x largest
    are treated as zero: a LoRA B starts at exactly zero)."""
    vals, vecs = torch.linalg.eigh(gram)
    keep = vals > rtol * max(float(vals.max()), 0.0)
    root = vals.clamp(min=0).sqrt()
    inv = torch.where(keep, 1.0 / torch.where(keep, root, torch.ones_like(root)),
                      torch.zeros_like(root))
    return root[:, None] * vecs.t(), vecs * inv[None, :]


@torch.no_grad()
def truncate_(module: LoRAMixin, k: int, seed: int = 0) -> torch.Tensor:
    """Shrink the module to rank k by SVD truncation of its active update, in place; returns
    the R singular values of the active B A (every TP rank gets the same, in float64)."""
    r = max_rank(module)
    if not 0 <= k <= r:
        raise ValueError(f"{module.lora_name}: rank {k} is outside [0, {r}]")
    base = module.lora_base_split
    shardings = factor_shardings(base)
    mask = (module.lora_rank_mask if module.lora_rank_mask is not None
            else torch.ones(r, device=module.lora_A.device)).to(torch.float64)
    a = module.lora_A.to(torch.float64) * mask[:, None]            # [R, in_local]
    b = module.lora_B.to(torch.float64) * mask                     # [K, out_local, R]
    heads, out_local = b.shape[0], b.shape[1]
    b2 = b.reshape(heads * out_local, r)
    rb, rb_inv = _root(_gram(b2, shardings["lora_B"].dim is not None, base.tp_group))
    ra, ra_inv = _root(_gram(a.t(), shardings["lora_A"].dim is not None, base.tp_group))
    # B A = (B R_b^+) (R_b R_a^T) (R_a^+T A): orthonormal x core x orthonormal
    u, sv, vh = torch.linalg.svd(rb @ ra.t())
    root_s = sv[:k].sqrt()
    new_b = (b2 @ rb_inv @ u[:, :k]) * root_s[None, :]             # [K out_local, k]
    new_a = root_s[:, None] * (vh[:k] @ ra_inv.t() @ a)            # [k, in_local]
    # kept ranks without signal (the update has rank < k, e.g. B still zero early on) restart
    # as fresh LoRA ranks: zero A and B rows would be a saddle with zero gradients forever
    live = sv[:k] > 1e-12 * max(float(sv[0]), 0.0) if k else sv[:0] > 0
    a_out = _fresh_rows(module, seed).to(torch.float64)
    a_out[:k][live] = new_a[live]
    b_out = torch.zeros_like(b2)
    b_out[:, :k] = new_b * live.to(new_b.dtype)[None, :]
    module.lora_A.copy_(a_out.to(module.lora_A.dtype))
    module.lora_B.copy_(b_out.reshape(heads, out_local, r).to(module.lora_B.dtype))
    set_rank(module, k)
    return sv


def _fresh_rows(module: LoRAMixin, seed: int) -> torch.Tensor:
    """This rank's piece of a freshly seeded A (kaiming uniform, keyed by seed and the module's
    name: the same full tensor on every TP layout), for the ranks that are switched off."""
    from megalora.sharding import shard

    base = module.lora_base_split
    g = torch.Generator().manual_seed(zlib.crc32(f"hydra:{seed}:{module.lora_name}".encode()))
    bound = 1.0 / math.sqrt(base.in_features)
    full = torch.empty(max_rank(module), base.in_features).uniform_(-bound, bound, generator=g)
    return shard(full, factor_shardings(base)["lora_A"], base.tp_rank,
                 base.tp_size).to(module.lora_A.device)


def _masters(optimizer):
    """(torch optimizer, {id(model param): master param}) pairs inside ``optimizer``: megalora's
    AdapterOptimizer (fp32 masters of low-precision adapters), megatron-core's optimizers
    (chained, fp32, or fp16/bf16 with fp32 main params) or a plain torch optimizer."""
    if hasattr(optimizer, "masters") and hasattr(optimizer, "params"):  # AdapterOptimizer
        return [(optimizer.opt, {id(p): m for p, m in zip(optimizer.params, optimizer.masters)})]
    inner = getattr(optimizer, "opt", optimizer)  # MegatronAdapterOptimizer
    out = []
    for opt in getattr(inner, "chained_optimizers", [inner]):
        mapping = {}
        for model_group, main_group in zip(getattr(opt, "float16_groups", []),
                                           getattr(opt, "fp32_from_float16_groups", [])):
            mapping.update({id(p): m for p, m in zip(model_group, main_group)})
        torch_opt = getattr(opt, "optimizer", opt)
        for group in torch_opt.param_groups:
            mapping.update({id(p): p for p in group["params"] if id(p) not in mapping})
        out.append((torch_opt, mapping))
    return out


@torch.no_grad()
def reset_optimizer(optimizer, params) -> int:
    """After ``params`` were rewritten (a truncation: a new basis), copy them into their fp32
    master copies and zero their per-parameter optimizer state (Adam's moments). Returns how
    many parameters were found."""
    found = 0
    for torch_opt, mapping in _masters(optimizer):
        for p in params:
            master = mapping.get(id(p))
            if master is None:
                continue
            found += 1
            if master is not p:
                master.copy_(p.to(master.dtype))
            for value in torch_opt.state.get(master, {}).values():
                if torch.is_tensor(value) and value.shape == master.shape:
                    value.zero_()
    return found

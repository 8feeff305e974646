"""The ``triton`` backend of ``megalora.ops``: adapts the op signatures to the kernel launchers.

Imported only when the backend is chosen (it imports triton). Kernels accumulate in fp32 and
return fp32 gradients; ``megalora.ops`` casts them to the parameters' dtypes.
"""

from __future__ import annotations

from typing import Optional

from megalora.reference import DropoutSpec
from megalora.triton_kernels.lora_expand import lora_expand_bwd, lora_expand_fwd
from megalora.triton_kernels.lora_shrink import (lora_shrink_bwd_da, lora_shrink_bwd_dx,
                                                 lora_shrink_fwd)


def _drop_kwargs(dropout: Optional[DropoutSpec]) -> dict:
    if dropout is None:
        return {}
    return dict(probs=tuple(dropout.probs), seed=dropout.seed, token_offset=dropout.token_offset,
                feature_offset=dropout.feature_offset)


def shrink_fwd(x, a, dropout, head_ids):
    return lora_shrink_fwd(x.contiguous(), a.contiguous(), head_ids=head_ids,
                           **_drop_kwargs(dropout))


def shrink_bwd(ds, x, a, dropout, head_ids, split_heads, need_dx):
    ds, a = ds.contiguous(), a.contiguous()
    kw = _drop_kwargs(dropout)
    dx = lora_shrink_bwd_dx(ds, a, x.dtype, head_ids=head_ids, **kw) if need_dx else None
    stack = lora_shrink_bwd_da(ds, x.contiguous(), a.dtype, head_ids=head_ids,
                               split_heads=split_heads, **kw)
    da = stack.sum(0) if split_heads else stack[0]
    return dx, da, (stack[:split_heads] if split_heads else None)


def expand_fwd(s, b, scale, head_ids, weights, out=None):
    target = out.view(-1, out.shape[-1]) if out is not None else None
    y = lora_expand_fwd(s.contiguous(), b.contiguous(), scale, head_ids, weights, target)
    return out if out is not None else y


def expand_bwd(dy, s, b, scale, head_ids, weights, deterministic):
    return lora_expand_bwd(dy.contiguous(), s.contiguous(), b.contiguous(), scale, head_ids,
                           weights, deterministic)



"""``lora_shrink``: s = dropout(x) @ A^T and its gradients (dx, dA and the per-head dA split).

Contract: ``megalora.reference.lora_shrink_ref`` / ``lora_shrink_backward_ref``. Dropout masks are
regenerated from (seed, global token, global feature) in every kernel, never stored.

Launchers only (no autograd): ``lora_shrink_fwd``, ``lora_shrink_bwd_dx``, ``lora_shrink_bwd_da``.
"""

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from megalora.triton_kernels.common import (block_sizes, cast, dot_flags, dropout_scale, mma,
                                            pow2, row_hash, split_count)

_MAX_WIDE = 128  # columns of the stacked per-head operand handled by one program


@triton.jit
def _token_p(ids_ptr, p_ptr, rm, mask_m, PER_HEAD_P: tl.constexpr):
    if PER_HEAD_P:
        ids = tl.maximum(tl.load(ids_ptr + rm, mask=mask_m, other=0), 0)
        return tl.load(p_ptr + ids)
    return tl.load(p_ptr + rm * 0)


@triton.jit(do_not_specialize=["seed", "tok_off", "feat_off"])
def _lora_shrink_fwd_kernel(
        x_ptr, a_ptr, s_ptr, ids_ptr, p_ptr,
        T, D, R, sxt, sxd, sar, sad, sst, ssr,
        seed, tok_off, feat_off,
        DROPOUT: tl.constexpr, PER_HEAD_P: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
        UPCAST: tl.constexpr, IEEE: tl.constexpr):
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # 64-bit offsets
    rr = tl.arange(0, BLOCK_R)
    mask_m = rm < T
    if DROPOUT:
        p = _token_p(ids_ptr, p_ptr, rm, mask_m, PER_HEAD_P)
        rh = row_hash(seed, rm + tok_off)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + rm[:, None] * sxt + rd[None, :] * sxd,
                    mask=mask_m[:, None] & (rd < D)[None, :], other=0.0)
        if DROPOUT:  # x * scale with the scale rounded to x's dtype first, as the reference
            scale = cast(dropout_scale(rh, rd + feat_off, p), x.dtype, UPCAST).to(tl.float32)
            x = cast(x.to(tl.float32) * scale, x.dtype, UPCAST)
        a = tl.load(a_ptr + rr[None, :] * sar + rd[:, None] * sad,
                    mask=(rr < R)[None, :] & (rd < D)[:, None], other=0.0)
        acc = mma(x, a, acc, UPCAST, IEEE)
    tl.store(s_ptr + rm[:, None] * sst + rr[None, :] * ssr,
             cast(acc, s_ptr.dtype.element_ty, UPCAST), mask=mask_m[:, None] & (rr < R)[None, :])


@triton.jit(do_not_specialize=["seed", "tok_off", "feat_off"])
def _lora_shrink_dx_kernel(
        ds_ptr, a_ptr, dx_ptr, ids_ptr, p_ptr,
        T, D, R, sdst, sdsr, sar, sad, sxt, sxd,
        seed, tok_off, feat_off,
        DROPOUT: tl.constexpr, PER_HEAD_P: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
        UPCAST: tl.constexpr, IEEE: tl.constexpr):
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # 64-bit offsets
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rr = tl.arange(0, BLOCK_R)
    mask_m, mask_d = rm < T, rd < D
    ds = tl.load(ds_ptr + rm[:, None] * sdst + rr[None, :] * sdsr,
                 mask=mask_m[:, None] & (rr < R)[None, :], other=0.0)
    a = tl.load(a_ptr + rr[:, None] * sar + rd[None, :] * sad,
                mask=(rr < R)[:, None] & mask_d[None, :], other=0.0)
    acc = mma(ds, a, tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32), UPCAST, IEEE)
    if DROPOUT:
        p = _token_p(ids_ptr, p_ptr, rm, mask_m, PER_HEAD_P)
        scale = dropout_scale(row_hash(seed, rm + tok_off), rd + feat_off, p)
        acc = cast(acc, a.dtype, UPCAST).to(tl.float32) * \
            cast(scale, a.dtype, UPCAST).to(tl.float32)
    tl.store(dx_ptr + rm[:, None] * sxt + rd[None, :] * sxd,
             cast(acc, dx_ptr.dtype.element_ty, UPCAST), mask=mask_m[:, None] & mask_d[None, :])


@triton.jit(do_not_specialize=["seed", "tok_off", "feat_off"])
def _lora_shrink_da_kernel(
        ds_ptr, x_ptr, out_ptr, ids_ptr, p_ptr,
        T, D, R, K, tiles_per_split, sdst, sdsr, sxt, sxd, so_s, so_c, so_d,
        seed, tok_off, feat_off,
        DROPOUT: tl.constexpr, PER_HEAD_P: tl.constexpr, SPLIT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
        HEADS_PER_PROG: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """One program: a [heads x r, BLOCK_D] slice of dA_stack over one fixed token split.
    Column c of the stacked operand is (head c // BLOCK_R, rank c % BLOCK_R); a token feeds
    only its own head's rows (SPLIT) or the single stack (no split)."""
    WIDE: tl.constexpr = HEADS_PER_PROG * BLOCK_R
    rd = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    cols = tl.program_id(1) * WIDE + tl.arange(0, WIDE)
    head, j = cols // BLOCK_R, cols % BLOCK_R
    k_lo = tl.program_id(1) * HEADS_PER_PROG
    acc = tl.zeros((WIDE, BLOCK_D), dtype=tl.float32)
    for tile in range(tiles_per_split):
        rm = ((tl.program_id(2) * tiles_per_split + tile) * BLOCK_M +
              tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = rm < T
        if SPLIT:  # unrouted tokens (-1) go to the last slot, so the slots still sum to dA
            ids = tl.load(ids_ptr + rm, mask=mask_m, other=-2)
            ids = tl.where(ids == -1, K - 1, ids)
            mine = (ids >= k_lo) & (ids < k_lo + HEADS_PER_PROG)
            present = tl.max(mine.to(tl.int32), axis=0) > 0
            sel = ids[:, None] == head[None, :]
        else:
            present = tl.min(rm, axis=0) < T
            sel = head[None, :] == 0
        if present:  # skip tiles holding none of this program's heads
            ds = tl.load(ds_ptr + rm[:, None] * sdst + j[None, :] * sdsr,
                         mask=mask_m[:, None] & sel & (j < R)[None, :] & (head < K)[None, :],
                         other=0.0)
            x = tl.load(x_ptr + rm[:, None] * sxt + rd[None, :] * sxd,
                        mask=mask_m[:, None] & (rd < D)[None, :], other=0.0)
            if DROPOUT:
                p = _token_p(ids_ptr, p_ptr, rm, mask_m, PER_HEAD_P)
                scale = dropout_scale(row_hash(seed, rm + tok_off), rd + feat_off, p)
                x = cast(x.to(tl.float32) * cast(scale, x.dtype, UPCAST).to(tl.float32), x.dtype,
                         UPCAST)
            acc = mma(tl.trans(ds.to(x.dtype)), x, acc, UPCAST, IEEE)
    tl.store(out_ptr + tl.program_id(2) * so_s + cols[:, None] * so_c + rd[None, :] * so_d, acc,
             mask=(rd < D)[None, :])


_PROB_TABLES = {}


def _prob_table(probs, device) -> torch.Tensor:
    """The per-head probabilities as a device tensor, made once per (probs, device): building it
    on every call would be a host-to-device copy, i.e. a host sync inside CUDA-graph capture."""
    key = (probs, str(device))
    if key not in _PROB_TABLES:
        _PROB_TABLES[key] = torch.tensor(probs, dtype=torch.float32, device=device)
    return _PROB_TABLES[key]


def _dropout_args(x, probs, head_ids):
    """(DROPOUT, PER_HEAD_P, p tensor, ids tensor) for the kernels."""
    probs = tuple(float(p) for p in probs) if probs else (0.0,)
    dropout = any(p > 0 for p in probs)
    per_head = dropout and len(probs) > 1
    p = _prob_table(probs, x.device)
    ids = head_ids.to(device=x.device, dtype=torch.int32).contiguous() if head_ids is not None \
        else torch.zeros(1, dtype=torch.int32, device=x.device)
    if per_head and head_ids is None:
        raise ValueError("lora_shrink: per-head dropout probabilities need head_ids")
    return dropout, per_head, p, ids


def lora_shrink_fwd(x: torch.Tensor, a: torch.Tensor, probs: Sequence[float] = (0.0,),
                    seed: int = 0, token_offset: int = 0, feature_offset: int = 0,
                    head_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """s [T, r] (a's dtype) = dropout(x) @ a^T for x [T, d], a [r, d]."""
    x = x.to(a.dtype)
    T, D = x.shape
    R = a.shape[0]
    s = torch.empty((T, R), device=x.device, dtype=a.dtype)
    if T == 0:
        return s
    dropout, per_head, p, ids = _dropout_args(x, probs, head_ids)
    bm, bd = block_sizes(T, D)
    upcast, ieee = dot_flags(a.dtype)
    _lora_shrink_fwd_kernel[(triton.cdiv(T, bm),)](
        x, a, s, ids, p, T, D, R, x.stride(0), x.stride(1), a.stride(0), a.stride(1),
        s.stride(0), s.stride(1), seed, token_offset, feature_offset,
        DROPOUT=dropout, PER_HEAD_P=per_head, BLOCK_M=bm, BLOCK_D=bd, BLOCK_R=pow2(R),
        UPCAST=upcast, IEEE=ieee)
    return s


def lora_shrink_bwd_dx(ds: torch.Tensor, a: torch.Tensor, x_dtype: torch.dtype,
                       probs: Sequence[float] = (0.0,), seed: int = 0, token_offset: int = 0,
                       feature_offset: int = 0, head_ids: Optional[torch.Tensor] = None
                       ) -> torch.Tensor:
    """dx [T, d] = dropout_scale * (ds @ a) (no routing: A is shared by every head)."""
    ds = ds.to(a.dtype)
    T, R = ds.shape
    D = a.shape[1]
    dx = torch.empty((T, D), device=ds.device, dtype=x_dtype)
    if T == 0:
        return dx
    dropout, per_head, p, ids = _dropout_args(ds, probs, head_ids)
    bm, bd = block_sizes(T, D)
    upcast, ieee = dot_flags(a.dtype)
    _lora_shrink_dx_kernel[(triton.cdiv(T, bm), triton.cdiv(D, bd))](
        ds, a, dx, ids, p, T, D, R, ds.stride(0), ds.stride(1), a.stride(0), a.stride(1),
        dx.stride(0), dx.stride(1), seed, token_offset, feature_offset,
        DROPOUT=dropout, PER_HEAD_P=per_head, BLOCK_M=bm, BLOCK_D=bd, BLOCK_R=pow2(R),
        UPCAST=upcast, IEEE=ieee)
    return dx


def lora_shrink_bwd_da(ds: torch.Tensor, x: torch.Tensor, a_dtype: torch.dtype,
                       probs: Sequence[float] = (0.0,), seed: int = 0, token_offset: int = 0,
                       feature_offset: int = 0, head_ids: Optional[torch.Tensor] = None,
                       split_heads: int = 0) -> torch.Tensor:
    """dA_stack [max(1, split_heads), r, d] in fp32 from one read of x.

    With ``split_heads`` = K > 0, row block k sums only the tokens whose head id is k (the
    per-head dA split) and one more block (index K) the tokens with head -1, so dA is
    ``dA_stack.sum(0)`` whatever ds holds. Deterministic: fixed token splits reduced in a fixed
    order, no atomics.
    """
    x = x.to(a_dtype)
    T, D = x.shape
    R = ds.shape[1]
    heads = split_heads + 1 if split_heads else 1
    br = pow2(R)
    hpp = max(1, min(triton.next_power_of_2(heads), _MAX_WIDE // br))
    chunks = triton.cdiv(heads, hpp)
    bm, bd = block_sizes(T, D, hpp * br)
    splits = split_count(T, bm, triton.cdiv(D, bd) * chunks)
    tiles = triton.cdiv(triton.cdiv(max(T, 1), bm), splits)
    out = torch.zeros((splits, chunks * hpp * br, D), device=x.device, dtype=torch.float32)
    if T > 0:
        dropout, per_head, p, ids = _dropout_args(x, probs, head_ids)
        if split_heads and head_ids is None:
            raise ValueError("lora_shrink_bwd_da: the per-head split needs head_ids")
        upcast, ieee = dot_flags(a_dtype)
        _lora_shrink_da_kernel[(triton.cdiv(D, bd), chunks, splits)](
            ds, x, out, ids, p, T, D, R, heads, tiles, ds.stride(0), ds.stride(1),
            x.stride(0), x.stride(1), out.stride(0), out.stride(1), out.stride(2),
            seed, token_offset, feature_offset, DROPOUT=dropout, PER_HEAD_P=per_head,
            SPLIT=split_heads > 0, BLOCK_M=bm, BLOCK_D=bd, BLOCK_R=br, HEADS_PER_PROG=hpp,
            UPCAST=upcast, IEEE=ieee)
    stack = out.sum(0) if splits > 1 else out[0]
    return stack.view(chunks * hpp, br, D)[:heads, :R]

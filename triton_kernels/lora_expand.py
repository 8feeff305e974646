"""``lora_expand``: y = scale * sum_k w[:, k] * s @ B[k]^T and its gradients (ds, dB, dw).

Contract: ``megalora.reference.lora_expand_ref`` / ``lora_expand_backward_ref``. Routing (ROUTING
constexpr): 0 = single head, 1 = per-token head ids (-1 = none), 2 = dense weights [T, K].

Tokens are neither sorted nor padded. Heads are handled as one stacked operand: column c of the
"wide" tile is (head c // BLOCK_R, rank c % BLOCK_R), each token's s row placed under its own
head(s) and scaled by its weight, so one MMA covers every head present in a tile. A tile skips a
chunk of heads none of its tokens use (contiguous modality spans cost one head per tile).

Launchers only: ``lora_expand_fwd``, ``lora_expand_bwd``.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from megalora.triton_kernels.common import (block_sizes, cast, dot_flags, mma, pow2,
                                            split_count)

_MAX_WIDE = 128


@triton.jit
def _routing_tile(ids_ptr, w_ptr, rm, mask_m, head, K, swt, swk, ROUTING: tl.constexpr):
    """[BM, WIDE] weight of each token for each stacked column's head (0 outside)."""
    if ROUTING == 0:
        w = tl.where(mask_m[:, None] & (head == 0)[None, :], 1.0, 0.0)
    elif ROUTING == 1:
        ids = tl.load(ids_ptr + rm, mask=mask_m, other=-1)
        w = tl.where(ids[:, None] == head[None, :], 1.0, 0.0)
    else:
        w = tl.load(w_ptr + rm[:, None] * swt + head[None, :] * swk,
                    mask=mask_m[:, None] & (head < K)[None, :], other=0.0).to(tl.float32)
    return w


@triton.jit
def _lora_expand_fwd_kernel(
        s_ptr, b_ptr, y_ptr, ids_ptr, w_ptr, scale,
        T, N, R, K, sst, ssr, sbk, sbn, sbr, syt, syn, swt, swk,
        ROUTING: tl.constexpr, ACCUMULATE: tl.constexpr, CHUNKS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        HEADS_PER_PROG: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    WIDE: tl.constexpr = HEADS_PER_PROG * BLOCK_R
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # 64-bit offsets
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = rm < T, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for chunk in range(CHUNKS):
        cols = chunk * WIDE + tl.arange(0, WIDE)
        head, j = cols // BLOCK_R, cols % BLOCK_R
        w = _routing_tile(ids_ptr, w_ptr, rm, mask_m, head, K, swt, swk, ROUTING)
        if tl.max(tl.max(w, axis=1), axis=0) > 0:
            s = tl.load(s_ptr + rm[:, None] * sst + j[None, :] * ssr,
                        mask=mask_m[:, None] & (j < R)[None, :], other=0.0)
            s_wide = cast(s.to(tl.float32) * w, s.dtype, UPCAST)
            b = tl.load(b_ptr + head[:, None] * sbk + rn[None, :] * sbn + j[:, None] * sbr,
                        mask=((head < K) & (j < R))[:, None] & mask_n[None, :], other=0.0)
            acc = mma(s_wide, b, acc, UPCAST, IEEE)
    acc = acc * scale
    y_ptrs = y_ptr + rm[:, None] * syt + rn[None, :] * syn
    mask = mask_m[:, None] & mask_n[None, :]
    if ACCUMULATE:
        acc += tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, cast(acc, y_ptr.dtype.element_ty, UPCAST), mask=mask)


@triton.jit
def _grad_wide(dy, b_ptr, rn, mask_n, head, j, K, R, sbk, sbn, sbr,
               UPCAST: tl.constexpr, IEEE: tl.constexpr, acc):
    """acc + dy @ B_stack^T: column (k, j) holds (dy @ B[k])[:, j]."""
    bt = tl.load(b_ptr + head[None, :] * sbk + rn[:, None] * sbn + j[None, :] * sbr,
                 mask=mask_n[:, None] & ((head < K) & (j < R))[None, :], other=0.0)
    return mma(dy, bt, acc, UPCAST, IEEE)


@triton.jit
def _router_grad(g, s, chunk, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                 HEADS_PER_PROG: tl.constexpr):
    """(dw [BM, heads of this chunk], their head indices): dw[:, k] = <s, (dy @ B[k])>."""
    dw = tl.sum(tl.reshape(g * s.to(tl.float32), (BLOCK_M, HEADS_PER_PROG, BLOCK_R)), axis=2)
    return dw, chunk * HEADS_PER_PROG + tl.arange(0, HEADS_PER_PROG)


@triton.jit
def _lora_expand_bwd_fused_kernel(
        dy_ptr, s_ptr, b_ptr, ids_ptr, w_ptr, ds_ptr, db_ptr, dw_ptr, scale,
        T, N, R, K, sdyt, sdyn, sst, ssr, sbk, sbn, sbr, swt, swk,
        sdst, sdsr, sdbk, sdbn, sdbr, sdwt, sdwk,
        ROUTING: tl.constexpr, CHUNKS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        HEADS_PER_PROG: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Atomic mode: ds, dw and dB from a single read of dy (fp32 atomics, L2-resident)."""
    WIDE: tl.constexpr = HEADS_PER_PROG * BLOCK_R
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # 64-bit offsets
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = rm < T, rn < N
    dy = tl.load(dy_ptr + rm[:, None] * sdyt + rn[None, :] * sdyn,
                 mask=mask_m[:, None] & mask_n[None, :], other=0.0)
    rr = tl.arange(0, BLOCK_R)
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for chunk in range(CHUNKS):
        cols = chunk * WIDE + tl.arange(0, WIDE)
        head, j = cols // BLOCK_R, cols % BLOCK_R
        w = _routing_tile(ids_ptr, w_ptr, rm, mask_m, head, K, swt, swk, ROUTING)
        if tl.max(tl.max(w, axis=1), axis=0) > 0:
            g = _grad_wide(dy, b_ptr, rn, mask_n, head, j, K, R, sbk, sbn, sbr, UPCAST, IEEE,
                           tl.zeros((BLOCK_M, WIDE), dtype=tl.float32))
            ds += tl.sum(tl.reshape(g * w, (BLOCK_M, HEADS_PER_PROG, BLOCK_R)), axis=1)
            s = tl.load(s_ptr + rm[:, None] * sst + j[None, :] * ssr,
                        mask=mask_m[:, None] & (j < R)[None, :], other=0.0)
            if ROUTING == 2:
                dw, hk = _router_grad(g, s, chunk, BLOCK_M, BLOCK_R, HEADS_PER_PROG)
                tl.atomic_add(dw_ptr + rm[:, None] * sdwt + hk[None, :] * sdwk, dw * scale,
                              mask=mask_m[:, None] & (hk < K)[None, :])
            s_wide = cast(s.to(tl.float32) * w, dy.dtype, UPCAST)
            db = mma(tl.trans(s_wide), dy, tl.zeros((WIDE, BLOCK_N), dtype=tl.float32),
                     UPCAST, IEEE)
            tl.atomic_add(db_ptr + head[:, None] * sdbk + rn[None, :] * sdbn + j[:, None] * sdbr,
                          db * scale, mask=((head < K) & (j < R))[:, None] & mask_n[None, :])
    tl.atomic_add(ds_ptr + rm[:, None] * sdst + rr[None, :] * sdsr, ds * scale,
                  mask=mask_m[:, None] & (rr < R)[None, :])


@triton.jit
def _lora_expand_bwd_ds_kernel(
        dy_ptr, s_ptr, b_ptr, ids_ptr, w_ptr, ds_ptr, dw_ptr, scale,
        T, N, R, K, sdyt, sdyn, sst, ssr, sbk, sbn, sbr, swt, swk, sdst, sdsr, sdwt, sdwk,
        ROUTING: tl.constexpr, CHUNKS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        HEADS_PER_PROG: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Deterministic mode, part 1: a program owns BLOCK_M tokens and loops over all of N."""
    WIDE: tl.constexpr = HEADS_PER_PROG * BLOCK_R
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # 64-bit offsets
    mask_m = rm < T
    rr = tl.arange(0, BLOCK_R)
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for chunk in range(CHUNKS):
        cols = chunk * WIDE + tl.arange(0, WIDE)
        head, j = cols // BLOCK_R, cols % BLOCK_R
        w = _routing_tile(ids_ptr, w_ptr, rm, mask_m, head, K, swt, swk, ROUTING)
        if tl.max(tl.max(w, axis=1), axis=0) > 0:
            g = tl.zeros((BLOCK_M, WIDE), dtype=tl.float32)
            for n0 in range(0, N, BLOCK_N):
                rn = n0 + tl.arange(0, BLOCK_N)
                dy = tl.load(dy_ptr + rm[:, None] * sdyt + rn[None, :] * sdyn,
                             mask=mask_m[:, None] & (rn < N)[None, :], other=0.0)
                g = _grad_wide(dy, b_ptr, rn, rn < N, head, j, K, R, sbk, sbn, sbr, UPCAST,
                               IEEE, g)
            ds += tl.sum(tl.reshape(g * w, (BLOCK_M, HEADS_PER_PROG, BLOCK_R)), axis=1)
            if ROUTING == 2:
                s = tl.load(s_ptr + rm[:, None] * sst + j[None, :] * ssr,
                            mask=mask_m[:, None] & (j < R)[None, :], other=0.0)
                dw, hk = _router_grad(g, s, chunk, BLOCK_M, BLOCK_R, HEADS_PER_PROG)
                tl.store(dw_ptr + rm[:, None] * sdwt + hk[None, :] * sdwk, dw * scale,
                         mask=mask_m[:, None] & (hk < K)[None, :])
    tl.store(ds_ptr + rm[:, None] * sdst + rr[None, :] * sdsr, ds * scale,
             mask=mask_m[:, None] & (rr < R)[None, :])


@triton.jit
def _lora_expand_bwd_db_kernel(
        dy_ptr, s_ptr, ids_ptr, w_ptr, out_ptr, scale,
        T, N, R, K, tiles_per_split, sdyt, sdyn, sst, ssr, swt, swk, so_s, so_c, so_n,
        ROUTING: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr, HEADS_PER_PROG: tl.constexpr, UPCAST: tl.constexpr,
        IEEE: tl.constexpr):
    """Deterministic mode, part 2: dB_stack partial sums over a fixed token split."""
    WIDE: tl.constexpr = HEADS_PER_PROG * BLOCK_R
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * WIDE + tl.arange(0, WIDE)
    head, j = cols // BLOCK_R, cols % BLOCK_R
    acc = tl.zeros((WIDE, BLOCK_N), dtype=tl.float32)
    for tile in range(tiles_per_split):
        rm = ((tl.program_id(2) * tiles_per_split + tile) * BLOCK_M +
              tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = rm < T
        w = _routing_tile(ids_ptr, w_ptr, rm, mask_m, head, K, swt, swk, ROUTING)
        if tl.max(tl.max(w, axis=1), axis=0) > 0:
            s = tl.load(s_ptr + rm[:, None] * sst + j[None, :] * ssr,
                        mask=mask_m[:, None] & (j < R)[None, :], other=0.0)
            dy = tl.load(dy_ptr + rm[:, None] * sdyt + rn[None, :] * sdyn,
                         mask=mask_m[:, None] & (rn < N)[None, :], other=0.0)
            acc = mma(tl.trans(cast(s.to(tl.float32) * w, dy.dtype, UPCAST)), dy, acc, UPCAST,
                      IEEE)
    tl.store(out_ptr + tl.program_id(2) * so_s + cols[:, None] * so_c + rn[None, :] * so_n,
             acc * scale, mask=(rn < N)[None, :])


def _routing_args(s, head_ids, weights, num_heads):
    if weights is not None:
        w = weights.to(torch.float32).contiguous()
        return 2, torch.zeros(1, dtype=torch.int32, device=s.device), w
    dummy_w = torch.zeros((1, 1), dtype=torch.float32, device=s.device)
    if head_ids is not None:
        return 1, head_ids.to(device=s.device, dtype=torch.int32).contiguous(), dummy_w
    if num_heads != 1:
        raise ValueError(f"lora_expand: {num_heads} B heads need head_ids or weights")
    return 0, torch.zeros(1, dtype=torch.int32, device=s.device), dummy_w


def _heads_per_prog(num_heads: int, br: int) -> Tuple[int, int]:
    hpp = max(1, min(triton.next_power_of_2(num_heads), _MAX_WIDE // br))
    return hpp, triton.cdiv(num_heads, hpp)


def lora_expand_fwd(s: torch.Tensor, b: torch.Tensor, scale: float,
                    head_ids: Optional[torch.Tensor] = None,
                    weights: Optional[torch.Tensor] = None,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y [T, N] (b's dtype) for s [T, r], b [K, N, r]; ``out`` given: y is added into it."""
    s = s.to(b.dtype)
    T, R = s.shape
    K, N, _ = b.shape
    routing, ids, w = _routing_args(s, head_ids, weights, K)
    y = out if out is not None else torch.empty((T, N), device=s.device, dtype=b.dtype)
    if T == 0:
        return y
    br = pow2(R)
    hpp, chunks = _heads_per_prog(K, br)
    bm, bn = block_sizes(T, N, hpp * br)
    upcast, ieee = dot_flags(b.dtype)
    _lora_expand_fwd_kernel[(triton.cdiv(T, bm), triton.cdiv(N, bn))](
        s, b, y, ids, w, float(scale), T, N, R, K, s.stride(0), s.stride(1), b.stride(0),
        b.stride(1), b.stride(2), y.stride(0), y.stride(1), w.stride(0), w.stride(1),
        ROUTING=routing, ACCUMULATE=out is not None, CHUNKS=chunks, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_R=br, HEADS_PER_PROG=hpp, UPCAST=upcast, IEEE=ieee)
    return y


def lora_expand_bwd(dy: torch.Tensor, s: torch.Tensor, b: torch.Tensor, scale: float,
                    head_ids: Optional[torch.Tensor] = None,
                    weights: Optional[torch.Tensor] = None, deterministic: bool = False):
    """(ds [T, r] fp32, dB [K, N, r] fp32, dw [T, K] fp32 or None).

    ``deterministic``: no atomics, the same bits every run (dy is read twice); otherwise one
    read of dy with fp32 atomics.
    """
    s, dy = s.to(b.dtype), dy.to(b.dtype)
    T, R = s.shape
    K, N, _ = b.shape
    routing, ids, w = _routing_args(s, head_ids, weights, K)
    ds = torch.zeros((T, R), device=s.device, dtype=torch.float32)
    db = torch.zeros((K, N, R), device=s.device, dtype=torch.float32)
    dw = torch.zeros((T, K), device=s.device, dtype=torch.float32) if routing == 2 else None
    if T == 0:
        return ds, db, dw
    dw_arg = dw if dw is not None else torch.zeros((1, 1), device=s.device)
    br = pow2(R)
    hpp, chunks = _heads_per_prog(K, br)
    bm, bn = block_sizes(T, N, hpp * br)
    upcast, ieee = dot_flags(b.dtype)
    common = dict(ROUTING=routing, BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br, HEADS_PER_PROG=hpp,
                  UPCAST=upcast, IEEE=ieee)
    strides = (dy.stride(0), dy.stride(1), s.stride(0), s.stride(1))
    if not deterministic:
        _lora_expand_bwd_fused_kernel[(triton.cdiv(T, bm), triton.cdiv(N, bn))](
            dy, s, b, ids, w, ds, db, dw_arg, float(scale), T, N, R, K, *strides, b.stride(0),
            b.stride(1), b.stride(2), w.stride(0), w.stride(1), ds.stride(0), ds.stride(1),
            db.stride(0), db.stride(1), db.stride(2), dw_arg.stride(0), dw_arg.stride(1),
            CHUNKS=chunks, **common)
        return ds, db, dw
    _lora_expand_bwd_ds_kernel[(triton.cdiv(T, bm),)](
        dy, s, b, ids, w, ds, dw_arg, float(scale), T, N, R, K, *strides, b.stride(0),
        b.stride(1), b.stride(2), w.stride(0), w.stride(1), ds.stride(0), ds.stride(1),
        dw_arg.stride(0), dw_arg.stride(1), CHUNKS=chunks, **common)
    splits = split_count(T, bm, triton.cdiv(N, bn) * chunks)
    tiles = triton.cdiv(triton.cdiv(T, bm), splits)
    part = torch.empty((splits, chunks * hpp * br, N), device=s.device, dtype=torch.float32)
    _lora_expand_bwd_db_kernel[(triton.cdiv(N, bn), chunks, splits)](
        dy, s, ids, w, part, float(scale), T, N, R, K, tiles, *strides, w.stride(0),
        w.stride(1), part.stride(0), part.stride(1), part.stride(2), **common)
    stack = part.sum(0) if splits > 1 else part[0]
    db = stack.view(chunks * hpp, br, N)[:K, :R].transpose(1, 2).contiguous()
    return ds, db, dw

"""Pieces shared by the LoRA kernels: the dropout hash, the matmul helper, launch settings."""

import os

import torch
import triton
import triton.language as tl

_HASH_TOKEN = 0x9E3779B1
_HASH_FEATURE = 0x85EBCA77


@triton.jit
def fmix32(h):
    """murmur3's 32-bit finaliser on uint32 (wrapping multiplies), as megalora.reference."""
    h ^= h >> 16
    h = h * tl.cast(0x85EBCA6B, tl.uint32)
    h ^= h >> 13
    h = h * tl.cast(0xC2B2AE35, tl.uint32)
    h ^= h >> 16
    return h


@triton.jit
def row_hash(seed, rows):
    """Per-token half of the dropout hash: fmix32(seed ^ t * C_TOKEN). rows: global token idx."""
    return fmix32(tl.cast(seed, tl.uint32) ^ (rows.to(tl.uint32) *
                                              tl.cast(0x9E3779B1, tl.uint32)))


@triton.jit
def dropout_scale(rhash, cols, p):
    """keep / (1 - p) for a [BM, BD] tile: rhash [BM] from ``row_hash``, cols [BD] global
    feature indices, p [BM] per-token probabilities (fp32)."""
    h = fmix32(rhash[:, None] ^ (cols.to(tl.uint32) * tl.cast(0x85EBCA77, tl.uint32))[None, :])
    u = (h >> 8).to(tl.float32) * (1.0 / 16777216.0)
    return tl.where(u >= p[:, None], 1.0 / (1.0 - p[:, None]), 0.0)


@triton.jit
def cast(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """x.to(dtype), rounding to nearest even. Under the CPU interpreter (UPCAST) bf16
    conversions truncate instead, doubling the rounding error; round the bits by hand there."""
    if UPCAST:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & tl.cast(0xFFFF0000, tl.uint32)
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ b with fp32 accumulation. UPCAST (the CPU interpreter with bf16): feed fp32
    operands, because the interpreter mis-reads bf16 MMA operands; bf16 products are exact in
    fp32, so the numbers match a GPU's bf16 MMA up to summation order. IEEE: full-precision fp32
    (no TF32)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run on the CPU through numpy)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_flags(dtype: torch.dtype):
    """(UPCAST, IEEE) for operands of ``dtype``."""
    upcast = interpreting() and dtype == torch.bfloat16
    ieee = dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    return upcast, ieee


def pow2(n: int, minimum: int = 16) -> int:
    """Next power of two >= max(n, minimum) (tl.dot needs every dim >= 16)."""
    return max(minimum, triton.next_power_of_2(max(1, n)))


BLOCKS_ENV = "MEGALORA_TRITON_BLOCKS"
"""``BMxBN`` (e.g. ``64x128``): pin the GPU tiles of the streaming passes, as chosen by the
GPU check's tile search (``python -m megalora.bench gpu-check``); BLOCK_N is still halved where
the fp32 tile would pass 32 KB."""


def pinned_blocks():
    """(BLOCK_M, BLOCK_N) from MEGALORA_TRITON_BLOCKS, or None when it is unset."""
    value = os.environ.get(BLOCKS_ENV, "").strip()
    if not value:
        return None
    try:
        bm, bn = (int(v) for v in value.lower().split("x"))
    except ValueError:
        bm = bn = 0
    if not all(v >= 16 and v & (v - 1) == 0 for v in (bm, bn)):
        raise ValueError(f"{BLOCKS_ENV}={value!r}: expected BMxBN with powers of two >= 16 "
                         f"(e.g. 64x128); unset it for the defaults")
    return bm, bn


def block_sizes(tokens: int, features: int, wide: int = 16):
    """(BLOCK_M, BLOCK_N) for a [tokens, features] streaming pass whose programs also hold a
    [wide, BLOCK_N] fp32 tile. Small under the interpreter (every program instance is a Python
    loop). On GPU 64 x 128 unless MEGALORA_TRITON_BLOCKS pins them, with BLOCK_N halved until
    that tile is <= 32 KB (untuned defaults: the GPU check's tile search decides on the
    device)."""
    if interpreting():
        return 16, 32
    bm, bn = pinned_blocks() or (64, 128)
    while wide * bn > 8192 and bn > 32:
        bn //= 2
    return bm, bn


def split_count(tokens: int, block_m: int, programs: int) -> int:
    """Fixed token splits for reductions over T: enough programs to fill a GPU, decided from
    shapes only (no host sync), so the deterministic second stage is reproducible."""
    if interpreting():
        return 1
    blocks = triton.cdiv(tokens, block_m)
    want = max(1, 264 // max(1, programs))  # ~2 waves on 132 SMs
    return max(1, min(want, blocks, 32))

"""The numerical contract of shared-A / multi-B LoRA, in plain PyTorch.

Everything a fused kernel must reproduce lives here, runs on any device and in any dtype, and is
what tests use (in float64) as the independent reference. Shapes use T for tokens (Megatron's
[s, b] flattened sequence-major), d_in/d_out for the *local* feature sizes, r for the rank and K
for the number of B heads.

    shrink:  s[t]  = (x[t] * keep[t] / (1 - p_t)) @ A^T                 A: [r, d_in]
    route:   w[t]  = one-hot(head_id[t])  |  topk_renorm(softmax(x[t] @ R^T))
    expand:  y[t]  = scale * sum_k w[t, k] * s[t] @ B[k]^T               B: [K, d_out, r]

Dropout masks are a pure function of (seed, global token index, global feature index): a
counter-based hash (murmur3's 32-bit finaliser), written with 32-bit multiplies emulated in int64
so the same bits come out of PyTorch here and of uint32 arithmetic in a Triton kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

_M32 = 0xFFFFFFFF
_C_TOKEN = 0x9E3779B1  # golden-ratio constant: spreads consecutive token indices
_C_FEATURE = 0x85EBCA77
_C_MIX1 = 0x85EBCA6B  # murmur3 fmix32 constants
_C_MIX2 = 0xC2B2AE35


def _mul32(a: torch.Tensor, b: int) -> torch.Tensor:
    """(a * b) mod 2**32 for int64 ``a`` in [0, 2**32) without int64 overflow."""
    lo = (a & 0xFFFF) * b
    hi = (((a >> 16) * b) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, _C_MIX1)
    h = h ^ (h >> 13)
    h = _mul32(h, _C_MIX2)
    return h ^ (h >> 16)


def fmix32_int(h: int) -> int:
    """The same finaliser on a Python int (used to derive per-layer seeds)."""
    h &= _M32
    h ^= h >> 16
    h = (h * _C_MIX1) & _M32
    h ^= h >> 13
    h = (h * _C_MIX2) & _M32
    return h ^ (h >> 16)


def dropout_uniform_ref(seed: int, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) numbers, shape [len(tokens), len(features)], from global indices.

    ``u = (fmix32(fmix32(seed ^ t*C_TOKEN) ^ j*C_FEATURE) >> 8) / 2**24`` with 32-bit wrap-around.
    """
    t = tokens.to(torch.int64) & _M32
    j = features.to(torch.int64) & _M32
    row = _fmix32((seed & _M32) ^ _mul32(t, _C_TOKEN))
    h = _fmix32(row[:, None] ^ _mul32(j, _C_FEATURE)[None, :])
    return (h >> 8).to(torch.float32) * (1.0 / 16777216.0)


@dataclass(frozen=True)
class DropoutSpec:
    """Where a local block of x sits in the global token x feature grid, and what to drop."""

    probs: Sequence[float]
    """One probability per head (indexed by head id) or a single shared one."""
    seed: int
    token_offset: int = 0
    """Global index of the block's first token (sequence-parallel shards start mid-sequence)."""
    feature_offset: int = 0
    """Global index of the block's first feature (row-parallel shards start mid-hidden)."""

    def active(self) -> bool:
        return any(p > 0.0 for p in self.probs)


def dropout_scale_ref(spec: DropoutSpec, num_tokens: int, num_features: int,
                      head_ids: Optional[torch.Tensor] = None,
                      device: Optional[torch.device] = None) -> torch.Tensor:
    """keep / (1 - p) as float32 [T, d]: the factor dropout multiplies x by."""
    tokens = torch.arange(num_tokens, device=device) + spec.token_offset
    features = torch.arange(num_features, device=device) + spec.feature_offset
    u = dropout_uniform_ref(spec.seed, tokens, features)
    if len(spec.probs) == 1:
        p = torch.full((num_tokens, 1), float(spec.probs[0]), device=device)
    else:
        if head_ids is None:
            raise ValueError("per-head dropout probabilities need per-token head ids")
        table = torch.tensor([float(q) for q in spec.probs], device=device)
        p = table[head_ids.clamp(min=0).to(torch.long)][:, None]
    return (u >= p).to(torch.float32) / (1.0 - p)


def lora_shrink_ref(x: torch.Tensor, a: torch.Tensor, dropout: Optional[DropoutSpec] = None,
                    head_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """s = dropout(x) @ A^T.  x: [T, d_in], A: [r, d_in] -> s: [T, r] in A's dtype."""
    x = x.to(a.dtype)
    if dropout is not None and dropout.active():
        scale = dropout_scale_ref(dropout, x.shape[0], x.shape[1], head_ids, x.device)
        x = x * scale.to(x.dtype)
    return x @ a.t()


def lora_shrink_backward_ref(ds: torch.Tensor, x: torch.Tensor, a: torch.Tensor,
                             dropout: Optional[DropoutSpec] = None,
                             head_ids: Optional[torch.Tensor] = None, split_heads: int = 0):
    """Gradients of ``lora_shrink_ref``: (dx [T, d_in], dA [r, d_in], dA_split or None).

    dA_split [K, r, d_in] (``split_heads`` = K > 0) holds each head's share of dA: the sum over
    the tokens routed to head k (tokens with head -1 contribute nothing).
    """
    ds = ds.to(a.dtype)
    xd = x.to(a.dtype)
    dx = ds @ a
    if dropout is not None and dropout.active():
        scale = dropout_scale_ref(dropout, x.shape[0], x.shape[1], head_ids, x.device)
        xd, dx = xd * scale.to(xd.dtype), dx * scale.to(dx.dtype)
    da = ds.t() @ xd
    split = None
    if split_heads:
        split = torch.stack([ds[head_ids == k].t() @ xd[head_ids == k]
                             for k in range(split_heads)])
    return dx.to(x.dtype), da, split


def lora_expand_backward_ref(dy: torch.Tensor, s: torch.Tensor, b: torch.Tensor, scale: float,
                             head_ids: Optional[torch.Tensor] = None,
                             weights: Optional[torch.Tensor] = None):
    """Gradients of ``lora_expand_ref``: (ds [T, r], dB [K, d_out, r], dweights [T, K] or None).

    With g_k = dy @ B[k]:  ds = scale * sum_k w_k g_k;  dB[k] = scale * (w_k dy)^T s;
    dw[:, k] = scale * <s, g_k> (router weights only).
    """
    dy, s = dy.to(b.dtype), s.to(b.dtype)
    if weights is not None:
        w = weights.to(b.dtype)
    elif head_ids is not None:
        w = torch.zeros(s.shape[0], b.shape[0], dtype=b.dtype, device=s.device)
        valid = head_ids >= 0
        w[valid, head_ids[valid].long()] = 1.0
    else:
        w = torch.ones(s.shape[0], 1, dtype=b.dtype, device=s.device)
    g = [dy @ b[k] for k in range(b.shape[0])]
    ds = scale * sum(w[:, k:k + 1] * g[k] for k in range(b.shape[0]))
    db = torch.stack([scale * (w[:, k:k + 1] * dy).t() @ s for k in range(b.shape[0])])
    dw = None
    if weights is not None:
        dw = torch.stack([scale * (s * g[k]).sum(-1) for k in range(b.shape[0])], dim=1)
    return ds, db, dw


def router_weights_ref(logits: torch.Tensor, top_k: Optional[int] = None) -> torch.Tensor:
    """HydraLoRA routing weights: softmax over heads in at least fp32, optionally top-k and
    renormalised.  logits: [T, K] -> w: [T, K] (float32, or float64 for float64 logits).
    """
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    if top_k is None or top_k >= probs.shape[-1]:
        return probs
    vals, idx = probs.topk(top_k, dim=-1)
    vals = vals / vals.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, idx, vals)


def lora_expand_ref(s: torch.Tensor, b: torch.Tensor, scale: float,
                    head_ids: Optional[torch.Tensor] = None,
                    weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = scale * sum_k w[:, k] * s @ B[k]^T.  s: [T, r], B: [K, d_out, r] -> y: [T, d_out].

    Exactly one of: ``head_ids`` [T] (int, -1 = no adapter: y row is zero), ``weights`` [T, K],
    or neither (K must be 1: plain LoRA).
    """
    s = s.to(b.dtype)
    if weights is not None:
        w = weights.to(s.dtype)
        y = sum(w[:, k:k + 1] * (s @ b[k].t()) for k in range(b.shape[0]))
    elif head_ids is not None:
        y = s.new_zeros(s.shape[0], b.shape[1])
        for k in range(b.shape[0]):
            rows = (head_ids == k).nonzero().squeeze(1)
            y = y.index_add(0, rows, s.index_select(0, rows) @ b[k].t())
    else:
        if b.shape[0] != 1:
            raise ValueError(f"lora_expand_ref: {b.shape[0]} B heads need head_ids or weights")
        y = s @ b[0].t()
    return y * scale


def multi_b_lora_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     a: torch.Tensor, b: torch.Tensor, scale: float, *,
                     head_ids: Optional[torch.Tensor] = None,
                     router: Optional[torch.Tensor] = None, top_k: Optional[int] = None,
                     dropout: Optional[DropoutSpec] = None) -> torch.Tensor:
    """The whole adapted linear on one process: x W^T + bias + LoRA.  x: [T, d_in]."""
    y = x @ weight.t()
    if bias is not None:
        y = y + bias
    s = lora_shrink_ref(x, a, dropout, head_ids)
    weights = router_weights_ref(x.to(router.dtype) @ router.t(), top_k) if router is not None \
        else None
    return y + lora_expand_ref(s, b, scale, None if weights is not None else head_ids, weights)


def gram_ref(grads, groups, num_groups: int) -> torch.Tensor:
    """G[g, i, j] = sum over tensors p of group g of <grads[i][p], grads[j][p]>, in float64.

    grads: K lists of P tensors (same shapes across lists); groups: P group indices.
    """
    K = len(grads)
    out = torch.zeros(num_groups, K, K, dtype=torch.float64)
    for p, g in enumerate(groups):
        flat = [grads[k][p].detach().reshape(-1).to(torch.float64).cpu() for k in range(K)]
        for i in range(K):
            for j in range(K):
                out[int(g), i, j] += torch.dot(flat[i], flat[j])
    return out


def combine_ref(grads, weights: torch.Tensor, groups, out=None) -> list:
    """out[p] = sum_k weights[group(p), k] * grads[k][p] (+ out[p]), in float64."""
    result = []
    w = weights.to(torch.float64).cpu()
    for p, g in enumerate(groups):
        acc = sum(w[int(g), k] * grads[k][p].detach().to(torch.float64).cpu()
                  for k in range(len(grads)))
        if out is not None:
            acc = acc + out[p].detach().to(torch.float64).cpu()
        result.append(acc)
    return result

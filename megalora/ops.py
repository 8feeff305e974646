"""The op dispatch point: every adapter computation goes through ``lora_shrink``/``lora_expand``.

The two ops are the halves of the LoRA branch on either side of the tensor-parallel collective
(only the rank-r activation ``s`` crosses ranks), so a layer calls them separately. Each has one
autograd Function (``LoRAShrinkFunction``, ``LoRAExpandFunction``) whose forward and backward
call a backend's implementation; every backend must match ``megalora.reference``:

- ``torch``: the reference formulas (forward and explicit backward). Runs everywhere.
- ``triton``: the fused kernels in ``megalora.triton_kernels`` (CUDA tensors; CPU tensors only
  under ``TRITON_INTERPRET=1``, for tests).

``auto`` picks ``triton`` for CUDA tensors when it can run them and ``torch`` otherwise, and logs
once which path runs and why.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from megalora import reference
from megalora.reference import DropoutSpec

logger = logging.getLogger("megalora")

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Backend:
    """One implementation of the two ops (plain functions, no autograd)."""

    unavailable: Callable[[torch.device, torch.dtype], Optional[str]]
    shrink_fwd: Callable
    shrink_bwd: Callable
    expand_fwd: Callable
    expand_bwd: Callable


def _torch_shrink_fwd(x, a, dropout, head_ids):
    return reference.lora_shrink_ref(x, a, dropout, head_ids)


def _torch_shrink_bwd(ds, x, a, dropout, head_ids, split_heads, need_dx):
    return reference.lora_shrink_backward_ref(ds, x, a, dropout, head_ids, split_heads)


def _torch_expand_fwd(s, b, scale, head_ids, weights, out=None):
    y = reference.lora_expand_ref(s, b, scale, head_ids, weights)
    return y if out is None else out.add_(y.reshape(out.shape).to(out.dtype))


def _torch_expand_bwd(dy, s, b, scale, head_ids, weights, deterministic):
    return reference.lora_expand_backward_ref(dy, s, b, scale, head_ids, weights)


def _triton_unavailable(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "CPU tensors run Triton only under TRITON_INTERPRET=1 (a slow test mode)"
    if device.type not in ("cuda", "cpu"):
        return f"no Triton path for {device.type} tensors"
    if dtype not in _KERNEL_DTYPES:
        return f"kernels take float16/bfloat16/float32, not {dtype}"
    return None


def _triton_impl() -> Backend:
    from megalora import triton_ops

    return Backend(_triton_unavailable, triton_ops.shrink_fwd, triton_ops.shrink_bwd,
                   triton_ops.expand_fwd, triton_ops.expand_bwd)


_BACKENDS: Dict[str, Callable[[], Backend]] = {
    "torch": lambda: Backend(lambda device, dtype: None, _torch_shrink_fwd, _torch_shrink_bwd,
                             _torch_expand_fwd, _torch_expand_bwd),
    "triton": _triton_impl,
}
_announced = set()


def backend_names():
    return sorted(_BACKENDS)


def _availability(name: str, device, dtype) -> Optional[str]:
    if name == "triton":
        return _triton_unavailable(device, dtype)
    return _BACKENDS[name]().unavailable(device, dtype)


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend to use for tensors on ``device`` of ``dtype``; logs the choice once."""
    if requested not in ("auto",) + tuple(_BACKENDS):
        raise ValueError(f"unknown LoRA backend {requested!r}; available: auto, "
                         f"{', '.join(backend_names())}")
    if requested != "auto":
        reason = _availability(requested, device, dtype)
        if reason is not None:
            raise RuntimeError(f"LoRA backend {requested!r} cannot run {dtype} on {device}: "
                               f"{reason}; use backend='auto' or 'torch'")
        chosen, why = requested, "requested in LoRAConfig.backend"
    elif device.type == "cuda" and _availability("triton", device, dtype) is None:
        chosen, why = "triton", "fused Triton kernels for CUDA tensors"
    else:
        reason = _availability("triton", device, dtype) if device.type == "cuda" else \
            f"{device.type} tensors"
        chosen, why = "torch", f"plain-PyTorch reference ({reason})"
    key = (requested, device.type, dtype, chosen)
    if key not in _announced:
        _announced.add(key)
        # Said by default only when CUDA tensors miss the Triton kernels (a slower run than the
        # user would expect); the expected choice, or one the user made, is a verbose-run line.
        fallback = requested == "auto" and device.type == "cuda" and chosen != "triton"
        logger.log(logging.INFO if fallback else logging.DEBUG,
                   "megalora: LoRA adapter maths runs on the %r path: %s", chosen, why)
    return chosen


class LoRAShrinkFunction(torch.autograd.Function):
    """s = dropout(x) @ A^T. Backward: dx, dA and (when a sink is given) the per-head dA split
    accumulated into ``split_sink`` [K, r, d_in] fp32."""

    @staticmethod
    def forward(ctx, x, a, backend, dropout, head_ids, split_sink):
        impl = _BACKENDS[backend]()
        ctx.impl, ctx.dropout, ctx.split_sink = impl, dropout, split_sink
        ctx.save_for_backward(x, a, head_ids)
        return impl.shrink_fwd(x, a, dropout, head_ids)

    @staticmethod
    def backward(ctx, ds):
        x, a, head_ids = ctx.saved_tensors
        sink = ctx.split_sink
        split = sink.shape[0] if sink is not None else 0
        dx, da, da_split = ctx.impl.shrink_bwd(ds, x, a, ctx.dropout, head_ids, split,
                                               ctx.needs_input_grad[0])
        if sink is not None:
            sink.add_(da_split.to(sink.dtype))
        return (dx.to(x.dtype) if ctx.needs_input_grad[0] else None, da.to(a.dtype),
                None, None, None, None)


class LoRAExpandFunction(torch.autograd.Function):
    """y = scale * sum_k w_k s @ B_k^T, or ``out += ...`` in place when ``out`` is given (one
    read-modify-write of the base output instead of writing y and adding it). Backward: ds, dB,
    (router weights) dw, and dy passed through to ``out``."""

    @staticmethod
    def forward(ctx, s, b, weights, out, backend, scale, head_ids, deterministic):
        impl = _BACKENDS[backend]()
        ctx.impl, ctx.scale, ctx.deterministic = impl, scale, deterministic
        ctx.save_for_backward(s, b, weights, head_ids)
        if out is None:
            return impl.expand_fwd(s, b, scale, head_ids, weights)
        ctx.mark_dirty(out)
        return impl.expand_fwd(s, b, scale, head_ids, weights, out)

    @staticmethod
    def backward(ctx, dy):
        s, b, weights, head_ids = ctx.saved_tensors
        # with ``out``, dy arrives in out's shape (e.g. [s, b, d_out])
        ds, db, dw = ctx.impl.expand_bwd(dy.reshape(-1, dy.shape[-1]), s, b, ctx.scale,
                                         head_ids, weights, ctx.deterministic)
        return (ds.to(s.dtype), db.to(b.dtype), dw.to(weights.dtype) if dw is not None else None,
                dy if ctx.needs_input_grad[3] else None, None, None, None, None)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, dropout: Optional[DropoutSpec] = None,
                head_ids: Optional[torch.Tensor] = None, backend: str = "auto",
                split_sink: Optional[torch.Tensor] = None) -> torch.Tensor:
    """s = dropout(x) @ A^T (see ``reference.lora_shrink_ref``)."""
    name = resolve_backend(backend, x.device, a.dtype)
    if dropout is not None and not dropout.active():
        dropout = None
    return LoRAShrinkFunction.apply(x, a, name, dropout, head_ids, split_sink)


def lora_expand(s: torch.Tensor, b: torch.Tensor, scale: float,
                head_ids: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None,
                backend: str = "auto", deterministic: bool = False,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = scale * sum_k w_k s B_k^T (see ``reference.lora_expand_ref``); with ``out`` (any
    contiguous shape holding T x d_out, e.g. the base layer's [s, b, d_out] output) the result is
    added into ``out`` in place and ``out`` is returned. ``out`` must not be a view whose base
    autograd tracks separately: pass the tensor itself."""
    name = resolve_backend(backend, s.device, b.dtype)
    deterministic = deterministic or torch.are_deterministic_algorithms_enabled()
    return LoRAExpandFunction.apply(s, b, weights, out, name, scale, head_ids, deterministic)

"""The op dispatch point: every adapter computation goes through ``lora_shrink``/``lora_expand``.

The two ops are the halves of the LoRA branch that sit on either side of the tensor-parallel
collective (only the rank-r activation ``s`` crosses ranks), which is why a layer calls them
separately rather than one fused ``lora(x)``. Each backend must match ``megalora.reference``:

- ``torch``: the reference itself, differentiated by PyTorch autograd. Runs everywhere.
- fused kernels (Triton, for CUDA tensors) plug in here; ``auto`` picks them when they exist for
  the tensors' device and falls back to ``torch`` otherwise, saying once which path runs and why.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Optional, Tuple

import torch

from megalora import reference
from megalora.reference import DropoutSpec

logger = logging.getLogger("megalora")

#: name -> (is_available(device) -> Optional[str reason unavailable], shrink, expand)
_BACKENDS: Dict[str, Tuple[Callable, Callable, Callable]] = {}
_announced = set()


def register_backend(name: str, unavailable_reason: Callable[[torch.device], Optional[str]],
                     shrink: Callable, expand: Callable) -> None:
    """Add a backend. ``unavailable_reason(device)`` returns None when it can run there."""
    _BACKENDS[name] = (unavailable_reason, shrink, expand)


def _torch_shrink(x, a, dropout, head_ids):
    return reference.lora_shrink_ref(x, a, dropout, head_ids)


def _torch_expand(s, b, scale, head_ids, weights):
    return reference.lora_expand_ref(s, b, scale, head_ids, weights)


register_backend("torch", lambda device: None, _torch_shrink, _torch_expand)


def resolve_backend(requested: str, device: torch.device) -> str:
    """Pick the backend for ``device``; logs the choice once per (request, device type)."""
    if requested != "auto":
        if requested not in _BACKENDS:
            raise ValueError(f"unknown LoRA backend {requested!r}; available: {sorted(_BACKENDS)}")
        reason = _BACKENDS[requested][0](device)
        if reason is not None:
            raise RuntimeError(f"LoRA backend {requested!r} cannot run on {device}: {reason}")
        chosen, why = requested, "requested in LoRAConfig.backend"
    else:
        chosen, why = "torch", None
        skipped = []
        for name, (unavailable, _, _) in _BACKENDS.items():
            if name == "torch":
                continue
            reason = unavailable(device)
            if reason is None:
                chosen, why = name, f"fastest available for {device.type} tensors"
                break
            skipped.append(f"{name}: {reason}")
        if why is None:
            why = "no fused backend for " + device.type + " tensors" + (
                f" ({'; '.join(skipped)})" if skipped else " (none registered)")
    key = (requested, device.type)
    if key not in _announced:
        _announced.add(key)
        logger.info("megalora: adapter maths on the %r path: %s", chosen, why)
    return chosen


def lora_shrink(x: torch.Tensor, a: torch.Tensor, dropout: Optional[DropoutSpec] = None,
                head_ids: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """s = dropout(x) @ A^T (see ``reference.lora_shrink_ref``)."""
    name = resolve_backend(backend, x.device)
    return _BACKENDS[name][1](x, a, dropout, head_ids)


def lora_expand(s: torch.Tensor, b: torch.Tensor, scale: float,
                head_ids: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None,
                backend: str = "auto") -> torch.Tensor:
    """y = scale * sum_k w_k s B_k^T (see ``reference.lora_expand_ref``)."""
    name = resolve_backend(backend, s.device)
    return _BACKENDS[name][2](s, b, scale, head_ids, weights)

"""Which base linears can carry an adapter, and how each one is split over tensor parallelism.

A registry maps a base class to a *kind* (``column``, ``row``, ``duplicated``) and a *style*
(``mcore``: Megatron-core's own layers; ``te``: Transformer Engine linears; ``te_ln``: TE's
LayerNorm+linear, whose adapter must read the post-norm activation). Megatron-core's layers are
always registered; TE's are added on first use when ``transformer_engine`` imports, and a log line
says so when it does not. ``register_base_layer`` lets a project add its own linear classes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from megalora.comm import group_rank, group_size

logger = logging.getLogger("megalora")

_REGISTRY: Dict[type, Tuple[str, str]] = {}
_te_checked = False


@dataclass(frozen=True)
class BaseLinearSplit:
    """How a base linear is split over its tensor-parallel group (sizes are global). An adapted
    layer keeps it as ``lora_base_split``; ``megalora.sharding`` derives the factors' split."""

    kind: str
    """``column`` (weight split on out), ``row`` (split on in) or ``duplicated`` (replicated)."""
    style: str
    """``mcore``, ``te`` or ``te_ln``."""
    in_features: int
    out_features: int
    tp_group: Optional[torch.distributed.ProcessGroup]
    tp_size: int
    tp_rank: int
    sequence_parallel: bool
    """Inputs (column, duplicated) or outputs (row) are split along the sequence over TP."""
    out_stride: int = 1
    """Column only: Megatron's partition stride of the out dim (2 for a SwiGLU fc1: each rank
    holds [gate_i; up_i])."""
    gather_output: bool = False
    """Column only: the base all-gathers its output over TP."""
    input_is_parallel: bool = True
    """Row only: the input arrives already split over TP on its last dim."""


def register_base_layer(cls: type, kind: str, style: str = "mcore") -> None:
    """Declare that instances of ``cls`` (and subclasses) can be adapted as ``kind``/``style``."""
    if kind not in ("column", "row", "duplicated") or style not in ("mcore", "te", "te_ln"):
        raise ValueError(f"register_base_layer: bad kind/style {kind!r}/{style!r}")
    _REGISTRY[cls] = (kind, style)


def _ensure_registered() -> None:
    global _te_checked
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    _REGISTRY.setdefault(ColumnParallelLinear, ("column", "mcore"))
    _REGISTRY.setdefault(RowParallelLinear, ("row", "mcore"))
    if _te_checked:
        return
    _te_checked = True
    try:
        import transformer_engine  # noqa: F401  (megatron's wrapper imports even without it)
        from megatron.core.extensions import transformer_engine as te_ext

        if not getattr(te_ext, "HAVE_TE", True):
            raise ImportError("megatron.core.extensions.transformer_engine has HAVE_TE=False")
    except Exception as exc:  # ImportError, or TE present but broken
        # Not installed: no TE layer can exist in this process, so no layer a model holds is
        # skipped (a verbose-run line). Installed but unusable: a broken install, said by default.
        absent = isinstance(exc, ModuleNotFoundError) and exc.name == "transformer_engine"
        logger.log(logging.DEBUG if absent else logging.INFO,
                   "megalora: transformer-engine not importable (%s): TE linear support skipped; "
                   "Megatron-core's own Column/RowParallelLinear are supported", exc)
        return
    # Order matters: TELayerNormColumnParallelLinear/TEColumn/TERow before their base TELinear.
    _REGISTRY.setdefault(te_ext.TELayerNormColumnParallelLinear, ("column", "te_ln"))
    _REGISTRY.setdefault(te_ext.TEColumnParallelLinear, ("column", "te"))
    _REGISTRY.setdefault(te_ext.TERowParallelLinear, ("row", "te"))
    _REGISTRY.setdefault(te_ext.TELinear, ("duplicated", "te"))


def lookup(module: torch.nn.Module) -> Optional[Tuple[str, str]]:
    """(kind, style) for a registered class (nearest in the MRO), else None."""
    return lookup_class(type(module))


def lookup_class(klass: type) -> Optional[Tuple[str, str]]:
    """(kind, style) for a class or its nearest registered ancestor, else None."""
    _ensure_registered()
    for cls in klass.__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


def unsupported_reason(module: torch.nn.Module) -> Optional[str]:
    """Why ``module`` cannot carry an adapter, or None when it can."""
    found = lookup(module)
    if found is None:
        return (f"{type(module).__name__} is not a supported linear (supported: "
                f"{sorted(c.__name__ for c in _REGISTRY)})")
    if getattr(module, "is_expert", False):
        return "MoE expert linears are not supported yet"
    if getattr(module, "weight", None) is None:
        return "the layer has no weight of its own (skip_weight_param_allocation / shared weight)"
    if found[0] == "duplicated" and getattr(module, "parallel_mode", None) not in (None,
                                                                                  "duplicated"):
        return f"TELinear with parallel_mode={module.parallel_mode!r} is not a duplicated linear"
    return None


def detect(module: torch.nn.Module) -> BaseLinearSplit:
    """Read the TP split off a supported base linear (raises ValueError otherwise)."""
    reason = unsupported_reason(module)
    if reason is not None:
        raise ValueError(reason)
    kind, style = lookup(module)
    if style == "mcore":
        group = module.tp_group
        in_f, out_f = module.input_size, module.output_size
    else:
        group = getattr(module, "_tp_group", None) or getattr(module, "tp_group", None)
        in_f, out_f = module.in_features, module.out_features
    size, rank = group_size(group), group_rank(group)
    sp = bool(getattr(module, "sequence_parallel", False)) and size > 1
    return BaseLinearSplit(
        kind=kind, style=style, in_features=int(in_f), out_features=int(out_f),
        tp_group=group, tp_size=size, tp_rank=rank, sequence_parallel=sp,
        out_stride=int(getattr(module.weight, "partition_stride", 1) or 1) if kind == "column"
        else 1,
        gather_output=bool(getattr(module, "gather_output", False)),
        input_is_parallel=bool(getattr(module, "input_is_parallel", True)),
    )

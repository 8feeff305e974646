"""How LoRA enters a Megatron model: ``apply_lora`` (post-build) and ``lora_layer_spec`` (specs).

``apply_lora(model, config)`` adapts the matching linears of a built model (a GPTModel, anything
made of its transformer layers, one pipeline stage, or a list of virtual-pipeline chunks) in
place, freezes every other parameter and returns a report. Run it on every rank, after building
and before wrapping in DDP (so DDP allocates gradient buffers for the adapters only). When
torch.distributed is initialised it is a collective: patterns and parameter counts are checked
and summed over all pipeline stages.

Module paths in patterns and reports are canonical (global layer indices), see
``megalora.config``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.distributed as dist

from megalora import base_layers
from megalora.config import LoRAConfig
from megalora.layers import LoRAMixin, base_class_of, lora_class_for
from megalora.runtime import LoRARuntime, data_parallel_wrapper, model_chunks
from megalora.sharding import global_shapes

ModelLike = Union[torch.nn.Module, Sequence[torch.nn.Module]]
logger = logging.getLogger("megalora")


@dataclass
class ModuleReport:
    name: str
    kind: str
    in_features: int
    out_features: int
    rank: int
    alpha: float
    num_heads: int
    params: int
    """Adapter parameters of this module at full (unsharded) size."""


@dataclass
class LoRAReport:
    """What ``apply_lora`` did, over the whole model (all stages) when distributed."""

    modules: List[ModuleReport] = field(default_factory=list)
    trainable_params: int = 0
    """Adapter parameters of the whole model, each counted once (not per TP shard)."""
    frozen_params: int = 0
    """Base parameters of the whole model at full size, each counted once."""
    local_trainable_params: int = 0
    """Adapter parameters held by this rank."""

    def __str__(self) -> str:
        rows = [f"{'module':<48} {'kind':<10} {'in':>6} {'out':>6} {'r':>4} {'K':>2} "
                f"{'params':>10}"]
        for m in self.modules:
            rows.append(f"{m.name:<48} {m.kind:<10} {m.in_features:>6} {m.out_features:>6} "
                        f"{m.rank:>4} {m.num_heads:>2} {m.params:>10,}")
        pct = 100.0 * self.trainable_params / max(1, self.trainable_params + self.frozen_params)
        rows.append(f"{len(self.modules)} adapted modules; trainable {self.trainable_params:,} "
                    f"({pct:.3f}% of {self.trainable_params + self.frozen_params:,}); "
                    f"on this rank {self.local_trainable_params:,}")
        return "\n".join(rows)


_INDEX = re.compile(r"^(.*\.)(\d+)$")


def canonical_names(chunk: torch.nn.Module) -> Dict[str, str]:
    """Module path -> canonical path (transformer layer indices made global, 0-based)."""
    remap: Dict[str, str] = {}
    for path, module in chunk.named_modules():
        number = getattr(module, "layer_number", None)
        match = _INDEX.match(path)
        if isinstance(number, int) and match:
            remap[path] = f"{match.group(1)}{number - 1}"
    out = {}
    for path, _ in chunk.named_modules():
        best = max((p for p in remap if path == p or path.startswith(p + ".")), key=len,
                   default=None)
        out[path] = remap[best] + path[len(best):] if best else path
    return out


def all_gather_objects(obj) -> list:
    """``obj`` of every rank (small objects, the world's group; [obj] without one)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _check_patterns(config: LoRAConfig, local_paths: List[str], eligible_leaves: set) -> None:
    """Every pattern must match some module on some rank; say what exists when one does not."""
    unused = config.unused_patterns(local_paths)
    gathered = all_gather_objects(unused)
    for fld in ("target_modules", "exclude_modules", "rank_pattern", "alpha_pattern",
                "single_head_modules"):
        never = set(gathered[0].get(fld, []))
        for other in gathered[1:]:
            never &= set(other.get(fld, []))
        if never:
            leaves = sorted(set().union(*all_gather_objects(sorted(eligible_leaves))))
            raise ValueError(f"LoRAConfig.{fld}: {sorted(never)} match no adaptable module. "
                             f"Adaptable module names: {leaves}; patterns may also be globs over "
                             "canonical paths such as 'decoder.layers.0.*.linear_qkv'")


def _targets(chunk, names, config):
    """(path, module) of the adaptable modules selected by ``config``; errors for bad ones."""
    eligible, selected = [], []
    for path, module in chunk.named_modules():
        if base_layers.lookup(module) is None:
            continue
        canonical = names[path]
        eligible.append(canonical)
        if not config.selects(canonical):
            if isinstance(module, LoRAMixin) and not module._lora_ready:
                module.__class__ = base_class_of(module)  # from a spec, but not selected here
            continue
        reason = base_layers.unsupported_reason(module)
        if reason is not None:
            raise ValueError(f"cannot adapt {canonical}: {reason}")
        selected.append((path, canonical, module))
    return eligible, selected


def apply_lora(model: ModelLike, config: LoRAConfig) -> LoRAReport:
    """Adapt the target linears of ``model`` in place; freeze the rest. See module docstring."""
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"apply_lora: config must be a LoRAConfig, got {type(config).__name__}")
    _refuse_wrapped(model)
    report = LoRAReport()
    all_eligible, all_selected, frozen = [], [], 0
    for chunk in model_chunks(model):
        names = canonical_names(chunk)
        eligible, selected = _targets(chunk, names, config)
        all_eligible += eligible
        all_selected.append((chunk, selected))
    _check_patterns(config, all_eligible, {p.rsplit(".", 1)[-1] for p in all_eligible})
    local_reports = []
    for chunk, selected in all_selected:
        frozen += _freeze(chunk)
        runtime = _chunk_runtime(chunk, config)
        chunk._lora_config = config
        for _, canonical, module in selected:
            local_reports.append(_adapt(module, canonical, config, runtime))
        _maybe_fix_recompute_input_grad(chunk)
    report.local_trainable_params = sum(p.numel() for c in model_chunks(model)
                                        for p in c.parameters() if p.requires_grad)
    merged = {}
    for reports in all_gather_objects(local_reports):
        for r in reports:
            merged.setdefault(r.name, r)
    report.modules = [merged[k] for k in sorted(merged, key=_natural_key)]
    report.trainable_params = sum(m.params for m in report.modules)
    report.frozen_params = _global_frozen_count(model)
    _warn_rank_too_large(report.modules)
    return report


def _refuse_wrapped(model: ModelLike) -> None:
    """DDP/FSDP register the parameters that exist when they wrap: adapters added later get no
    gradient buffer, are never reduced, and data-parallel ranks drift apart."""
    wrapper = data_parallel_wrapper(model)
    if wrapper is not None:
        raise ValueError(f"apply_lora: the model is already wrapped in {wrapper}, which does not "
                         "see parameters added after wrapping (the adapters would never be "
                         "reduced over data parallelism). Call megalora.apply_lora on the bare "
                         "model first, then wrap it in DistributedDataParallel")


def _warn_rank_too_large(modules: List[ModuleReport]) -> None:
    """B @ A has rank <= min(in, out): ranks beyond that add parameters but no capacity."""
    over = [m for m in modules if m.rank > min(m.in_features, m.out_features)]
    if not over or (dist.is_initialized() and dist.get_rank() != 0):
        return  # the report is the same on every rank: say it once
    listed = ", ".join(f"{m.name} (r={m.rank}, in={m.in_features}, out={m.out_features})"
                       for m in over[:8])
    more = f" and {len(over) - 8} more" if len(over) > 8 else ""
    logger.warning("megalora: LoRA rank exceeds min(in_features, out_features) for %d module(s): "
                   "%s%s. Their update B @ A cannot have that rank, so the extra parameters are "
                   "wasted: lower LoRAConfig.rank or set rank_pattern for these modules",
                   len(over), listed, more)


def lora_config_of(model: ModelLike) -> Optional[LoRAConfig]:
    """The LoRAConfig ``apply_lora`` gave ``model`` (found through DDP/FSDP wrappers), or None
    when it has no adapters."""
    return next((c._lora_config for c in model_chunks(model)
                 if getattr(c, "_lora_config", None) is not None), None)


def require_lora(model: ModelLike, what: str) -> None:
    """Raise unless ``apply_lora`` ran on ``model`` (a pipeline stage may hold no adapted layer,
    so the config is the mark, not the layer count)."""
    if lora_config_of(model) is None and not lora_modules(model):
        raise ValueError(f"{what}: the model has no LoRA layers; call "
                         "megalora.apply_lora(model, config) first")


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _freeze(chunk: torch.nn.Module) -> int:
    count = 0
    for name, param in chunk.named_parameters():
        if name.rsplit(".", 1)[-1] not in ("lora_A", "lora_B", "lora_router"):
            param.requires_grad_(False)
            count += param.numel()
    return count


def _chunk_runtime(chunk: torch.nn.Module, config: LoRAConfig) -> LoRARuntime:
    runtime = getattr(chunk, "_lora_chunk_runtime", None)
    if runtime is None:
        runtime = LoRARuntime(config.seed, config.num_heads, config.routing)
        chunk._lora_chunk_runtime = runtime
        chunk.register_forward_pre_hook(runtime.on_chunk_forward)
    return runtime


def _adapt(module, canonical: str, config: LoRAConfig, runtime: LoRARuntime) -> ModuleReport:
    if isinstance(module, LoRAMixin) and module._lora_ready:
        raise ValueError(f"{canonical} already has a LoRA adapter (apply_lora called twice?)")
    base = base_layers.detect(module)
    settings = config.settings_for(canonical)
    if settings.routing == "modality" and getattr(getattr(module, "config", None),
                                                  "context_parallel_size", 1) > 1:
        raise ValueError(f"{canonical}: routing='modality' with context parallelism is not "
                         "supported yet (head ids follow the un-split sequence); use "
                         "context_parallel_size=1 or routing='single'/'router'")
    _check_divisible(canonical, base)
    module.__class__ = lora_class_for(type(module))
    module.lora_setup(name=canonical, settings=settings, base_split=base, runtime=runtime,
                      seed=config.seed, init_a=config.init_a, init_b=config.init_b,
                      dtype=config.dtype, backend=config.backend,
                      deterministic=config.deterministic)
    shapes = global_shapes(base, settings.rank, settings.num_heads)
    used = ("lora_A", "lora_B") + (("lora_router",) if settings.routing == "router" else ())
    params = sum(int(torch.Size(shapes[f]).numel()) for f in used)
    return ModuleReport(canonical, base.kind, base.in_features, base.out_features,
                        settings.rank, settings.alpha, settings.num_heads, params)


def _check_divisible(name: str, base) -> None:
    if base.kind == "column" and base.out_features % (base.tp_size * base.out_stride):
        raise ValueError(f"{name}: out_features={base.out_features} does not split over "
                         f"TP={base.tp_size} (stride {base.out_stride})")
    if base.kind == "row" and base.in_features % base.tp_size:
        raise ValueError(f"{name}: in_features={base.in_features} does not split over "
                         f"TP={base.tp_size}")


def _global_frozen_count(model: ModelLike) -> int:
    """Full-size count of frozen parameters, each counted once over TP and PP."""
    from megatron.core import parallel_state as ps

    local = 0
    for chunk in model_chunks(model):
        for param in chunk.parameters():
            if param.requires_grad:
                continue
            tp_parallel = getattr(param, "tensor_model_parallel", False)
            tp = ps.get_tensor_model_parallel_world_size() if ps.is_initialized() else 1
            local += param.numel() * (tp if tp_parallel else 1)
    if not dist.is_initialized() or not ps.is_initialized():
        return local
    # One representative per pipeline stage: TP rank 0 of data-parallel rank 0.
    keep = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    return sum(all_gather_objects(local if keep else 0))


def _maybe_fix_recompute_input_grad(chunk: torch.nn.Module) -> None:
    """With full recompute and a frozen embedding, Megatron's reentrant checkpoint sees inputs
    that need no grad and never runs the adapters' backward (verl#4514, Megatron-Bridge#1762).
    Marking the embedding output as requiring grad restores it."""
    config = getattr(chunk, "config", None)
    embedding = getattr(chunk, "embedding", None)
    if embedding is None or getattr(config, "recompute_granularity", None) != "full":
        return
    if getattr(embedding, "_lora_grad_hook", False):
        return

    def hook(module, args, output):
        if module.training and torch.is_tensor(output) and not output.requires_grad:
            return output.detach().requires_grad_(True)
        return output

    embedding.register_forward_hook(hook)
    embedding._lora_grad_hook = True


# ---------------------------------------------------------------------- model-wide operations
def lora_modules(model: ModelLike) -> List[LoRAMixin]:
    """The adapted layers of a model (or chunks), in module order."""
    return [m for chunk in model_chunks(model) for m in chunk.modules()
            if isinstance(m, LoRAMixin) and m._lora_ready]


def merge_lora(model: ModelLike, head: Optional[int] = None) -> int:
    """Fold the adapters into the base weights on every rank's own shard (no communication).

    ``head`` picks the B head for multi-head adapters (it then applies to every token).
    Returns the number of merged layers. Undo with ``unmerge_lora``.
    """
    require_lora(model, "merge_lora")
    layers = lora_modules(model)
    for layer in layers:
        layer.lora_merge(head)
    return len(layers)


def unmerge_lora(model: ModelLike) -> int:
    """Undo ``merge_lora``. Returns the number of unmerged layers."""
    require_lora(model, "unmerge_lora")
    layers = lora_modules(model)
    for layer in layers:
        layer.lora_unmerge()
    return len(layers)


class disable_lora:
    """Context manager: run the base model only (e.g. reference log-probs in RL)."""

    def __init__(self, model: ModelLike):
        self.layers = lora_modules(model)

    def __enter__(self):
        for layer in self.layers:
            layer.lora_enabled = False
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            layer.lora_enabled = True


def remove_lora(model: ModelLike) -> int:
    """Drop the adapters and restore the base classes (after ``unmerge_lora`` if merged)."""
    layers = lora_modules(model)
    for layer in layers:
        if layer.lora_merged_head is not None:
            raise RuntimeError(f"{layer.lora_name} is merged; call unmerge_lora first")
        for name in ("lora_A", "lora_B", "lora_router"):
            if name in layer._parameters:
                del layer._parameters[name]
        if layer.lora_base_split.style == "te_ln":
            layer.return_layernorm_output = layer._lora_user_wants_ln
        layer.__class__ = base_class_of(layer)
    for chunk in model_chunks(model):
        if getattr(chunk, "_lora_config", None) is not None:
            chunk._lora_config = None  # no adapters left: load/merge must ask for apply_lora
    return len(layers)


# ---------------------------------------------------------------------- ModuleSpec route
def lora_layer_spec(spec, config: LoRAConfig):
    """A copy of a Megatron ``ModuleSpec`` tree whose target linears are LoRA classes.

    Targets are matched by submodule field name (``linear_qkv``, ...); path globs and per-path
    patterns need the built model, so after building call ``apply_lora(model, config)``, which
    initialises these layers (TP-invariant, by canonical name), freezes the base and reports.
    """
    from megatron.core.transformer.spec_utils import ModuleSpec

    def convert(node, field_name: Optional[str]):
        if isinstance(node, type):
            hit = field_name is not None and config.selects(field_name) and \
                base_layers.lookup_class(node) is not None
            return lora_class_for(node) if hit else node
        if isinstance(node, ModuleSpec):
            module = convert(node.module, field_name)
            subs = convert(node.submodules, None) if node.submodules is not None else None
            return dataclasses.replace(node, module=module, submodules=subs)
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            changes = {f.name: convert(getattr(node, f.name), f.name)
                       for f in dataclasses.fields(node)}
            return dataclasses.replace(node, **changes)
        if isinstance(node, (list, tuple)):
            return type(node)(convert(n, None) for n in node)
        return node

    return convert(copy.copy(spec), None)

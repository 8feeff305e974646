"""Adapter files (``save_adapter`` / ``load_adapter``): the adapter alone, loadable at any TP/PP.

One safetensors file of full-size factors plus a manifest. The other two kinds of checkpoint are
Megatron's sharded dist-checkpointing of a whole model (``megalora.dist_checkpoint``) and the
trainer's run checkpoints, an adapter file plus optimizer and data state to resume a run
(``megalora.umm.run_checkpoint``).

Factors are stored at their global shapes under canonical module names
(``decoder.layers.3.self_attention.linear_qkv.lora_A``), gathered over TP and collected over PP
on save, sliced on load, so an adapter saved at TP=2/PP=2 loads at TP=1/PP=1 and the reverse.
The file's metadata holds a JSON manifest: format version, the full LoRAConfig, per-module
split and scale, and each tensor's global shape, dtype and CRC32 (a flipped bit is caught, not
loaded). Non-finite adapters are neither saved nor loaded; a load verifies every tensor (and
every rank's checks) before it changes the model, and refuses another LoRA scale unless asked.

Writes are atomic: the file is written to a temporary name in the same directory, fsynced, then
renamed over the target, so a crash leaves either the old adapter or the new one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import zlib
from typing import Dict, List, Optional, Tuple, Type

import torch
import torch.distributed as dist

from megalora.atomic import atomic_write
from megalora.config import LoRAConfig
from megalora.inject import ModelLike, lora_config_of, lora_modules
from megalora.sharding import factor_shardings, global_shapes, shard, unshard

FORMAT = "megalora-adapter"
FORMAT_VERSION = 1

logger = logging.getLogger("megalora")

Err = Tuple[Type[Exception], str]
"""An error found on one rank, raised on every rank once all have reported."""


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())


def gather_full(param: torch.Tensor, spec, base) -> torch.Tensor:
    """The full (unsharded) tensor of a TP-sharded adapter factor, on the CPU: a collective
    over the factor's TP group when it is sharded."""
    if spec.dim is None or base.tp_size == 1:
        return param.detach().cpu().clone()
    pieces = [torch.empty_like(param) for _ in range(base.tp_size)]
    dist.all_gather(pieces, param.detach().contiguous(), group=base.tp_group)
    return unshard([p.cpu() for p in pieces], spec)


def adapter_state(model: ModelLike) -> Dict[str, torch.Tensor]:
    """Full-size adapter tensors of the layers on this pipeline stage, by canonical key.

    Collective over the tensor-parallel group (every TP rank gets the same result).
    """
    out = {}
    for layer in lora_modules(model):
        specs = factor_shardings(layer.lora_base_split)
        for factor, param in layer.lora_parameters().items():
            out[f"{layer.lora_name}.{factor}"] = gather_full(param, specs[factor],
                                                              layer.lora_base_split)
    return out


def module_manifest(model: ModelLike) -> Dict[str, dict]:
    """Per adapted layer of this stage: base split, rank, alpha, scale, heads and routing."""
    info = {}
    for layer in lora_modules(model):
        s, base = layer.lora_settings, layer.lora_base_split
        info[layer.lora_name] = {
            "kind": base.kind, "in_features": base.in_features,
            "out_features": base.out_features, "out_stride": base.out_stride, "rank": s.rank,
            "alpha": s.alpha, "scale": s.scale, "num_heads": s.num_heads, "routing": s.routing,
            "router_top_k": s.router_top_k}
    return info


def stage_leader() -> bool:
    """True on the one rank per pipeline stage that contributes its tensors (TP 0, DP 0)."""
    from megatron.core import parallel_state as ps

    if not ps.is_initialized():
        return True
    return ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0


def _layout_summary() -> Dict[str, int]:
    from megatron.core import parallel_state as ps

    if not ps.is_initialized():
        return {"tp": 1, "pp": 1}
    return {"tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size()}


def _world_gather(obj) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _raise_first(errors) -> None:
    """Raise the first (exception class, message) of any rank, on every rank alike, so no rank
    goes on into a collective (or a write) that the others have left."""
    found = next((e for e in errors if e), None)
    if found:
        exc = found[0](found[1])
        exc.same_on_all_ranks = True  # read by megalora.errors: rank 0 prints it, once
        raise exc


def _first_non_finite(tensors: Dict[str, torch.Tensor]) -> Optional[str]:
    return next((k for k, v in tensors.items() if not bool(torch.isfinite(v).all())), None)


def _save_error(model: ModelLike, tensors: Dict[str, torch.Tensor], path: str) -> Optional[Err]:
    if lora_config_of(model) is None:
        return ValueError, ("save_adapter: the model has no LoRA adapters (no LoRAConfig to "
                            "store); call megalora.apply_lora(model, config) first")
    bad = _first_non_finite(tensors)
    if bad is not None:
        return FloatingPointError, (
            f"save_adapter: {bad} holds non-finite values (NaN/inf), so {path!r} was not "
            "written: training diverged; lower the learning rate or resume from the last good "
            "checkpoint")
    return None


def save_adapter(model: ModelLike, path: str, extra: Optional[Dict[str, str]] = None) -> None:
    """Write the adapter of ``model`` to ``path`` (collective; global rank 0 writes).

    ``model`` may be wrapped in DDP/FSDP: the file always stores the full LoRAConfig. A
    non-finite adapter tensor is refused (FloatingPointError on every rank) before anything is
    written, so the previous file at ``path`` stays as it was.
    """
    tensors = adapter_state(model)
    _raise_first(_world_gather(_save_error(model, tensors, path)))
    payload = (tensors, module_manifest(model)) if stage_leader() else ({}, {})
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size() if rank0 else None
        dist.gather_object(payload, parts, dst=0)
    else:
        parts = [payload]
    if rank0:
        all_tensors, modules = {}, {}
        for t, m in parts:
            all_tensors.update(t)
            modules.update(m)
        manifest = {
            "format": FORMAT, "version": FORMAT_VERSION,
            "lora_config": lora_config_of(model).to_dict(),
            "modules": modules, "saved_with": _layout_summary(),
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""),
                            "crc32": _crc(v)} for k, v in all_tensors.items()},
            "extra": dict(extra or {})}
        _atomic_save(all_tensors, manifest, path)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _atomic_save(tensors: Dict[str, torch.Tensor], manifest: dict, path: str) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                                             metadata={"format": FORMAT,
                                                       "manifest": json.dumps(manifest)}))


def read_manifest(path: str) -> dict:
    """The manifest of an adapter file; clear errors for missing, corrupt or foreign files."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"adapter file {path!r} does not exist")
    try:
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:
        raise ValueError(f"adapter file {path!r} is not a readable safetensors file (truncated or "
                         f"corrupt?): {exc}") from exc
    if meta.get("format") != FORMAT or "manifest" not in meta:
        raise ValueError(f"{path!r} is a safetensors file but not a megalora adapter (metadata "
                         f"format={meta.get('format')!r})")
    try:
        manifest = json.loads(meta["manifest"])
    except ValueError as exc:
        raise ValueError(f"adapter file {path!r} has a manifest that is not valid JSON ({exc}); "
                         "the file is corrupt: restore it from a good copy") from exc
    _check_manifest(path, manifest)
    if manifest.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path!r} has adapter format version {manifest['version']}; this "
                         f"megalora reads up to {FORMAT_VERSION}: upgrade megalora")
    return manifest


def _check_manifest(path: str, manifest) -> None:
    """The fields the loader reads, so a damaged manifest is one clear error, not a KeyError."""
    problem = None
    if not isinstance(manifest, dict):
        problem = "it is not a JSON object"
    elif not isinstance(manifest.get("tensors"), dict):
        problem = "no 'tensors' table"
    elif not isinstance(manifest.get("modules"), dict):
        problem = "no 'modules' table"
    elif manifest.get("lora_config") is not None and not isinstance(manifest["lora_config"],
                                                                     dict):
        problem = "'lora_config' is not a table"
    else:
        for key, info in manifest["tensors"].items():
            if not (isinstance(info, dict) and isinstance(info.get("shape"), list)
                    and isinstance(info.get("crc32"), int)):
                problem = f"the entry of tensor {key!r} lacks its shape or crc32"
                break
    if problem:
        raise ValueError(f"adapter file {path!r} has a broken manifest ({problem}); it was not "
                         "written by megalora or was edited: restore it from a good copy")


def adapter_config(path: str, manifest: Optional[dict] = None) -> Optional[LoRAConfig]:
    """The LoRAConfig stored in an adapter file; None for older files saved without one (they
    were saved through a DDP wrapper, where the config was not found)."""
    manifest = read_manifest(path) if manifest is None else manifest
    if manifest.get("lora_config") is None:
        return None
    try:
        return LoRAConfig.from_dict(manifest["lora_config"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"adapter file {path!r}: its stored LoRAConfig is not valid for this "
                         f"megalora ({exc})") from exc


#: LoRAConfig fields that decide an adapter's tensors or its maths (not training-only ones
#: such as dropout, seed or init).
ADAPTER_FIELDS = ("rank", "alpha", "use_rslora", "rank_pattern", "alpha_pattern", "num_heads",
                  "routing", "router_top_k", "target_modules", "exclude_modules",
                  "single_head_modules")


def config_differences(stored: LoRAConfig, other: LoRAConfig,
                       fields=ADAPTER_FIELDS) -> List[str]:
    """``"field: stored value vs other value"`` for each of ``fields`` that differs."""
    return [f"{name}: {getattr(stored, name)!r} vs {getattr(other, name)!r}" for name in fields
            if getattr(stored, name) != getattr(other, name)]


def _expected(layer) -> Dict[str, tuple]:
    s = layer.lora_settings
    shapes = global_shapes(layer.lora_base_split, s.rank, s.num_heads)
    return {f"{layer.lora_name}.{f}": tuple(shapes[f]) for f in layer.lora_parameters()}


def _key_error(path: str, manifest: dict, layers) -> Optional[str]:
    file_keys = set(manifest["tensors"])
    local = {k: v for layer in layers for k, v in _expected(layer).items()}
    missing = sorted(set(local) - file_keys)
    if missing:
        return (f"adapter {path!r} lacks {len(missing)} tensor(s) this model needs, e.g. "
                f"{missing[:4]}; was it saved from a model with other target modules?")
    for key, shape in local.items():
        got = tuple(manifest["tensors"][key]["shape"])
        if got != shape:
            return (f"adapter {path!r}: {key} has shape {list(got)} in the file but "
                    f"{list(shape)} in the model (global shapes: A [r, in], B [K, out, r], "
                    "router [K, in]); match LoRAConfig.rank/rank_pattern/num_heads to the saved "
                    "adapter")
    return None


def _scale_error(path: str, manifest: dict, layers) -> Optional[str]:
    """The same factors at another alpha / r are another model: refuse unless asked."""
    bad = []
    for layer in layers:
        saved = manifest["modules"].get(layer.lora_name)
        s = layer.lora_settings
        if isinstance(saved, dict) and "scale" in saved and \
                not math.isclose(float(saved["scale"]), s.scale, rel_tol=1e-9):
            bad.append(f"{layer.lora_name} (file alpha={saved.get('alpha')}, scale="
                       f"{saved['scale']:g}; model alpha={s.alpha}, scale={s.scale:g})")
    if not bad:
        return None
    return (f"adapter {path!r} was trained at another LoRA scale than this model uses for "
            f"{len(bad)} module(s), e.g. {'; '.join(bad[:3])}. Apply LoRA with the adapter's "
            "config (megalora.adapter_config(path): alpha, alpha_pattern, use_rslora) "
            "or pass allow_scale_mismatch=True to run its factors at the model's scale")


def _model_error(path: str, model: ModelLike, layers) -> Optional[str]:
    if lora_config_of(model) is None and not layers:
        return ("load_adapter: the model has no LoRA layers; call megalora.apply_lora(model, "
                f"config) first, e.g. with the adapter's own config: "
                f"megalora.adapter_config({path!r})")
    merged = next((layer for layer in layers if layer.lora_merged_head is not None), None)
    if merged is not None:
        return (f"load_adapter: {merged.lora_name} has head {merged.lora_merged_head} merged into "
                "its base weight; call megalora.unmerge_lora(model) before loading (unmerging "
                "later would subtract the new factors from weights holding the old ones)")
    return None


def _read_shards(path: str, manifest: dict,
                 layers) -> Tuple[Optional[Err], Dict[str, torch.Tensor]]:
    """This rank's slice of every tensor it loads, each verified (checksum, finite) first."""
    from safetensors import safe_open

    shards = {}
    with safe_open(path, framework="pt") as fh:
        for layer in layers:
            specs, base = factor_shardings(layer.lora_base_split), layer.lora_base_split
            for factor, param in layer.lora_parameters().items():
                key = f"{layer.lora_name}.{factor}"
                try:
                    full = fh.get_tensor(key)
                except Exception as exc:
                    return (ValueError, f"adapter {path!r}: cannot read {key} ({exc}); the file "
                            "is corrupt, restore it from a good copy"), {}
                if _crc(full) != manifest["tensors"][key]["crc32"]:
                    return (ValueError, f"adapter {path!r}: checksum mismatch for {key}; the file "
                            "is corrupt, restore it from a good copy"), {}
                if not bool(torch.isfinite(full).all()):
                    return (FloatingPointError, f"adapter {path!r}: {key} holds non-finite values "
                            "(NaN/inf), saved from a diverged run; use an earlier checkpoint"), {}
                local = shard(full, specs[factor], base.tp_rank, base.tp_size)
                shards[key] = local.to(device=param.device, dtype=param.dtype)
    return None, shards


def _load_check(path, manifest, model, layers, allow_scale_mismatch):
    """(error or None, verified shards): everything is read and checked, nothing written."""
    error = _model_error(path, model, layers) or _key_error(path, manifest, layers)
    if error is None and not allow_scale_mismatch:
        error = _scale_error(path, manifest, layers)
    if error is not None:
        return (ValueError, error), {}
    return _read_shards(path, manifest, layers)


def load_adapter(model: ModelLike, path: str, strict: bool = True,
                 allow_scale_mismatch: bool = False) -> List[str]:
    """Load an adapter file into ``model`` at any TP/PP layout. Returns the loaded keys.

    Collective when distributed (every rank calls it): each rank reads the file, keeps its own
    shard, and nothing in the model changes unless every check passed on every rank: a model
    with LoRA applied and not merged, keys and shapes, each module's LoRA scale (another
    alpha/r is an error unless ``allow_scale_mismatch``, which runs the file's factors at the
    model's scale), and every tensor's checksum and finiteness. With ``strict`` tensors for
    modules the model does not adapt are an error too.
    """
    manifest = read_manifest(path)
    layers = lora_modules(model)
    error, shards = _load_check(path, manifest, model, layers, allow_scale_mismatch)
    gathered = _world_gather((error, sorted(shards)))
    _raise_first(e for e, _ in gathered)
    if strict:
        unused = sorted(set(manifest["tensors"]) - set().union(*(set(k) for _, k in gathered)))
        if unused:
            raise ValueError(f"adapter {path!r} has {len(unused)} tensor(s) for modules this model "
                             f"does not adapt, e.g. {unused[:4]}; pass strict=False to ignore them")
    mismatch = _scale_error(path, manifest, layers) if allow_scale_mismatch else None
    if mismatch:
        logger.warning("megalora: loading anyway (allow_scale_mismatch=True): %s", mismatch)
    with torch.no_grad():
        for layer in layers:
            for factor, param in layer.lora_parameters().items():
                param.copy_(shards[f"{layer.lora_name}.{factor}"])
    return list(shards)

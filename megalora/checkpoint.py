"""Adapter-only checkpoints: one safetensors file of full-size factors plus a manifest.

Factors are stored at their global shapes under canonical module names
(``decoder.layers.3.self_attention.linear_qkv.lora_A``), gathered over TP and collected over PP
on save, sliced on load, so an adapter saved at TP=2/PP=2 loads at TP=1/PP=1 and the reverse.
The file's metadata holds a JSON manifest: format version, the LoRAConfig, per-module layout,
and each tensor's global shape, dtype and CRC32 (a flipped bit is caught, not loaded).

Writes are atomic: the file is written to a temporary name in the same directory, fsynced, then
renamed over the target, so a crash leaves either the old adapter or the new one.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megalora.atomic import atomic_write
from megalora.inject import ModelLike, lora_modules
from megalora.runtime import _chunks
from megalora.sharding import factor_shardings, global_shapes, shard, unshard

FORMAT = "megalora-adapter"
FORMAT_VERSION = 1


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())


def _gather_full(param: torch.Tensor, spec, layout) -> torch.Tensor:
    if spec.dim is None or layout.tp_size == 1:
        return param.detach().cpu().clone()
    pieces = [torch.empty_like(param) for _ in range(layout.tp_size)]
    dist.all_gather(pieces, param.detach().contiguous(), group=layout.tp_group)
    return unshard([p.cpu() for p in pieces], spec)


def adapter_state(model: ModelLike) -> Dict[str, torch.Tensor]:
    """Full-size adapter tensors of the layers on this pipeline stage, by canonical key.

    Collective over the tensor-parallel group (every TP rank gets the same result).
    """
    out = {}
    for layer in lora_modules(model):
        specs = factor_shardings(layer.lora_layout)
        for factor, param in layer.lora_parameters().items():
            out[f"{layer.lora_name}.{factor}"] = _gather_full(param, specs[factor],
                                                              layer.lora_layout)
    return out


def _module_manifest(model: ModelLike) -> Dict[str, dict]:
    info = {}
    for layer in lora_modules(model):
        s, lay = layer.lora_settings, layer.lora_layout
        info[layer.lora_name] = {
            "kind": lay.kind, "in_features": lay.in_features, "out_features": lay.out_features,
            "out_stride": lay.out_stride, "rank": s.rank, "alpha": s.alpha, "scale": s.scale,
            "num_heads": s.num_heads, "routing": s.routing, "router_top_k": s.router_top_k}
    return info


def _stage_leader() -> bool:
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


def save_adapter(model: ModelLike, path: str, extra: Optional[Dict[str, str]] = None) -> None:
    """Write the adapter of ``model`` to ``path`` (collective; global rank 0 writes)."""
    tensors = adapter_state(model)
    payload = (tensors, _module_manifest(model)) if _stage_leader() else ({}, {})
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
        config = next((getattr(c, "_lora_config", None) for c in _chunks(model)
                       if getattr(c, "_lora_config", None) is not None), None)
        manifest = {
            "format": FORMAT, "version": FORMAT_VERSION,
            "lora_config": config.to_dict() if config is not None else None,
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
    manifest = json.loads(meta["manifest"])
    if manifest.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path!r} has adapter format version {manifest['version']}; this "
                         f"megalora reads up to {FORMAT_VERSION}: upgrade megalora")
    return manifest


def _expected(layer) -> Dict[str, tuple]:
    s = layer.lora_settings
    shapes = global_shapes(layer.lora_layout, s.rank, s.num_heads)
    return {f"{layer.lora_name}.{f}": tuple(shapes[f]) for f in layer.lora_parameters()}


def _check_keys(path: str, manifest: dict, layers, strict: bool) -> None:
    file_keys = set(manifest["tensors"])
    local = {k: v for layer in layers for k, v in _expected(layer).items()}
    missing = sorted(set(local) - file_keys)
    if missing:
        raise ValueError(f"adapter {path!r} lacks {len(missing)} tensor(s) this model needs, e.g. "
                         f"{missing[:4]}; was it saved from a model with other target modules?")
    for key, shape in local.items():
        got = tuple(manifest["tensors"][key]["shape"])
        if got != shape:
            raise ValueError(f"adapter {path!r}: {key} has shape {list(got)} in the file but "
                             f"{list(shape)} in the model (global shapes: A [r, in], B [K, out, r],"
                             " router [K, in]); match LoRAConfig.rank/rank_pattern/num_heads to "
                             "the saved adapter")
    if strict:
        wanted = [set(local)]
        if dist.is_initialized() and dist.get_world_size() > 1:
            wanted = [None] * dist.get_world_size()
            dist.all_gather_object(wanted, set(local))
        unused = sorted(file_keys - set().union(*wanted))
        if unused:
            raise ValueError(f"adapter {path!r} has {len(unused)} tensor(s) for modules this model "
                             f"does not adapt, e.g. {unused[:4]}; pass strict=False to ignore them")


def load_adapter(model: ModelLike, path: str, strict: bool = True) -> List[str]:
    """Load an adapter file into ``model`` at any TP/PP layout. Returns the loaded keys.

    Every rank reads the file and keeps its own shard. With ``strict`` (a collective when
    distributed) tensors for modules the model does not adapt are an error.
    """
    from safetensors import safe_open

    manifest = read_manifest(path)
    layers = lora_modules(model)
    _check_keys(path, manifest, layers, strict)
    loaded = []
    with safe_open(path, framework="pt") as fh, torch.no_grad():
        for layer in layers:
            specs = factor_shardings(layer.lora_layout)
            for factor, param in layer.lora_parameters().items():
                key = f"{layer.lora_name}.{factor}"
                full = fh.get_tensor(key)
                if _crc(full) != manifest["tensors"][key]["crc32"]:
                    raise ValueError(f"adapter {path!r}: checksum mismatch for {key}; the file is "
                                     "corrupt, restore it from a good copy")
                lay = layer.lora_layout
                local = shard(full, specs[factor], lay.tp_rank, lay.tp_size)
                param.copy_(local.to(device=param.device, dtype=param.dtype))
                loaded.append(key)
    return loaded

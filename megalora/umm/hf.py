"""Hugging Face interop of the UMM: import LLaMA weights, export PEFT adapters and merged models.

- ``import_llama(model, dir)``: a LLaMA-architecture checkpoint (config.json + safetensors,
  sharded or not) into this rank's stage at any TP/PP layout; each rank reads only its tensors.
- ``export_peft(model, out_dir, head)``: the adapter as PEFT LoRA for ``LlamaForCausalLM``.
- ``export_merged(model, out_dir, head)``: ``LlamaForCausalLM`` weights with the LoRA folded in.
The ``megalora export-peft`` / ``megalora export-merged`` commands are in
``megalora.umm.hf_cli``.

Names, row orders and configs are mapped by ``megalora.umm.hf_mapping``; each TP rank keeps its
slice by the parameter's own Megatron partition dim and stride. Exports gather shards over TP and
stages over PP; global rank 0 writes (atomically: a temporary file, then a rename).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megalora.atomic import atomic_write, atomic_write_bytes
from megalora.sharding import FactorSharding, shard, unshard
from megalora.umm.ckpt_files import CheckpointFiles
from megalora.umm.hf_mapping import (LORA_FACTORS, check_llama_config, hf_entry, join,
                                     llama_config, merged_tensors, peft_adapter_config,
                                     peft_tensors)

logger = logging.getLogger("megalora")


# ---------------------------------------------------------------------- reading a checkpoint
class _DictReader:
    def __init__(self, state: Dict[str, torch.Tensor]):
        self.state = state

    def get(self, name: str, needed_for: str) -> torch.Tensor:
        if name not in self.state:
            raise ValueError(f"state dict has no tensor {name!r} (needed for {needed_for})")
        return self.state[name]


def tp_info() -> Tuple[int, int]:
    from megatron.core import parallel_state as ps

    if not ps.is_initialized():
        return 1, 0
    return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()


def param_spec(param) -> FactorSharding:
    """How Megatron split ``param`` over TP (dim None = replicated)."""
    if getattr(param, "tensor_model_parallel", False) and tp_info()[0] > 1:
        return FactorSharding(getattr(param, "partition_dim", 0),
                              getattr(param, "partition_stride", 1) or 1)
    return FactorSharding(None)


def base_params(model, entry: Callable = hf_entry):
    """(canonical name, conversion kind, checkpoint names, parameter) of every base parameter of
    this stage that ``entry`` maps (default: to LLaMA), in module order (the same on every TP
    rank)."""
    from megalora.inject import canonical_names

    names = canonical_names(model)
    for path, param in model.named_parameters():
        module_path, leaf = path.rsplit(".", 1)
        if leaf in LORA_FACTORS:
            continue
        canonical = f"{names[module_path]}.{leaf}"
        found = entry(canonical)
        if found is not None:
            yield canonical, found[0], found[1], param


def import_llama(model, path_or_state, hf_config: Optional[dict] = None) -> List[str]:
    """Load LLaMA weights into this rank's stage of ``model`` (a ``UMMModel``) in place.

    ``path_or_state``: a checkpoint directory (config.json + safetensors) or an HF state dict
    (then ``hf_config``, if given, is validated). Only the tensors of this stage are read. The
    visual connectors and the vision encoder keep their init. Returns the loaded canonical
    names. A tied checkpoint (``tie_word_embeddings``) fills the output layer from the
    embedding.
    """
    m = model.run.model
    if isinstance(path_or_state, (str, os.PathLike)):
        path = os.fspath(path_or_state)
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{path!r} is not a Hugging Face checkpoint directory "
                                    "(no config.json)")
        with open(cfg_path) as fh:
            hf_config = json.load(fh)
        reader = CheckpointFiles(path)
    else:
        reader = _DictReader(path_or_state)
    if hf_config is not None:
        check_llama_config(hf_config, m)
    tied = bool((hf_config or {}).get("tie_word_embeddings", False))
    padded = model.llm.vocab_size

    def full(canonical, kind, hf_names):
        if tied and hf_names == ("lm_head.weight",):
            hf_names = ("model.embed_tokens.weight",)
        return join(kind, [reader.get(n, canonical) for n in hf_names], m, padded)

    return load_stage(model, hf_entry, full)


def load_stage(model, entry: Callable, full: Callable) -> List[str]:
    """Copy into each base parameter of this stage that ``entry`` maps its TP slice of
    ``full(canonical, kind, checkpoint names)`` (the whole Megatron tensor); returns the loaded
    canonical names."""
    tp, rank = tp_info()
    loaded = []
    with torch.no_grad():
        for canonical, kind, names, param in base_params(model, entry):
            whole = full(canonical, kind, names)
            local = shard(whole, param_spec(param), rank, tp)
            if local.shape != param.shape:
                raise ValueError(f"{canonical} <- {', '.join(names)}: the checkpoint gives "
                                 f"{list(whole.shape)} (this rank's slice {list(local.shape)}) "
                                 f"but the parameter is {list(param.shape)}")
            param.copy_(local.to(device=param.device, dtype=param.dtype))
            loaded.append(canonical)
    return loaded


# ---------------------------------------------------------------------- gathering for export
def full_base(param, group) -> torch.Tensor:
    """The unsharded base parameter (collective over TP when it is split)."""
    spec = param_spec(param)
    if spec.dim is None:
        return param.detach().cpu().clone()
    pieces = [torch.empty_like(param) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, param.detach().contiguous(), group=group)
    return unshard([p.cpu() for p in pieces], spec)


def _lora_config(model):
    from megalora.inject import lora_config_of

    return lora_config_of(model)


def agree(error: Optional[str]) -> None:
    """Raise ``error`` on every rank when any rank has one (so no rank waits in a collective)."""
    errors = [error]
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    found = next((e for e in errors if e), None)
    if found:
        from megalora.errors import AgreedError
        raise AgreedError(found)  # the same on every rank: printed once


def check_exportable(model, head: int, entry: Callable = hf_entry) -> None:
    """Router-routed or wrongly merged adapters of modules ``entry`` maps cannot become one
    LoRA per module."""
    from megalora.inject import lora_modules

    error = None
    for layer in lora_modules(model):
        s = layer.lora_settings
        if entry(f"{layer.lora_name}.weight") is None:
            continue
        if s.routing == "router":
            error = (f"{layer.lora_name}: routing='router' mixes the B heads per token with a "
                     "learned router; PEFT's LoRA has one B per module, so a router-routed "
                     "adapter cannot be exported (merge or export a modality/single adapter)")
        elif s.num_heads > 1 and not 0 <= head < s.num_heads:
            error = f"head={head} out of range: {layer.lora_name} has {s.num_heads} B heads"
        elif layer.lora_merged_head not in (None, head if s.num_heads > 1 else 0):
            error = (f"{layer.lora_name} has head {layer.lora_merged_head} merged into its base "
                     f"weight; unmerge_lora first to export head {head}")
        if error:
            break
    agree(error)


def stage_payload(model, with_base: bool, entry: Callable = hf_entry) -> dict:
    """This stage's full adapter tensors, per-module settings and (``with_base``) full base
    tensors of the parameters ``entry`` maps. Collective over the TP group."""
    from megatron.core import parallel_state as ps

    from megalora.adapter_file import adapter_state, module_manifest
    from megalora.inject import lora_modules

    lora = adapter_state(model)
    group = ps.get_tensor_model_parallel_group() if ps.is_initialized() else None
    base = {c: (kind, names, full_base(p, group))
            for c, kind, names, p in base_params(model, entry)} if with_base else {}
    modules = module_manifest(model)
    for layer in lora_modules(model):
        modules[layer.lora_name]["merged_head"] = layer.lora_merged_head
    return {"lora": lora, "modules": modules, "base": base}


def collect(model, with_base: bool, entry: Callable = hf_entry) -> Optional[dict]:
    """On global rank 0: the full adapter tensors, per-module settings and (``with_base``) full
    base tensors (those ``entry`` maps) of all stages; None elsewhere. Collective over the whole
    world."""
    from megalora.adapter_file import stage_leader

    payload = stage_payload(model, with_base, entry)  # every TP rank takes part
    payload = payload if stage_leader() else {}
    if not dist.is_initialized() or dist.get_world_size() == 1:
        parts = [payload]
    else:
        parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(payload, parts, dst=0)
        if dist.get_rank() != 0:
            return None
    out = {"lora": {}, "modules": {}, "base": {}}
    for part in parts:
        for key in out:
            out[key].update(part.get(key, {}))
    return out


def on_rank0(fn: Callable[[], None]) -> None:
    """Run ``fn`` on global rank 0 and re-raise its error on every rank."""
    from megalora.errors import AgreedError, is_user_error

    error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            fn()
        except Exception as exc:
            error = (is_user_error(exc), f"{type(exc).__name__}: {exc}")
            if not dist.is_initialized() or dist.get_world_size() == 1:
                raise
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        if box[0]:
            user, text = box[0]
            # a user error (a bad path, nothing to export) is printed once, not as a bug
            raise (AgreedError if user else RuntimeError)(f"export failed on rank 0: {text}")


def write_safetensors(path: str, tensors: Dict[str, torch.Tensor]) -> None:
    """Atomically (``megalora.atomic``: a temporary file, fsynced, renamed), written from the
    tensors without building the whole file in memory first."""
    from safetensors.torch import save_file

    # clones: A is shared by q/k/v (gate/up) and safetensors refuses aliased storage
    data = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(data, tmp, metadata={"format": "pt"}))


def write_json(path: str, obj: dict) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


# ---------------------------------------------------------------------- PEFT export
def export_peft(model, out_dir: str, head: int = 0, base_model: Optional[str] = None
                ) -> Optional[dict]:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT LoRA for
    ``LlamaForCausalLM``) to ``out_dir``. Collective over all ranks; global rank 0 writes and
    gets the adapter config back (None elsewhere).

    Multi-head adapters export B head ``head`` (modality routing: 0 = text). Adapted modules
    LLaMA has no equivalent for (vision encoder) are skipped with a warning.
    """
    config = _lora_config(model)
    agree(None if config is not None else "export_peft: the model has no LoRA adapters; "
           "call megalora.apply_lora (and load_adapter) first")
    check_exportable(model, head)
    got = collect(model, with_base=False)
    result = {}

    def write():
        m = model.run.model
        tensors, settings, skipped = peft_tensors(got, head, m)
        if skipped:
            logger.warning("megalora: export_peft skipped %d adapted module(s) LlamaForCausalLM "
                           "has no equivalent for: %s", len(skipped), ", ".join(skipped))
        if not tensors:
            raise ValueError("export_peft: no adapted module maps to LlamaForCausalLM")
        cfg = peft_adapter_config(config, settings, head, m.num_layers,
                                  base_model or m.hf_checkpoint)
        write_safetensors(os.path.join(out_dir, "adapter_model.safetensors"), tensors)
        write_json(os.path.join(out_dir, "adapter_config.json"), cfg)
        result["config"] = cfg

    on_rank0(write)
    return result.get("config")


# ---------------------------------------------------------------------- merged export
def export_merged(model, out_dir: str, head: int = 0) -> None:
    """Write ``config.json`` + ``model.safetensors`` of a ``LlamaForCausalLM`` whose weights are
    the base with the LoRA delta (B head ``head``) merged in; text vocabulary rows only.
    Collective over all ranks; global rank 0 writes. Works without adapters (base only)."""
    check_exportable(model, head)
    got = collect(model, with_base=True)

    def write():
        m = model.run.model
        tensors = merged_tensors(got, head, m)
        skipped = sorted(n for n in got["modules"] if hf_entry(f"{n}.weight") is None)
        if skipped:
            logger.warning("megalora: export_merged left out %d adapted module(s) "
                           "LlamaForCausalLM has no equivalent for: %s", len(skipped),
                           ", ".join(skipped))
        base = None
        if m.hf_checkpoint and os.path.isfile(os.path.join(m.hf_checkpoint, "config.json")):
            with open(os.path.join(m.hf_checkpoint, "config.json")) as fh:
                base = json.load(fh)
        dtype = next(iter(tensors.values())).dtype
        write_safetensors(os.path.join(out_dir, "model.safetensors"), tensors)
        write_json(os.path.join(out_dir, "config.json"), llama_config(m, dtype, base))

    on_rank0(write)

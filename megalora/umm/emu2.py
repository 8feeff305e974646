"""Emu2's checkpoints in and out of the UMM (layout: docs/emu2.md).

- ``import_emu2(model, path)``: Emu2's decoder (a LLaMA under ``decoder.lm.``), all its
  vocabulary rows and the ``project_up`` / ``project_down`` connectors into this rank's stage,
  at any TP/PP/SP layout. Each rank reads only the tensors of its own stage.
- ``export_emu2_peft(model, out_dir, head)``: the adapter as PEFT LoRA on Emu2's own module
  names (Hugging Face layout ``model.decoder.lm.model.layers.N...``, or native names).
- ``export_emu2_merged(model, out_dir, head)``: a checkpoint in Emu2's layout with the LoRA
  folded in, that Emu2's loader reads strictly: no ``rotary_emb.inv_freq`` (transformers 4.31,
  which Emu2 pins, does not save it) and the encoder's ``visual.*`` tensors copied from the
  source checkpoint.

Three layouts are recognised by where ``decoder.lm.model.embed_tokens.weight`` sits: native
Emu2 / Emu2-Chat (no root), Hugging Face (``model.``; connectors at the top) and Emu2-Gen
(``multimodal_encoder.`` for everything; its ``unet.*``, ``vae.*`` and ``safety_checker.*``
are not read). A Gen Hugging Face folder is read from its ``multimodal_encoder/`` sub-folder.

Emu2 adds [PAD], [IMG], [/IMG], <image> right after LLaMA's 32000 text ids: the UMM's 4
special tokens at base_vocab + 0..3, so ids need no remapping. The 268 (Emu2-Chat: 270) rows
after them are kept as ``model.extra_vocab`` rows.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from megalora.umm.ckpt_files import INDEX_FILES, CheckpointFiles
from megalora.umm.hf import (agree, check_exportable, collect, load_stage, on_rank0, stage_payload,
                             tp_info, write_json, write_safetensors)
from megalora.umm.hf_mapping import (hf_entry, join, merge_into_base, peft_adapter_config,
                                     peft_tensors, split)

logger = logging.getLogger("megalora")

EMBED = "decoder.lm.model.embed_tokens.weight"
CONNECTORS = ("project_up.weight", "project_down.weight")


@dataclass(frozen=True)
class Layout:
    """Where one of Emu2's checkpoint layouts keeps our tensors."""

    name: str
    root: str
    """Prefix of ``visual.*`` and ``decoder.*``."""
    connectors: str
    """Prefix of ``project_up`` / ``project_down``."""


LAYOUTS = {"native": Layout("native", "", ""), "hf": Layout("hf", "model.", ""),
           "gen": Layout("gen", "multimodal_encoder.", "multimodal_encoder.")}


# the in-loop EVA encoder (megalora.umm.eva_parallel) -> Emu2's visual.* names
_VISION_TOP = {"vision.patch_embed.weight": "patch_embed.proj.weight",
               "vision.patch_embed.bias": "patch_embed.proj.bias",
               "vision.cls_token": "cls_token", "vision.pos_embed": "pos_embed"}
_VISION_LAYER = {"norm1": "norm1", "norm2": "norm2", "self_attention.linear_qkv": "attn.qkv",
                 "self_attention.linear_proj": "attn.proj", "mlp.linear_fc1": "mlp.fc1",
                 "mlp.linear_fc2": "mlp.fc2"}
_VISION_RE = re.compile(r"^vision\.decoder\.layers\.(\d+)\.(.+)\.([a-z_]+)$")
VISION_QKV = re.compile(r"^vision\.decoder\.layers\.\d+\.self_attention\.linear_qkv$")


def vision_name(canonical: str) -> Optional[str]:
    """Emu2's name (below ``visual.``) of an in-loop EVA parameter; None for others."""
    if canonical in _VISION_TOP:
        return _VISION_TOP[canonical]
    match = _VISION_RE.match(canonical)
    if match is None:
        return None
    i, module, leaf = match.groups()
    if module == "self_attention" and leaf in ("q_bias", "v_bias"):
        return f"blocks.{i}.attn.{leaf}"
    return f"blocks.{i}.{_VISION_LAYER[module]}.{leaf}" if module in _VISION_LAYER else None


def emu2_entry(layout: Layout) -> Callable[[str], Optional[Tuple[str, Tuple[str, ...]]]]:
    """canonical UMM parameter -> (conversion kind, Emu2 names) in ``layout``; None when Emu2
    has no such tensor. Kinds: ``rows`` (all vocabulary rows), else ``hf_mapping.join``'s."""
    def entry(canonical: str):
        if canonical in CONNECTORS:
            return "plain", (layout.connectors + canonical,)
        if canonical.startswith("vision."):
            name = vision_name(canonical)
            return None if name is None else ("plain", (f"{layout.root}visual.{name}",))
        found = hf_entry(canonical)
        if found is None:
            return None
        kind, names = found
        return ("rows" if kind == "vocab" else kind), \
            tuple(f"{layout.root}decoder.lm.{n}" for n in names)
    return entry


def open_emu2(path: str) -> Tuple[CheckpointFiles, Layout]:
    """The checkpoint's files and its layout; refused naming what was looked for."""
    path = os.fspath(path)
    sub = os.path.join(path, "multimodal_encoder")
    if os.path.isdir(sub) and not any(os.path.isfile(os.path.join(path, n)) for n in INDEX_FILES):
        path = sub  # Emu2-Gen's Hugging Face folder: the LLM and EVA live in this sub-folder
    files = CheckpointFiles(path)
    for layout in LAYOUTS.values():
        if layout.root + EMBED in files:
            return files, layout
    keys = sorted(files.keys())
    raise ValueError(f"{path!r} is not an Emu2 checkpoint: it has none of "
                     f"{[lay.root + EMBED for lay in LAYOUTS.values()]} (first keys: {keys[:4]})")


def checkpoint_vocab_rows(path: str) -> int:
    """Rows of the checkpoint's embedding (read from the header)."""
    files, layout = open_emu2(path)
    return files.shape(layout.root + EMBED)[0]


def resolve_vocab(run):
    """``run`` with ``model.extra_vocab`` read from ``model.emu2_checkpoint`` when it is null
    (a new RunConfig; ``run`` is not changed)."""
    m = run.model
    if m.extra_vocab is not None:
        return run
    rows = checkpoint_vocab_rows(m.emu2_checkpoint)
    extra = rows - m.base_vocab - 4
    if extra < 0:
        raise ValueError(f"the Emu2 checkpoint's embedding has {rows} rows, fewer than "
                         f"model.base_vocab={m.base_vocab} + 4 special tokens; set "
                         "model.base_vocab to its text vocabulary (Emu2: 32000)")
    logger.info("megalora: model.extra_vocab=%d, read from %s (%d rows)", extra,
                m.emu2_checkpoint, rows)
    return dataclasses.replace(run, model=dataclasses.replace(m, extra_vocab=extra))


def _layer_count(keys: List[str], root: str) -> int:
    pattern = re.compile(re.escape(root) + r"decoder\.lm\.model\.layers\.(\d+)\.")
    found = {int(m.group(1)) for m in map(pattern.match, keys) if m}
    return 1 + max(found) if found else 0


def check_shapes(files: CheckpointFiles, layout: Layout, m) -> None:
    """Refuse a checkpoint whose sizes differ from ``run.model``'s, naming key, shapes and the
    field to set. Heads are not in the shapes: ``model.num_attention_heads`` is trusted."""
    r = layout.root + "decoder.lm."
    rows, hidden = files.shape(r + "model.embed_tokens.weight")
    checks = [
        (r + "model.embed_tokens.weight", (rows, hidden), "hidden_size", m.hidden_size, 1),
        (r + "model.layers.0.mlp.gate_proj.weight", None, "ffn_hidden_size",
         m.ffn_hidden_size, 0),
        (layout.connectors + "project_up.weight", None, "visual_dim", m.visual_dim, 1),
    ]
    for key, shape, name, want, dim in checks:
        shape = shape or files.shape(key, f"model.{name}")
        if shape[dim] != want:
            raise ValueError(f"{key!r}: the checkpoint has {list(shape)}, so model.{name} must "
                             f"be {shape[dim]} (it is {want}): set model.{name}: {shape[dim]}")
    layers = _layer_count(files.keys(), layout.root)
    if layers != m.num_layers:
        raise ValueError(f"the Emu2 checkpoint has {layers} decoder layers but "
                         f"model.num_layers={m.num_layers}: set model.num_layers: {layers}")
    if rows != m.vocab_rows():
        extra = rows - m.base_vocab - 4
        fix = (f"set model.extra_vocab: {extra} (or null to read it)" if extra >= 0 else
               "set model.base_vocab to the text vocabulary (Emu2: 32000)")
        raise ValueError(f"{r}model.embed_tokens.weight has {rows} rows but model.base_vocab="
                         f"{m.base_vocab} + 4 special tokens + model.extra_vocab="
                         f"{m.extra_vocab} = {m.vocab_rows()}: {fix}")
    head_rows = files.shape(r + "lm_head.weight", "the output layer")[0]
    if head_rows != rows:
        raise ValueError(f"{r}lm_head.weight has {head_rows} rows but the embedding has {rows}")


def check_vision_shapes(files: CheckpointFiles, layout: Layout, v) -> None:
    """Refuse an encoder whose sizes differ from ``vision``'s, naming the field to set."""
    r = layout.root + "visual."
    width, _, patch, _ = files.shape(r + "patch_embed.proj.weight", "vision.patch_embed")
    tokens = files.shape(r + "pos_embed", "vision.pos_embed")[1]
    grid = int(round((tokens - 1) ** 0.5))
    mlp = files.shape(r + "blocks.0.mlp.fc1.weight", "vision.ffn_hidden_size")[0]
    pattern = re.compile(re.escape(r) + r"blocks\.(\d+)\.")
    layers = 1 + max((int(m.group(1)) for m in map(pattern.match, files.keys()) if m), default=-1)
    for name, theirs in (("hidden_size", width), ("patch_size", patch),
                         ("image_size", grid * patch), ("ffn_hidden_size", mlp),
                         ("num_layers", layers)):
        if getattr(v, name) != theirs:
            raise ValueError(f"the Emu2 checkpoint's encoder ({r}*) has {name} {theirs} but "
                             f"vision.{name}={getattr(v, name)}: set vision.{name}: {theirs}")


SPECIAL_NAMES = ("[PAD]", "[IMG]", "[/IMG]", "<image>")
"""Emu2's first four added tokens: the UMM's special tokens, in the UMM's order."""


def check_tokenizer(folder: str, base_vocab: int) -> None:
    """When a Hugging Face folder ships its tokenizer, its ids of [PAD] [IMG] [/IMG] <image>
    must be the UMM's (base_vocab + 0..3); a native file has no tokenizer (Emu2 derives the
    ids by adding the tokens in this order)."""
    import json

    ids = {}
    added = os.path.join(folder, "added_tokens.json")
    full = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(added):
        with open(added) as fh:
            ids = json.load(fh)
    elif os.path.isfile(full):
        with open(full) as fh:
            ids = {t["content"]: t["id"] for t in json.load(fh).get("added_tokens", [])}
    for offset, name in enumerate(SPECIAL_NAMES):
        if name in ids and ids[name] != base_vocab + offset:
            raise ValueError(f"the checkpoint's tokenizer gives {name} id {ids[name]}, but the "
                             f"UMM's {name} is model.base_vocab + {offset} = "
                             f"{base_vocab + offset}: set model.base_vocab: {ids[name] - offset}")


def _join(kind: str, tensors: List[torch.Tensor], m, padded: int) -> torch.Tensor:
    if kind != "rows":
        return join(kind, tensors, m, padded)
    out = torch.zeros((padded,) + tuple(tensors[0].shape[1:]), dtype=tensors[0].dtype)
    out[:tensors[0].shape[0]] = tensors[0]  # padding rows (for TP) stay zero
    return out


def import_emu2(model, path: str) -> List[str]:
    """Load Emu2's decoder, vocabulary rows and connectors into this rank's stage of ``model``
    (a ``UMMModel``) in place; returns the loaded canonical names. Only this stage's tensors are
    read; each TP rank keeps its slice."""
    m = model.run.model
    files, layout = open_emu2(path)
    check_shapes(files, layout, m)
    if os.path.isdir(files.path):
        check_tokenizer(files.path, m.base_vocab)
    if model.vision is not None:
        if model.run.vision.kind != "eva":
            raise ValueError("the in-loop CLIP encoder cannot be filled from an Emu2 "
                             "checkpoint; set vision.kind: eva, or vision.enabled: false and "
                             "use `megalora eva-features`")
        check_vision_shapes(files, layout, model.run.vision)
    padded = model.llm.vocab_size
    loaded = load_stage(model, emu2_entry(layout), lambda canonical, kind, names: _join(
        kind, [files.get(n, canonical) for n in names], m, padded))
    logger.info("megalora: imported %d tensors of this stage from the Emu2 checkpoint %s "
                "(%s layout)", len(loaded), path, layout.name)
    return loaded


# ---------------------------------------------------------------------- exports
def _split(kind: str, full: torch.Tensor, m) -> List[torch.Tensor]:
    """Emu2's tensors of a full Megatron tensor (weights or LoRA B factors)."""
    return [full[:m.vocab_rows()]] if kind == "rows" else split(kind, full, m)


def export_emu2_peft(model, out_dir: str, head: int = 0, layout: str = "hf",
                     base_model: Optional[str] = None) -> Optional[dict]:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors``: PEFT LoRA on Emu2's module
    names in ``layout`` (``hf``: ``model.decoder.lm...``, ``native``: ``decoder.lm...``).
    Collective over all ranks; global rank 0 writes and gets the config back."""
    lay = _layout(layout)
    from megalora.inject import lora_config_of

    config = lora_config_of(model)
    agree(None if config is not None else "export: the model has no LoRA adapters")
    agree(_vision_qkv_error(model))
    check_exportable(model, head, emu2_entry(lay))
    got = collect(model, with_base=False, entry=emu2_entry(lay))
    result = {}

    def write():
        m = model.run.model
        tensors, settings, skipped = peft_tensors(got, head, m, emu2_entry(lay), _split)
        if skipped:
            logger.warning("megalora: the Emu2 export skipped %d adapted module(s) Emu2 has "
                           "no equivalent for: %s", len(skipped), ", ".join(skipped))
        if not tensors:
            raise ValueError("export: no adapted module maps to Emu2's decoder")
        cfg = peft_adapter_config(config, settings, head, m.num_layers,
                                  base_model or m.emu2_checkpoint)
        # Emu2 is a custom (remote-code) model, not a transformers CAUSAL_LM class: PEFT wraps
        # it as a plain module. Names are exact (a leaf like "proj" would hit EVA's too).
        cfg["task_type"] = None
        cfg["target_modules"] = "^(?:" + "|".join(re.escape(k) for k in sorted(settings)) + ")$"
        write_safetensors(os.path.join(out_dir, "adapter_model.safetensors"), tensors)
        write_json(os.path.join(out_dir, "adapter_config.json"), cfg)
        result["config"] = cfg

    on_rank0(write)
    return result.get("config")


def _vision_qkv_error(model) -> Optional[str]:
    """Emu2's EVA attention computes F.linear(x, self.qkv.weight, ...) and never calls its qkv
    module, so PEFT's wrapper there would be silently skipped: refuse such an adapter."""
    from megalora.inject import lora_modules

    names = [layer.lora_name for layer in lora_modules(model) if VISION_QKV.match(layer.lora_name)]
    if not names:
        return None
    return (f"{names[0]} (and {len(names) - 1} more) is adapted, but Emu2's EVA attention uses "
            "attn.qkv.weight directly, so PEFT would never apply this adapter: export-merged "
            "folds it in, or train without it (lora.exclude_modules: "
            "['vision.*.linear_qkv'])")


def _layout(name: str) -> Layout:
    if name not in ("hf", "native"):
        raise ValueError(f"Emu2 export layout must be 'hf' or 'native', got {name!r}")
    return LAYOUTS[name]


def _visual_from(source: Optional[str], layout: Layout) -> Dict[str, torch.Tensor]:
    """The encoder's tensors of the source checkpoint under ``layout``'s names."""
    if not source:
        logger.warning("megalora: model.emu2_checkpoint is not set, so the merged checkpoint "
                       "has no visual.* (EVA) tensors; Emu2's strict loader will refuse it")
        return {}
    files, src = open_emu2(source)
    root = src.root + "visual."
    return {layout.root + k[len(src.root):]: files.get(k) for k in files.keys()
            if k.startswith(root)}


def export_emu2_merged(model, out_dir: str, head: int = 0, layout: str = "native") -> None:
    """Emu2's checkpoint (``layout`` names) with the LoRA delta (B head ``head``) folded in;
    the encoder from the model when it is in the loop, else copied from the source checkpoint;
    no ``rotary_emb.inv_freq``. Each pipeline stage's leader writes its own stage: one
    ``model.safetensors`` at PP = 1, else ``model-0000k-of-0000n.safetensors`` shards and
    ``model.safetensors.index.json`` (``hf`` layout only: Emu2's native loader reads one
    file). ``hf`` also copies the source folder's config, tokenizer and code files. Collective
    over all ranks; no rank holds more than one stage."""
    from megatron.core import parallel_state as ps

    from megalora.adapter_file import stage_leader
    from megalora.errors import agree as agree_block
    from megalora.inject import all_gather_objects

    lay = _layout(layout)
    stages = ps.get_pipeline_model_parallel_world_size() if ps.is_initialized() else 1
    stage = ps.get_pipeline_model_parallel_rank() if ps.is_initialized() else 0
    agree(None if lay.name == "hf" or stages == 1 else
          f"a native Emu2 checkpoint is one file, written by one pipeline stage: export it with "
          f"parallel.pipeline_parallel=1 (TP may stay {tp_info()[0]}), or use --layout hf (one "
          "shard per stage and an index)")
    entry = emu2_entry(lay)
    check_exportable(model, head, entry)
    got = stage_payload(model, with_base=True, entry=entry)  # collective over TP
    name = "model.safetensors" if stages == 1 else \
        f"model-{stage + 1:05d}-of-{stages:05d}.safetensors"
    mine: Dict[str, str] = {}
    with agree_block("export-merged"):
        if stage_leader():
            skipped = sorted(n for n in got["modules"] if entry(f"{n}.weight") is None)
            if skipped:
                logger.warning("megalora: the merged Emu2 export left out %d adapted "
                               "module(s): %s", len(skipped), ", ".join(skipped))
            tensors = merge_into_base(got, head, model.run.model, _split)
            if stage == 0 and not any(k.startswith(lay.root + "visual.") for k in tensors):
                tensors.update(_visual_from(model.run.model.emu2_checkpoint, lay))
            write_safetensors(os.path.join(out_dir, name), tensors)
            mine = {k: name for k in tensors}
    weight_map = {k: v for part in all_gather_objects(mine) for k, v in part.items()}
    on_rank0(lambda: _finish_merged(model, out_dir, lay, weight_map, stages))


def _finish_merged(model, out_dir: str, lay: Layout, weight_map: Dict[str, str],
                   stages: int) -> None:
    """Rank 0: every stage written (tensor count), the index, the support files."""
    m = model.run.model
    expected = 3 + 9 * m.num_layers + len(CONNECTORS)
    got = sum(1 for k in weight_map if not k.startswith(lay.root + "visual."))
    if got != expected:
        raise ValueError(f"export: the stages wrote {got} of Emu2's decoder and connector "
                         f"tensors, expected {expected}")
    if stages > 1:
        write_json(os.path.join(out_dir, "model.safetensors.index.json"),
                   {"metadata": {"format": "pt"}, "weight_map": dict(sorted(weight_map.items()))})
    if lay.name == "hf" and m.emu2_checkpoint and os.path.isdir(m.emu2_checkpoint):
        # from the folder the weights came from (Emu2-Gen's: multimodal_encoder/)
        _copy_support_files(open_emu2(m.emu2_checkpoint)[0].path, out_dir)


def _copy_support_files(source: str, out_dir: str) -> None:
    """config, tokenizer and remote-code files of an HF folder (not its weights or index)."""
    from megalora.atomic import atomic_write_bytes

    for name in sorted(os.listdir(source)):
        full = os.path.join(source, name)
        if os.path.isfile(full) and ".index." not in name and \
                name.endswith((".json", ".py", ".model", ".txt")):
            with open(full, "rb") as fh:
                atomic_write_bytes(os.path.join(out_dir, name), fh.read())

"""The LLaMA <-> UMM (megatron-core) mapping of parameter names, row orders and configs.

Pure functions, no torch.distributed (``megalora.umm.hf`` does the reading, gathering and
writing).

Megatron row orders (global, before TP slicing): ``linear_qkv`` rows are per query group
[q heads of the group; k; v]; ``linear_fc1`` is [gate; up]; the vocabulary is the text
vocabulary, 4 special tokens (initialised to the mean text row), then zero padding rows.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Callable, Dict, List, Optional, Tuple

import torch

from megalora.umm.tokens import NUM_SPECIAL

logger = logging.getLogger("megalora")

# canonical Megatron parameter (inside a decoder layer) -> (how to convert, HF names)
_LAYER_PARAMS = {
    "input_layernorm.weight": ("plain", ("input_layernorm.weight",)),
    "self_attention.linear_qkv.layer_norm_weight": ("plain", ("input_layernorm.weight",)),  # TE
    "self_attention.linear_qkv.weight": ("qkv", ("self_attn.q_proj.weight",
                                                 "self_attn.k_proj.weight",
                                                 "self_attn.v_proj.weight")),
    "self_attention.linear_proj.weight": ("plain", ("self_attn.o_proj.weight",)),
    "pre_mlp_layernorm.weight": ("plain", ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.layer_norm_weight": ("plain", ("post_attention_layernorm.weight",)),  # TE
    "mlp.linear_fc1.weight": ("fc1", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "mlp.linear_fc2.weight": ("plain", ("mlp.down_proj.weight",)),
}
_TOP_PARAMS = {
    "llm.embedding.word_embeddings.weight": ("vocab", ("model.embed_tokens.weight",)),
    "llm.decoder.final_layernorm.weight": ("plain", ("model.norm.weight",)),
    "llm.output_layer.weight": ("vocab", ("lm_head.weight",)),
}
_LAYER = re.compile(r"^llm\.decoder\.layers\.(\d+)\.(.+)$")
LORA_FACTORS = ("lora_A", "lora_B", "lora_router")


def hf_entry(canonical: str) -> Optional[Tuple[str, Tuple[str, ...]]]:
    """(conversion kind, HF parameter names) of a canonical UMM parameter, None when LLaMA has
    no equivalent (visual connectors, vision encoder)."""
    if canonical in _TOP_PARAMS:
        return _TOP_PARAMS[canonical]
    match = _LAYER.match(canonical)
    if match and match.group(2) in _LAYER_PARAMS:
        kind, names = _LAYER_PARAMS[match.group(2)]
        return kind, tuple(f"model.layers.{match.group(1)}.{n}" for n in names)
    return None


def _heads(m) -> Tuple[int, int, int]:
    """(query heads, query groups, head dim) of the decoder."""
    heads = m.num_attention_heads
    return heads, m.num_query_groups or heads, m.hidden_size // heads


def join(kind: str, tensors: List[torch.Tensor], m, padded_vocab: int) -> torch.Tensor:
    """The full Megatron tensor from its HF tensors (inverse of ``split``)."""
    if kind == "qkv":
        nq, ng, hn = _heads(m)
        q, k, v = (t.reshape(ng, -1, t.shape[-1]) for t in tensors)
        if q.shape[1] != nq // ng * hn or k.shape[1] != hn or v.shape[1] != hn:
            raise ValueError(f"q/k/v shapes {[tuple(t.shape) for t in tensors]} do not fit "
                             f"{nq} heads, {ng} query groups of dim {hn}")
        return torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])
    if kind == "fc1":
        return torch.cat(tensors, dim=0)
    if kind == "vocab":
        text = tensors[0]
        if text.shape[0] != m.base_vocab:
            raise ValueError(f"vocabulary matrix has {text.shape[0]} rows but model.base_vocab="
                             f"{m.base_vocab}")
        out = torch.zeros((padded_vocab,) + tuple(text.shape[1:]), dtype=text.dtype)
        out[:m.base_vocab] = text
        # the special tokens are new: start them at the mean text row rather than at random
        out[m.base_vocab:m.base_vocab + NUM_SPECIAL] = text.float().mean(0).to(text.dtype)
        return out
    return tensors[0]


def split(kind: str, full: torch.Tensor, m) -> List[torch.Tensor]:
    """HF tensors from a full Megatron tensor (weights or LoRA B factors: rows = outputs)."""
    if kind == "qkv":
        nq, ng, hn = _heads(m)
        grouped = full.reshape(ng, (nq // ng + 2) * hn, -1)
        q, k, v = grouped.split([nq // ng * hn, hn, hn], dim=1)
        return [t.reshape(-1, full.shape[-1]) for t in (q, k, v)]
    if kind == "fc1":
        return list(full.chunk(2, dim=0))
    if kind == "vocab":
        return [full[:m.base_vocab]]  # the special/padding rows have no LLaMA token
    return [full]


# ---------------------------------------------------------------------- configs
def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    return float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)


def check_llama_config(cfg: dict, m) -> None:
    """Raise ValueError naming the first field where the HF config and ``run.model`` differ."""
    heads = cfg.get("num_attention_heads")
    pairs = [("hidden_size", "hidden_size", m.hidden_size),
             ("num_layers", "num_hidden_layers", m.num_layers),
             ("num_attention_heads", "num_attention_heads", m.num_attention_heads),
             ("num_query_groups", "num_key_value_heads", m.num_query_groups or
              m.num_attention_heads),
             ("ffn_hidden_size", "intermediate_size", m.ffn_hidden_size),
             ("base_vocab", "vocab_size", m.base_vocab),
             ("norm_eps", "rms_norm_eps", m.norm_eps),
             ("rope_base", "rope_theta", m.rope_base)]
    theirs = dict(cfg, num_key_value_heads=cfg.get("num_key_value_heads") or heads,
                  rope_theta=_rope_theta(cfg))
    for ours, name, value in pairs:
        other = theirs.get(name)
        same = (math.isclose(float(value), float(other), rel_tol=1e-9)
                if isinstance(other, (int, float)) else False)
        if not same:
            raise ValueError(f"model.{ours}={value} but the checkpoint's {name}={other}: set "
                             f"model.{ours}: {other}")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))  # "type": transformers 4
    problems = {"hidden_act": cfg.get("hidden_act", "silu") not in ("silu", "swish"),
                "attention_bias": bool(cfg.get("attention_bias")),
                "mlp_bias": bool(cfg.get("mlp_bias")),
                "head_dim": cfg.get("head_dim") not in (None, _heads(m)[2]),
                "rope_parameters.rope_type": rope_type != "default"}
    bad = [k for k, v in problems.items() if v]
    if bad:
        raise ValueError(f"the checkpoint's {bad[0]}={cfg.get(bad[0].split('.')[0])!r} is not "
                         "supported: the UMM decoder is LLaMA with SiLU, no biases, "
                         "head_dim = hidden/heads and unscaled RoPE")
    if cfg.get("model_type", "llama") != "llama":
        logger.warning("megalora: importing a %r checkpoint as LLaMA", cfg.get("model_type"))


# ---------------------------------------------------------------------- exports
def b_head(got: dict, name: str, head: int) -> torch.Tensor:
    """The gathered B factor of module ``name`` for ``head`` (the only one of a 1-head one)."""
    return got["lora"][f"{name}.lora_B"][head if got["modules"][name]["num_heads"] > 1 else 0]


def peft_tensors(got: dict, head: int, m, entry: Callable = hf_entry, split_fn: Callable = split):
    """PEFT tensors, per-module (rank, alpha) and skipped modules from the gathered adapter;
    ``entry`` names the checkpoint's tensors (default LLaMA's), ``split_fn`` cuts B into them."""
    tensors, settings, skipped = {}, {}, []
    for name, info in sorted(got["modules"].items()):
        found = entry(f"{name}.weight")
        if found is None:
            skipped.append(name)
            continue
        kind, hf_names = found
        a = got["lora"][f"{name}.lora_A"]
        for hf_name, b_part in zip(hf_names, split_fn(kind, b_head(got, name, head), m)):
            module = hf_name[:-len(".weight")]
            tensors[f"base_model.model.{module}.lora_A.weight"] = a
            tensors[f"base_model.model.{module}.lora_B.weight"] = b_part
            settings[module] = (info["rank"], info["alpha"])
    return tensors, settings, skipped


def _target_modules(modules: List[str], num_layers: int):
    """Leaf names when every layer adapts the same ones (readable), else an exact regex."""
    per_layer: Dict[str, set] = {}
    for module in modules:
        match = re.match(r"^model\.layers\.(\d+)\.(.+)$", module)
        key, leaf = (match.group(1), match.group(2)) if match else ("top", module)
        per_layer.setdefault(key, set()).add(leaf)
    layer_sets = [per_layer.get(str(i)) for i in range(num_layers)]
    if all(s == layer_sets[0] for s in layer_sets) and layer_sets[0]:
        return sorted({m.rsplit(".", 1)[-1] for m in modules})
    return "^(?:" + "|".join(re.escape(m) for m in sorted(modules)) + ")$"


def peft_adapter_config(config, settings: Dict[str, Tuple[int, float]], head: int,
                        num_layers: int, base_model: Optional[str]) -> dict:
    """adapter_config.json for PEFT's LoRA (per-module ranks/alphas as exact-name patterns)."""
    dropout = config.dropout[head] if isinstance(config.dropout, tuple) else config.dropout
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": float(dropout),
        "use_rslora": bool(config.use_rslora), "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "target_modules": _target_modules(sorted(settings), num_layers),
        "rank_pattern": {k: r for k, (r, _) in sorted(settings.items()) if r != config.rank},
        "alpha_pattern": {k: a for k, (_, a) in sorted(settings.items()) if a != config.alpha},
    }


def llama_config(m, dtype: torch.dtype, base: Optional[dict] = None) -> dict:
    """config.json of the merged model (starting from the imported checkpoint's, if any)."""
    nq, ng, hn = _heads(m)
    cfg = dict(base or {})
    cfg.update({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": m.hidden_size, "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers, "num_attention_heads": nq,
        "num_key_value_heads": ng, "head_dim": hn, "hidden_act": "silu",
        "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_base},
        "vocab_size": m.base_vocab, "tie_word_embeddings": False, "attention_bias": False,
        "mlp_bias": False, "torch_dtype": str(dtype).replace("torch.", "")})
    cfg["dtype"] = cfg["torch_dtype"]
    cfg.setdefault("max_position_embeddings", m.max_seq_length)
    cfg.pop("rope_scaling", None)
    return cfg


def merge_into_base(got: dict, head: int, m, split_fn: Callable = split
                    ) -> Dict[str, torch.Tensor]:
    """Checkpoint tensors (named by the gathered base's entries, cut by ``split_fn``) of the
    base with each adapter (B head ``head``) folded in, in fp32 maths."""
    out = {}
    for canonical, (kind, names, weight) in got["base"].items():
        module, leaf = canonical.rsplit(".", 1)
        info = got["modules"].get(module) if leaf == "weight" else None
        if info is not None and info["merged_head"] is None:  # merged ones already hold it
            a = got["lora"][f"{module}.lora_A"].float()
            b = b_head(got, module, head).float()
            weight = (weight.float() + info["scale"] * (b @ a)).to(weight.dtype)
        out.update(zip(names, split_fn(kind, weight, m)))
    return out


def merged_tensors(got: dict, head: int, m) -> Dict[str, torch.Tensor]:
    """HF tensors of the base with each LLaMA-mapped adapter folded in (fp32 maths)."""
    out = merge_into_base(got, head, m)
    expected = 3 + 9 * m.num_layers
    if len(out) != expected:
        raise ValueError(f"export_merged: gathered {len(out)} LLaMA tensors, expected "
                         f"{expected} (a pipeline stage missing?)")
    return out

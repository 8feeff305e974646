"""LoRA configuration: one validated dataclass, plus the per-module settings it resolves to.

No torch.distributed and no Megatron import here, so configs can be built and checked anywhere
(a login node, a unit test, a `--dry-run`).

Module paths used by the patterns are *canonical*: the module's path inside its model chunk with
each transformer layer index replaced by its global 0-based index (``layer_number - 1``), so a
pattern such as ``decoder.layers.3.*`` means the same layer under any pipeline split.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple, Union

#: The Megatron-core linear names in a GPT transformer layer.
MEGATRON_LINEAR_NAMES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")

ROUTING_MODES = ("single", "modality", "router")
A_INITS = ("kaiming", "gaussian")
B_INITS = ("zeros", "gaussian")
DTYPES = ("float32", "bfloat16", "float16")
BACKENDS = ("auto", "torch", "triton")


def _is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def pattern_matches(pattern: str, path: str) -> bool:
    """True when ``pattern`` selects the module at canonical ``path``.

    A bare name without dots or glob characters (``linear_qkv``) matches the last path component;
    anything else is an fnmatch glob over the whole path (``decoder.layers.1[0-5].*``).
    """
    if "." not in pattern and not _is_glob(pattern):
        return path.rsplit(".", 1)[-1] == pattern
    return fnmatch.fnmatchcase(path, pattern)


@dataclass(frozen=True)
class ModuleLoRASettings:
    """What one adapted linear gets, after patterns are applied."""

    rank: int
    alpha: float
    scale: float
    num_heads: int
    routing: str
    router_top_k: Optional[int]
    dropout: Tuple[float, ...]
    """One probability per head (modality routing) or a single shared one."""


@dataclass
class LoRAConfig:
    """LoRA adapters for Megatron-core linears: ranks, routing between B heads, init.

    Every field is checked in ``__post_init__``; a bad value raises ``ValueError`` naming the field.
    """

    rank: int = 8
    """Default LoRA rank r (the width of A and of every B head)."""

    alpha: float = 16.0
    """Scaling numerator: the adapter output is multiplied by alpha / r (alpha / sqrt(r) with
    ``use_rslora``)."""

    dropout: Union[float, Tuple[float, ...]] = 0.0
    """Dropout probability on the adapter input. A tuple gives one probability per B head
    (``routing="modality"`` only: each token uses the probability of its head). Masks come from
    a counter-based hash of (seed, global token, global feature), so they are the same at any
    TP/SP/PP layout and a fused kernel can regenerate them instead of storing them."""

    target_modules: Tuple[str, ...] = MEGATRON_LINEAR_NAMES
    """Which linears get adapters: Megatron names (``linear_qkv``, ``linear_proj``,
    ``linear_fc1``, ``linear_fc2``, or any other leaf name) and/or glob patterns over canonical
    module paths. Every entry must match at least one module."""

    exclude_modules: Tuple[str, ...] = ()
    """Names/globs removed from the targets (same syntax as ``target_modules``)."""

    rank_pattern: Dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides, ``{pattern: rank}``; the first matching pattern wins."""

    alpha_pattern: Dict[str, float] = field(default_factory=dict)
    """Per-module alpha overrides, ``{pattern: alpha}``; the first matching pattern wins."""

    num_heads: int = 1
    """K, the number of B heads sharing one A (AsymLoRA / HydraLoRA). 1 = plain LoRA."""

    single_head_modules: Tuple[str, ...] = ()
    """Names/globs of targets that get one B head and no routing whatever ``routing`` says
    (e.g. ``vision.*``: a vision encoder sees other tokens than the LLM's modality ids)."""

    routing: str = "single"
    """How tokens pick B heads: ``single`` (one head, plain LoRA), ``modality`` (per-token head
    id from the batch: text=0, image=1, ...; -1 = no adapter), ``router`` (a learned softmax
    router per adapted linear, HydraLoRA style)."""

    router_top_k: Optional[int] = None
    """Router mode only: keep the k largest router weights per token and renormalise them to sum
    to 1. None = dense softmax over all heads."""

    init_a: str = "kaiming"
    """A init: ``kaiming`` (uniform, bound 1/sqrt(fan_in) of the *global* input size) or
    ``gaussian`` (std 1/r). Drawn for the full tensor, then sliced, so TP size does not matter."""

    init_b: str = "zeros"
    """B init: ``zeros`` (the adapter starts as a no-op) or ``gaussian`` (std 1/r; for tests and
    experiments that need a non-zero adapter at step 0)."""

    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) instead of alpha / r."""

    seed: int = 1234
    """Seed for the TP-invariant init and for dropout masks."""

    dtype: Optional[str] = None
    """Adapter parameter dtype: ``float32``, ``bfloat16``, ``float16``; None = the base weight's."""

    backend: str = "auto"
    """Which implementation runs the adapter maths: ``torch`` (the plain-PyTorch reference),
    ``triton`` (fused kernels; CUDA, or CPU under TRITON_INTERPRET=1) or ``auto`` (``triton`` for
    CUDA tensors when it can run them, else ``torch``; logged once)."""

    deterministic: bool = False
    """Backward without atomics, the same bits every run (the fused kernels then read dy twice).
    Also on whenever ``torch.use_deterministic_algorithms(True)`` is."""

    def __post_init__(self) -> None:
        self.target_modules = _as_str_tuple("target_modules", self.target_modules)
        self.exclude_modules = _as_str_tuple("exclude_modules", self.exclude_modules)
        self.single_head_modules = _as_str_tuple("single_head_modules", self.single_head_modules)
        if isinstance(self.dropout, (list, tuple)):
            self.dropout = tuple(float(p) for p in self.dropout)
        self.rank_pattern = dict(self.rank_pattern)
        self.alpha_pattern = dict(self.alpha_pattern)
        self._validate()

    def _validate(self) -> None:
        _check_int("rank", self.rank, 1)
        _check_int("num_heads", self.num_heads, 1)
        _check_positive("alpha", self.alpha)
        _check_choice("routing", self.routing, ROUTING_MODES)
        _check_choice("init_a", self.init_a, A_INITS)
        _check_choice("init_b", self.init_b, B_INITS)
        _check_choice("backend", self.backend, BACKENDS)
        if self.dtype is not None:
            _check_choice("dtype", self.dtype, DTYPES)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"LoRAConfig.seed must be an int, got {self.seed!r}")
        if not self.target_modules:
            raise ValueError("LoRAConfig.target_modules is empty: name at least one module, "
                             f"e.g. {list(MEGATRON_LINEAR_NAMES)}")
        for key, value in self.rank_pattern.items():
            _check_int(f"rank_pattern[{key!r}]", value, 1)
        for key, value in self.alpha_pattern.items():
            _check_positive(f"alpha_pattern[{key!r}]", value)
        self._validate_routing()
        self._validate_dropout()

    def _validate_routing(self) -> None:
        if self.routing == "single" and self.num_heads != 1:
            raise ValueError(f"LoRAConfig.routing='single' needs num_heads=1, got "
                             f"num_heads={self.num_heads}; use routing='modality' or 'router'")
        if self.routing == "router" and self.num_heads < 2:
            raise ValueError("LoRAConfig.routing='router' needs num_heads >= 2 (a router over one "
                             "head is plain LoRA: use routing='single')")
        if self.router_top_k is not None:
            if self.routing != "router":
                raise ValueError(f"LoRAConfig.router_top_k is only used with routing='router', "
                                 f"got routing={self.routing!r}")
            _check_int("router_top_k", self.router_top_k, 1)
            if self.router_top_k > self.num_heads:
                raise ValueError(f"LoRAConfig.router_top_k={self.router_top_k} exceeds "
                                 f"num_heads={self.num_heads}")

    def _validate_dropout(self) -> None:
        probs = self.dropout if isinstance(self.dropout, tuple) else (self.dropout,)
        for p in probs:
            if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
                raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.dropout, tuple):
            if self.routing != "modality":
                raise ValueError("LoRAConfig.dropout as a per-head tuple needs routing='modality' "
                                 "(each token must have exactly one head); use a single float")
            if len(self.dropout) != self.num_heads:
                raise ValueError(f"LoRAConfig.dropout has {len(self.dropout)} per-head values but "
                                 f"num_heads={self.num_heads}")

    # ------------------------------------------------------------------ resolution
    def selects(self, path: str) -> bool:
        """True when the module at canonical ``path`` is a target and not excluded."""
        if not any(pattern_matches(p, path) for p in self.target_modules):
            return False
        return not any(pattern_matches(p, path) for p in self.exclude_modules)

    def settings_for(self, path: str) -> ModuleLoRASettings:
        """Resolve rank, alpha and scale for the module at canonical ``path``."""
        rank = _first_match(self.rank_pattern, path, self.rank)
        alpha = float(_first_match(self.alpha_pattern, path, self.alpha))
        scale = alpha / (math.sqrt(rank) if self.use_rslora else rank)
        dropout = self.dropout if isinstance(self.dropout, tuple) else (float(self.dropout),)
        if any(pattern_matches(p, path) for p in self.single_head_modules):
            return ModuleLoRASettings(rank=rank, alpha=alpha, scale=scale, num_heads=1,
                                      routing="single", router_top_k=None,
                                      dropout=(max(dropout),))
        return ModuleLoRASettings(rank=rank, alpha=alpha, scale=scale, num_heads=self.num_heads,
                                  routing=self.routing, router_top_k=self.router_top_k,
                                  dropout=dropout)

    def unused_patterns(self, paths) -> Dict[str, list]:
        """Patterns of each field that match none of ``paths`` (to report typos)."""
        paths = list(paths)
        unused = {}
        for name in ("target_modules", "exclude_modules", "rank_pattern", "alpha_pattern",
                     "single_head_modules"):
            patterns = getattr(self, name)
            missing = [p for p in patterns if not any(pattern_matches(p, q) for q in paths)]
            if missing:
                unused[name] = missing
        return unused

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> Dict[str, Any]:
        """Plain-JSON form (tuples become lists)."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LoRAConfig":
        """Build from a mapping (YAML/JSON); unknown keys are an error naming the valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown LoRAConfig field(s) {unknown}; "
                             f"valid fields: {sorted(names)}")
        return cls(**dict(data))


def _first_match(patterns: Mapping[str, Any], path: str, default):
    for pattern, value in patterns.items():
        if pattern_matches(pattern, path):
            return value
    return default


def _as_str_tuple(name: str, value) -> Tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    value = tuple(value)
    for item in value:
        if not isinstance(item, str) or not item:
            raise ValueError(f"LoRAConfig.{name} entries must be non-empty strings, got {item!r}")
    return value


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"LoRAConfig.{name} must be an int >= {minimum}, got {value!r}")


def _check_positive(name: str, value) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(f"LoRAConfig.{name} must be a finite number > 0, got {value!r}")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"LoRAConfig.{name} must be one of {list(choices)}, got {value!r}")

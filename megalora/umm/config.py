"""Run configuration of the UMM trainer: model, vision encoder, parallel layout, data, training.

A run config is a small YAML file under ``launch/configs/`` with the sections ``model``,
``vision`` (optional), ``parallel``, ``data``, ``lora``, ``train``; ``section.field=value``
overrides come from the command line. Every field is validated; cross-field problems (a TP size
that does not divide the heads, a sequence that cannot hold an image, ...) raise ``ValueError``
naming the fields and what to change. Nothing here imports Megatron.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from megalora.config import LoRAConfig
from megalora.hydra.config import HydraConfig
from megalora.umm.config_io import coerce_fields, load_yaml
from megalora.pareto.engine import ParetoConfig
from megalora.umm.tokens import NUM_SPECIAL


def _positive(section: str, obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{section}.{name} must be a positive int, got {value!r}")


IMAGE_LOSSES = ("mse", "mse_sum", "cosine")
VISION_KINDS = ("clip", "eva")

@dataclass
class UMMModelConfig:
    """The LLaMA-style decoder and its visual connectors (Emu2's architecture)."""

    num_layers: int = 4
    """Transformer layers of the decoder."""
    hidden_size: int = 64
    """Model width."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: Optional[int] = None
    """Key/value heads (GQA); None = num_attention_heads (MHA, as Emu2/LLaMA-33B)."""
    ffn_hidden_size: int = 172
    """SwiGLU inner width (per branch)."""
    base_vocab: int = 64
    """Text vocabulary; the 4 special tokens follow it, then padding for TP."""
    max_seq_length: int = 64
    """Longest sequence (RoPE table size)."""
    image_tokens: int = 4
    """N: ``<image>`` slots per image (Emu2: 64)."""
    visual_dim: int = 16
    """Dimension of a visual feature (Emu2's EVA-CLIP: 1792)."""
    rope_base: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    image_loss: str = "mse"
    """Visual regression loss per predicted slot: ``mse`` (per-element: mean over the feature
    dims, as Emu2), ``mse_sum`` (summed over the feature dims: visual_dim times larger, which
    flips the text/image gradient balance) or ``cosine`` (1 - cos). Logged at start."""
    text_loss_weight: float = 1.0
    """Weight of the text cross-entropy in the summed loss."""
    image_loss_weight: float = 1.0
    """Weight of the image regression in the summed loss."""
    init_std: float = 0.1
    """Std of the random base init when no checkpoint is imported (tiny/test models)."""
    base_checkpoint: Optional[str] = None
    """A base trained by ``megalora pretrain`` (its base.safetensors), loaded before the
    adapters are added (TP = PP = 1)."""
    hf_checkpoint: Optional[str] = None
    """A LLaMA-architecture Hugging Face checkpoint directory (config.json + safetensors) whose
    weights replace the random base (``megalora.umm.hf.import_llama``); its config must match
    the fields above. The visual connectors keep their init."""
    emu2_checkpoint: Optional[str] = None
    """An Emu2 checkpoint (BAAI): a native file (``.bin``/``.pth``/``.safetensors``, Emu2-Gen's
    too) or a Hugging Face folder (sharded, with its index). Its decoder, vocabulary rows and
    ``project_up``/``project_down`` replace the random base (``megalora.umm.emu2``); the sizes
    above must match its shapes. Not with ``hf_checkpoint``."""
    extra_vocab: Optional[int] = 0
    """Vocabulary rows after the 4 special tokens that the data does not use as UMM tokens
    (Emu2: 268 grounding/patch-index tokens; Emu2-Chat: 270). None = read it from
    ``emu2_checkpoint``'s embedding."""

    def vocab_rows(self) -> int:
        """Rows of the embedding and output layer before TP padding: text, the 4 special
        tokens, ``extra_vocab``."""
        if self.extra_vocab is None:
            raise ValueError("model.extra_vocab is null and was not read from "
                             "model.emu2_checkpoint (megalora.umm.emu2.resolve_vocab)")
        return self.base_vocab + NUM_SPECIAL + self.extra_vocab

    def validate(self) -> None:
        _positive("model", self, "num_layers", "hidden_size", "num_attention_heads",
                  "ffn_hidden_size", "base_vocab", "max_seq_length", "image_tokens",
                  "visual_dim")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} is not divisible by "
                             f"model.num_attention_heads={self.num_attention_heads}")
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise ValueError(f"model.num_attention_heads={self.num_attention_heads} is not "
                             f"divisible by model.num_query_groups={groups}")
        if self.image_loss not in IMAGE_LOSSES:
            raise ValueError(f"model.image_loss must be one of {', '.join(IMAGE_LOSSES)}, got "
                             f"{self.image_loss!r}")
        if self.text_loss_weight < 0 or self.image_loss_weight < 0:
            raise ValueError("model.text_loss_weight and model.image_loss_weight must be >= 0")
        if self.hf_checkpoint and self.emu2_checkpoint:
            raise ValueError("model.hf_checkpoint and model.emu2_checkpoint are both set: an "
                             "Emu2 checkpoint already holds the decoder; keep one")
        if self.extra_vocab is None and not self.emu2_checkpoint:
            raise ValueError("model.extra_vocab=null means 'read it from model.emu2_checkpoint', "
                             "which is not set: give a number (0 without Emu2)")
        if self.extra_vocab is not None and (not isinstance(self.extra_vocab, int)
                                             or isinstance(self.extra_vocab, bool)
                                             or self.extra_vocab < 0):
            raise ValueError(f"model.extra_vocab must be an int >= 0 or null, got "
                             f"{self.extra_vocab!r}")


@dataclass
class VisionConfig:
    """An optional vision encoder in the loop, so that encoder-side LoRA is possible. Its
    pooled output gives the ``<image>`` inputs."""

    enabled: bool = False
    """Run the encoder on the batch's pixels; otherwise features come precomputed."""
    kind: str = "clip"
    """``clip``: megatron-core's CLIP ViT; ``eva``: Emu2's EVA-CLIP (``megalora.umm.eva_parallel``;
    loaded from ``model.emu2_checkpoint``; pixels in [0, 1] are normalised with CLIP's mean and
    std inside). Emu2's sizes: image 448, patch 14, hidden 1792, 64 layers, 16 heads, FFN 15360."""
    num_layers: int = 2
    hidden_size: int = 16
    """Encoder width; must equal model.visual_dim (its pooled tokens are the features)."""
    num_attention_heads: int = 2
    ffn_hidden_size: int = 64
    image_size: int = 16
    """Square input size in pixels."""
    patch_size: int = 4
    """Patch size; (image_size / patch_size)^2 patches are average-pooled to the N slots."""

    def validate(self, model: UMMModelConfig) -> None:
        if self.kind not in VISION_KINDS:
            raise ValueError(f"vision.kind must be one of {', '.join(VISION_KINDS)}, got "
                             f"{self.kind!r}")
        if not self.enabled:
            return
        _positive("vision", self, "num_layers", "hidden_size", "num_attention_heads",
                  "ffn_hidden_size", "image_size", "patch_size")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"vision.hidden_size={self.hidden_size} is not divisible by "
                             f"vision.num_attention_heads={self.num_attention_heads}")
        if self.hidden_size != model.visual_dim:
            raise ValueError(f"vision.hidden_size={self.hidden_size} must equal "
                             f"model.visual_dim={model.visual_dim}")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision.patch_size={self.patch_size} does not divide "
                             f"vision.image_size={self.image_size}")
        grid, slots = self.image_size // self.patch_size, int(round(model.image_tokens ** 0.5))
        if slots * slots != model.image_tokens or grid % slots:
            raise ValueError(f"model.image_tokens={model.image_tokens} must be a square number "
                             f"whose root divides the {grid}x{grid} patch grid")


@dataclass
class ParallelConfig:
    """Tensor, sequence and pipeline parallel sizes; data parallel is what remains."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    sequence_parallel: bool = False
    """Split activations along the sequence between TP ranks (needs tensor_parallel > 1)."""
    recompute: bool = False
    """Full activation recompute of every layer."""

    def validate(self, model: UMMModelConfig) -> None:
        _positive("parallel", self, "tensor_parallel", "pipeline_parallel")
        tp = self.tensor_parallel
        if self.sequence_parallel and tp == 1:
            raise ValueError("parallel.sequence_parallel needs parallel.tensor_parallel > 1")
        groups = model.num_query_groups or model.num_attention_heads
        if model.num_attention_heads % tp or groups % tp:
            raise ValueError(f"parallel.tensor_parallel={tp} must divide model."
                             f"num_attention_heads={model.num_attention_heads} and the "
                             f"{groups} query groups")
        if model.ffn_hidden_size % tp:
            raise ValueError(f"parallel.tensor_parallel={tp} must divide "
                             f"model.ffn_hidden_size={model.ffn_hidden_size}")
        if model.num_layers % self.pipeline_parallel:
            raise ValueError(f"parallel.pipeline_parallel={self.pipeline_parallel} must divide "
                             f"model.num_layers={model.num_layers}")


@dataclass
class DataConfig:
    """Where samples come from: a dataset directory, or synthetic data made on the fly."""

    path: Optional[str] = None
    """Directory with index.json (``python -m megalora.umm.convert`` writes one)."""
    synthetic_samples: int = 512
    """With no path: how many synthetic samples to generate."""
    seq_length: int = 64
    """Tokens per training sequence (samples are padded to it)."""
    seed: int = 0
    """Shuffling (and synthetic generation) seed."""
    eval_samples: int = 64
    """Held-out synthetic samples (a different seed) for evaluation."""
    eval_path: Optional[str] = None
    """Held-out dataset directory (with ``path``): evaluated in order, never trained on."""
    max_samples: int = 0
    """With ``path``: train on this many of its samples only (the first of a permutation
    seeded by ``seed``, held in memory), 0 for all. MARS's probes vary the data size with it."""

    def validate(self, model: UMMModelConfig) -> None:
        _positive("data", self, "seq_length")
        if not isinstance(self.max_samples, int) or isinstance(self.max_samples, bool) \
                or self.max_samples < 0:
            raise ValueError(f"data.max_samples must be an int >= 0 (0: all), got "
                             f"{self.max_samples!r}")
        if self.path is None:
            _positive("data", self, "synthetic_samples")
        if not isinstance(self.eval_samples, int) or isinstance(self.eval_samples, bool) \
                or self.eval_samples < 0:
            raise ValueError(f"data.eval_samples must be an int >= 0 (0: no held-out set), got "
                             f"{self.eval_samples!r}")
        if self.seq_length > model.max_seq_length:
            raise ValueError(f"data.seq_length={self.seq_length} exceeds "
                             f"model.max_seq_length={model.max_seq_length}")
        if self.seq_length < model.image_tokens + 3:
            raise ValueError(f"data.seq_length={self.seq_length} cannot hold one image "
                             f"(model.image_tokens={model.image_tokens} + 2 markers + 1)")


@dataclass
class TrainConfig:
    """The optimisation loop."""

    steps: int = 60
    micro_batch_size: int = 4
    num_microbatches: int = 2
    """Microbatches per step and data-parallel rank (gradient accumulation / pipeline depth)."""
    lr: float = 5e-3
    min_lr: float = 5e-4
    """Floor of the cosine decay."""
    warmup_steps: int = 5
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    seed: int = 0
    """Base-model init and dropout seed."""
    log_every: int = 5
    save_every: int = 20
    """Checkpoint every this many steps (0 = only at the end)."""
    out_dir: str = "out/umm_tiny"
    device: str = "auto"
    """``cpu`` (gloo + CPU harness), ``cuda`` (NCCL, bf16) or ``auto``."""
    bf16: bool = True
    """bf16 base weights and activations on CUDA (adapters keep fp32 master copies)."""
    optimizer: str = "megatron"
    """``megatron`` (megatron-core's DDP + optimizer; on CPU through the harness) or ``torch``
    (AdamW with fp32 masters and megalora's own gradient reductions)."""
    resume: bool = True
    """Continue from the newest checkpoint in out_dir when there is one. False starts afresh;
    an earlier run's checkpoints in out_dir are then moved to checkpoints.before-<time>/."""
    tensorboard: bool = True
    nonfinite: str = "stop"
    """What an inf/nan loss or gradient does: ``stop`` (a clear error, nothing of that step
    saved) or ``skip`` (the step makes no update; the run goes on)."""
    max_nonfinite_skips: int = 10
    """With nonfinite=skip: stop after this many skipped steps in a row."""

    def validate(self) -> None:
        _positive("train", self, "steps", "micro_batch_size", "num_microbatches", "log_every")
        if not 0 < self.min_lr <= self.lr:
            raise ValueError(f"train.min_lr={self.min_lr} must be in (0, train.lr={self.lr}]")
        if self.warmup_steps < 0 or self.save_every < 0 or self.clip_grad < 0:
            raise ValueError("train.warmup_steps, train.save_every and train.clip_grad must "
                             "be >= 0")
        if self.optimizer not in ("megatron", "torch"):
            raise ValueError(f"train.optimizer must be megatron or torch, got "
                             f"{self.optimizer!r}")
        if self.nonfinite not in ("stop", "skip"):
            raise ValueError(f"train.nonfinite must be stop or skip, got {self.nonfinite!r}")
        _positive("train", self, "max_nonfinite_skips")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"train.device must be auto, cpu or cuda, got {self.device!r}")


SECTIONS = {"model": UMMModelConfig, "vision": VisionConfig, "parallel": ParallelConfig,
            "data": DataConfig, "train": TrainConfig, "pareto": ParetoConfig,
            "hydra": HydraConfig}


@dataclass
class RunConfig:
    model: UMMModelConfig = field(default_factory=UMMModelConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(num_heads=2,
                                                                routing="modality"))
    train: TrainConfig = field(default_factory=TrainConfig)
    pareto: ParetoConfig = field(default_factory=ParetoConfig)
    """Pareto LoRA (per-objective gradients combined per group); off by default."""
    hydra: HydraConfig = field(default_factory=HydraConfig)
    """HyDRA: per-module ranks under a budget, rescheduled during training; off by default."""

    def __post_init__(self):
        self.model.validate()
        self.vision.validate(self.model)
        self.parallel.validate(self.model)
        self.data.validate(self.model)
        self.train.validate()
        if self.hydra.enabled:
            self.hydra.validate(self.lora.rank)
        from megalora.pareto.groups import group_names
        group_names(self.pareto.groups, self.model.num_layers)
        tp = self.parallel.tensor_parallel
        if self.vision.enabled and (self.vision.num_attention_heads % tp
                                    or self.vision.ffn_hidden_size % tp):
            raise ValueError(f"parallel.tensor_parallel={tp} must divide vision."
                             f"num_attention_heads={self.vision.num_attention_heads} and vision."
                             f"ffn_hidden_size={self.vision.ffn_hidden_size} (the encoder shares "
                             "the decoder's TP group)")
        if self.vision.enabled and self.vision.kind == "clip" and self.model.emu2_checkpoint:
            raise ValueError("vision.enabled with model.emu2_checkpoint: the in-loop encoder "
                             "is megatron-core's CLIP ViT (vision.kind: clip), which cannot hold "
                             "Emu2's EVA-CLIP: set vision.kind: eva, or vision.enabled: false "
                             "and precompute the features with `megalora eva-features` "
                             "(docs/emu2.md)")
        if self.lora.routing == "modality" and self.lora.num_heads != 2:
            # the UMM's tokens carry two modality ids (text 0, image span 1): a third head
            # would never see a token and never train
            raise ValueError(f"lora.routing='modality' needs lora.num_heads=2 (text tokens -> "
                             f"head 0, image slots -> head 1), got {self.lora.num_heads}; use "
                             "routing='router' for learned routing over more heads")
        if self.vision.enabled and self.lora.routing != "single" and \
                "vision.*" not in self.lora.single_head_modules:
            # the encoder sees image patches, not the LLM's tokens: one head, no routing there
            self.lora = dataclasses.replace(
                self.lora, single_head_modules=self.lora.single_head_modules + ("vision.*",))

    @classmethod
    def from_dict(cls, raw: Dict[str, Any]) -> "RunConfig":
        unknown = sorted(set(raw) - set(SECTIONS) - {"lora"})
        if unknown:
            raise ValueError(f"unknown config section(s) {unknown}; expected "
                             f"{sorted(list(SECTIONS) + ['lora'])}")
        built = {}
        for name in raw:
            if raw[name] is not None and not isinstance(raw[name], dict):
                raise ValueError(f"config section {name!r} must be a mapping of field: value, "
                                 f"got {raw[name]!r}")
        if raw.get("lora") is not None:  # else the dataclass default (2 heads, modality)
            built["lora"] = LoRAConfig.from_dict(coerce_fields("lora", LoRAConfig, raw["lora"]))
        for name, klass in SECTIONS.items():
            values = dict(raw.get(name) or {})
            names = {f.name for f in dataclasses.fields(klass)}
            bad = sorted(set(values) - names)
            if bad:
                raise ValueError(f"unknown {name} field(s) {bad}; valid: {sorted(names)}")
            built[name] = klass(**coerce_fields(name, klass, values))
        return cls(**built)

    @classmethod
    def from_yaml(cls, path: str, overrides: Optional[List[str]] = None) -> "RunConfig":
        resolved = resolve_config(path)
        with open(resolved) as fh:
            raw = load_yaml(fh.read(), resolved)
        if not raw:
            raise ValueError(f"config {resolved} is empty: a run config has the sections "
                             f"{sorted(list(SECTIONS) + ['lora'])} (see launch/configs/"
                             "umm_tiny.yaml); an empty file would silently train the defaults")
        if not isinstance(raw, dict):
            raise ValueError(f"config {resolved} must be a mapping of sections (model:, train:, "
                             f"...), got a {type(raw).__name__}")
        for item in overrides or []:
            key, eq, value = item.partition("=")
            section, dot, name = key.partition(".")
            if not eq or not dot:
                raise ValueError(f"override {item!r} must look like section.field=value")
            raw.setdefault(section, {})
            raw[section] = dict(raw[section] or {})
            raw[section][name] = load_yaml(value, f"override {item!r}")
        return cls.from_dict(raw)

    def to_dict(self) -> Dict[str, Any]:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["lora"] = self.lora.to_dict()
        return out


def resolve_config(name: str) -> str:
    """A config path, or a name under launch/configs (``umm_tiny`` or ``umm_tiny.yaml``), looked
    up in the working directory's launch/configs and then in the source tree's."""
    if os.path.isfile(name):
        return name
    if os.sep in name:
        raise FileNotFoundError(f"config {name!r} does not exist")
    stem = name if name.endswith((".yaml", ".yml")) else name + ".yaml"
    roots = [os.getcwd(), os.path.dirname(os.path.dirname(os.path.dirname(__file__)))]
    for root in roots:
        path = os.path.join(root, "launch", "configs", stem)
        if os.path.isfile(path):
            return path
    known = sorted({f[:-5] for r in roots if os.path.isdir(os.path.join(r, "launch", "configs"))
                    for f in os.listdir(os.path.join(r, "launch", "configs"))
                    if f.endswith(".yaml")})
    raise FileNotFoundError(f"config {name!r} is neither a file nor one of launch/configs: "
                            f"{', '.join(known) or '(none found)'}")

"""The unified multimodal model: a megatron-core GPT decoder with Emu2's visual connectors.

``UMMModel`` holds this pipeline stage of
- ``llm``: a megatron-core ``GPTModel`` (RMSNorm, SwiGLU, RoPE, no biases, untied embeddings);
- on the first stage ``project_up`` (visual_dim -> hidden; the input at ``<image>`` positions)
  and, optionally, ``vision``: megatron-core's ``CLIPViTModel`` whose patch tokens are
  average-pooled to the N slots of each image (so encoder-side LoRA is possible);
- on the last stage ``project_down`` (hidden -> visual_dim; the regression head).

The last stage returns both losses separately, per microbatch: the mean vocab-parallel
cross-entropy over text targets and the mean MSE (or 1 - cosine) over visual targets, so that
later code can treat them as two objectives. Under sequence parallelism each TP rank scores
the image positions of its own sequence shard and the sums are all-reduced.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from megalora import comm
from megalora.umm.batch import UMMBatch
from megalora.umm.config import RunConfig
from megalora.umm.tokens import SpecialTokens, padded_vocab_size


def _have_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
        return torch.cuda.is_available()
    except ImportError:
        return False


def llm_transformer_config(run: RunConfig, dtype: torch.dtype, cpu: bool):
    """The megatron-core TransformerConfig of the decoder."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    m, p = run.model, run.parallel
    extra = {}
    if p.recompute:
        extra = dict(recompute_granularity="full", recompute_method="uniform",
                     recompute_num_layers=1)
    return TransformerConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size, normalization="RMSNorm", layernorm_epsilon=m.norm_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        bias_activation_fusion=True, masked_softmax_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, attention_dropout=0.0, hidden_dropout=0.0,
        tensor_model_parallel_size=p.tensor_parallel,
        pipeline_model_parallel_size=p.pipeline_parallel,
        sequence_parallel=p.sequence_parallel, params_dtype=dtype, pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16, use_cpu_initialization=cpu, **extra)


def vision_transformer_config(run: RunConfig, dtype: torch.dtype, cpu: bool):
    """The CLIP ViT's TransformerConfig (same TP group, no SP, never pipelined)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    v = run.vision
    return TransformerConfig(
        num_layers=v.num_layers, hidden_size=v.hidden_size,
        num_attention_heads=v.num_attention_heads, ffn_hidden_size=v.ffn_hidden_size,
        add_bias_linear=True, bias_activation_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, attention_dropout=0.0, hidden_dropout=0.0,
        tensor_model_parallel_size=run.parallel.tensor_parallel, pipeline_model_parallel_size=1,
        sequence_parallel=False, params_dtype=dtype, pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16, use_cpu_initialization=cpu)


def _decoder_class():
    from megatron.core.models.gpt.gpt_model import GPTModel

    class UMMDecoder(GPTModel):
        """GPTModel that also keeps the final hidden states (after the final norm) of the last
        stage for the visual regression head."""

        def _postprocess(self, hidden_states, **kwargs):
            self.umm_hidden = hidden_states if self.post_process else None
            return super()._postprocess(hidden_states=hidden_states, **kwargs)

    return UMMDecoder


def _bidirectional(spec):
    """A ViT layer spec with unmasked self-attention (megatron-core 0.16's ViT specs ask for a
    causal mask, which a CLIP encoder does not use)."""
    import dataclasses

    from megatron.core.transformer.enums import AttnMaskType

    attn = spec.submodules.self_attention
    attn = dataclasses.replace(attn, params={**attn.params, "attn_mask_type": AttnMaskType.no_mask})
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules,
                                                                    self_attention=attn))


def _layer_spec(config, vision: bool):
    if _have_te():
        if vision:
            from megatron.core.models.vision.vit_layer_specs import (
                get_vit_layer_with_transformer_engine_spec)
            return _bidirectional(get_vit_layer_with_transformer_engine_spec())
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec)
        return get_gpt_layer_with_transformer_engine_spec()
    from megalora.cpu import cpu_gpt_block_spec
    if vision:
        from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
        return cpu_gpt_block_spec(config, _bidirectional(get_vit_layer_with_local_spec()))
    return cpu_gpt_block_spec(config)


class UMMModel(torch.nn.Module):
    """This rank's pipeline stage of the UMM (see module docstring)."""

    def __init__(self, run: RunConfig, *, pre_process: bool, post_process: bool,
                 dtype: torch.dtype = torch.float32, cpu: bool = True):
        super().__init__()
        from megatron.core import parallel_state as ps

        m = run.model
        self.run = run
        self.special = SpecialTokens(m.base_vocab)
        self.pre_process, self.post_process = pre_process, post_process
        self.config = llm_transformer_config(run, dtype, cpu)
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.llm = _decoder_class()(
            config=self.config, transformer_layer_spec=_layer_spec(self.config, False),
            vocab_size=padded_vocab_size(m.vocab_rows()),
            max_sequence_length=m.max_seq_length, pre_process=pre_process,
            post_process=post_process, share_embeddings_and_output_weights=False,
            position_embedding_type="rope", rotary_base=m.rope_base)
        # read by Megatron's schedules and finalize_model_grads through the DDP wrapper
        self.model_type = self.llm.model_type
        self.share_embeddings_and_output_weights = False
        self.vision = None
        if pre_process:
            self.project_up = torch.nn.Linear(m.visual_dim, m.hidden_size, bias=False, dtype=dtype)
            if run.vision.enabled:
                self.vision = self._build_vision(run, dtype, cpu)
        if post_process:
            self.project_down = torch.nn.Linear(m.hidden_size, m.visual_dim, bias=False,
                                                dtype=dtype)

    @staticmethod
    def _build_vision(run: RunConfig, dtype, cpu):
        from megatron.core.models.vision.clip_vit_model import CLIPViTModel

        from megalora.cpu import SequenceParallelTorchNorm

        vcfg = vision_transformer_config(run, dtype, cpu)
        if run.vision.kind == "eva":
            from megalora.umm.eva_parallel import EVAParallelEncoder, eva_config
            return EVAParallelEncoder(eva_config(run.vision), vcfg)
        spec = _layer_spec(vcfg, True)
        layer_spec = spec.layer_specs[0] if hasattr(spec, "layer_specs") else spec
        norm = SequenceParallelTorchNorm if not _have_te() else None
        kwargs = dict(ln_pre_impl=norm, ln_post_impl=norm) if norm is not None else {}
        vit = CLIPViTModel(vcfg, layer_spec, add_class_token=True, class_token_len=1,
                           patch_dim=run.vision.patch_size, img_h=run.vision.image_size,
                           img_w=run.vision.image_size, **kwargs)
        # its conv1 and class token are made in fp32 whatever params_dtype says (megatron wraps
        # the model in Float16Module for that); one dtype for the whole encoder instead
        return vit.to(dtype)

    # ------------------------------------------------------------------ pipeline plumbing
    def set_input_tensor(self, input_tensor) -> None:
        """Megatron's schedules hand the previous stage's activations in here."""
        self.llm.set_input_tensor(input_tensor)

    # ------------------------------------------------------------------ forward
    def visual_inputs(self, batch: UMMBatch) -> torch.Tensor:
        """[n_slots, visual_dim]: pooled encoder tokens (in-loop encoder) or the batch's
        precomputed features."""
        if self.vision is None:
            return batch.features
        if batch.pixels is None:
            raise ValueError("vision.enabled=true but the batch has no pixels; use data with "
                             "pixels (has_pixels) or disable the in-loop encoder")
        tokens = self.vision(batch.pixels.to(self.project_up.weight.dtype))  # [n, 1+P, d]
        patches = tokens[:, self.vision.class_token_len:]
        grid = int(round(patches.shape[1] ** 0.5))
        slots = int(round(self.run.model.image_tokens ** 0.5))
        img = patches.transpose(1, 2).reshape(patches.shape[0], -1, grid, grid)
        pooled = F.adaptive_avg_pool2d(img, slots)  # Emu2: avg-pool the patch grid to N slots
        return pooled.flatten(2).transpose(1, 2).reshape(-1, patches.shape[-1])

    def embed_inputs(self, batch: UMMBatch) -> torch.Tensor:
        """Decoder input [s(/TP), b, h]: word embeddings, project_up at ``<image>`` slots."""
        words = self.llm.embedding.word_embeddings
        # Under SP megatron reduce-scatters inside the embedding; keep the full [b, s, h] here so
        # image slots can be placed and every TP rank sees the whole visual input (its
        # gradients stay replicated), then scatter to the sequence shard below.
        flag = getattr(words, "reduce_scatter_embeddings", False)
        words.reduce_scatter_embeddings = False
        try:
            emb = words(batch.tokens)  # [b, s, h], all-reduced over TP
        finally:
            words.reduce_scatter_embeddings = flag
        if bool(batch.image_in_mask.any()):
            up = self.project_up(self.visual_inputs(batch).to(self.project_up.weight.dtype))
            emb = emb.index_put(tuple(batch.image_in_mask.nonzero().t()), up.to(emb.dtype))
        emb = emb.transpose(0, 1).contiguous()
        if self.config.fp32_residual_connection:
            emb = emb.float()
        if self.config.sequence_parallel:
            from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region
            emb = scatter_to_sequence_parallel_region(emb, group=self.tp_group)
        return emb

    def forward(self, batch: UMMBatch, attention_mask: torch.Tensor):
        """Hidden states (not the last stage) or the last stage's losses: ``text`` (= ``lm`` +
        ``caption``), ``image`` and the token counts."""
        b, s = batch.tokens.shape
        positions = torch.arange(s, device=batch.tokens.device).unsqueeze(0).expand(b, s)
        decoder_input = self.embed_inputs(batch) if self.pre_process else None
        out = self.llm(batch.tokens, positions, attention_mask, decoder_input=decoder_input,
                       labels=batch.text_labels if self.post_process else None)
        if not self.post_process:
            return out
        mask = batch.text_loss_mask
        denom = mask.sum().clamp_min(1.0)
        # text = lm + caption exactly (one denominator): text after an image in its sequence
        # (image-conditioned, e.g. captions) and the rest, separable Pareto objectives
        after_image = (torch.cumsum(batch.image_in_mask.long(), dim=1) > 0).to(mask.dtype)
        ce = out.float() * mask
        caption = (ce * after_image).sum() / denom
        lm = (ce * (1.0 - after_image)).sum() / denom
        return {"text": ce.sum() / denom, "lm": lm, "caption": caption,
                "image": self._image_loss(batch, self.llm.umm_hidden),
                "text_tokens": mask.sum().detach(),
                "image_tokens": batch.image_target_mask.sum().to(torch.float32)}

    def _image_loss(self, batch: UMMBatch, hidden: torch.Tensor) -> torch.Tensor:
        """Mean regression loss over the positions that predict an image slot."""
        target_mask = batch.image_target_mask  # [b, s]
        rows = torch.cumsum(target_mask.flatten().long(), 0).view_as(target_mask) - 1
        local = hidden.transpose(0, 1)  # [b, s_local, h]
        if self.config.sequence_parallel:
            n = local.shape[1]
            start = comm.group_rank(self.tp_group) * n
            target_mask, rows = target_mask[:, start:start + n], rows[:, start:start + n]
        pred = self.project_down(local[target_mask].to(self.project_down.weight.dtype)).float()
        target = batch.features[rows[target_mask]].float()
        if self.run.model.image_loss == "mse":
            per_slot = ((pred - target) ** 2).mean(-1)
        elif self.run.model.image_loss == "mse_sum":
            per_slot = ((pred - target) ** 2).sum(-1)
        else:
            per_slot = 1.0 - F.cosine_similarity(pred, target, dim=-1)
        total = per_slot.sum()
        if self.config.sequence_parallel:
            total = comm.reduce_from_tp(total.reshape(1), self.tp_group)[0]
        return total / batch.image_target_mask.sum().clamp_min(1).to(total.dtype)


def loss_convention(run: RunConfig) -> str:
    """One line that says how the two losses are measured and weighted (logged at start: a
    text/image gradient ratio means little without it)."""
    m = run.model
    image = {"mse": f"per-element MSE (mean over visual_dim={m.visual_dim})",
             "mse_sum": f"MSE summed over visual_dim={m.visual_dim}",
             "cosine": "1 - cosine"}[m.image_loss]
    return (f"losses: text cross-entropy (mean over text targets) x {m.text_loss_weight:g} + "
            f"image {image} per predicted slot (mean over slots) x {m.image_loss_weight:g}")


def objective_weights(run: RunConfig, names=("text", "image")) -> Dict[str, float]:
    """The weight of each objective (a key of the model's losses) in the summed loss:
    ``model.text_loss_weight`` for text and its parts (``lm``, ``caption``),
    ``model.image_loss_weight`` for image."""
    return {name: run.model.image_loss_weight if name == "image" else run.model.text_loss_weight
            for name in names}


def build_umm(run: RunConfig, dtype: torch.dtype = torch.float32, cpu: bool = True,
              seed: Optional[int] = None) -> UMMModel:
    """This rank's stage, with a TP/PP-invariant random base (replace it by importing a
    checkpoint, e.g. ``megalora.umm.hf.import_llama``)."""
    from megatron.core import parallel_state as ps

    from megalora.base_init import init_base_deterministic

    model = UMMModel(run, pre_process=ps.is_pipeline_first_stage(),
                     post_process=ps.is_pipeline_last_stage(), dtype=dtype, cpu=cpu)
    init_base_deterministic(model, run.train.seed if seed is None else seed,
                            run.model.init_std)
    return model

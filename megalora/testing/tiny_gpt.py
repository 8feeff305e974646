"""Tiny megatron-core GPT models for tests and CPU dry runs, identical at any TP/PP layout.

``build_tiny_gpt`` builds this rank's pipeline stage of a real ``GPTModel`` (local spec, torch
norms that allow sequence parallelism) and then re-initialises every base parameter from a
generator keyed by its canonical name, drawn at full size and sliced like Megatron shards it.
Megatron's own init draws in construction order, which differs between pipeline stages; this
makes the same ``seed`` give the same full model at TP=1, TP=2, PP=2, ...

``train_step`` runs one optimizer step through Megatron's own forward/backward schedule
(no-pipelining or 1F1B), setting each microbatch's per-token head ids for the adapters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from megalora.runtime import set_head_ids
from megalora.base_init import init_base_deterministic
from megalora.cpu import cpu_gpt_block_spec
from megalora.umm.batch import causal_mask


@dataclass
class TinyGPTShape:
    """Sizes of the tiny model (defaults: about 0.2M parameters)."""

    num_layers: int = 4
    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: Optional[int] = None
    vocab_size: int = 128
    seq_length: int = 16
    swiglu: bool = False
    init_std: float = 0.02
    """Std of the (random, frozen) base weights; biases get half of it."""


def tiny_gpt_config(shape: TinyGPTShape, tp: int = 1, pp: int = 1, sp: bool = False,
                    dtype: torch.dtype = torch.float32, recompute: bool = False):
    """A TransformerConfig for CPU runs (no dropout inside the base model)."""
    from megatron.core.transformer.transformer_config import TransformerConfig
    import torch.nn.functional as F

    extra = {}
    if recompute:
        extra = dict(recompute_granularity="full", recompute_method="uniform",
                     recompute_num_layers=1)
    return TransformerConfig(
        num_layers=shape.num_layers, hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads, ffn_hidden_size=shape.ffn_hidden_size,
        use_cpu_initialization=True, params_dtype=dtype, pipeline_dtype=dtype,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sp,
        attention_dropout=0.0, hidden_dropout=0.0, gated_linear_unit=shape.swiglu,
        activation_func=F.silu if shape.swiglu else F.gelu, bias_activation_fusion=False,
        masked_softmax_fusion=False, gradient_accumulation_fusion=False, **extra)


def build_tiny_gpt(shape: TinyGPTShape, config, seed: int = 0):
    """This rank's stage of the GPT, with a layout-independent base init."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_model import GPTModel

    model = GPTModel(
        config=config, transformer_layer_spec=cpu_gpt_block_spec(config),
        vocab_size=shape.vocab_size, max_sequence_length=shape.seq_length,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
        position_embedding_type="learned_absolute")  # rope caches on torch.cuda.current_device()
    init_base_deterministic(model, seed, shape.init_std)
    return model


@dataclass
class Batch:
    tokens: torch.Tensor
    """[b, s] int64"""
    labels: torch.Tensor
    """[b, s] int64"""
    head_ids: Optional[torch.Tensor] = None
    """[b, s] int: the B head per token (None for single-head adapters)."""
    loss_mask: Optional[torch.Tensor] = None
    """[b, s] float: which targets count."""


def _forward_step(data_iterator, model):
    batch: Batch = next(data_iterator)
    b, s = batch.tokens.shape
    if batch.head_ids is not None:
        set_head_ids(model, batch.head_ids)
    positions = torch.arange(s).unsqueeze(0).expand(b, s)
    out = model(batch.tokens, positions, causal_mask(s), labels=batch.labels)
    mask = batch.loss_mask if batch.loss_mask is not None else torch.ones(b, s)

    def loss_func(per_token):
        loss = (per_token.float() * mask).sum() / mask.sum()
        # clone: the schedule divides the returned loss in place by the microbatch count
        return loss, {"loss": loss.detach().clone()}

    return out, loss_func


def forward_backward(model, batches: List[Batch], config, forward_only: bool = False
                     ) -> List[dict]:
    """Megatron's forward/backward schedule over ``batches`` (one per microbatch)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, s = batches[0].tokens.shape
    seq = s
    return get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=iter(batches), model=model,
        num_microbatches=len(batches), seq_length=seq, micro_batch_size=b,
        forward_only=forward_only)


def mean_loss(losses: List[dict]) -> Optional[float]:
    """Average of the microbatch losses (None on non-last pipeline stages)."""
    if not losses:
        return None
    return float(sum(float(x["loss"]) for x in losses) / len(losses))


def broadcast_last_stage(value: Optional[float]) -> float:
    """Make a last-stage scalar (the loss) known on every rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not dist.is_initialized() or ps.get_pipeline_model_parallel_world_size() == 1:
        return float(value)
    t = torch.tensor([value if value is not None else 0.0], dtype=torch.float64)
    src = ps.get_pipeline_model_parallel_last_rank()
    dist.broadcast(t, src=src, group=ps.get_pipeline_model_parallel_group())
    return float(t.item())

"""The adapter optimizer: AdamW over fp32 master copies, with the gradient plumbing a LoRA
step needs under TP/SP/PP/DP and without Megatron's DDP.

Per step: ``finalize_lora_grads`` (TP sum of the sequence-parallel partial gradients), one
coalesced data-parallel all-reduce (mean) of the adapter gradients, the global grad norm
(each factor counted once: TP replicas skipped, summed over the model-parallel group), clipping,
AdamW on fp32 masters (bf16/fp16 adapters are updated through them), copy back. The learning
rate follows linear warmup then cosine decay to ``min_lr``.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megalora.grads import finalize_lora_grads


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Learning rate for 0-based ``step``: linear warmup, then cosine to ``min_lr``."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


class AdapterOptimizer:
    """AdamW on the trainable (adapter) parameters of ``model``."""

    def __init__(self, model, *, lr: float, weight_decay: float = 0.0, clip_grad: float = 0.0,
                 dp_group=None, mp_group=None):
        self.model = model
        self.params: List[torch.nn.Parameter] = [p for p in model.parameters() if p.requires_grad]
        self.masters = [p.detach().float().clone() if p.dtype != torch.float32 else p
                        for p in self.params]
        self.opt = torch.optim.AdamW(self.masters, lr=lr, weight_decay=weight_decay)
        self.clip_grad = clip_grad
        self.dp_group, self.mp_group = dp_group, mp_group

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        for m in self.masters:
            m.grad = None

    def _sync(self) -> None:
        finalize_lora_grads(self.model)
        grads = [p.grad for p in self.params if p.grad is not None]
        world = dist.get_world_size(self.dp_group) if dist.is_initialized() else 1
        if world > 1 and grads:
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=self.dp_group)
            flat /= world
            for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(synced)

    def grad_norm(self) -> float:
        """Global L2 norm; replicated factors counted once (Megatron's grad-norm rule)."""
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

        total = torch.zeros((), dtype=torch.float64)
        for p in self.params:
            if p.grad is not None and param_is_not_tensor_parallel_duplicate(p):
                total += p.grad.detach().double().pow(2).sum().cpu()
        if dist.is_initialized() and self.mp_group is not None:
            total = total.to(self.params[0].device if self.params else "cpu")
            dist.all_reduce(total, group=self.mp_group)
        return float(total.sqrt())

    def reduce(self) -> None:
        """Reduce the gradients (SP partial sums, DP mean) without stepping."""
        self._sync()

    def step(self, lr: float, reduced: bool = False) -> float:
        """Synchronise (unless ``reduced``), clip and apply one update; returns the pre-clip
        grad norm."""
        if not reduced:
            self._sync()
        norm = self.grad_norm()
        coef = self.clip_grad / (norm + 1e-6) if self.clip_grad and norm > self.clip_grad else 1.0
        for p, m in zip(self.params, self.masters):
            if p.grad is not None:
                m.grad = p.grad.float() * coef if coef != 1.0 else p.grad.float()
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.masters):
                if m is not p:
                    p.copy_(m.to(p.dtype))
        return norm

    def state_dict(self) -> Dict:
        return {"opt": self.opt.state_dict(),
                "masters": [m.detach().cpu().clone() for m in self.masters]}

    def load_state_dict(self, state: Dict, strict_shapes: bool = True) -> None:
        masters = state["masters"]
        if len(masters) != len(self.masters):
            raise ValueError(f"optimizer checkpoint has {len(masters)} parameters but this model "
                             f"trains {len(self.masters)}: the LoRA config or layout differs")
        with torch.no_grad():
            for m, saved in zip(self.masters, masters):
                if strict_shapes and m.shape != saved.shape:
                    raise ValueError(f"optimizer checkpoint shape {tuple(saved.shape)} != "
                                     f"{tuple(m.shape)}: resume with the same parallel layout")
                m.copy_(saved.to(m.device, m.dtype))
            for p, m in zip(self.params, self.masters):
                if m is not p:
                    p.copy_(m.to(p.dtype))
        self.opt.load_state_dict(state["opt"])


def loss_scalars(losses: List[dict]) -> Optional[Dict[str, float]]:
    """Token-weighted means over the microbatches of a step (None off the last stage)."""
    if not losses:
        return None
    n_text = sum(float(d["text_tokens"]) for d in losses)
    n_image = sum(float(d["image_tokens"]) for d in losses)
    out = {  # lm and caption share text's denominator, so they average like text
        name: sum(float(d[name]) * float(d["text_tokens"]) for d in losses) / max(n_text, 1)
        for name in ("text", "lm", "caption") if name in losses[0]}
    return {
        **out,
        "image": sum(float(d["image"]) * float(d["image_tokens"]) for d in losses)
        / max(n_image, 1),
        "loss": sum(float(d["loss"]) for d in losses) / len(losses),
        "text_tokens": n_text, "image_tokens": n_image}


class MegatronAdapterOptimizer:
    """The same interface on megatron-core's machinery: the stage wrapped in its
    ``DistributedDataParallel`` (gradient buffers for the adapters only, since they are the only
    trainable parameters), ``finalize_model_grads`` (DP reduction, and the TP sum of the
    sequence-parallel partial gradients from their ``sequence_parallel`` flag) and
    ``get_megatron_optimizer`` (Adam, fp32 main params for bf16 adapters, clipping with each
    factor counted once). Run the forward through ``module``."""

    def __init__(self, model, transformer_config, *, lr: float, weight_decay: float = 0.0,
                 clip_grad: float = 0.0, bf16: bool = False):
        from megatron.core.distributed import (DistributedDataParallel,
                                               DistributedDataParallelConfig)
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        self.module = DistributedDataParallel(
            config=transformer_config, module=model,
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True))
        self.opt = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=lr, weight_decay=weight_decay,
                            clip_grad=clip_grad, bf16=bf16,
                            params_dtype=torch.bfloat16 if bf16 else torch.float32),
            [self.module])

    def zero_grad(self) -> None:
        self.module.zero_grad_buffer()
        self.opt.zero_grad()

    def reduce(self) -> None:
        """DP reduction and SP partial sums into the main_grad buffers, without stepping."""
        from megatron.core.distributed import finalize_model_grads

        finalize_model_grads([self.module])

    def step(self, lr: float, reduced: bool = False) -> float:
        if not reduced:
            self.reduce()
        for group in self.opt.param_groups:
            group["lr"] = lr
        ok, norm, _ = self.opt.step()
        if not ok:
            from megalora.errors import NonFiniteError
            raise NonFiniteError("megatron-core's optimizer skipped the step (inf/nan "
                                 "gradients): lower train.lr or check the data")
        return float(norm) if norm is not None else 0.0

    def state_dict(self) -> Dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: Dict) -> None:
        self.opt.load_state_dict(state)

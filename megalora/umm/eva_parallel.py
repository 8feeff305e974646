"""Emu2's EVA-CLIP encoder in the training loop, tensor-parallel, so vision-side LoRA is
possible (``vision.kind: eva``).

The same maths as ``megalora.umm.eva.EVAEncoder`` (Emu2's ``eva_vit.py``: fused qkv without
bias plus q_bias/v_bias, residual post-norm, exact-GELU MLP, LayerNorm eps 1e-6, no final norm)
with megatron-core's parallel linears under Megatron-style names, so ``lora.target_modules``
(``linear_qkv``, ``linear_proj``, ``linear_fc1``, ``linear_fc2``) reach it as they reach the
decoder:

    vision.patch_embed (Conv2d with bias), vision.cls_token, vision.pos_embed
    vision.decoder.layers.i.norm1 / norm2                       (LayerNorm)
    vision.decoder.layers.i.self_attention.linear_qkv           (column, stride 3, no bias)
    vision.decoder.layers.i.self_attention.q_bias / v_bias      (split like q and v)
    vision.decoder.layers.i.self_attention.linear_proj          (row, bias)
    vision.decoder.layers.i.mlp.linear_fc1 / linear_fc2         (column / row, bias)

Stride 3 gives TP rank r the rows [q_r; k_r; v_r] of Emu2's fused [q; k; v] weight: its own
heads, in Emu2's order, so Emu2's ``attn.qkv.weight`` loads without reordering. The encoder
shares the decoder's TP group, is never pipelined (first stage) and runs without sequence
parallelism. Pixels arrive in [0, 1] and are normalised here (OpenAI CLIP's mean and std).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megalora.umm.eva import EVAConfig, normalize


def eva_config(vision) -> EVAConfig:
    """The EVAConfig of a ``VisionConfig`` (kind eva)."""
    return EVAConfig(image_size=vision.image_size, patch_size=vision.patch_size,
                     width=vision.hidden_size, layers=vision.num_layers,
                     heads=vision.num_attention_heads, mlp=vision.ffn_hidden_size)


class EVAParallelLayer(nn.Module):
    def __init__(self, cfg: EVAConfig, tcfg, layer_number: int):
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        super().__init__()
        d, tp = cfg.width, tcfg.tensor_model_parallel_size
        self.layer_number = layer_number  # canonical names: vision.decoder.layers.<n - 1>
        self.heads = cfg.heads // tp
        init = nn.init.zeros_  # the base is loaded or drawn by init_base_deterministic
        common = dict(config=tcfg, init_method=init)
        self.norm1 = nn.LayerNorm(d, eps=cfg.eps, dtype=tcfg.params_dtype)
        self.norm2 = nn.LayerNorm(d, eps=cfg.eps, dtype=tcfg.params_dtype)
        self.self_attention = nn.Module()
        att = self.self_attention
        att.linear_qkv = ColumnParallelLinear(d, 3 * d, bias=False, gather_output=False,
                                              stride=3, **common)
        for name in ("q_bias", "v_bias"):
            bias = nn.Parameter(torch.zeros(d // tp, dtype=tcfg.params_dtype))
            set_tensor_model_parallel_attributes(bias, True, 0, 1)
            setattr(att, name, bias)
        att.linear_proj = RowParallelLinear(d, d, bias=True, input_is_parallel=True,
                                            skip_bias_add=False, **common)
        self.mlp = nn.Module()
        self.mlp.linear_fc1 = ColumnParallelLinear(d, cfg.mlp, bias=True, gather_output=False,
                                                   **common)
        self.mlp.linear_fc2 = RowParallelLinear(cfg.mlp, d, bias=True, input_is_parallel=True,
                                                skip_bias_add=False, **common)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, d] -> [B, N, d]."""
        att = self.self_attention
        qkv, _ = att.linear_qkv(x)
        b, n, _ = qkv.shape
        qkv = qkv + torch.cat([att.q_bias, torch.zeros_like(att.v_bias), att.v_bias])
        q, k, v = qkv.view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # scale head_dim^-0.5, as Emu2's
        out, _ = att.linear_proj(out.transpose(1, 2).reshape(b, n, -1))
        x = x + self.norm1(out)  # residual post-norm: the norm is on the branch
        h, _ = self.mlp.linear_fc1(x)
        out, _ = self.mlp.linear_fc2(F.gelu(h))
        return x + self.norm2(out)


class EVAParallelEncoder(nn.Module):
    """This TP rank's EVA encoder; ``forward(pixels in [0, 1])`` -> [B, 1 + P, d] tokens."""

    class_token_len = 1

    def __init__(self, cfg: EVAConfig, tcfg):
        super().__init__()
        dtype = tcfg.params_dtype
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size,
                                     dtype=dtype)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width, dtype=dtype))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid ** 2 + 1, cfg.width, dtype=dtype))
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList(EVAParallelLayer(cfg, tcfg, i + 1)
                                            for i in range(cfg.layers))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        s = self.cfg.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ValueError(f"EVA expects images [B, 3, {s}, {s}], got {list(pixels.shape)}")
        # normalised in float32 at least (bf16 would lose the constants' digits)
        wide = torch.promote_types(self.cls_token.dtype, torch.float32)
        x = normalize(pixels.to(wide)).to(self.cls_token.dtype)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for layer in self.decoder.layers:
            x = layer(x)
        return x

"""Emu2's visual encoder, EVA-CLIP-E, as Emu2 defines it (``Emu2/emu/eva_vit.py`` in GitHub
``baaivision/Emu``), for turning images into the slot features Emu2's LLM reads.

What Emu2's code fixes, and this module follows:
- a 14x14 patch convolution with bias, a CLS token, an absolute position embedding for the
  1 + (448/14)^2 = 1025 tokens (no interpolation: the image must be 448x448);
- blocks without layer scale, rope or relative position bias. Attention uses one fused ``qkv``
  weight without bias plus separate ``q_bias`` and ``v_bias`` (k has no bias). The MLP is
  fc1 -> exact GELU -> fc2, with biases;
- *residual post-norm*: x = x + norm1(attn(x)); x = x + norm2(mlp(x)). The norm sits on the
  branch, and the residual stream itself is never normalised. LayerNorm eps is 1e-6, and there
  is no final norm;
- image tokens: drop CLS, lay the 32x32 grid out, average-pool it with stride 32 / sqrt(n),
  row-major (64 slots for Emu2 and Emu2-Gen, 256 for Emu2-Chat);
- preprocessing: RGB, resized (squashed, not cropped) to 448x448 bicubic, normalised with
  OpenAI CLIP's mean and std.

The checkpoint's ``visual.*`` tensors load under Emu2's own names. The native root is
``visual.``, the Hugging Face layout's is ``model.visual.`` and Emu2-Gen's is
``multimodal_encoder.visual.``. Sizes are read from the shapes; the head count cannot be read
from shapes, so it is a parameter (16 for EVA-CLIP-E: head width 112).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
VISUAL_ROOTS = ("visual.", "model.visual.", "multimodal_encoder.visual.")
"""Where Emu2's checkpoints keep the encoder: native, Hugging Face, Emu2-Gen."""


@dataclass(frozen=True)
class EVAConfig:
    """An EVA-CLIP encoder's sizes (the defaults are Emu2's EVA-CLIP-E)."""

    image_size: int = 448
    """Input side in pixels (square; Emu2 asserts it)."""
    patch_size: int = 14
    """Side of a patch (the convolution's kernel and stride)."""
    width: int = 1792
    """Hidden size: the feature size of a slot (Emu2's visual_dim)."""
    layers: int = 64
    """Transformer blocks."""
    heads: int = 16
    """Attention heads (width / 112 for EVA-CLIP-E); not readable from a checkpoint."""
    mlp: int = 15360
    """The MLP's hidden size."""
    eps: float = 1e-6
    """LayerNorm epsilon."""

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "width", "layers", "heads", "mlp"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"EVA {name} must be a positive integer, got "
                                 f"{getattr(self, name)!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"EVA image_size {self.image_size} is not a multiple of patch_size "
                             f"{self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"EVA width {self.width} is not divisible by heads {self.heads}")

    @property
    def grid(self) -> int:
        """Patches per side (32 for Emu2)."""
        return self.image_size // self.patch_size

    def parameters(self) -> int:
        """Parameter count in closed form (EVA-CLIP-E: 4,350,093,568)."""
        d, f, p = self.width, self.mlp, self.patch_size
        block = 3 * d * d + 2 * d + (d * d + d) + (d * f + f) + (f * d + d) + 4 * d
        return 3 * p * p * d + d + d + (self.grid ** 2 + 1) * d + self.layers * block


class EVAAttention(nn.Module):
    def __init__(self, cfg: EVAConfig):
        super().__init__()
        d = cfg.width
        self.heads = cfg.heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(d))
        self.v_bias = nn.Parameter(torch.zeros(d))
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # scale (d / heads)^-0.5, as Emu2's
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class EVAMlp(nn.Module):
    def __init__(self, cfg: EVAConfig):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(cfg.width, cfg.mlp), nn.Linear(cfg.mlp, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EVABlock(nn.Module):
    def __init__(self, cfg: EVAConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = EVAAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = EVAMlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.norm1(self.attn(x))  # residual post-norm (module docstring)
        return x + self.norm2(self.mlp(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: EVAConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)


class EVAEncoder(nn.Module):
    """EVA-CLIP as Emu2 defines it; parameter names are Emu2's ``visual.*`` names without the
    root, so a checkpoint loads with a strict ``load_state_dict``."""

    def __init__(self, cfg: EVAConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid ** 2 + 1, cfg.width))
        self.blocks = nn.ModuleList(EVABlock(cfg) for _ in range(cfg.layers))

    def forward(self, normalized: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] normalised pixels -> [B, 1 + grid^2, width] tokens (CLS first)."""
        s = self.cfg.image_size
        if normalized.dim() != 4 or tuple(normalized.shape[1:]) != (3, s, s):
            raise ValueError(f"EVA expects images [B, 3, {s}, {s}], got "
                             f"{list(normalized.shape)}")
        x = self.patch_embed.proj(normalized).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x

    def encode(self, pixels: torch.Tensor, image_tokens: int) -> torch.Tensor:
        """[B, 3, S, S] pixels in [0, 1] -> [B, image_tokens, width] slot features (Emu2's
        ``encode_image``: normalise, encode, drop CLS, average-pool)."""
        # normalised in float32 at least (bf16 weights: the constants would lose digits)
        wide = torch.promote_types(self.cls_token.dtype, torch.float32)
        x = normalize(pixels.to(wide)).to(self.cls_token.dtype)
        return eva_pool(self(x)[:, 1:], image_tokens)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, S, S] pixels in [0, 1] -> normalised with OpenAI CLIP's mean and std, in the
    pixels' dtype."""
    kw = dict(dtype=pixels.dtype, device=pixels.device)
    return (pixels - torch.tensor(OPENAI_MEAN, **kw).view(1, 3, 1, 1)) / \
        torch.tensor(OPENAI_STD, **kw).view(1, 3, 1, 1)


def eva_pool(patches: torch.Tensor, image_tokens: int) -> torch.Tensor:
    """[B, grid^2, d] patch tokens (CLS dropped) -> [B, image_tokens, d]: the grid laid out
    row-major, average-pooled with stride grid / sqrt(image_tokens)."""
    b, n, d = patches.shape
    stride = pool_stride(n, image_tokens)
    x = patches.transpose(1, 2).reshape(b, d, math.isqrt(n), math.isqrt(n))
    x = F.avg_pool2d(x, kernel_size=stride, stride=stride)
    return x.reshape(b, d, image_tokens).transpose(1, 2)


def pool_stride(patches: int, image_tokens: int) -> int:
    """``eva_pool``'s stride for ``patches`` patch tokens and ``image_tokens`` slots; refused
    unless both are squares and the slot grid divides the patch grid."""
    grid, side = math.isqrt(patches), math.isqrt(image_tokens)
    if grid * grid != patches or side * side != image_tokens or grid % side:
        raise ValueError(f"EVA pooling needs square grids with {image_tokens} slots dividing "
                         f"{patches} patches evenly (e.g. 64 or 256 slots of a 32x32 grid)")
    return grid // side


def load_image_eva(path: str, size: int = 448) -> torch.Tensor:
    """[3, size, size] float32 in [0, 1], prepared as Emu2 prepares an image: RGB, resized
    (squashed) bicubic. Non-square images are accepted, as Emu2 accepts them."""
    from PIL import Image

    with Image.open(path) as im:
        rgb = im.convert("RGB").resize((size, size), Image.BICUBIC)
    data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return data.reshape(size, size, 3).permute(2, 0, 1).to(torch.float32) / 255.0


def visual_root(keys: Sequence[str]) -> str:
    """The root under which a checkpoint's keys hold the encoder (``VISUAL_ROOTS``)."""
    for root in VISUAL_ROOTS:
        if any(k.startswith(root) for k in keys):
            return root
    raise ValueError(f"no EVA encoder in this checkpoint: no key starts with any of "
                     f"{list(VISUAL_ROOTS)} (first keys: {sorted(keys)[:5]})")


def read_visual(path: str) -> Dict[str, torch.Tensor]:
    """Only the ``visual.*`` tensors of an Emu2 checkpoint (keys without the root): a file
    (.safetensors read tensor by tensor, .bin/.pth memory-mapped) or a sharded folder with its
    index, whose shards without encoder tensors are not opened (``CheckpointFiles``)."""
    from megalora.umm.ckpt_files import CheckpointFiles

    files = CheckpointFiles(path)
    root = visual_root(files.keys())
    return {k[len(root):]: files.get(k) for k in files.keys() if k.startswith(root)}


def config_from_state(state: Dict[str, torch.Tensor], heads: int) -> EVAConfig:
    """Sizes read from the tensors' shapes (``heads`` given: shapes do not carry it)."""
    for key in ("pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
        if key not in state:
            raise ValueError(f"EVA checkpoint has no tensor 'visual.{key}'")
    width, patch = state["patch_embed.proj.weight"].shape[0], \
        state["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    return EVAConfig(image_size=grid * patch, patch_size=patch, width=width, layers=layers,
                     heads=heads, mlp=state["blocks.0.mlp.fc1.weight"].shape[0])


def load_eva(state: Dict[str, torch.Tensor], heads: int = 16,
             dtype: Optional[torch.dtype] = None) -> EVAEncoder:
    """An ``EVAEncoder`` holding ``state`` (``read_visual``'s keys); a missing, extra or
    mis-shaped tensor is refused by name."""
    cfg = config_from_state(state, heads)
    with torch.device("meta"):
        model = EVAEncoder(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"EVA checkpoint does not match Emu2's encoder: missing "
                         f"{['visual.' + k for k in missing[:5]]}, unexpected "
                         f"{['visual.' + k for k in extra[:5]]}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"EVA tensor 'visual.{key}': checkpoint {list(state[key].shape)}, "
                             f"the encoder expects {list(shape)} ({cfg})")
    # the dtype is set on meta: EVA-CLIP-E is 17 GB in float32, 8.7 GB in bf16 (one copy)
    model = (model.to(dtype) if dtype is not None else model).to_empty(device="cpu")
    model.load_state_dict(state, strict=True)
    return model

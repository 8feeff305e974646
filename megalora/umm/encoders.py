"""Frozen image encoders: pixels in, the [image_tokens, visual_dim] slot features the data
format stores out (and, where the encoder can, features back to pixels, so that generated
images can be looked at and judged).

``patch_pca``: the image cut into a grid x grid of square patches, each patch projected on the
top ``dims`` principal components of the training images' patches. Features keep their natural
scale (projections, not whitened), as a real encoder's do; ``decode`` is the exact inverse on
the components' span. It is fitted once (deterministic: SVD in float64, each component's sign
fixed) and saved; the converter and the trainer then load it frozen. Other kinds (Emu2's
EVA-CLIP) plug in through ``load_encoder``.
"""

from __future__ import annotations

import os
from typing import Dict

import torch

ENCODER_KINDS = ("patch_pca",)


class PatchPCAEncoder:
    """A frozen linear patch encoder (module docstring)."""

    kind = "patch_pca"

    def __init__(self, image_size: int, grid: int, mean: torch.Tensor, components: torch.Tensor):
        if image_size % grid:
            raise ValueError(f"patch_pca: image_size {image_size} is not a multiple of grid {grid}")
        self.image_size, self.grid = int(image_size), int(grid)
        self.mean = mean.to(torch.float64)               # [3 * p * p]
        self.components = components.to(torch.float64)  # [dims, 3 * p * p], orthonormal rows

    @property
    def image_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def visual_dim(self) -> int:
        return self.components.shape[0]

    def _patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, grid * grid, 3 * p * p] (row-major patches)."""
        b, c, s, _ = pixels.shape
        if (c, s) != (3, self.image_size) or pixels.shape[3] != s:
            raise ValueError(f"patch_pca: expected pixels [B, 3, {self.image_size}, "
                             f"{self.image_size}], got {list(pixels.shape)}")
        g, p = self.grid, s // self.grid
        x = pixels.to(torch.float64).reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, g * g, c * p * p)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] in [0, 1] -> float32 features [B, image_tokens, visual_dim]."""
        return ((self._patches(pixels) - self.mean) @ self.components.t()).to(torch.float32)

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """float32 features [B, image_tokens, visual_dim] -> pixels [B, 3, S, S] in [0, 1]."""
        b, g = features.shape[0], self.grid
        p = self.image_size // g
        x = features.to(torch.float64) @ self.components + self.mean
        x = x.reshape(b, g, g, 3, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, 3, self.image_size, self.image_size).clamp(0, 1).to(torch.float32)

    def explained(self, pixels: torch.Tensor) -> float:
        """Share of the patches' variance (about their mean) the components keep."""
        x = self._patches(pixels) - self.mean
        kept = x @ self.components.t()
        return float((kept ** 2).sum() / (x ** 2).sum())

    @classmethod
    def fit(cls, pixels: torch.Tensor, grid: int, dims: int) -> "PatchPCAEncoder":
        """The top ``dims`` principal components of ``pixels``' patches ([N, 3, S, S])."""
        enc = cls(pixels.shape[-1], grid, torch.zeros(1), torch.zeros(1, 1))
        x = enc._patches(pixels).reshape(-1, 3 * (pixels.shape[-1] // grid) ** 2)
        if not 1 <= dims <= x.shape[1]:
            raise ValueError(f"patch_pca: dims must be in [1, {x.shape[1]}] (the patch size), "
                             f"got {dims}")
        mean = x.mean(0)
        _, _, vt = torch.linalg.svd(x - mean, full_matrices=False)
        comps = vt[:dims]
        # a fixed sign per component (its largest entry positive): the same fit everywhere
        signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
        return cls(pixels.shape[-1], grid, mean, comps * signs)

    def state(self) -> Dict[str, torch.Tensor]:
        return {"mean": self.mean, "components": self.components}

    def metadata(self) -> Dict[str, str]:
        return {"kind": self.kind, "image_size": str(self.image_size), "grid": str(self.grid)}


def save_encoder(encoder, path: str) -> str:
    """Write the encoder's tensors and kind to ``path`` (safetensors, atomically)."""
    from safetensors.torch import save_file

    from megalora.atomic import atomic_write

    tensors = {k: v.contiguous() for k, v in encoder.state().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=encoder.metadata()))
    return path


def load_encoder(path: str):
    """The frozen encoder saved at ``path``; errors name the file and what is wrong."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"encoder file {path!r} does not exist (build one with the "
                                "EmojiCap builder or PatchPCAEncoder.fit + save_encoder)")
    try:
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:
        raise ValueError(f"encoder file {path!r} is not a readable safetensors file ({exc})") \
            from exc
    kind = meta.get("kind")
    if kind == "patch_pca":
        missing = {"mean", "components"} - set(tensors)
        if missing or not {"image_size", "grid"} <= set(meta):
            raise ValueError(f"encoder file {path!r}: a patch_pca encoder needs tensors mean, "
                             f"components and metadata image_size, grid; missing "
                             f"{sorted(missing | ({'image_size', 'grid'} - set(meta)))}")
        return PatchPCAEncoder(int(meta["image_size"]), int(meta["grid"]), tensors["mean"],
                               tensors["components"])
    raise ValueError(f"encoder file {path!r} has kind {kind!r}; known kinds: {ENCODER_KINDS}")

"""Synthetic interleaved image-text data with structure a tiny model learns in a few dozen steps.

A sample is ``text, image, text, image, ..., text``. The rules, all exact except the noise:

* text spans count up: t_{i+1} = (t_i + 1) mod base_vocab; the first span starts at random;
* the image after a span shows concept c = (last text token) mod NUM_CONCEPTS;
* slot j of that image has feature R^j u_c + noise (std NOISE_STD), where u_c is row c of a
  seeded codebook [NUM_CONCEPTS, visual_dim] with N(0, 1) entries and R a seeded signed
  permutation (orthogonal, so every slot keeps per-element scale ~1). Slot 0 is thus predictable
  from the text before ``[IMG]`` and slot j+1 from slot j;
* the span after ``[/IMG]`` starts at (5 c + 3) mod base_vocab, so text depends on the image;
* with pixels, image pixels are tanh(W u_c) reshaped to [3, P, P] for a seeded W.

The codebook, R and W come from ``structure_seed`` and the samples from ``seed``: a held-out set
drawn with another ``seed`` shares the mapping a model learned on the training set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple

import torch

from megalora.umm.tokens import IMAGE, TEXT, SpecialTokens

NUM_CONCEPTS = 8
NOISE_STD = 0.05
MIN_SPAN = 2


@dataclass
class SyntheticSpec:
    num_samples: int = 512
    """Number of samples."""
    seq_length: int = 64
    """Maximum tokens per sample; samples are between about half and all of it long."""
    base_vocab: int = 64
    """Text vocabulary size (special tokens follow it); at least NUM_CONCEPTS."""
    image_tokens: int = 4
    """``<image>`` slots per image (each image takes image_tokens + 2 tokens)."""
    visual_dim: int = 16
    """Feature dimension of each slot."""
    images_per_sample: int = 1
    """Images per sample, each preceded and followed by a text span."""
    seed: int = 0
    """Seed of the per-sample draws (span starts and lengths, noise)."""
    with_pixels: bool = False
    """Also emit ``pixels`` [images_per_sample, 3, pixel_size, pixel_size] per sample."""
    pixel_size: int = 16
    """Height and width of the synthetic images."""
    structure_seed: int = 0
    """Seed of the codebook, the slot map R and the pixel map (shared across data splits)."""

    def __post_init__(self):
        for name in ("num_samples", "seq_length", "base_vocab", "image_tokens", "visual_dim",
                     "pixel_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"SyntheticSpec.{name} must be a positive int, got {v!r}")
        if not isinstance(self.images_per_sample, int) or self.images_per_sample < 0:
            raise ValueError(f"SyntheticSpec.images_per_sample must be an int >= 0, got "
                             f"{self.images_per_sample!r}")
        if self.base_vocab < NUM_CONCEPTS:
            raise ValueError(f"SyntheticSpec.base_vocab must be >= {NUM_CONCEPTS} (one text id "
                             f"per concept), got {self.base_vocab}")
        need = self.images_per_sample * (self.image_tokens + 2) + \
            (self.images_per_sample + 1) * MIN_SPAN
        if self.seq_length < need:
            raise ValueError(f"SyntheticSpec.seq_length={self.seq_length} is too short: "
                             f"{self.images_per_sample} image(s) of {self.image_tokens} + 2 tokens "
                             f"and {self.images_per_sample + 1} text spans of >= {MIN_SPAN} "
                             f"tokens need {need}")
        for name in ("seed", "structure_seed"):
            if not isinstance(getattr(self, name), int):
                raise ValueError(f"SyntheticSpec.{name} must be an int, got "
                                 f"{getattr(self, name)!r}")
        if not isinstance(self.with_pixels, bool):
            raise ValueError(f"SyntheticSpec.with_pixels must be a bool, got {self.with_pixels!r}")


class Structure(NamedTuple):
    codebook: torch.Tensor
    """[NUM_CONCEPTS, visual_dim] concept vectors u_c."""
    rotation: torch.Tensor
    """[visual_dim, visual_dim] signed permutation R (slot j+1 = R @ slot j)."""
    pixel_map: torch.Tensor
    """[3 * P * P, visual_dim] W of pixels = tanh(W u_c)."""


def structure(spec: SyntheticSpec) -> Structure:
    """The fixed maps behind ``spec``'s data (from ``spec.structure_seed``)."""
    g = torch.Generator().manual_seed(spec.structure_seed)
    d, p = spec.visual_dim, spec.pixel_size
    codebook = torch.randn(NUM_CONCEPTS, d, generator=g)
    perm = torch.randperm(d, generator=g)
    signs = torch.randint(0, 2, (d,), generator=g).to(torch.float32) * 2 - 1
    rotation = torch.zeros(d, d)
    rotation[torch.arange(d), perm] = signs
    pixel_map = torch.randn(3 * p * p, d, generator=g) / d ** 0.5
    return Structure(codebook, rotation, pixel_map)


def concept_of(last_text_token: int) -> int:
    return last_text_token % NUM_CONCEPTS


def text_start_after(concept: int, base_vocab: int) -> int:
    """First text token after an image of ``concept``."""
    return (5 * concept + 3) % base_vocab


def concept_features(st: Structure, concept: int, image_tokens: int) -> torch.Tensor:
    """Noise-free [image_tokens, visual_dim] slot features R^j u_c."""
    rows, f = [], st.codebook[concept]
    for _ in range(image_tokens):
        rows.append(f)
        f = st.rotation @ f
    return torch.stack(rows)


def concept_pixels(st: Structure, concept: int, pixel_size: int) -> torch.Tensor:
    return torch.tanh(st.pixel_map @ st.codebook[concept]).reshape(3, pixel_size, pixel_size)


def _span_lengths(spec: SyntheticSpec, g: torch.Generator) -> List[int]:
    budget = spec.seq_length - spec.images_per_sample * (spec.image_tokens + 2)
    hi = budget // (spec.images_per_sample + 1)
    lo = max(MIN_SPAN, hi // 2)
    return torch.randint(lo, hi + 1, (spec.images_per_sample + 1,), generator=g).tolist()


def _one_sample(spec: SyntheticSpec, st: Structure, special: SpecialTokens,
                g: torch.Generator) -> dict:
    lengths = _span_lengths(spec, g)
    start = int(torch.randint(0, spec.base_vocab, (1,), generator=g))
    tokens, modality, feats, pixels = [], [], [], []
    for k, n in enumerate(lengths):
        span = [(start + i) % spec.base_vocab for i in range(n)]
        tokens += span
        modality += [TEXT] * n
        if k == len(lengths) - 1:
            break
        c = concept_of(span[-1])
        tokens += [special.img_start] + [special.img_slot] * spec.image_tokens + [special.img_end]
        modality += [IMAGE] * (spec.image_tokens + 1) + [TEXT]
        clean = concept_features(st, c, spec.image_tokens)
        feats.append(clean + NOISE_STD * torch.randn(clean.shape, generator=g))
        if spec.with_pixels:
            pixels.append(concept_pixels(st, c, spec.pixel_size))
        start = text_start_after(c, spec.base_vocab)
    sample = {"tokens": torch.tensor(tokens, dtype=torch.int64),
              "modality": torch.tensor(modality, dtype=torch.int64),
              "features": (torch.cat(feats) if feats else torch.zeros(0, spec.visual_dim))}
    if spec.with_pixels:
        p = spec.pixel_size
        sample["pixels"] = torch.stack(pixels) if pixels else torch.zeros(0, 3, p, p)
    return sample


def synthetic_samples(spec: SyntheticSpec) -> List[dict]:
    """``spec.num_samples`` sample dicts (see ``batch.py``), identical for identical specs."""
    st, special = structure(spec), SpecialTokens(spec.base_vocab)
    g = torch.Generator().manual_seed(spec.seed)
    return [_one_sample(spec, st, special, g) for _ in range(spec.num_samples)]


def write_synthetic(spec: SyntheticSpec, out_dir: str, *, shard_size: int = 1024,
                    feature_dtype: str = "float32") -> str:
    """Write ``synthetic_samples(spec)`` as a dataset in ``out_dir``; return the index path."""
    from megalora.umm.data import write_dataset

    return write_dataset(synthetic_samples(spec), out_dir, base_vocab=spec.base_vocab,
                         image_tokens=spec.image_tokens, visual_dim=spec.visual_dim,
                         shard_size=shard_size, feature_dtype=feature_dtype)

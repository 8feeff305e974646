"""Validation of one sample against the token format of ``tokens.py``.

Used by the writer (every sample before it is stored), by the reader (every sample as it is read:
shards may come from other writers) and for in-memory datasets. Errors name the sample (``where``)
and the model field that decides the expected value.
"""

from __future__ import annotations

from typing import Dict

import torch

from megalora.umm.tokens import IMAGE, PAD_MODALITY, TEXT, SpecialTokens

Sample = Dict[str, torch.Tensor]


def _check_image_spans(tokens, modality, special: SpecialTokens, image_tokens: int,
                       where: str) -> int:
    """Check image spans and modality ids against the tokens; return the number of images."""
    n = tokens.numel()
    starts = (tokens == special.img_start).nonzero().flatten().tolist()
    for s in starts:
        span = tokens[s + 1:s + 2 + image_tokens].tolist()
        if span != [special.img_slot] * image_tokens + [special.img_end]:
            raise ValueError(f"{where}: the image span at position {s} is not [IMG] + "
                             f"{image_tokens} x <image> + [/IMG] (model.image_tokens="
                             f"{image_tokens}); got tokens "
                             f"{tokens[s:s + 2 + image_tokens].tolist()}")
    # Every span found above is disjoint from the others, so matching totals mean no stray
    # <image> or [/IMG] exists outside a well-formed span.
    n_slots = int((tokens == special.img_slot).sum())
    n_ends = int((tokens == special.img_end).sum())
    if n_slots != image_tokens * len(starts) or n_ends != len(starts):
        raise ValueError(f"{where}: {n_slots} <image> and {n_ends} [/IMG] tokens for "
                         f"{len(starts)} [IMG]: an <image> or [/IMG] sits outside an image span "
                         f"[IMG] + {image_tokens} x <image> + [/IMG]")
    expected = torch.full((n,), TEXT, dtype=torch.int64)
    expected[(tokens == special.img_start) | (tokens == special.img_slot)] = IMAGE
    expected[tokens == special.pad] = PAD_MODALITY
    bad = (modality != expected).nonzero().flatten()
    if bad.numel():
        p = int(bad[0])
        raise ValueError(f"{where}: modality ids inconsistent with tokens at {bad.numel()} "
                         f"position(s), first at {p}: token {int(tokens[p])} has modality "
                         f"{int(modality[p])}, expected {int(expected[p])} (IMAGE=1 for [IMG] and "
                         "its <image> slots, TEXT=0 for text and [/IMG], -1 only for [PAD])")
    return len(starts)


def validate_sample(sample: Sample, special: SpecialTokens, image_tokens: int, visual_dim: int,
                    where: str) -> None:
    """Raise ValueError (naming ``where``) unless ``sample`` follows the format of ``tokens.py``."""
    tokens, modality, feats = sample.get("tokens"), sample.get("modality"), sample.get("features")
    for key, t in (("tokens", tokens), ("modality", modality), ("features", feats)):
        if not torch.is_tensor(t):
            raise ValueError(f"{where}: sample[{key!r}] must be a tensor, got {type(t).__name__}")
    if tokens.dim() != 1 or tokens.numel() == 0 or tokens.is_floating_point():
        raise ValueError(f"{where}: tokens must be a non-empty 1-D integer tensor, got "
                         f"{tuple(tokens.shape)} {tokens.dtype}")
    if modality.shape != tokens.shape or modality.is_floating_point():
        raise ValueError(f"{where}: modality must be an integer tensor shaped like tokens "
                         f"{tuple(tokens.shape)}, got {tuple(modality.shape)} {modality.dtype}")
    tokens, modality = tokens.to(torch.int64), modality.to(torch.int64)
    if int(tokens.min()) < 0 or int(tokens.max()) >= special.vocab_size:
        bad = int(tokens[(tokens < 0) | (tokens >= special.vocab_size)][0])
        raise ValueError(f"{where}: token id {bad} is outside [0, {special.vocab_size}) "
                         f"(model.base_vocab={special.base_vocab} + 4 special tokens)")
    stray = modality[(modality != TEXT) & (modality != IMAGE) & (modality != PAD_MODALITY)]
    if stray.numel():
        raise ValueError(f"{where}: modality id {int(stray[0])} is not one of -1 (pad), 0 (text), "
                         "1 (image)")
    n_images = _check_image_spans(tokens, modality, special, image_tokens, where)
    if feats.dim() != 2 or feats.shape[1] != visual_dim or not feats.is_floating_point():
        raise ValueError(f"{where}: features must be a float [n_slots, {visual_dim}] tensor "
                         f"(model.visual_dim={visual_dim}), got {tuple(feats.shape)} {feats.dtype}")
    n_slots = n_images * image_tokens
    if feats.shape[0] != n_slots:
        raise ValueError(f"{where}: {feats.shape[0]} feature rows but {n_slots} <image> tokens; "
                         "there must be exactly one feature row per <image>")
    if not bool(torch.isfinite(feats).all()):
        raise ValueError(f"{where}: features contain NaN or inf")
    pixels = sample.get("pixels")
    if pixels is not None and (not torch.is_tensor(pixels) or pixels.dim() != 4
                               or pixels.shape[0] != n_images):
        shape = tuple(pixels.shape) if torch.is_tensor(pixels) else type(pixels).__name__
        raise ValueError(f"{where}: pixels must be a [n_images={n_images}, C, H, W] tensor, "
                         f"got {shape}")

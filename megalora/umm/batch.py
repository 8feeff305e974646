"""The batch contract between the UMM data pipeline and the model.

A *sample* is one sequence: ``tokens`` [L] int, ``modality`` [L] int (see ``tokens.py``) and
``features`` [n_slots, visual_dim] (one row per ``<image>`` token, in order), optionally
``pixels`` [n_images, C, H, W] for an in-loop vision encoder. ``collate`` pads samples to the
sequence length and derives everything the two losses need; tensors are batch-major [b, s] like
Megatron's token ids (the model transposes to its [s, b, h] order).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, List, Optional

import torch

from megalora.umm.tokens import PAD_MODALITY, SpecialTokens


@dataclass
class UMMBatch:
    tokens: torch.Tensor
    """[b, s] int64 input ids (padding = ``[PAD]``)."""
    modality: torch.Tensor
    """[b, s] int64 per-token modality ids (0 text, 1 image span, -1 padding)."""
    text_labels: torch.Tensor
    """[b, s] int64 next-token targets (``[PAD]`` where there is none)."""
    text_loss_mask: torch.Tensor
    """[b, s] float32: 1 where the next token is a text token (the cross-entropy positions)."""
    image_in_mask: torch.Tensor
    """[b, s] bool: positions holding ``<image>`` (their input is project_up of a feature)."""
    image_target_mask: torch.Tensor
    """[b, s] bool: positions whose next token is ``<image>`` (they regress that slot)."""
    features: torch.Tensor
    """[n, visual_dim] float: one row per ``<image>`` in row-major [b, s] order. Row k is both
    the input at the k-th ``image_in_mask`` position and the target of the k-th
    ``image_target_mask`` position (each slot is predicted from the position before it)."""
    pixels: Optional[torch.Tensor] = None
    """[n_images, C, H, W] float images in order of appearance, for an in-loop encoder."""

    def to(self, device) -> "UMMBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return UMMBatch(**{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
                           for k, v in moved.items()})

    @property
    def num_text_targets(self) -> int:
        return int(self.text_loss_mask.sum())

    @property
    def num_image_targets(self) -> int:
        return int(self.image_target_mask.sum())


def collate(samples: List[Dict[str, torch.Tensor]], seq_length: int,
            special: SpecialTokens) -> UMMBatch:
    """Pad ``samples`` to ``seq_length`` and derive labels and masks."""
    b = len(samples)
    tokens = torch.full((b, seq_length), special.pad, dtype=torch.int64)
    modality = torch.full((b, seq_length), PAD_MODALITY, dtype=torch.int64)
    features, pixels = [], []
    for i, sample in enumerate(samples):
        n = int(sample["tokens"].numel())
        if n > seq_length:
            raise ValueError(f"data: sample {i} has {n} tokens but data.seq_length={seq_length}; "
                             "raise data.seq_length or split the sample")
        tokens[i, :n] = sample["tokens"].to(torch.int64)
        modality[i, :n] = sample["modality"].to(torch.int64)
        features.append(sample["features"])
        if sample.get("pixels") is not None:
            pixels.append(sample["pixels"])
    labels = torch.full_like(tokens, special.pad)
    labels[:, :-1] = tokens[:, 1:]
    text_mask = (labels < special.base_vocab).to(torch.float32)
    image_in = tokens == special.img_slot
    image_target = torch.zeros_like(image_in)
    image_target[:, :-1] = image_in[:, 1:]
    feats = torch.cat(features) if features else torch.zeros(0, 0)
    if feats.shape[0] != int(image_in.sum()):
        raise ValueError(f"data: {int(image_in.sum())} <image> tokens but {feats.shape[0]} "
                         "feature rows in the batch")
    return UMMBatch(tokens=tokens, modality=modality, text_labels=labels, text_loss_mask=text_mask,
                    image_in_mask=image_in, image_target_mask=image_target, features=feats,
                    pixels=torch.cat(pixels) if pixels else None)


def causal_mask(seq: int) -> torch.Tensor:
    """[1, 1, seq, seq] bool attention mask, True where a position may not attend (the
    future), as Megatron's attention takes it."""
    return torch.tril(torch.ones(seq, seq)).bool().logical_not()[None, None]

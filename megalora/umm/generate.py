"""Generation with the UMM (one process, TP = PP = 1): caption -> image by regressing the image
slots one after another, image -> caption by greedy decoding. Used to score a model on
EmojiCap with the judge (``megalora emojicap-eval``).

Caption -> image: the sequence is the caption, ``[IMG]``, N ``<image>`` slots and ``[/IMG]``.
The hidden state before slot k (``[IMG]`` for k = 0) regresses slot k's feature through
``project_down``; the prediction becomes slot k's input and the next pass predicts slot k + 1.
Later slots hold zeros until they are predicted; causal attention keeps them from reaching the
positions that matter. Image -> caption: ``[IMG]`` + the image's slots + ``[/IMG]``, then the
most likely text token (byte), appended, until ``max_new`` tokens.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from megalora.umm.batch import causal_mask, collate
from megalora.umm.tokens import IMAGE, TEXT


def forward_samples(model, run, samples: List[dict], seq_length: int):
    """(logits [b, s, vocab], hidden [b, s, h], batch) of the samples, in eval mode."""
    import megalora

    batch = collate(samples, seq_length, model.special)
    device = next(model.parameters()).device
    batch = batch.to(device)
    if run.lora.routing == "modality":
        megalora.set_head_ids(model, batch.modality)
    b, s = batch.tokens.shape
    positions = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
    logits = model.llm(batch.tokens, positions, causal_mask(s).to(device),
                       decoder_input=model.embed_inputs(batch), labels=None)  # [b, s, vocab]
    return logits, model.llm.umm_hidden.transpose(0, 1), batch


def image_sample(prefix: List[int], features: torch.Tensor, sp, text_after=(),
                 pixels: Optional[torch.Tensor] = None) -> dict:
    """``prefix`` text, one image (its slot ``features`` [N, D], the targets; with an in-loop
    vision encoder also its ``pixels`` [C, H, W], the inputs), then ``text_after``."""
    n = features.shape[0]
    tokens = list(prefix) + [sp.img_start] + [sp.img_slot] * n + [sp.img_end] + list(text_after)
    modality = ([TEXT] * len(prefix) + [IMAGE] * (n + 1) + [TEXT] + [TEXT] * len(text_after))
    sample = {"tokens": torch.tensor(tokens), "modality": torch.tensor(modality),
              "features": features}
    if pixels is not None:
        sample["pixels"] = pixels.unsqueeze(0)
    return sample


@torch.no_grad()
def captions_to_images(model, run, captions: List[List[int]], batch: int = 64) -> torch.Tensor:
    """[len(captions), image_tokens, visual_dim] generated slot features."""
    m = run.model
    model.eval()
    out = []
    for start in range(0, len(captions), batch):
        chunk = captions[start:start + batch]
        feats = torch.zeros(len(chunk), m.image_tokens, m.visual_dim)
        seq = max(len(c) for c in chunk) + m.image_tokens + 2
        for k in range(m.image_tokens):
            samples = [image_sample(c, feats[i], model.special) for i, c in enumerate(chunk)]
            _, hidden, b = forward_samples(model, run, samples, seq)
            targets = hidden[b.image_target_mask]  # [b * N, h], row-major: sample, then slot
            pred = model.project_down(targets.to(model.project_down.weight.dtype)).float()
            feats[:, k] = pred.reshape(len(chunk), m.image_tokens, -1)[:, k].cpu()
        out.append(feats)
    return torch.cat(out)


@torch.no_grad()
def images_to_captions(model, run, features: torch.Tensor, max_new: int = 40,
                       batch: int = 64) -> List[List[int]]:
    """Greedy text (token ids < base_vocab) after each image's slots [B, N, D]."""
    model.eval()
    base = run.model.base_vocab
    out: List[List[int]] = []
    for start in range(0, features.shape[0], batch):
        chunk = features[start:start + batch]
        texts = [[] for _ in range(chunk.shape[0])]
        for step in range(max_new):
            samples = [image_sample([], chunk[i], model.special, texts[i])
                       for i in range(chunk.shape[0])]
            seq = run.model.image_tokens + 2 + step
            logits, _, _ = forward_samples(model, run, samples, seq)
            nxt = logits[:, seq - 1, :base].argmax(-1).tolist()  # the last position's choice
            for text, t in zip(texts, nxt):
                text.append(int(t))
        out += texts
    return out

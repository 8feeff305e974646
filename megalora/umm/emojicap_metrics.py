"""One trained run's figures on EmojiCap's test emoji, cheap enough to score every run of a
methods comparison (launch/experiments/pareto_emojicap.py; docs/pareto-emojicap.md).

All on the Noto test images and English captions of the test emoji (in no training set), with
the run's model and its adapter (``<out_dir>/adapter.safetensors``):

- **Teacher-forced losses per document**, token-weighted over the test emoji: ``lm_ce`` (the
  caption's bytes with nothing before them, nats/byte), ``caption_ce`` (the caption after its
  image), ``text_ce`` (both), ``image_mse`` (the image's slots after its caption, per
  element).
- **Multiple choice** among ``choices`` emoji (the test emoji in seeded blocks of that size;
  chance 1 / choices): caption -> image picks, for each caption, the block's image whose
  teacher-forced MSE after that caption is lowest, and image -> caption the caption with the
  lowest CE after that image. Each candidate's score is first centred on its mean over the
  block's conditions (a PMI-style correction): an image that is easy to predict after any
  caption, or a caption that is likely after any image, must not win for that alone.
- **The judge** (``megalora.umm.judge``) on images generated from every test caption (slots
  regressed in turn, decoded by the encoder): category accuracy, retrieval of each EmojiOne
  twin, Fréchet distance to the real train Noto images.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import torch

STYLE = 1
"""The Noto column of EmojiImages.pairs (the art style the LoRA recipe adapts to)."""


@torch.no_grad()
def sequence_losses(model, run, samples: List[dict], batch: int = 64) -> Dict[str, torch.Tensor]:
    """Per sample: text NLL summed (``lm`` before any image, ``caption`` after one) with its
    byte counts, and image squared error summed with its element count; [len(samples)] each."""
    import torch.nn.functional as F

    from megalora.umm.generate import forward_samples

    model.eval()
    keys = ("lm", "lm_n", "caption", "caption_n", "image", "image_n")
    out = {k: [] for k in keys}
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        seq = max(int(s["tokens"].numel()) for s in chunk)
        logits, hidden, b = forward_samples(model, run, chunk, seq)
        logits, b_cpu = logits.float().cpu(), b.to("cpu")
        nll = -F.log_softmax(logits, -1).gather(-1, b_cpu.text_labels.unsqueeze(-1)).squeeze(-1)
        mask = b_cpu.text_loss_mask
        after = (torch.cumsum(b_cpu.image_in_mask.long(), 1) > 0).float()
        pred = model.project_down(hidden[b.image_target_mask].to(
            model.project_down.weight.dtype)).float().cpu()
        err = ((pred - b_cpu.features.float()) ** 2).sum(-1)
        owner = b_cpu.image_target_mask.nonzero()[:, 0]
        image = torch.zeros(len(chunk)).index_add_(0, owner, err)
        slots = torch.zeros(len(chunk)).index_add_(0, owner, torch.ones_like(err))
        out["lm"].append((nll * mask * (1 - after)).sum(1))
        out["lm_n"].append((mask * (1 - after)).sum(1))
        out["caption"].append((nll * mask * after).sum(1))
        out["caption_n"].append((mask * after).sum(1))
        out["image"].append(image)
        out["image_n"].append(slots * pred.shape[-1])
    return {k: torch.cat(v).double() for k, v in out.items()}


def choose(scores: torch.Tensor) -> torch.Tensor:
    """Row i's pick among the columns: argmin of ``scores`` [C, C] (row = condition, column =
    candidate, lower = better) after each column is centred on its mean over the rows."""
    return (scores - scores.mean(0, keepdim=True)).argmin(1)


def choice_samples(captions, feats, pixels, sp, rows, cols, image_first: bool) -> List[dict]:
    """The documents of one block: every (condition row, candidate column) pair, image first
    (image i, then caption j) or caption first (caption i, then image j); ``pixels`` (or None)
    go with their image."""
    from megalora.umm.generate import image_sample

    def pix(i):
        return None if pixels is None else pixels[i]

    if image_first:  # condition = image i, candidate = caption j
        return [image_sample([], feats[i], sp, captions[j], pix(i)) for i in rows for j in cols]
    return [image_sample(captions[i], feats[j], sp, pixels=pix(j)) for i in rows for j in cols]


def choice_and_losses(model, run, captions: List[List[int]], feats: torch.Tensor,
                      choices: int, seed: int,
                      pixels: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Multiple-choice accuracies (both directions) and the per-document losses (the blocks'
    diagonals: each emoji's own caption and image), over the emoji the blocks cover;
    ``pixels`` [n, C, H, W]: the images' inputs for an in-loop vision encoder."""
    order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(seed))
    blocks = order[:len(order) // choices * choices].view(-1, choices).tolist()
    if not blocks:
        raise ValueError(f"{len(captions)} test emoji cannot fill a block of {choices} choices")
    hits = {"caption_to_image": 0, "image_to_caption": 0}
    sums = dict.fromkeys(("lm", "lm_n", "caption", "caption_n", "image", "image_n"), 0.0)
    diag = torch.arange(choices)
    for block in blocks:
        c2i = sequence_losses(model, run, choice_samples(captions, feats, pixels, model.special,
                                                         block, block, False))
        i2c = sequence_losses(model, run, choice_samples(captions, feats, pixels, model.special,
                                                         block, block, True))
        mse = (c2i["image"] / c2i["image_n"]).view(choices, choices)
        ce = (i2c["caption"] / i2c["caption_n"]).view(choices, choices)
        hits["caption_to_image"] += int(choose(mse).eq(diag).sum())
        hits["image_to_caption"] += int(choose(ce).eq(diag).sum())
        on_diag = diag * (choices + 1)
        for key in ("lm", "lm_n", "image", "image_n"):
            sums[key] += float(c2i[key][on_diag].sum())
        for key in ("caption", "caption_n"):
            sums[key] += float(i2c[key][on_diag].sum())
    n = len(blocks) * choices
    return {"choice_caption_to_image": hits["caption_to_image"] / n,
            "choice_image_to_caption": hits["image_to_caption"] / n,
            "choice_chance": 1.0 / choices, "choice_emoji": n,
            "text_ce": (sums["lm"] + sums["caption"]) / (sums["lm_n"] + sums["caption_n"]),
            "lm_ce": sums["lm"] / sums["lm_n"], "caption_ce": sums["caption"] / sums["caption_n"],
            "image_mse": sums["image"] / sums["image_n"]}


def score_run(run, data_dir: str, limit: int = 0, choices: int = 4, seed: int = 0,
              judge_epochs: Optional[int] = None, judge_width: Optional[int] = None) -> dict:
    """The figures above for the run ``run`` (its out_dir's adapter); ``limit``: the first N
    test emoji only; ``judge_*``: a smaller judge than the default (quick checks). With an
    in-loop vision encoder (``vision.enabled``) the images enter as pixels, and nothing is
    generated: a generated slot is a feature, which that model cannot take as input, so
    ``judge`` and ``generated_mse`` are None."""
    import megalora
    from megalora.umm.emojicap_eval import load_split, score_generated
    from megalora.umm.encoders import load_encoder
    from megalora.umm.generate import captions_to_images
    from megalora.umm.image_docs import ByteTokenizer
    from megalora.umm.judge import JudgeConfig, judge_outputs, load_or_train
    from megalora.umm.session import build_model, parallel_session

    judge_cfg = JudgeConfig(**{k: v for k, v in (("epochs", judge_epochs),
                                                 ("width", judge_width)) if v is not None})
    train, test = load_split(data_dir, "train"), load_split(data_dir, "test")
    keep = slice(0, limit or None)
    rows = {r["code"]: r for r in map(json.loads, open(os.path.join(data_dir, "emoji.jsonl")))}
    tok = ByteTokenizer()
    captions = [tok.encode(rows[c]["captions"]["en"]) for c in test.codes[keep]]
    real = test.pairs[keep, STYLE]
    encoder = load_encoder(os.path.join(data_dir, "encoder.safetensors"))
    feats = encoder.encode(real)
    with parallel_session(run) as device:
        model, _ = build_model(run, device)
        megalora.load_adapter(model, os.path.join(run.train.out_dir, "adapter.safetensors"))
        vision = run.vision.enabled
        # the datasets store pixels in float16: the encoder sees the same values it trained on
        result = choice_and_losses(model, run, captions, feats, choices, seed,
                                   real.half().float() if vision else None)
        if vision:
            return {**result, "judge": None, "generated_mse": None}
        generated = captions_to_images(model, run, captions)
    net = load_or_train(data_dir, judge_cfg, {"train": train.pairs}, train.categories,
                        len(train.category_names), progress=lambda m: None)
    reference = judge_outputs(net, train.pairs[:, STYLE])[0]
    result["judge"] = score_generated(net, encoder.decode(generated), test.pairs[keep, 1 - STYLE],
                                      reference, test.categories[keep])
    result["generated_mse"] = float(((generated - feats) ** 2).mean())
    return result

"""EmojiCap's independent judge: a small CNN trained only on real train-split images (never on
model outputs), deterministic from its seed and cached beside the data.

It has a category head (the 8 EmojiOne categories) and an embedding trained to match each
emoji's two art styles (EmojiOne <-> Noto, a symmetric InfoNCE loss). It scores a set of images
(real, or decoded from a model's generated features) by:

- category accuracy against the emoji's category;
- cross-style retrieval: each EmojiOne image's Noto twin among the set's Noto images, top-1
  and top-5;
- Fréchet distance between the judge's features of the images and of the real test images.

Its scores on real held-out images are the ceiling printed beside every evaluation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Dict, List, Optional

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """How the judge is trained (the cache key includes every field)."""

    seed: int = 0
    """Initialisation and batch order."""
    epochs: int = 40
    """Passes over the train images."""
    batch: int = 128
    """Emoji per batch (each with both styles)."""
    lr: float = 2e-3
    """AdamW learning rate (cosine decay to 0)."""
    width: int = 32
    """Channels of the first conv layer (doubled twice)."""
    temperature: float = 0.1
    """InfoNCE temperature of the cross-style loss."""


class JudgeNet(nn.Module):
    def __init__(self, categories: int, width: int):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.category = nn.Linear(4 * w, categories)
        self.embed = nn.Linear(4 * w, 64)

    def forward(self, x: torch.Tensor):
        """(features [B, 4w], category logits [B, C], unit embeddings [B, 64])."""
        f = self.body(x * 2 - 1)
        return f, self.category(f), nn.functional.normalize(self.embed(f), dim=1)


def _info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = a @ b.t() / temperature
    target = torch.arange(a.shape[0])
    return 0.5 * (nn.functional.cross_entropy(logits, target) +
                  nn.functional.cross_entropy(logits.t(), target))


def train_judge(pairs: torch.Tensor, categories: torch.Tensor, num_categories: int,
                cfg: JudgeConfig) -> JudgeNet:
    """``pairs``: [N, 2, 3, S, S] (EmojiOne, Noto) train images; ``categories``: [N]."""
    torch.manual_seed(cfg.seed)
    net = JudgeNet(num_categories, cfg.width)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps = cfg.epochs * -(-pairs.shape[0] // cfg.batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    order = torch.Generator().manual_seed(cfg.seed)
    net.train()
    for _ in range(cfg.epochs):
        for idx in torch.randperm(pairs.shape[0], generator=order).split(cfg.batch):
            if idx.numel() < 2:
                continue
            x = pairs[idx].flatten(0, 1)  # [2b, 3, S, S], styles interleaved
            _, logits, emb = net(x)
            loss = nn.functional.cross_entropy(logits, categories[idx].repeat_interleave(2))
            loss = loss + _info_nce(emb[0::2], emb[1::2], cfg.temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


@torch.no_grad()
def judge_outputs(net: JudgeNet, images: torch.Tensor, batch: int = 512):
    """(features, category logits, embeddings) of [N, 3, S, S] images, in eval mode."""
    outs = [net(images[i:i + batch]) for i in range(0, images.shape[0], batch)]
    return tuple(torch.cat(parts) for parts in zip(*outs))


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to the rows of ``a`` and ``b`` (float64)."""
    import numpy as np
    from scipy import linalg

    a, b = a.double().numpy(), b.double().numpy()
    mu = a.mean(0) - b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root, _ = linalg.sqrtm(ca @ cb, disp=False)
    return float(mu @ mu + np.trace(ca + cb - 2 * root.real))


def score(net: JudgeNet, emojione: torch.Tensor, noto: torch.Tensor, categories: torch.Tensor,
          real_reference: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Scores of twin image sets [N, 3, S, S] (row i of both is emoji i); module docstring."""
    fa, la, ea = judge_outputs(net, emojione)
    fb, lb, eb = judge_outputs(net, noto)
    acc = torch.cat([la.argmax(1), lb.argmax(1)]).eq(categories.repeat(2)).float().mean()
    rank = (ea @ eb.t()).argsort(dim=1, descending=True)
    hit = rank.eq(torch.arange(len(rank)).unsqueeze(1))
    out = {"category_accuracy": float(acc), "retrieval_top1": float(hit[:, :1].any(1).float()
                                                                        .mean()),
           "retrieval_top5": float(hit[:, :5].any(1).float().mean())}
    if real_reference is not None:
        ref, _, _ = judge_outputs(net, real_reference)
        out["frechet"] = frechet_distance(torch.cat([fa, fb]), ref)
    return out


def chance(categories: torch.Tensor, n: int) -> Dict[str, float]:
    """What guessing gets: the majority category's share, and k / n for retrieval."""
    counts = torch.bincount(categories)
    return {"category_accuracy": float(counts.max()) / len(categories),
            "retrieval_top1": 1.0 / n, "retrieval_top5": min(1.0, 5.0 / n)}


def cache_key(data_dir: str, cfg: JudgeConfig) -> str:
    """The judge depends on the train images (via the build's emoji.jsonl) and ``cfg``."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode())
    with open(os.path.join(data_dir, "emoji.jsonl"), "rb") as fh:
        h.update(fh.read())
    return h.hexdigest()[:12]


def load_or_train(data_dir: str, cfg: JudgeConfig, images: Dict[str, torch.Tensor],
                  categories: torch.Tensor, num_categories: int,
                  progress=print) -> JudgeNet:
    """The cached judge of ``data_dir`` for ``cfg``, trained on ``images["train"]`` first."""
    from safetensors.torch import load_file, save_file

    from megalora.atomic import atomic_write

    path = os.path.join(data_dir, f"judge-{cache_key(data_dir, cfg)}.safetensors")
    net = JudgeNet(num_categories, cfg.width)
    if os.path.exists(path):
        net.load_state_dict(load_file(path))
        return net.eval()
    progress(f"training the judge on {images['train'].shape[0]} real train emoji "
             f"(both styles, {cfg.epochs} epochs)")
    net = train_judge(images["train"], categories, num_categories, cfg)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp))
    return net


def table(rows: List[tuple]) -> str:
    """``name  metric ...`` lines for (name, scores) pairs."""
    keys = ["category_accuracy", "retrieval_top1", "retrieval_top5", "frechet"]
    lines = [f"{'':<22}" + "".join(f"{k:>19}" for k in keys)]
    for name, s in rows:
        lines.append(f"{name:<22}" + "".join(
            f"{s[k]:>19.4f}" if k in s else f"{'':>19}" for k in keys))
    return "\n".join(lines)

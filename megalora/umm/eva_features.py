"""``megalora eva-features``: image files -> Emu2's slot features, one ``.npy``
[image_tokens, 1792] per image, for ``megalora convert`` (``{"image": "feats/x.npy"}``
segments: the ``.npy`` of ``imgs/x.png`` is ``feats/x.png.npy``).

    megalora eva-features --checkpoint Emu2_pytorch_model.bf16.bin --images imgs/ --out feats/
    torchrun --nproc_per_node 8 -m megalora eva-features ...   # data-parallel, one GPU each

The encoder is EVA-CLIP-E read from the checkpoint's ``visual.*`` tensors
(``megalora.umm.eva``). Images are prepared as Emu2 prepares them and encoded in batches:
bf16 on a GPU, float32 on CPU. Three properties:

- **Resumable:** an image whose ``.npy`` exists is skipped, and each ``.npy`` is written
  atomically, so an interrupted run continues where it stopped. ``<out>/eva-features.json``
  records the checkpoint, slot count and dtype; a rerun with other ones is refused.
- **Data-parallel:** under torchrun, srun or mpiexec, process r of W takes images r, r + W, …
  No process group is needed, since the processes never talk.
- **Checked:** non-finite features are refused, naming the image. So are features too large
  for ``--dtype float16``.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from typing import List

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


@dataclass
class EVAFeaturesConfig:
    """What ``megalora eva-features`` does; each field is one flag."""

    checkpoint: str
    """Emu2's checkpoint file (.bin/.pth or .safetensors) holding ``visual.*``,
    ``model.visual.*`` or ``multimodal_encoder.visual.*``."""
    images: str
    """A folder (searched recursively for image files) or a text file listing image paths
    relative to its own folder, one per line."""
    out: str
    """Output folder: ``<out>/<image path relative to the images>.npy``."""
    heads: int = 16
    """The encoder's attention heads (16 for EVA-CLIP-E; checkpoints do not record it)."""
    image_tokens: int = 64
    """Slots per image: 64 for Emu2 and Emu2-Gen, 256 for Emu2-Chat."""
    batch: int = 32
    """Images per encoder call."""
    device: str = "auto"
    """``auto`` (this process's GPU when there is one), ``cuda`` or ``cpu``."""
    dtype: str = "float32"
    """How features are stored: ``float32`` or ``float16`` (EVA's outputs are not normalised;
    float16 is refused where they exceed its range)."""

    def __post_init__(self) -> None:
        for name in ("heads", "image_tokens", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"--device must be auto, cuda or cpu, got {self.device!r}")
        if self.dtype not in ("float32", "float16"):
            raise ValueError(f"--dtype must be float32 or float16, got {self.dtype!r}")
        if not os.path.exists(self.images):
            raise FileNotFoundError(f"--images {self.images!r} does not exist")


def list_images(images: str) -> List[str]:
    """Image paths relative to ``images`` (a folder: sorted) or to a list file's folder (in the
    file's order). A listed path must stay inside that folder: its ``.npy`` goes to the same
    relative path under --out."""
    if os.path.isdir(images):
        found = [os.path.relpath(os.path.join(d, f), images) for d, _, files in os.walk(images)
                 for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
        return sorted(found)
    with open(images) as fh:
        names = [line.strip() for line in fh if line.strip()]
    for i, name in enumerate(names, 1):
        norm = os.path.normpath(name)
        if os.path.isabs(name) or norm == ".." or norm.startswith(".." + os.sep):
            raise ValueError(f"{images}:{i}: {name!r} leaves the list's folder; list paths "
                             "relative to it (features go to the same path under --out)")
    return names


def _root(images: str) -> str:
    return images if os.path.isdir(images) else os.path.dirname(os.path.abspath(images))


def _save_npy(path: str, array: np.ndarray) -> None:
    from megalora.atomic import atomic_write_bytes

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def _check(features: torch.Tensor, name: str, dtype: str) -> np.ndarray:
    if not torch.isfinite(features).all():
        raise FloatingPointError(f"EVA features of {name!r} are not finite; nothing was saved "
                                 "for it (check the checkpoint and the image)")
    if dtype == "float16" and features.abs().max() > float(np.finfo(np.float16).max):
        raise ValueError(f"EVA features of {name!r} exceed float16's range "
                         f"({features.abs().max():.3g}): use --dtype float32")
    return features.numpy().astype(dtype)


def _load(root: str, name: str, size: int) -> torch.Tensor:
    from megalora.umm.eva import load_image_eva

    try:
        return load_image_eva(os.path.join(root, name), size)
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's errors for a bad file
        raise ValueError(f"image {name!r} (under {root}) cannot be read: {exc}") from exc


def _claim(cfg: EVAFeaturesConfig, write: bool) -> None:
    """``<out>/eva-features.json`` records what made the features. A rerun with another
    checkpoint, slot count or dtype would mix stale and new files, so it is refused. With
    ``write``, a missing record is written (once the inputs are known to be good)."""
    import json

    from megalora.atomic import atomic_write_bytes

    what = {"checkpoint": os.path.abspath(cfg.checkpoint), "heads": cfg.heads,
            "image_tokens": cfg.image_tokens, "dtype": cfg.dtype}
    path = os.path.join(cfg.out, "eva-features.json")
    if os.path.isfile(path):
        with open(path) as fh:
            before = json.load(fh)
        if before != what:
            raise ValueError(f"{cfg.out} holds features made with {before}, not {what}: choose "
                             "another --out, or remove the folder to start again")
    elif write:
        atomic_write_bytes(path, json.dumps(what, indent=1).encode())  # ranks write the same


@contextlib.contextmanager
def same_everywhere():
    """Errors raised inside are the same on every rank (the inputs are): marked so that
    ``megalora.errors.report`` prints them once, from rank 0, not once per process."""
    try:
        yield
    except Exception as exc:
        exc.same_on_all_ranks = True
        raise


def _device(cfg: EVAFeaturesConfig, local_rank: int) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no GPU")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def extract(cfg: EVAFeaturesConfig, rank: int = 0, world: int = 1, local_rank: int = 0,
            progress=print) -> dict:
    """Encode this process's share of the images; returns counts (written, skipped, total)."""
    from megalora.umm.eva import config_from_state, load_eva, pool_stride, read_visual

    with same_everywhere():  # every rank sees the same inputs: rank 0 reports, once
        names = list_images(cfg.images)
        _claim(cfg, write=False)  # also when all is done: other settings must not pass as done
    mine = names[rank::world]
    root = _root(cfg.images)
    todo = [n for n in mine if not os.path.isfile(os.path.join(cfg.out, n + ".npy"))]
    counts = {"total": len(names), "mine": len(mine), "skipped": len(mine) - len(todo),
              "written": 0}
    if not todo:
        return counts
    device = _device(cfg, local_rank)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with same_everywhere():
        state = read_visual(cfg.checkpoint)
        # a bad --image-tokens fails now, not after loading 4B weights
        pool_stride(config_from_state(state, cfg.heads).grid ** 2, cfg.image_tokens)
        _claim(cfg, write=True)
    model = load_eva(state, heads=cfg.heads, dtype=dtype).to(device)
    model.eval()
    for start in range(0, len(todo), cfg.batch):
        chunk = todo[start:start + cfg.batch]
        pixels = torch.stack([_load(root, n, model.cfg.image_size) for n in chunk]).to(device)
        with torch.no_grad():
            feats = model.encode(pixels, cfg.image_tokens).float().cpu()
        for name, f in zip(chunk, feats):
            _save_npy(os.path.join(cfg.out, name + ".npy"), _check(f, name, cfg.dtype))
        counts["written"] += len(chunk)
        progress(f"eva-features: rank {rank}: {counts['written'] + counts['skipped']}/"
                 f"{len(mine)} images")
    return counts


def add_parser(sub) -> None:
    p = sub.add_parser("eva-features", help="image files -> Emu2's EVA-CLIP slot features "
                                            "(.npy per image, for convert)")
    for name in ("checkpoint", "images", "out"):
        p.add_argument("--" + name, required=True)
    defaults = EVAFeaturesConfig.__dataclass_fields__
    for name, kind in (("heads", int), ("image_tokens", int), ("batch", int), ("device", str),
                       ("dtype", str)):
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=defaults[name].default)
    p.set_defaults(handler=run_cli)


def run_cli(args, progress=print) -> int:
    from megalora.distributed import detect

    with same_everywhere():
        cfg = EVAFeaturesConfig(checkpoint=args.checkpoint, images=args.images, out=args.out,
                                heads=args.heads, image_tokens=args.image_tokens,
                                batch=args.batch, device=args.device, dtype=args.dtype)
    env = detect()
    counts = extract(cfg, env.rank, env.world_size, env.local_rank, progress)
    progress(f"eva-features: rank {env.rank}/{env.world_size}: wrote {counts['written']}, "
             f"skipped {counts['skipped']} already done, of {counts['mine']} images "
             f"({counts['total']} in all) under {cfg.out}")
    return 0

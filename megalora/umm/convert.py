"""Convert interleaved data from JSONL + .npy files into the sharded format of ``data.py``.

Each JSONL line is one sample::

    {"segments": [{"tokens": [12, 7, 99]},
                  {"image": "feats/0001.npy", "pixels": "pix/0001.npy"},
                  {"tokens": [5, 3]}]}

``tokens`` are text ids (< base_vocab; the converter adds the special tokens), ``image`` is a
float array [image_tokens, visual_dim] of slot features and the optional ``pixels`` a [C, H, W]
image; paths are relative to the JSONL file's directory. Either every image has pixels or none.

Documents can instead carry raw text and image files (``megalora.umm.image_docs``)::

    {"segments": [{"text": "a red apple"}, {"image_file": "img/apple.png"}]}

``text`` is tokenized with ``--tokenizer`` (default UTF-8 bytes); each ``image_file`` is loaded,
resized to the frozen encoder's size (``--encoder``, see ``megalora.umm.encoders``) and encoded
into slot features, ``--image-batch`` images per call; ``--pixels`` stores the pixels too.

The dataset is built beside ``--out`` and swapped in only when every line converted: a failure
leaves a dataset already in ``--out`` as it was. ``--out`` must be new, empty or a dataset.

    python -m megalora.umm.convert --jsonl data.jsonl --out data/ --base-vocab 32000 \\
        --image-tokens 64 --visual-dim 1792
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterator, List, Optional

import numpy as np
import torch

from megalora.umm.data import FEATURE_DTYPES, write_dataset
from megalora.umm.image_docs import PendingImages, load_image, make_tokenizer
from megalora.umm.tokens import IMAGE, TEXT, SpecialTokens

_IMAGE_KEYS = {"image", "pixels"}
_SEGMENTS = ("{'tokens': [...]}, {'text': '...'}, {'image': 'x.npy'} (optionally with 'pixels': "
             "'y.npy') or {'image_file': 'x.png'}")


def _load_npy(base_dir: str, rel, where: str, what: str) -> np.ndarray:
    if not isinstance(rel, str):
        raise ValueError(f"{where}: {what} path must be a string, got {rel!r}")
    path = os.path.join(base_dir, rel)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: {what} file {path!r} does not exist")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises several types for a bad file
        raise ValueError(f"{where}: {what} file {path!r} is not a readable .npy ({exc})") from exc
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{where}: {what} file {path!r} has dtype {arr.dtype}, expected floats")
    return arr


class _Converter:
    """Turns parsed JSONL lines into samples, remembering whether images carry pixels."""

    def __init__(self, base_dir: str, base_vocab: int, image_tokens: int, visual_dim: int,
                 pixel_shape: Optional[tuple], tokenizer=None, pending=None):
        self.base_dir, self.special = base_dir, SpecialTokens(base_vocab)
        self.image_tokens, self.visual_dim = image_tokens, visual_dim
        self.pixel_shape = pixel_shape  # [C, H, W] of every image's pixels; None: no pixels
        self.tokenizer, self.pending = tokenizer, pending  # text segments; image files

    def raw_text(self, seg: dict, where: str) -> List[int]:
        if not isinstance(seg["text"], str):
            raise ValueError(f"{where}: 'text' must be a string, got {type(seg['text']).__name__}")
        toks = self.tokenizer.encode(seg["text"])
        if toks and max(toks) >= self.special.base_vocab:
            raise ValueError(f"{where}: the tokenizer gave id {max(toks)}, outside [0, base_vocab="
                             f"{self.special.base_vocab}); the tokenizer has "
                             f"{self.tokenizer.vocab_size} ids: set --base-vocab to at least that")
        return toks

    def image_file(self, seg: dict, where: str):
        """(slot the batched encoder fills with the features, pixels or None)."""
        if self.pending is None:
            raise ValueError(f"{where}: an image file needs a frozen encoder for its features: "
                             "pass --encoder PATH")
        rel = seg["image_file"]
        if not isinstance(rel, str):
            raise ValueError(f"{where}: 'image_file' must be a path string, got {rel!r}")
        pix = load_image(os.path.join(self.base_dir, rel), self.pending.encoder.image_size, where)
        if self.pixel_shape is not None and tuple(pix.shape) != self.pixel_shape:
            raise ValueError(f"{where}: pixels have shape {list(pix.shape)} but the first "
                             f"image's are {list(self.pixel_shape)}; all must be one [C, H, W]")
        return self.pending.add(pix), (pix if self.pixel_shape is not None else None)

    def text(self, seg: dict, where: str) -> List[int]:
        toks = seg["tokens"]
        if not isinstance(toks, list):
            raise ValueError(f"{where}: 'tokens' must be a list of ints, got {type(toks).__name__}")
        for t in toks:
            if not isinstance(t, int) or isinstance(t, bool):
                raise ValueError(f"{where}: token {t!r} is not an int")
            if not 0 <= t < self.special.base_vocab:
                raise ValueError(f"{where}: token id {t} is outside [0, base_vocab="
                                 f"{self.special.base_vocab}) (special tokens are added by the "
                                 "converter; text ids must be below base_vocab)")
        return toks

    def image(self, seg: dict, where: str):
        feats = _load_npy(self.base_dir, seg["image"], where, "image")
        want = (self.image_tokens, self.visual_dim)
        if feats.shape != want:
            raise ValueError(f"{where}: image features have shape {list(feats.shape)} but "
                             f"[image_tokens, visual_dim] = {list(want)} was expected")
        has_pix = "pixels" in seg
        if has_pix != (self.pixel_shape is not None):
            first = "does not" if has_pix else "has"
            raise ValueError(f"{where}: this image {'has' if has_pix else 'lacks'} 'pixels' but "
                             f"the file's first image {first}; either every image has pixels or "
                             "none")
        pix = None
        if has_pix:
            pix = _load_npy(self.base_dir, seg["pixels"], where, "pixels")
            if tuple(pix.shape) != self.pixel_shape:
                raise ValueError(f"{where}: pixels have shape {list(pix.shape)} but the first "
                                 f"image's are {list(self.pixel_shape)}; all must be one [C, H, W]")
            pix = torch.from_numpy(np.ascontiguousarray(pix, dtype=np.float32))
        return torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32)), pix

    def sample(self, record, where: str) -> dict:
        if not isinstance(record, dict) or not isinstance(record.get("segments"), list):
            raise ValueError(f"{where}: expected an object with a 'segments' list")
        unknown = set(record) - {"segments"}
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)} (only 'segments')")
        sp, n = self.special, self.image_tokens
        tokens, modality, feats, pixels = [], [], [], []
        for k, seg in enumerate(record["segments"]):
            at = f"{where} segment {k}"
            keys = set(seg) if isinstance(seg, dict) else None
            if keys in ({"tokens"}, {"text"}):
                toks = self.text(seg, at) if keys == {"tokens"} else self.raw_text(seg, at)
                tokens += toks
                modality += [TEXT] * len(toks)
            elif keys is not None and (keys == {"image_file"} or
                                       ("image" in keys and keys <= _IMAGE_KEYS)):
                f, p = self.image(seg, at) if "image" in keys else self.image_file(seg, at)
                tokens += [sp.img_start] + [sp.img_slot] * n + [sp.img_end]
                modality += [IMAGE] * (n + 1) + [TEXT]
                feats.append(f)
                if p is not None:
                    pixels.append(p)
            else:
                raise ValueError(f"{at}: unknown segment {seg!r}; a segment is {_SEGMENTS}")
        if not tokens:
            raise ValueError(f"{where}: the sample has no tokens")
        sample = {"tokens": torch.tensor(tokens, dtype=torch.int64),
                  "modality": torch.tensor(modality, dtype=torch.int64),
                  "features": feats}  # tensors, or slots the batched encoder fills (finish)
        if self.pixel_shape is not None:
            # Text-only samples of a dataset with pixels carry an empty [0, C, H, W] tensor.
            sample["pixels"] = torch.stack(pixels) if pixels else torch.zeros(0, *self.pixel_shape)
        return sample


def _lines(jsonl: str) -> Iterator[tuple]:
    """(where, parsed record) for each non-blank line."""
    with open(jsonl) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{jsonl} line {lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc})") from exc


def _scan_pixel_shape(jsonl: str, base_dir: str, file_pixels: Optional[tuple]) -> Optional[tuple]:
    """Shape of the first image's pixels, or None: decided before converting so that text-only
    lines before the first image already get the right (empty) pixel tensor. ``file_pixels``:
    the shape image files get ([3, S, S] with --pixels, else None)."""
    for where, record in _lines(jsonl):
        segments = record.get("segments") if isinstance(record, dict) else None
        for k, seg in enumerate(segments if isinstance(segments, list) else []):
            if isinstance(seg, dict) and "image_file" in seg:
                return file_pixels
            if isinstance(seg, dict) and "image" in seg:
                if "pixels" not in seg:
                    return None
                pix = _load_npy(base_dir, seg["pixels"], f"{where} segment {k}", "pixels")
                if pix.ndim != 3:
                    raise ValueError(f"{where} segment {k}: pixels have shape "
                                     f"{list(pix.shape)}, expected [C, H, W]")
                return tuple(pix.shape)
    return None


def _finish(sample: dict, visual_dim: int) -> dict:
    """The sample with its features as one tensor (image files' slots filled by now)."""
    feats = [f[0] if isinstance(f, list) else f for f in sample["features"]]
    sample["features"] = torch.cat(feats) if feats else torch.zeros(0, visual_dim)
    return sample


def read_jsonl(jsonl: str, *, base_vocab: int, image_tokens: int, visual_dim: int,
               max_tokens: Optional[int] = None, encoder=None, tokenizer: str = "bytes",
               pixels: bool = False, image_batch: int = 256) -> Iterator[dict]:
    """Yield the samples of ``jsonl`` in order (blank lines are skipped); errors name the line.
    ``encoder``: a frozen encoder (``megalora.umm.encoders``) for image files, which are
    encoded ``image_batch`` at a time; ``pixels``: keep image files' pixels too."""
    if not os.path.isfile(jsonl):
        raise FileNotFoundError(f"JSONL file {jsonl!r} does not exist")
    if encoder is not None and (encoder.image_tokens, encoder.visual_dim) != (image_tokens,
                                                                              visual_dim):
        raise ValueError(f"the encoder gives [{encoder.image_tokens}, {encoder.visual_dim}] "
                         f"features per image but --image-tokens {image_tokens} --visual-dim "
                         f"{visual_dim} were asked for: make them equal")
    base_dir = os.path.dirname(os.path.abspath(jsonl))
    file_pixels = (3, encoder.image_size, encoder.image_size) if encoder and pixels else None
    pending = PendingImages(encoder, image_batch) if encoder is not None else None
    conv = _Converter(base_dir, base_vocab, image_tokens, visual_dim,
                      _scan_pixel_shape(jsonl, base_dir, file_pixels), make_tokenizer(tokenizer),
                      pending)
    waiting: List[dict] = []  # samples whose image files are not encoded yet, in order
    for where, record in _lines(jsonl):
        sample = conv.sample(record, where)
        if max_tokens is not None and sample["tokens"].numel() > max_tokens:
            raise ValueError(f"{where}: {sample['tokens'].numel()} tokens exceed --max-tokens "
                             f"{max_tokens} (each image takes image_tokens + 2 tokens)")
        waiting.append(sample)
        if pending is None or pending.full():
            if pending is not None:
                pending.flush()
            yield from (_finish(x, visual_dim) for x in waiting)
            waiting = []
    if pending is not None:
        pending.flush()
    yield from (_finish(x, visual_dim) for x in waiting)


def convert_jsonl(jsonl: str, out_dir: str, *, base_vocab: int, image_tokens: int,
                  visual_dim: int, shard_size: int = 1024, feature_dtype: str = "float16",
                  max_tokens: Optional[int] = None, **image_files) -> str:
    """Convert ``jsonl`` into a dataset in ``out_dir``; return the index path. ``image_files``:
    ``encoder``, ``tokenizer``, ``pixels``, ``image_batch`` of ``read_jsonl``."""
    samples = read_jsonl(jsonl, base_vocab=base_vocab, image_tokens=image_tokens,
                         visual_dim=visual_dim, max_tokens=max_tokens, **image_files)
    return write_dataset(samples, out_dir, base_vocab=base_vocab, image_tokens=image_tokens,
                         visual_dim=visual_dim, shard_size=shard_size, feature_dtype=feature_dtype)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megalora.umm.convert",
                                description="Convert JSONL interleaved documents (token ids "
                                            "or text; .npy features or image files) to "
                                            "megalora's sharded safetensors format.")
    p.add_argument("--jsonl", required=True, help="input JSONL, one {'segments': [...]} per line")
    p.add_argument("--out", required=True,
                   help="output directory (index.json + shards): new, empty or an existing "
                        "dataset, which is replaced only if the conversion succeeds")
    p.add_argument("--base-vocab", type=int, required=True,
                   help="text vocabulary size; special tokens get the ids after it")
    p.add_argument("--image-tokens", type=int, default=None,
                   help="<image> slots per image (rows of each image .npy; default: the "
                        "encoder's)")
    p.add_argument("--visual-dim", type=int, default=None,
                   help="feature dimension (columns of each image .npy; default: the encoder's)")
    p.add_argument("--encoder", default=None, help="a frozen encoder file (megalora.umm."
                   "encoders) that turns image_file segments into features")
    p.add_argument("--tokenizer", default="bytes",
                   help="for text segments: bytes (UTF-8, ids 0-255) or hf:PATH")
    p.add_argument("--pixels", action="store_true",
                   help="store image files' pixels too (for the in-loop vision encoder)")
    p.add_argument("--image-batch", type=int, default=256, help="images per encoder call")
    p.add_argument("--shard-size", type=int, default=1024, help="samples per shard file")
    p.add_argument("--feature-dtype", choices=sorted(FEATURE_DTYPES), default="float16",
                   help="storage dtype of the features")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="reject samples longer than this (e.g. the training seq_length)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from megalora.logs import entry_point, take_verbose

    verbose, argv = take_verbose(argv)  # --verbose: megalora's debug lines, every warning
    with entry_point(verbose):
        return _convert(build_parser().parse_args(argv))


def _convert(args: argparse.Namespace) -> int:
    from megalora.umm.encoders import load_encoder

    try:
        encoder = load_encoder(args.encoder) if args.encoder else None
        dims = [args.image_tokens, args.visual_dim]
        if None in dims and encoder is None:
            raise ValueError("--image-tokens and --visual-dim are needed (or --encoder, whose "
                             "sizes they default to)")
        image_tokens = args.image_tokens or encoder.image_tokens
        visual_dim = args.visual_dim or encoder.visual_dim
        index = convert_jsonl(args.jsonl, args.out, base_vocab=args.base_vocab,
                              image_tokens=image_tokens, visual_dim=visual_dim,
                              shard_size=args.shard_size, feature_dtype=args.feature_dtype,
                              max_tokens=args.max_tokens, encoder=encoder,
                              tokenizer=args.tokenizer, pixels=args.pixels,
                              image_batch=args.image_batch)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a full disk, a read-only file system, ...
        print(f"error: {exc}; nothing was written to {args.out!r} (a dataset already there is "
              "unchanged)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted; nothing was written to {args.out!r} (a dataset already there is "
              "unchanged)", file=sys.stderr)
        return 130
    with open(index) as fh:
        n = json.load(fh)["num_samples"]
    print(f"wrote {n} samples to {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

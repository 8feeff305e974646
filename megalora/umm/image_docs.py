"""Documents with image files and raw text, for the converter (``megalora.umm.convert``).

A document's segments may be ``{"text": "..."}`` (tokenized here) and
``{"image_file": "img/x.png"}`` (PNG, JPEG or anything Pillow reads): the image is loaded,
composited on white when it has transparency, resized to the encoder's square size, and turned
into slot features by a frozen encoder (``megalora.umm.encoders``), many images per call. Its
pixels can be stored too, for the in-loop vision encoder.

Tokenizers: ``bytes`` (UTF-8 bytes, ids 0-255: needs base_vocab >= 256; any language, no
files) or ``hf:PATH`` (a Hugging Face tokenizer saved at PATH, read offline).
"""

from __future__ import annotations

import os
from typing import List

import torch


class ByteTokenizer:
    """UTF-8 bytes as token ids (0-255)."""

    vocab_size = 256

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer from a local folder, without special tokens."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer folder {path!r} does not exist")
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.vocab_size = len(self.tok)

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


def make_tokenizer(spec: str):
    """``bytes`` or ``hf:PATH``."""
    if spec == "bytes":
        return ByteTokenizer()
    if spec.startswith("hf:"):
        return HFTokenizer(spec[3:])
    raise ValueError(f"--tokenizer must be 'bytes' or 'hf:PATH', got {spec!r}")


def load_image(path: str, size: int, where: str) -> torch.Tensor:
    """[3, size, size] float32 in [0, 1]; errors name ``where`` (document and segment)."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: image file {path!r} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            w, h = im.size
            if w != h:
                raise ValueError(f"{where}: image file {path!r} is {w}x{h}; images must be "
                                 "square (crop or pad it first)")
            rgba = im.convert("RGBA")
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"{where}: image file {path!r} is not a readable image ({exc})") \
            from exc
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    white.alpha_composite(rgba)  # transparent pixels on white, as the image is shown
    rgb = white.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.LANCZOS)
    data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return data.reshape(size, size, 3).permute(2, 0, 1).to(torch.float32) / 255.0


class PendingImages:
    """Images whose features are computed in batches: ``add`` returns a slot that ``flush``
    fills with the encoder's output for that image."""

    def __init__(self, encoder, batch: int):
        self.encoder, self.batch = encoder, max(1, batch)
        self.pixels: List[torch.Tensor] = []
        self.slots: List[list] = []

    def add(self, pixels: torch.Tensor) -> list:
        slot = [None]
        self.pixels.append(pixels)
        self.slots.append(slot)
        return slot

    def full(self) -> bool:
        return len(self.pixels) >= self.batch

    def flush(self) -> None:
        for start in range(0, len(self.pixels), self.batch):
            feats = self.encoder.encode(torch.stack(self.pixels[start:start + self.batch]))
            for slot, f in zip(self.slots[start:start + self.batch], feats):
                slot[0] = f
        self.pixels, self.slots = [], []

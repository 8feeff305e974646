"""EmojiCap: a real image-text dataset built from three Debian packages, at run time.

    megalora emojicap --out data/emojicap            # make emojicap
    megalora emojicap --out /tmp/ec --limit 40      # a subset (tests)

Sources, fetched with the ordinary package client (``apt-get download``) and unpacked with
``dpkg-deb -x`` (nothing is installed; no Ruby is pulled in):

- ``ruby-gemojione``: EmojiOne 2.2 art, PNG 64x64, with name, category and keywords
  (art CC-BY-SA-4.0, code MIT);
- ``fonts-noto-color-emoji``: Noto Color Emoji, rendered with Pillow: a second, independent art
  style of the same emoji (OFL-1.1);
- ``unicode-cldr-core``: CLDR annotations: the short name ("tts") and keywords of each emoji in
  147 languages (Unicode-DFS-2016).

Joined on the code point sequence (variation selectors ignored): every EmojiOne entry outside
the ``modifier`` and ``extras`` categories that Noto renders and CLDR names. Captions are the
CLDR short name and up to five CLDR keywords ("grinning face: face, grin"). Train and test are
split by base emoji (skin-tone variants share a group, so none leaks across). Per emoji and art
style, two documents: caption -> image and image -> caption. The images are PNG files written
here (the art is not committed), converted with a frozen patch-PCA encoder fitted on the train
images (``megalora.umm.encoders``) into ``train/`` and ``test/`` datasets (both styles, pixels
included) and ``train_emojione/``, ``train_noto/``, ``test_emojione/``, ``test_noto/`` (one
style each: a base pretrained on one style, LoRA adapting it to the other).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from typing import Dict, List

from megalora.errors import UsageError

PACKAGES = ("ruby-gemojione", "fonts-noto-color-emoji", "unicode-cldr-core")
GEMOJIONE = "usr/share/rubygems-integration/all/gems/gemojione-3.3.0"
NOTO = "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
CLDR = "usr/share/unicode/cldr/common"
SKIN_TONES = {"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"}
STYLES = ("emojione", "noto")


@dataclasses.dataclass(frozen=True)
class EmojiCapConfig:
    """What ``megalora emojicap`` builds."""

    out: str = "data/emojicap"
    """Output folder: images/, documents (*.jsonl), emoji.jsonl, encoder.safetensors, train/,
    test/, emojicap.json."""
    cache: str = os.path.join("~", ".cache", "megalora", "debian")
    """Where the .deb files are downloaded and unpacked (reused by later builds)."""
    size: int = 32
    """Image side in pixels (both styles; a multiple of ``grid``)."""
    grid: int = 4
    """The encoder's patch grid: grid x grid image tokens per image."""
    dims: int = 24
    """The encoder's feature dimension (principal components per patch)."""
    languages: tuple = ("en",)
    """CLDR languages of the captions (en first); each adds caption documents."""
    test_fraction: float = 0.15
    """Share of base-emoji groups held out for the test split."""
    seed: int = 0
    """Split seed."""
    limit: int = 0
    """Keep the first N emoji only (0: all); for quick builds and tests."""

    def __post_init__(self):
        if self.size < self.grid or self.size % self.grid:
            raise ValueError(f"--size {self.size} must be a positive multiple of --grid "
                             f"{self.grid}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"--test-fraction must be in (0, 1), got {self.test_fraction}")
        if not self.languages or self.languages[0] != "en":
            raise ValueError("--languages must start with en (the keywords are English)")
        if self.limit < 0:
            raise ValueError(f"--limit must be >= 0, got {self.limit}")


def fetch_sources(cache: str) -> str:
    """Download and unpack the three packages into ``cache`` once; return the unpacked root."""
    cache = os.path.expanduser(cache)
    root = os.path.join(cache, "root")
    if all(os.path.exists(os.path.join(root, p)) for p in (GEMOJIONE, NOTO, CLDR)):
        return root
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise UsageError("EmojiCap needs apt-get and dpkg-deb (Debian or Ubuntu) to fetch "
                           f"{', '.join(PACKAGES)}; or unpack those packages into {root}")
    debs = os.path.join(cache, "deb")
    os.makedirs(debs, exist_ok=True)
    cmd = ["apt-get", "download", *PACKAGES]
    done = subprocess.run(cmd, cwd=debs, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:  # stale package lists: refresh once (needs root), then again
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600)
        done = subprocess.run(cmd, cwd=debs, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise UsageError(f"`apt-get download {' '.join(PACKAGES)}` failed (the Debian package "
                         f"archive must be reachable): "
                           f"{done.stderr.strip()[-500:]}")
    staging = root + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    for name in sorted(os.listdir(debs)):
        if name.endswith(".deb"):
            subprocess.run(["dpkg-deb", "-x", os.path.join(debs, name), staging], check=True,
                           timeout=600)
    shutil.rmtree(root, ignore_errors=True)
    os.replace(staging, root)  # complete or absent
    return root


def package_versions(cache: str) -> Dict[str, str]:
    """Versions of the downloaded packages, read from the .deb file names."""
    debs = os.path.join(os.path.expanduser(cache), "deb")
    out = {}
    for name in sorted(os.listdir(debs)) if os.path.isdir(debs) else []:
        parts = name.split("_")
        if name.endswith(".deb") and parts[0] in PACKAGES:
            out[parts[0]] = parts[1]
    return out


def _strip_vs(text: str) -> str:
    return text.replace("\ufe0f", "")


def cldr_annotations(root: str, language: str) -> Dict[str, dict]:
    """{emoji (no variation selectors): {"tts": short name, "keywords": [...]}}."""
    out: Dict[str, dict] = {}
    for folder in ("annotations", "annotationsDerived"):
        path = os.path.join(root, CLDR, folder, f"{language}.xml")
        if not os.path.exists(path):
            if folder == "annotations":
                raise ValueError(f"CLDR has no annotations for language {language!r}")
            continue
        for node in ET.parse(path).getroot().iter("annotation"):
            entry = out.setdefault(_strip_vs(node.get("cp")), {})
            if node.get("type") == "tts":
                entry["tts"] = (node.text or "").strip()
            else:
                entry["keywords"] = [k.strip() for k in (node.text or "").split("|") if k.strip()]
    return out


def caption(entry: dict, keywords: bool = True) -> str:
    """``short name: kw1, kw2, ...`` (up to five keywords not already in the name)."""
    kws = [k for k in entry.get("keywords", []) if k not in entry["tts"]][:5] if keywords else []
    return entry["tts"] + (": " + ", ".join(kws) if kws else "")


def split_groups(groups: List[str], fraction: float, seed: int) -> set:
    """The held-out groups: a seeded ``fraction`` of the distinct groups (at least one)."""
    distinct = sorted(set(groups))
    random.Random(seed).shuffle(distinct)
    return set(distinct[:max(1, round(fraction * len(distinct)))])


def _square_on_white(im, size: int):
    """An RGBA image centred on a transparent square, then on white, resized to ``size``."""
    from PIL import Image

    im = im.convert("RGBA")
    side = max(im.size)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 0))
    square.alpha_composite(im, ((side - im.size[0]) // 2, (side - im.size[1]) // 2))
    white = Image.new("RGBA", square.size, (255, 255, 255, 255))
    white.alpha_composite(square)
    return white.convert("RGB").resize((size, size), Image.LANCZOS)


class NotoRenderer:
    """Noto Color Emoji through Pillow (its bitmap strike is 109 px)."""

    def __init__(self, root: str):
        from PIL import ImageFont

        self.font = ImageFont.truetype(os.path.join(root, NOTO), 109)

    def render(self, text: str):
        """The emoji cropped to its ink, or None when the font does not draw it."""
        from PIL import Image, ImageDraw

        canvas = Image.new("RGBA", (160 * max(1, len(text)), 136), (255, 255, 255, 0))
        ImageDraw.Draw(canvas).text((0, 0), text, font=self.font, embedded_color=True)
        box = canvas.getbbox()
        return canvas.crop(box) if box else None


def join_entries(root: str, cfg: EmojiCapConfig) -> List[dict]:
    """The joined emoji (module docstring), sorted by code point sequence."""
    with open(os.path.join(root, GEMOJIONE, "config", "index.json")) as fh:
        index = json.load(fh)
    names = {lang: cldr_annotations(root, lang) for lang in cfg.languages}
    noto = NotoRenderer(root)
    rows = []
    for entry in sorted(index.values(), key=lambda v: v["unicode"]):
        if entry["category"] in ("modifier", "extras"):
            continue
        code = entry["unicode"].upper()
        char = "".join(chr(int(c, 16)) for c in code.split("-"))
        en = names["en"].get(_strip_vs(char), {})
        drawn = noto.render(char) if en.get("tts") else None
        if drawn is None:
            continue
        rows.append({"code": code, "char": char, "category": entry["category"],
                     "group": "-".join(c for c in code.split("-") if c not in SKIN_TONES),
                     "name": en["tts"],
                     "captions": {lang: caption(names[lang][_strip_vs(char)], lang == "en")
                                  for lang in cfg.languages
                                  if names[lang].get(_strip_vs(char), {}).get("tts")},
                     "emojione_png": os.path.join(root, GEMOJIONE, "assets", "png",
                                                  f"{entry['unicode']}.png"),
                     "noto": drawn})
        if cfg.limit and len(rows) == cfg.limit:
            break
    return rows


def _write_images(rows: List[dict], out: str, size: int) -> None:
    from PIL import Image

    for style in STYLES:
        os.makedirs(os.path.join(out, "images", style), exist_ok=True)
    for r in rows:
        with Image.open(r["emojione_png"]) as im:
            _square_on_white(im, size).save(os.path.join(out, "images", "emojione",
                                                         f"{r['code']}.png"))
        _square_on_white(r["noto"], size).save(os.path.join(out, "images", "noto",
                                                            f"{r['code']}.png"))


def _documents(rows: List[dict], styles=STYLES) -> List[dict]:
    """Caption -> image and image -> caption, per art style and caption language."""
    docs = []
    for r in rows:
        for style in styles:
            image = {"image_file": f"images/{style}/{r['code']}.png"}
            for text in r["captions"].values():
                docs.append({"segments": [{"text": text}, image]})
                docs.append({"segments": [image, {"text": text}]})
    return docs


def _write_text(path: str, text: str) -> None:
    from megalora.atomic import atomic_write

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, write)


def _write_jsonl(path: str, records: List[dict]) -> None:
    _write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def build(cfg: EmojiCapConfig, progress=print) -> dict:
    """Fetch, join, split, write images and documents, fit the encoder, convert; return the
    manifest (also written to ``<out>/emojicap.json``)."""
    import torch

    from megalora.umm.convert import convert_jsonl
    from megalora.umm.encoders import PatchPCAEncoder, save_encoder
    from megalora.umm.image_docs import load_image

    start = time.monotonic()
    root = fetch_sources(cfg.cache)
    rows = join_entries(root, cfg)
    if not rows:
        raise UsageError(f"no emoji joined from {root}: delete it and build again")
    held_out = split_groups([r["group"] for r in rows], cfg.test_fraction, cfg.seed)
    for r in rows:
        r["split"] = "test" if r["group"] in held_out else "train"
    _write_images(rows, cfg.out, cfg.size)
    splits = {s: [r for r in rows if r["split"] == s] for s in ("train", "test")}
    train_pixels = torch.stack([
        load_image(os.path.join(cfg.out, "images", style, f"{r['code']}.png"), cfg.size, "train")
        for r in splits["train"] for style in STYLES])
    encoder = PatchPCAEncoder.fit(train_pixels, cfg.grid, cfg.dims)
    save_encoder(encoder, os.path.join(cfg.out, "encoder.safetensors"))
    counts = {}
    for split, members in splits.items():
        # both styles, and one style each (the parts a base is pretrained on and LoRA adapts
        # to); every dataset keeps its pixels, for the in-loop vision encoder (vision.enabled)
        for name, styles in [(split, STYLES)] + [(f"{split}_{style}", (style,))
                                                 for style in STYLES]:
            docs = os.path.join(cfg.out, f"{name}.jsonl")
            _write_jsonl(docs, _documents(members, styles))
            convert_jsonl(docs, os.path.join(cfg.out, name), base_vocab=256,
                          image_tokens=encoder.image_tokens, visual_dim=encoder.visual_dim,
                          encoder=encoder, pixels=True, feature_dtype="float32")
        counts[split] = {"emoji": len(members), "groups": len({r["group"] for r in members}),
                         "documents": 2 * len(STYLES) * sum(len(r["captions"]) for r in members)}
    _write_jsonl(os.path.join(cfg.out, "emoji.jsonl"),
                 [{k: r[k] for k in ("code", "char", "category", "group", "split", "name",
                                     "captions")}
                  for r in rows])
    manifest = {"config": dataclasses.asdict(cfg), "packages": package_versions(cfg.cache),
                "counts": counts, "categories": sorted({r["category"] for r in rows}),
                "encoder": {"kind": encoder.kind, "image_tokens": encoder.image_tokens,
                            "visual_dim": encoder.visual_dim,
                            "explained_variance": round(encoder.explained(train_pixels), 4),
                            "feature_std": round(float(encoder.encode(train_pixels).std()), 4)},
                "tokenizer": "bytes", "base_vocab": 256,
                "seconds": round(time.monotonic() - start, 1)}
    _write_text(os.path.join(cfg.out, "emojicap.json"), json.dumps(manifest, indent=1) + "\n")
    progress(f"EmojiCap: {len(rows)} emoji ({counts['train']['emoji']} train / "
             f"{counts['test']['emoji']} test, split by base emoji), "
             f"{sum(c['documents'] for c in counts.values())} documents, "
             f"{len(manifest['categories'])} categories, built in {manifest['seconds']} s "
             f"into {cfg.out}")
    return manifest


def add_parser(sub) -> None:
    p = sub.add_parser("emojicap", help="build EmojiCap, a real image-text dataset, from "
                                        "three Debian packages (about 30 MB, fetched once)")
    d = EmojiCapConfig()
    p.add_argument("--out", default=d.out, help=f"output folder (default {d.out})")
    p.add_argument("--cache", default=d.cache, help="where the packages are kept")
    for name in ("size", "grid", "dims", "seed", "limit"):
        p.add_argument("--" + name, type=int, default=getattr(d, name))
    p.add_argument("--test-fraction", type=float, default=d.test_fraction)
    p.add_argument("--languages", default=",".join(d.languages),
                   help="comma-separated CLDR languages of the captions, en first (e.g. en,de)")
    p.set_defaults(handler=run)


def run(args) -> int:
    cfg = EmojiCapConfig(out=args.out, cache=args.cache, size=args.size, grid=args.grid,
                         dims=args.dims, languages=tuple(args.languages.split(",")),
                         test_fraction=args.test_fraction, seed=args.seed, limit=args.limit)
    build(cfg)
    return 0

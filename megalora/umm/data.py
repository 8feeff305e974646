"""On-disk interleaved image-text data: format, writer, reader, validation, data-parallel stream.

A dataset is a directory holding ``index.json`` and shards ``shard-00000.safetensors``, ... Each
shard stores its samples concatenated (``tokens`` int32, ``modality`` int8, ``features``
float16/float32 [slots, visual_dim], optionally ``pixels`` float16 [images, C, H, W]) with
``*_offsets`` int64 [n+1] marking where each sample starts. The index records the model-facing
sizes (``base_vocab``, ``image_tokens``, ``visual_dim``) so that data built for another model is
refused at open time rather than producing silently wrong embeddings, and each shard's sha256.

Every file is written atomically (temporary file in the same directory, fsync, rename) and the
index last, so a crash never leaves an index pointing at half-written shards.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from megalora.atomic import atomic_write
from megalora.umm.batch import UMMBatch, collate
from megalora.umm.tokens import IMAGE, PAD_MODALITY, TEXT, SpecialTokens

FORMAT = "megalora-umm-data"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
FEATURE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_OFFSETS = ("sample_offsets", "slot_offsets", "image_offsets")

Sample = Dict[str, torch.Tensor]


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def _check_layout(tokens, modality, special: SpecialTokens, image_tokens: int, where: str) -> int:
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
    """Raise ValueError (naming ``where``) unless ``sample`` follows the layout of ``tokens.py``."""
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
    n_images = _check_layout(tokens, modality, special, image_tokens, where)
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


def _canonical(sample: Sample) -> Sample:
    out = {"tokens": sample["tokens"].to(torch.int64),
           "modality": sample["modality"].to(torch.int64),
           "features": sample["features"].to(torch.float32)}
    if sample.get("pixels") is not None:
        out["pixels"] = sample["pixels"].to(torch.float32)
    return out


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _offsets(lengths: List[int]) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    out[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return out


def _shard_tensors(samples: List[Sample], feature_dtype: torch.dtype,
                   has_pixels: bool) -> Dict[str, torch.Tensor]:
    feats = torch.cat([s["features"] for s in samples]).to(feature_dtype)
    if not bool(torch.isfinite(feats).all()):
        raise ValueError(f"features overflow {feature_dtype} (|x| > 65504?); write with "
                         "feature_dtype='float32'")
    out = {"tokens": torch.cat([s["tokens"] for s in samples]).to(torch.int32),
           "modality": torch.cat([s["modality"] for s in samples]).to(torch.int8),
           "sample_offsets": _offsets([s["tokens"].numel() for s in samples]),
           "features": feats.contiguous(),
           "slot_offsets": _offsets([s["features"].shape[0] for s in samples])}
    if has_pixels:
        out["pixels"] = torch.cat([s["pixels"] for s in samples]).to(torch.float16).contiguous()
        out["image_offsets"] = _offsets([s["pixels"].shape[0] for s in samples])
    return out


def _write_shard(samples: List[Sample], path: str, feature_dtype: str, has_pixels: bool) -> dict:
    from safetensors.torch import save_file

    index_path = os.path.join(os.path.dirname(path), INDEX_FILE)
    # An old index would describe the shards about to be overwritten: drop it before the first
    # one so an interrupted rewrite reads as "no dataset" rather than a checksum error, while
    # input that fails validation before any shard is written leaves the old dataset intact.
    if os.path.exists(index_path):
        os.unlink(index_path)
    tensors = _shard_tensors(samples, FEATURE_DTYPES[feature_dtype], has_pixels)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={
        "format": FORMAT, "version": str(FORMAT_VERSION)}))
    return {"file": os.path.basename(path), "samples": len(samples),
            "tokens": int(tensors["tokens"].numel()), "slots": int(tensors["features"].shape[0]),
            "sha256": _sha256(path)}


def write_dataset(samples: Iterable[Sample], out_dir: str, *, base_vocab: int, image_tokens: int,
                  visual_dim: int, shard_size: int = 1024, feature_dtype: str = "float16") -> str:
    """Validate ``samples`` and write them as a sharded dataset in ``out_dir``; return index path.

    ``samples`` may be any iterable (a generator keeps at most ``shard_size`` samples in memory).
    Either every sample carries ``pixels`` or none does.
    """
    if feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature_dtype must be one of {sorted(FEATURE_DTYPES)}, "
                         f"got {feature_dtype!r}")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    special = SpecialTokens(base_vocab)
    os.makedirs(out_dir, exist_ok=True)
    index_path = os.path.join(out_dir, INDEX_FILE)
    shards, buf, has_pixels, pixel_shape, count = [], [], None, None, 0
    for sample in samples:
        validate_sample(sample, special, image_tokens, visual_dim, where=f"sample {count}")
        pix = sample.get("pixels")
        if has_pixels is None:
            has_pixels = pix is not None
            pixel_shape = list(pix.shape[1:]) if has_pixels else None
        if (pix is not None) != has_pixels:
            raise ValueError(f"sample {count}: {'has' if pix is not None else 'lacks'} pixels but "
                             "sample 0 does not; either every sample has pixels or none")
        if has_pixels and list(pix.shape[1:]) != pixel_shape:
            raise ValueError(f"sample {count}: pixels are {list(pix.shape[1:])} per image but "
                             f"sample 0's are {pixel_shape}; all images must share one shape")
        buf.append(sample)
        count += 1
        if len(buf) == shard_size:
            shards.append(_write_shard(buf, os.path.join(out_dir, shard_name(len(shards))),
                                       feature_dtype, has_pixels))
            buf = []
    if buf:
        shards.append(_write_shard(buf, os.path.join(out_dir, shard_name(len(shards))),
                                   feature_dtype, has_pixels))
    if count == 0:
        raise ValueError(f"write_dataset({out_dir!r}): no samples to write")
    index = {"format": FORMAT, "version": FORMAT_VERSION, "base_vocab": base_vocab,
             "image_tokens": image_tokens, "visual_dim": visual_dim,
             "feature_dtype": feature_dtype, "has_pixels": bool(has_pixels),
             "pixel_shape": pixel_shape, "num_samples": count, "shards": shards}

    def write_index(tmp):
        with open(tmp, "w") as fh:
            json.dump(index, fh, indent=1)

    atomic_write(index_path, write_index)
    return index_path


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

class _Shard:
    """One opened shard: memory-mapped tensors plus its (small) offset arrays."""

    def __init__(self, path: str, entry: dict, index: dict, verify: bool):
        from safetensors import safe_open

        self.name = os.path.basename(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data shard {path!r} listed in index.json does not exist")
        try:
            self.fh = safe_open(path, framework="pt")
            meta = self.fh.metadata() or {}
        except Exception as exc:
            raise ValueError(f"data shard {path!r} is truncated or corrupt ({exc}); regenerate "
                             "it (rerun the converter / write_dataset)") from exc
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path!r} is not a {FORMAT} shard (metadata format="
                             f"{meta.get('format')!r})")
        if verify and _sha256(path) != entry.get("sha256"):
            raise ValueError(f"data shard {path!r}: sha256 mismatch with index.json; the file is "
                             "corrupt or was replaced, regenerate it")
        self.n = int(entry["samples"])
        self._check_tensors(path, index)
        self.offsets = {k: self.fh.get_tensor(k) for k in _OFFSETS if k in self.fh.keys()}
        self._check_offsets(path)

    def _check_tensors(self, path: str, index: dict) -> None:
        want = {"tokens": ("I32", None), "modality": ("I8", None),
                "features": ({"float16": "F16", "float32": "F32"}[index["feature_dtype"]],
                             [None, index["visual_dim"]]),
                "sample_offsets": ("I64", [self.n + 1]), "slot_offsets": ("I64", [self.n + 1])}
        if index["has_pixels"]:
            want["pixels"] = ("F16", [None] + list(index["pixel_shape"]))
            want["image_offsets"] = ("I64", [self.n + 1])
        self.shapes = {}
        for key, (dtype, shape) in want.items():
            if key not in self.fh.keys():
                raise ValueError(f"data shard {path!r} lacks tensor {key!r}; regenerate it")
            sl = self.fh.get_slice(key)
            got = list(sl.get_shape())
            bad_shape = shape is not None and (len(got) != len(shape) or any(
                w is not None and g != w for g, w in zip(got, shape)))
            if sl.get_dtype() != dtype or bad_shape or (shape is None and len(got) != 1):
                dim_hint = " (model.visual_dim)" if key == "features" else ""
                raise ValueError(f"data shard {path!r}: {key} is {sl.get_dtype()} {got} but "
                                 f"{dtype} {shape or '[T]'} was expected{dim_hint}")
            self.shapes[key] = got
        if self.shapes["tokens"] != self.shapes["modality"]:
            raise ValueError(f"data shard {path!r}: tokens {self.shapes['tokens']} and modality "
                             f"{self.shapes['modality']} differ in length")

    def _check_offsets(self, path: str) -> None:
        ends = {"sample_offsets": ("tokens", self.shapes["tokens"][0]),
                "slot_offsets": ("features", self.shapes["features"][0]),
                "image_offsets": ("pixels", self.shapes.get("pixels", [0])[0])}
        for key, off in self.offsets.items():
            what, total = ends[key]
            if int(off[0]) != 0 or int(off[-1]) != total:
                raise ValueError(f"data shard {path!r}: {key} out of range: must run from 0 to "
                                 f"the {total} rows of {what}, got {int(off[0])}..{int(off[-1])}")
            if bool((off[1:] < off[:-1]).any()):
                i = int((off[1:] < off[:-1]).nonzero()[0])
                raise ValueError(f"data shard {path!r}: {key} not monotonic: offset "
                                 f"{int(off[i + 1])} of sample {i + 1} is below {int(off[i])}")

    def sample(self, i: int, has_pixels: bool) -> Sample:
        def piece(key, off_key):
            off = self.offsets[off_key]
            return self.fh.get_slice(key)[int(off[i]):int(off[i + 1])]

        out = {"tokens": piece("tokens", "sample_offsets").to(torch.int64),
               "modality": piece("modality", "sample_offsets").to(torch.int64),
               "features": piece("features", "slot_offsets").to(torch.float32)}
        if has_pixels:
            out["pixels"] = piece("pixels", "image_offsets").to(torch.float32)
        return out


def _check_header(index: dict, path: str, base_vocab: int, image_tokens: int,
                  visual_dim: int) -> None:
    if index.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a {FORMAT} index (format={index.get('format')!r})")
    if index.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path!r} has data format version {index['version']}; this megalora "
                         f"reads up to {FORMAT_VERSION}: upgrade megalora")
    for field, want in (("base_vocab", base_vocab), ("image_tokens", image_tokens),
                        ("visual_dim", visual_dim)):
        if index.get(field) != want:
            raise ValueError(f"data at {path!r} has {field}={index.get(field)} but "
                             f"model.{field}={want}: the data was built for another model; "
                             f"rebuild it or set model.{field}={index.get(field)}")
    if index.get("feature_dtype") not in FEATURE_DTYPES:
        raise ValueError(f"{path!r}: feature_dtype {index.get('feature_dtype')!r} is not one of "
                         f"{sorted(FEATURE_DTYPES)}")
    total = sum(int(s["samples"]) for s in index["shards"])
    if total != index["num_samples"]:
        raise ValueError(f"{path!r}: num_samples={index['num_samples']} but the shards hold "
                         f"{total}; the index is corrupt, regenerate the dataset")


class UMMDataset:
    """Random access to samples, from a sharded directory or an in-memory list."""

    def __init__(self, special: SpecialTokens, image_tokens: int, visual_dim: int, *,
                 samples: Optional[List[Sample]] = None, shards: Optional[List[_Shard]] = None,
                 has_pixels: bool = False):
        self.special, self.image_tokens, self.visual_dim = special, image_tokens, visual_dim
        self.has_pixels = has_pixels
        self._samples, self._shards = samples, shards or []
        self._starts = [0]
        for sh in self._shards:
            self._starts.append(self._starts[-1] + sh.n)

    @classmethod
    def open(cls, path: str, *, base_vocab: int, image_tokens: int, visual_dim: int,
             verify: bool = True) -> "UMMDataset":
        """Open the dataset at ``path`` (its directory or its index.json); ``verify`` hashes
        every shard against the index (reads all bytes once)."""
        index_path = path if path.endswith(".json") else os.path.join(path, INDEX_FILE)
        if not os.path.isfile(index_path):
            raise FileNotFoundError(f"no data index at {index_path!r}; build the dataset with "
                                    "write_dataset / python -m megalora.umm.convert")
        try:
            with open(index_path) as fh:
                index = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"data index {index_path!r} is not valid JSON ({exc}); it is "
                             "truncated or corrupt, regenerate the dataset") from exc
        _check_header(index, index_path, base_vocab, image_tokens, visual_dim)
        directory = os.path.dirname(os.path.abspath(index_path))
        shards = [_Shard(os.path.join(directory, e["file"]), e, index, verify)
                  for e in index["shards"]]
        return cls(SpecialTokens(base_vocab), image_tokens, visual_dim, shards=shards,
                   has_pixels=bool(index["has_pixels"]))

    @classmethod
    def from_samples(cls, samples: Sequence[Sample], *, base_vocab: int, image_tokens: int,
                     visual_dim: int) -> "UMMDataset":
        """Wrap in-memory samples (each is validated now)."""
        special = SpecialTokens(base_vocab)
        for i, s in enumerate(samples):
            validate_sample(s, special, image_tokens, visual_dim, where=f"sample {i}")
        has_pixels = bool(samples) and samples[0].get("pixels") is not None
        return cls(special, image_tokens, visual_dim, samples=[_canonical(s) for s in samples],
                   has_pixels=has_pixels)

    def __len__(self) -> int:
        return len(self._samples) if self._samples is not None else self._starts[-1]

    def __getitem__(self, i: int) -> Sample:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for a dataset of {n}")
        i %= n
        if self._samples is not None:
            return dict(self._samples[i])
        k = bisect.bisect_right(self._starts, i) - 1
        shard, local = self._shards[k], i - self._starts[k]
        sample = shard.sample(local, self.has_pixels)
        # Shards may come from other writers: check each sample as it is read (cheap, O(L)).
        validate_sample(sample, self.special, self.image_tokens, self.visual_dim,
                        where=f"{shard.name} sample {local}")
        return sample

    def validate_all(self) -> None:
        """Read and validate every sample (raises on the first bad one)."""
        for i in range(len(self)):
            self[i]


# ---------------------------------------------------------------------------------------------
# Data-parallel stream
# ---------------------------------------------------------------------------------------------

class DataStream:
    """Deterministic, resumable micro-batches for one data-parallel rank.

    Each epoch visits a permutation of the dataset drawn from (seed, epoch). Step k of an epoch
    takes the k-th global batch (``micro_batch_size * dp_size`` samples) of that order and rank r
    keeps its r-th micro-batch-sized piece, so ranks never share a sample within an epoch. The
    last ``len(dataset) % global_batch`` samples of each epoch's order are skipped (a different
    set every epoch when shuffling).
    """

    def __init__(self, dataset, *, micro_batch_size: int, seq_length: int,
                 special: SpecialTokens, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        for name, v in (("micro_batch_size", micro_batch_size), ("seq_length", seq_length),
                        ("dp_size", dp_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"DataStream: {name} must be a positive int, got {v!r}")
        if not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_size:
            raise ValueError(f"DataStream: dp_rank must be in [0, dp_size={dp_size}), got "
                             f"{dp_rank!r}")
        self.dataset, self.special = dataset, special
        self.micro_batch_size, self.seq_length = micro_batch_size, seq_length
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        if len(dataset) < self.global_batch:
            raise ValueError(f"data: the dataset has {len(dataset)} samples but one global batch "
                             f"needs micro_batch_size x dp_size = {micro_batch_size} x {dp_size} "
                             f"= {self.global_batch}; use more data or a smaller batch")
        self.epoch, self.position = 0, 0
        self._order: Optional[torch.Tensor] = None

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.dp_size

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.global_batch

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The global sample order of ``epoch`` (identical on every rank)."""
        n = len(self.dataset)
        if not self.shuffle:
            return torch.arange(n)
        # Mix seed and epoch into one 63-bit seed so (seed, epoch) pairs do not collide.
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2 ** 63))
        return torch.randperm(n, generator=g)

    def next_indices(self) -> List[int]:
        """Dataset indices of this rank's next micro-batch (advances the stream)."""
        if self.position + self.global_batch > len(self.dataset):
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = self.epoch_order(self.epoch)
        start = self.position + self.dp_rank * self.micro_batch_size
        self.position += self.global_batch
        return self._order[start:start + self.micro_batch_size].tolist()

    def next_batch(self) -> UMMBatch:
        return collate([self.dataset[i] for i in self.next_indices()], self.seq_length,
                       self.special)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """Where the stream is; restoring it replays exactly the batches that would follow."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "shuffle": self.shuffle, "num_samples": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("shuffle", self.shuffle),
                          ("num_samples", len(self.dataset))):
            if state.get(key) != mine:
                raise ValueError(f"data stream state has {key}={state.get(key)!r} but this stream "
                                 f"has {key}={mine!r}; resuming would not replay the same order")
        position = int(state["position"])
        # Positions are counted in samples, so a resume with another dp_size is exact as long as
        # the old position falls on a boundary of the new global batch.
        if position % self.global_batch or position > len(self.dataset):
            raise ValueError(f"data stream state position={position} is not a multiple of this "
                             f"stream's global batch {self.global_batch} (micro_batch_size x "
                             "dp_size changed?)")
        self.epoch, self.position, self._order = int(state["epoch"]), position, None

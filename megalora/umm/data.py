"""On-disk interleaved image-text data: format, writer, reader, validation.

A dataset is a directory holding ``index.json`` and shards ``shard-00000.safetensors``, ... Each
shard stores its samples concatenated (``tokens`` int32, ``modality`` int8, ``features``
float16/float32 [slots, visual_dim], optionally ``pixels`` float16 [images, C, H, W]) with
``*_offsets`` int64 [n+1] marking where each sample starts. The index records the model-facing
sizes (``base_vocab``, ``image_tokens``, ``visual_dim``) so that data built for another model is
refused at open time rather than producing silently wrong embeddings, and each shard's sha256.

A dataset is built in a sibling directory and swapped in only when complete (``dataset_dir.py``),
so a failed or killed conversion leaves the dataset already there as it was. Opening checks the
index's fields and every shard's structure; ``DataStream`` (``stream.py``, also importable from
here) checks every sample's length against the sequence length before training starts.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from megalora.atomic import atomic_write
from megalora.umm.dataset_dir import interrupted_swap_hint, staged_directory
from megalora.umm.sample_check import Sample, validate_sample
from megalora.umm.stream import DataStream  # noqa: F401  (public import path)
from megalora.umm.tokens import SpecialTokens

FORMAT = "megalora-umm-data"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
FEATURE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_OFFSETS = ("sample_offsets", "slot_offsets", "image_offsets")
# What the writer puts in a dataset directory (atomic_write's temporaries start with ".tmp-")
_OWN_FILES = re.compile(r"index\.json|shard-\d{5,}\.safetensors|\.tmp-.*")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


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

    tensors = _shard_tensors(samples, FEATURE_DTYPES[feature_dtype], has_pixels)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={
        "format": FORMAT, "version": str(FORMAT_VERSION)}))
    return {"file": os.path.basename(path), "samples": len(samples),
            "tokens": int(tensors["tokens"].numel()), "slots": int(tensors["features"].shape[0]),
            "sha256": _sha256(path)}


def _write_shards(samples: Iterable[Sample], directory: str, special: SpecialTokens,
                  image_tokens: int, visual_dim: int, shard_size: int,
                  feature_dtype: str) -> dict:
    """Validate and write ``samples`` as shards in ``directory``; return the index's body."""
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
            shards.append(_write_shard(buf, os.path.join(directory, shard_name(len(shards))),
                                       feature_dtype, has_pixels))
            buf = []
    if buf:
        shards.append(_write_shard(buf, os.path.join(directory, shard_name(len(shards))),
                                   feature_dtype, has_pixels))
    return {"has_pixels": bool(has_pixels), "pixel_shape": pixel_shape, "num_samples": count,
            "shards": shards}


def _is_dataset_file(path: str) -> bool:
    """Whether ``path`` (an entry of an existing output directory) is a file this writer makes,
    i.e. one that replacing the directory may delete."""
    name = os.path.basename(path)
    if os.path.islink(path) or not os.path.isfile(path) or not _OWN_FILES.fullmatch(name):
        return False
    if name != INDEX_FILE:
        return True
    try:
        with open(path, "rb") as fh:
            index = json.loads(fh.read())
    except ValueError:
        return True  # a truncated index of ours (its shards sit beside it)
    # A readable index.json of another format belongs to someone else's data.
    return isinstance(index, dict) and index.get("format") == FORMAT


def write_dataset(samples: Iterable[Sample], out_dir: str, *, base_vocab: int, image_tokens: int,
                  visual_dim: int, shard_size: int = 1024, feature_dtype: str = "float16") -> str:
    """Validate ``samples`` and write them as a sharded dataset in ``out_dir``; return index path.

    ``samples`` may be any iterable (a generator keeps at most ``shard_size`` samples in memory).
    Either every sample carries ``pixels`` or none does. The dataset is built in a sibling
    directory and swapped in when complete (``dataset_dir.py``): if anything fails, a dataset
    already in ``out_dir`` is left untouched. ``out_dir`` must be missing, empty or a dataset.
    """
    if feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature_dtype must be one of {sorted(FEATURE_DTYPES)}, "
                         f"got {feature_dtype!r}")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    special = SpecialTokens(base_vocab)
    with staged_directory(out_dir, owned=_is_dataset_file) as staging:
        body = _write_shards(samples, staging, special, image_tokens, visual_dim, shard_size,
                             feature_dtype)
        if body["num_samples"] == 0:
            raise ValueError(f"write_dataset({out_dir!r}): no samples to write")
        index = {"format": FORMAT, "version": FORMAT_VERSION, "base_vocab": base_vocab,
                 "image_tokens": image_tokens, "visual_dim": visual_dim,
                 "feature_dtype": feature_dtype, **body}

        def write_index(tmp):
            with open(tmp, "w") as fh:
                json.dump(index, fh, indent=1)

        atomic_write(os.path.join(staging, INDEX_FILE), write_index)
    return os.path.join(out_dir, INDEX_FILE)


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


_REGENERATE = "regenerate the dataset (python -m megalora.umm.convert or write_dataset)"
# Checked before any field is used, so that a hand-edited or damaged index fails with the field's
# name rather than a KeyError or TypeError.
_INDEX_FIELDS = {"version": (int, "the format version"), "base_vocab": (int, "text vocabulary"),
                 "image_tokens": (int, "<image> slots per image"),
                 "visual_dim": (int, "feature dimension"),
                 "feature_dtype": (str, "storage dtype of the features"),
                 "has_pixels": (bool, "whether samples carry pixels"),
                 "num_samples": (int, "total sample count"),
                 "shards": (list, "the list of shard entries")}
_SHARD_FIELDS = {"file": str, "samples": int, "sha256": str}


def _read_index(index_path: str) -> dict:
    if not os.path.isfile(index_path):
        raise FileNotFoundError(f"no data index at {index_path!r}; build the dataset with "
                                "write_dataset / python -m megalora.umm.convert"
                                + interrupted_swap_hint(os.path.dirname(index_path)))
    try:
        with open(index_path, "rb") as fh:
            index = json.loads(fh.read())
    except ValueError as exc:  # JSONDecodeError, or UnicodeDecodeError for binary garbage
        raise ValueError(f"data index {index_path!r} is not valid JSON ({exc}); it is "
                         f"truncated or corrupt: {_REGENERATE}") from exc
    if not isinstance(index, dict):
        raise ValueError(f"data index {index_path!r} holds a JSON {type(index).__name__}, not "
                         f"an object, so it is not a {FORMAT} index; {_REGENERATE}")
    return index


def _wrong_type(value, want: type) -> bool:
    # JSON true/false load as bool, which Python counts as int: not a valid count
    return not isinstance(value, want) or (want is int and isinstance(value, bool))


def _check_fields(index: dict, path: str) -> None:
    for key, (want, what) in _INDEX_FIELDS.items():
        if key not in index:
            raise ValueError(f"data index {path!r} lacks {key!r} ({what}): the index is "
                             f"incomplete; {_REGENERATE}")
        if _wrong_type(index[key], want):
            raise ValueError(f"data index {path!r}: {key!r} is {type(index[key]).__name__} "
                             f"{index[key]!r:.60} but must be {want.__name__} ({what}); "
                             f"{_REGENERATE}")
    shape = index.get("pixel_shape")
    if index["has_pixels"] and (not isinstance(shape, list) or len(shape) != 3 or any(
            _wrong_type(x, int) or x < 1 for x in shape)):
        raise ValueError(f"data index {path!r}: has_pixels is true but pixel_shape {shape!r} is "
                         f"not a [C, H, W] list of positive ints; {_REGENERATE}")
    for i, entry in enumerate(index["shards"]):
        for key, want in _SHARD_FIELDS.items():
            value = entry.get(key) if isinstance(entry, dict) else None
            if _wrong_type(value, want) or (key == "samples" and value < 0):
                raise ValueError(f"data index {path!r}: shards[{i}] needs {key!r} as a "
                                 f"{'non-negative ' if want is int else ''}{want.__name__}, got "
                                 f"{value!r:.60}; {_REGENERATE}")
        if entry["file"] in ("", ".", "..") or os.path.basename(entry["file"]) != entry["file"]:
            raise ValueError(f"data index {path!r}: shards[{i}] file {entry['file']!r} is not a "
                             f"file name inside the dataset directory; {_REGENERATE}")


def _check_header(index: dict, path: str, base_vocab: int, image_tokens: int,
                  visual_dim: int) -> None:
    if index.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a {FORMAT} index (format={index.get('format')!r})")
    _check_fields(index, path)
    if index["version"] > FORMAT_VERSION:
        raise ValueError(f"{path!r} has data format version {index['version']}; this megalora "
                         f"reads up to {FORMAT_VERSION}: upgrade megalora")
    for field, want in (("base_vocab", base_vocab), ("image_tokens", image_tokens),
                        ("visual_dim", visual_dim)):
        if index[field] != want:
            raise ValueError(f"data at {path!r} has {field}={index[field]} but "
                             f"model.{field}={want}: the data was built for another model; "
                             f"rebuild it or set model.{field}={index[field]}")
    if index["feature_dtype"] not in FEATURE_DTYPES:
        raise ValueError(f"{path!r}: feature_dtype {index['feature_dtype']!r} is not one of "
                         f"{sorted(FEATURE_DTYPES)}")
    total = sum(s["samples"] for s in index["shards"])
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
        self.path: Optional[str] = None  # the index.json of an opened dataset, for messages
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
        index = _read_index(index_path)
        _check_header(index, index_path, base_vocab, image_tokens, visual_dim)
        directory = os.path.dirname(os.path.abspath(index_path))
        shards = [_Shard(os.path.join(directory, e["file"]), e, index, verify)
                  for e in index["shards"]]
        ds = cls(SpecialTokens(base_vocab), image_tokens, visual_dim, shards=shards,
                 has_pixels=bool(index["has_pixels"]))
        ds.path = index_path
        return ds

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

    def _where(self, i: int) -> str:
        """Sample ``i`` named for a person: its shard file and index in it, or the list index."""
        if self._samples is not None:
            return f"sample {i} of the in-memory dataset"
        k = bisect.bisect_right(self._starts, i) - 1
        return (f"sample {i} ({self._shards[k].name} sample {i - self._starts[k]} of "
                f"{self.path!r})")

    def sample_lengths(self) -> torch.Tensor:
        """Token count of every sample [len] int64, from the shards' offsets (reads no sample)."""
        if self._samples is not None:
            return torch.tensor([s["tokens"].numel() for s in self._samples], dtype=torch.int64)
        parts = [sh.offsets["sample_offsets"].diff() for sh in self._shards]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    def check_seq_length(self, seq_length: int) -> None:
        """Raise ValueError naming the first sample longer than ``seq_length`` tokens."""
        lengths = self.sample_lengths()
        too_long = (lengths > seq_length).nonzero().flatten()
        if not too_long.numel():
            return
        i, longest = int(too_long[0]), int(lengths.max())
        raise ValueError(f"data: {too_long.numel()} sample(s) are longer than data.seq_length="
                         f"{seq_length}; the first is {self._where(i)} with {int(lengths[i])} "
                         f"tokens, the longest has {longest}. Raise data.seq_length (and "
                         f"model.max_seq_length if needed) to at least {longest}, or drop or split "
                         "those samples (python -m megalora.umm.convert --max-tokens "
                         f"{seq_length} rejects them)")

    def validate_all(self) -> None:
        """Read and validate every sample (raises on the first bad one)."""
        for i in range(len(self)):
            self[i]

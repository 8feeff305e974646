"""Named tensors of a checkpoint on disk, read one at a time.

``CheckpointFiles(path)`` takes what Hugging Face and Emu2 write:
- one ``.safetensors`` file (tensors read one by one from the memory-mapped file);
- one torch zip file (``.bin`` / ``.pth``), memory-mapped: a tensor's pages are read only when
  it is used; a ``{"module": ...}`` wrapper is unwrapped, as Emu2's loader does. A legacy
  (non-zip) pickle cannot be memory-mapped and is refused with a conversion hint;
- a folder with an index (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``
  or one variant such as ``model.safetensors.index.bf16.json``):
  a shard is opened the first time one of its tensors is asked for, so a pipeline stage opens
  only the shards that hold its tensors;
- a folder without an index holding one weight file, or only ``.safetensors`` files.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Tuple

import torch

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
"""A sharded checkpoint's index (``weight_map``: key -> shard file)."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")


def _open_file(path: str) -> Tuple[List[str], Callable[[str], torch.Tensor],
                                   Callable[[str], Tuple[int, ...]]]:
    """(keys, get(key), shape(key)) of one file."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            fh = safe_open(path, framework="pt")
        except Exception as exc:
            raise ValueError(f"checkpoint file {path!r} is not a readable safetensors file "
                             f"(missing, truncated or corrupt?): {exc}") from exc
        return list(fh.keys()), fh.get_tensor, lambda k: tuple(fh.get_slice(k).get_shape())
    import pickle

    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as exc:
        # a legacy (non-zip) pickle cannot be memory-mapped; non-tensor objects (a training
        # script's args) are refused by weights_only
        raise ValueError(f"{path!r} is not a torch zip checkpoint of tensors that can be "
                         f"memory-mapped ({str(exc).splitlines()[0][:200]}); convert it once "
                         "to .safetensors") from exc
    if isinstance(state, dict) and isinstance(state.get("module"), dict):
        state = state["module"]
    if not isinstance(state, dict):
        raise ValueError(f"{path!r} holds a {type(state).__name__}, not a state dict")
    state = {k: v for k, v in state.items() if torch.is_tensor(v)}  # not weights: args, step
    return list(state), state.__getitem__, lambda k: tuple(state[k].shape)


def _index_file(folder: str):
    """The folder's index: the standard names, else one variant (``model.safetensors.index.
    bf16.json``, as ``from_pretrained(variant="bf16")`` reads); several variants are refused."""
    for name in INDEX_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    variants = sorted(f for f in os.listdir(folder) if ".index." in f and f.endswith(".json"))
    if len(variants) > 1:
        raise ValueError(f"checkpoint folder {folder!r} has several indexes ({', '.join(variants)})"
                         "; point at a folder with one")
    return os.path.join(folder, variants[0]) if variants else None


class CheckpointFiles:
    """The tensors of a checkpoint file or folder (module docstring), opened lazily."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self._open: Dict[str, tuple] = {}
        if os.path.isfile(self.path):
            self.where = {k: self.path for k in self._file(self.path)[0]}
            return
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"checkpoint {self.path!r} does not exist")
        index = _index_file(self.path)
        if index:
            try:
                with open(index) as fh:
                    weight_map = json.load(fh)["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{index!r} is not a checkpoint index (JSON with a "
                                 f"'weight_map'): {exc}") from exc
            self.where = {k: os.path.join(self.path, f) for k, f in weight_map.items()}
            return
        files = [f for f in sorted(os.listdir(self.path)) if f.endswith(WEIGHT_SUFFIXES)]
        if not files or (len(files) > 1 and not all(f.endswith(".safetensors") for f in files)):
            raise ValueError(f"checkpoint folder {self.path!r} has no {' or '.join(INDEX_FILES)} "
                             f"and {len(files)} weight files ({', '.join(files[:4])}); point at "
                             "one file, or add the index")
        self.where = {}
        for full in (os.path.join(self.path, f) for f in files):
            for key in self._file(full)[0]:
                if key in self.where:  # e.g. fp32 and bf16 copies side by side
                    raise ValueError(f"checkpoint folder {self.path!r}: {key!r} is in both "
                                     f"{os.path.basename(self.where[key])} and "
                                     f"{os.path.basename(full)}; point at one file")
                self.where[key] = full

    def _file(self, full: str) -> tuple:
        if full not in self._open:
            self._open[full] = _open_file(full)
        return self._open[full]

    def keys(self) -> List[str]:
        return list(self.where)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def _check(self, key: str, needed_for: str) -> None:
        if key not in self.where:
            raise ValueError(f"checkpoint {self.path!r} has no tensor {key!r} (needed for "
                             f"{needed_for})")

    def shape(self, key: str, needed_for: str = "its shape") -> Tuple[int, ...]:
        """The tensor's shape, read from the file's header (no data is read)."""
        self._check(key, needed_for)
        return self._file(self.where[key])[2](key)

    def get(self, key: str, needed_for: str = "") -> torch.Tensor:
        self._check(key, needed_for or key)
        try:
            return self._file(self.where[key])[1](key)
        except (ValueError, FileNotFoundError):
            raise
        except Exception as exc:
            raise ValueError(f"checkpoint {self.path!r}: cannot read {key!r} from "
                             f"{self.where[key]!r} (corrupt file?): {exc}") from exc

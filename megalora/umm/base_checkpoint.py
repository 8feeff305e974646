"""A UMM base checkpoint: every tensor of a TP = PP = 1 model's state (safetensors) and the model
section of the config it was trained with (``megalora pretrain`` writes it; ``model.
base_checkpoint`` loads it before the adapters are added, checking both)."""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from megalora.errors import NonFiniteError, UsageError
from megalora.umm.config import RunConfig

BASE_FILE = "base.safetensors"


def check_layout(run: RunConfig, what: str) -> None:
    p = run.parallel
    if (p.tensor_parallel, p.pipeline_parallel) != (1, 1):
        raise UsageError(f"{what} runs at parallel.tensor_parallel=1 and pipeline_parallel=1 "
                         f"(got {p.tensor_parallel} and {p.pipeline_parallel}): set both to 1")


def base_state(model) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if torch.is_tensor(v)}


def save_base(model, run: RunConfig, path: str) -> str:
    from safetensors.torch import save_file

    from megalora.atomic import atomic_write

    state = base_state(model)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise NonFiniteError(f"not saving a base with non-finite tensors ({bad[:3]})")
    meta = {"model": json.dumps(dataclasses.asdict(run.model), sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))
    return path


def load_base(model, run: RunConfig, path: str) -> None:
    """Load the base saved at ``path`` into ``model`` (built from ``run``, before adapters are
    added); every mismatch is named."""
    from safetensors import safe_open

    check_layout(run, "model.base_checkpoint")
    if not os.path.isfile(path):
        raise UsageError(f"model.base_checkpoint {path!r} does not exist (make one with "
                         "`megalora pretrain --config ...`)")
    with safe_open(path, framework="pt") as fh:
        saved_model = json.loads((fh.metadata() or {}).get("model", "{}"))
        state = {k: fh.get_tensor(k) for k in fh.keys()}
    ours = dataclasses.asdict(run.model)
    ignore = {"base_checkpoint", "hf_checkpoint", "text_loss_weight", "image_loss_weight",
              "image_loss"}  # what LoRA may change on a base
    differ = sorted(k for k in ours if k not in ignore and k in saved_model
                    and saved_model[k] != ours[k])
    if differ:
        k = differ[0]
        raise UsageError(f"model.{k}={ours[k]!r} but the base {path!r} was trained with "
                         f"{saved_model[k]!r}: set model.{k}: {saved_model[k]!r}")
    mine = base_state(model)
    missing, extra = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
    if missing or extra:
        raise UsageError(f"the base {path!r} does not match the model: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    for key, value in state.items():
        if value.shape != mine[key].shape:
            raise UsageError(f"the base {path!r}: {key} has shape {list(value.shape)}, the "
                             f"model's is {list(mine[key].shape)}")
    model.load_state_dict(state, strict=False)

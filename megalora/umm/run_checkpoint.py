"""The trainer's run checkpoints: what ``megalora train`` needs to resume exactly, atomically.

Step directories, ``latest``, and the checks before a resume. The adapter inside is an adapter
file (``megalora.adapter_file``); Megatron's sharded dist-checkpointing of a whole model is the
third kind of checkpoint (``megalora.dist_checkpoint``).

On disk: ``<out_dir>/checkpoints/step_000040/`` holds
- ``adapter.safetensors``: the adapter (full shapes, any layout can load it);
- ``optim_tp{t}_pp{p}.pt``: each model-parallel rank's optimizer state (written by data-parallel
  rank 0; it must be resumed with the same TP/PP layout);
- ``state.json``: step, data-stream position, dropout counters, the run config.
A step directory is assembled under a temporary name and renamed once every rank has written;
then ``latest`` (a one-line file) is replaced atomically. A crash leaves the previous checkpoint
untouched; older step directories beyond ``keep`` are removed afterwards: only ones with a lower
step than the checkpoint just written, so neither it nor anything newer is ever pruned.

Resume reads and checks everything before it touches the model (``read_checkpoint``): every
file parses, the run's layout and config can continue this checkpoint (``resume_mismatches``),
and only then are the adapter, optimizer and counters loaded (``apply_checkpoint``).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megalora.atomic import atomic_write_bytes
from megalora.adapter_file import load_adapter, read_manifest, save_adapter
from megalora.errors import UsageError
from megalora.runtime import runtimes

STEP_PREFIX = "step_"


def _mp_ranks():
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
            ps.get_data_parallel_rank())


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(out_dir: str, step: int, model, optimizer, stream_state: dict,
                    config: dict, keep: int = 2, extra: Optional[dict] = None) -> str:
    """Collective: every rank calls it. Returns the step directory. ``extra``: JSON-able
    trainer state (the same on every rank) kept in state.json under "extra"."""
    root = os.path.join(out_dir, "checkpoints")
    final = os.path.join(root, f"step_{step:06d}")
    staging = final + ".partial"
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    _barrier()
    save_adapter(model, os.path.join(staging, "adapter.safetensors"),
                 extra={"step": str(step)})
    tp, pp, dp = _mp_ranks()
    if dp == 0:
        buffer = _bytes(optimizer.state_dict())
        atomic_write_bytes(os.path.join(staging, f"optim_tp{tp}_pp{pp}.pt"), buffer)
    counters = [rt.forward_count for rt in runtimes(model)]
    gathered = [counters]
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, counters)
    if rank0:
        if len({tuple(c) for c in gathered}) != 1:
            raise RuntimeError(f"dropout counters differ across ranks: {gathered}")
        state = {"step": step, "stream": stream_state, "forward_counts": counters,
                 "config": config, "layout": _layout(), "extra": extra or {}}
        atomic_write_bytes(os.path.join(staging, "state.json"),
                           json.dumps(state, indent=1).encode())
    _barrier()
    if rank0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        atomic_write_bytes(os.path.join(root, "latest"), f"step_{step:06d}\n".encode())
        _prune(root, keep, step)
    _barrier()
    return final


def _bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _layout() -> Dict[str, int]:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def step_of(name: str) -> Optional[int]:
    """The step of a step directory's name (``step_000040`` -> 40), None for other names."""
    if not name.startswith(STEP_PREFIX) or name.endswith(".partial"):
        return None
    digits = name[len(STEP_PREFIX):]
    return int(digits) if digits.isdigit() else None


def _prune(root: str, keep: int, current: int) -> None:
    """Keep ``current`` and the ``keep - 1`` newest older ones. Directories with a higher step
    (another run's: the trainer sets those aside when it starts afresh) are never touched.
    ``keep`` <= 0 keeps everything."""
    if keep <= 0:
        return
    older = sorted((s, d) for d in os.listdir(root) if (s := step_of(d)) is not None
                   and s < current)
    for _, old in older[:len(older) - max(keep - 1, 0)]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def latest_checkpoint(out_dir: str) -> Optional[str]:
    """The step directory named by ``latest``, or None when there is no checkpoint."""
    pointer = os.path.join(out_dir, "checkpoints", "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as fh:
        name = fh.read().strip()
    path = os.path.join(out_dir, "checkpoints", name)
    if step_of(name) is None or not os.path.isfile(os.path.join(path, "state.json")):
        raise UsageError(f"checkpoint {path} named by {pointer} is missing or incomplete: write "
                         "the name of an intact step_* directory into that file to resume from "
                         "it, or start afresh with train.resume=false")
    return path


def _damaged(path: str, exc: BaseException) -> UsageError:
    return UsageError(f"checkpoint file {path} is unreadable ({type(exc).__name__}: {exc}); "
                      "the checkpoint is damaged: write the name of an earlier step_* directory "
                      f"into {os.path.join(os.path.dirname(os.path.dirname(path)), 'latest')} "
                      "to resume from it, or start afresh with train.resume=false")


def read_checkpoint(path: str) -> dict:
    """Read this rank's share of a checkpoint and check that it parses, without touching any
    model (no collectives). Returns state.json's content plus "optimizer" and "manifest"."""
    state_path = os.path.join(path, "state.json")
    try:
        with open(state_path) as fh:
            state = json.load(fh)
        for key in ("step", "stream", "forward_counts", "config"):
            if key not in state:
                raise KeyError(f"no {key!r} entry")
    except (OSError, ValueError, KeyError) as exc:
        raise _damaged(state_path, exc) from None
    tp, pp, _ = _mp_ranks()
    optim_path = os.path.join(path, f"optim_tp{tp}_pp{pp}.pt")
    if not os.path.exists(optim_path):
        raise UsageError(f"{path} has no optimizer state for tensor rank {tp}, pipeline rank "
                         f"{pp}: resume with the TP/PP layout it was saved with")
    try:
        state["optimizer"] = torch.load(optim_path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types on a bad file
        raise _damaged(optim_path, exc) from None
    state["manifest"] = read_manifest(os.path.join(path, "adapter.safetensors"))
    return state


# Config fields a checkpoint's adapter, optimizer state or base weights depend on: a resume
# must keep them. Everything else (steps, lr schedule, logging, paths, dropout) may change.
_FREE = {"model": {"hf_checkpoint"}, "lora": {"dropout", "backend", "deterministic"}}
_KEPT = {"model": None, "vision": None, "lora": None,
         "parallel": {"tensor_parallel", "pipeline_parallel"},
         "train": {"optimizer", "seed"}, "data": {"seq_length"}}


def resume_mismatches(saved: dict, current: dict) -> List[str]:
    """``section.field: saved -> current`` for every field that must match to resume."""
    out = []
    for section, names in _KEPT.items():
        old, new = saved.get(section) or {}, current.get(section) or {}
        fields = names if names is not None else set(old) | set(new)
        for name in sorted(fields - _FREE.get(section, set())):
            if name in old and old.get(name) != new.get(name):
                out.append(f"{section}.{name}: {old.get(name)!r} -> {new.get(name)!r}")
    return out


def check_resumable(path: str, state: dict, current_config: dict) -> None:
    """Refuse, before anything is loaded, a checkpoint this run cannot continue."""
    # JSON turns tuples into lists; compare like with like
    current = json.loads(json.dumps(current_config))
    bad = resume_mismatches(state["config"], current)
    if bad:
        raise UsageError(f"cannot resume from {path}: it was saved with other settings ("
                         + "; ".join(bad) + "). Resume with the saved values, or start afresh "
                         "with train.resume=false (the earlier checkpoints are set aside, not "
                         "deleted; their adapter.safetensors loads at any TP/PP layout with "
                         "megalora.load_adapter)")


def hook_states(state: dict) -> Dict[str, dict]:
    """The trainer hooks' saved states (hook name -> state) of a checkpoint's state.json;
    checkpoints written before the hook protocol kept Pareto's and HyDRA's under their own
    keys."""
    extra = state.get("extra") or {}
    if "hooks" in extra:
        return dict(extra["hooks"])
    legacy = {}
    if "pareto_loss_weights" in extra:
        legacy["pareto"] = {"multipliers": extra["pareto_loss_weights"]}
    if "hydra" in extra:
        legacy["hydra"] = extra["hydra"]
    return legacy


def apply_checkpoint(path: str, state: dict, model, optimizer) -> None:
    """Load what ``read_checkpoint`` read into the model and optimizer (collective)."""
    rts = runtimes(model)
    if len(rts) != len(state["forward_counts"]):
        raise UsageError(f"{path}: the model has {len(rts)} LoRA runtimes, the checkpoint "
                         f"{len(state['forward_counts'])}")
    load_adapter(model, os.path.join(path, "adapter.safetensors"))
    optimizer.load_state_dict(state["optimizer"])
    for rt, count in zip(rts, state["forward_counts"]):
        rt.forward_count = count


def load_checkpoint(path: str, model, optimizer) -> dict:
    """``read_checkpoint`` then ``apply_checkpoint``; returns state.json's content."""
    state = read_checkpoint(path)
    apply_checkpoint(path, state, model, optimizer)
    return state

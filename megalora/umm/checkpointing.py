"""Trainer checkpoints: everything needed to resume exactly, written atomically.

Layout: ``<out_dir>/checkpoints/step_000040/`` holds
- ``adapter.safetensors``: the adapter (full shapes, any layout can load it);
- ``optim_tp{t}_pp{p}.pt``: each model-parallel rank's optimizer state (written by data-parallel
  rank 0; it must be resumed with the same TP/PP layout);
- ``state.json``: step, data-stream position, dropout counters, the run config.
A step directory is assembled under a temporary name and renamed once every rank has written;
then ``latest`` (a one-line file) is replaced atomically. A crash leaves the previous checkpoint
untouched; older step directories beyond ``keep`` are removed afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist

from megalora.atomic import atomic_write_bytes
from megalora.checkpoint import load_adapter, save_adapter
from megalora.runtime import runtimes


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
                 "config": config, "extra": extra or {}}
        atomic_write_bytes(os.path.join(staging, "state.json"), json.dumps(state, indent=1).encode())
    _barrier()
    if rank0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        atomic_write_bytes(os.path.join(root, "latest"), f"step_{step:06d}\n".encode())
        _prune(root, keep)
    _barrier()
    return final


def _bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _prune(root: str, keep: int) -> None:
    steps = sorted(d for d in os.listdir(root) if d.startswith("step_") and
                   not d.endswith(".partial"))
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def latest_checkpoint(out_dir: str) -> Optional[str]:
    """The step directory named by ``latest``, or None when there is no checkpoint."""
    pointer = os.path.join(out_dir, "checkpoints", "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as fh:
        name = fh.read().strip()
    path = os.path.join(out_dir, "checkpoints", name)
    if not os.path.isfile(os.path.join(path, "state.json")):
        raise ValueError(f"checkpoint {path} named by {pointer} is missing or incomplete; "
                         "delete the pointer to start fresh or restore the directory")
    return path


def load_checkpoint(path: str, model, optimizer) -> dict:
    """Restore adapter, optimizer, dropout counters; returns state.json (step, stream, ...)."""
    with open(os.path.join(path, "state.json")) as fh:
        state = json.load(fh)
    load_adapter(model, os.path.join(path, "adapter.safetensors"))
    tp, pp, _ = _mp_ranks()
    optim_path = os.path.join(path, f"optim_tp{tp}_pp{pp}.pt")
    if not os.path.exists(optim_path):
        raise ValueError(f"{path} has no optimizer state for tensor rank {tp}, pipeline rank "
                         f"{pp}: resume with the TP/PP layout it was saved with")
    optimizer.load_state_dict(torch.load(optim_path, map_location="cpu", weights_only=False))
    rts = runtimes(model)
    if len(rts) != len(state["forward_counts"]):
        raise ValueError(f"{path}: the model has {len(rts)} LoRA runtimes, the checkpoint "
                         f"{len(state['forward_counts'])}")
    for rt, count in zip(rts, state["forward_counts"]):
        rt.forward_count = count
    return state

"""Spawn a gloo process group on this machine and run a function on every rank.

    results = run_distributed(world_size=2, fn=my_worker, args=(...))

``fn(rank, world_size, *args)`` runs inside ``cpu_megatron()`` with torch.distributed initialised
(gloo); whatever it returns (tensors, dicts, numbers) comes back as a list indexed by rank. A
failure on any rank raises in the caller with that rank's traceback.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from typing import Any, Callable, List, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megalora.distributed import free_port


def _entry(rank: int, world: int, port: int, outdir: str, fn: Callable, args: Sequence) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from megalora.cpu import cpu_megatron

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        with cpu_megatron():
            result = fn(rank, world, *args)
        torch.save({"ok": True, "result": result}, os.path.join(outdir, f"rank{rank}.pt"))
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()},
                   os.path.join(outdir, f"rank{rank}.pt"))
        raise
    finally:
        try:
            from megatron.core import parallel_state as ps

            if ps.is_initialized():
                ps.destroy_model_parallel()
        finally:
            dist.destroy_process_group()


def run_distributed(world_size: int, fn: Callable, args: Sequence[Any] = (),
                    timeout: float = 600.0) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks."""
    with tempfile.TemporaryDirectory(prefix="megalora-dist-") as outdir:
        ctx = mp.start_processes(_entry, args=(world_size, free_port(), outdir, fn, tuple(args)),
                                 nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=2.0):
                if time.monotonic() > deadline:
                    for proc in ctx.processes:
                        proc.kill()
                    raise TimeoutError(f"distributed run still going after {timeout:.0f}s "
                                       "(a rank is probably stuck in a collective)")
        except TimeoutError:
            raise
        except Exception as exc:
            errors = []
            for rank in range(world_size):
                path = os.path.join(outdir, f"rank{rank}.pt")
                if os.path.exists(path):
                    out = torch.load(path, weights_only=False)
                    if not out["ok"]:
                        errors.append(f"--- rank {rank} ---\n{out['error']}")
            raise RuntimeError("distributed run failed:\n" + "\n".join(errors)) from exc
        results = []
        for rank in range(world_size):
            out = torch.load(os.path.join(outdir, f"rank{rank}.pt"), weights_only=False)
            results.append(out["result"])
        return results

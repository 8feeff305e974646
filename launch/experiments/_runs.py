"""Shared by the experiment scripts: an experiment is data (a run config, variants as
overrides, seeds), trained one process per job; each run keeps its out_dir (adapter, logs,
pareto.jsonl) and its result is cached as JSON next to its log, so a rerun trains only what is
missing. ``evaluate_many`` scores the trained runs the same way (cached too)."""

from __future__ import annotations

import importlib
import json
import os
import time
from typing import Dict, List, Sequence, Tuple


def grid(config: str, overrides: Sequence[str], variants: Dict[str, Sequence[str]],
         seeds: Sequence[int], out: str) -> List[Tuple[str, dict]]:
    """One run config per (variant, seed): ``config`` + ``overrides`` + the variant's own
    overrides (``{seed}`` in them becomes the seed); train.seed and data.seed are the seed, so
    every variant of a seed starts from the same init and reads the same data in the same
    order."""
    from megalora.umm.config import RunConfig

    runs = []
    for name, extra in variants.items():
        for seed in seeds:
            key = f"{name}_s{seed}"
            run = RunConfig.from_yaml(config, [
                *overrides, *(o.format(seed=seed) for o in extra), f"train.seed={seed}",
                f"data.seed={seed}", f"train.out_dir={os.path.join(out, key)}",
                "train.resume=false"])
            runs.append((key, run.to_dict()))
    return runs


def _save(path: str, record: dict) -> None:
    """Atomically: a worker killed mid-write must not leave a half-written file that a rerun
    would take for a finished run."""
    from megalora.atomic import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(record).encode())


def _quiet_world_1():
    import torch

    from megalora.distributed import init

    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(name, None)
    torch.set_num_threads(1)
    init(1, 1, device="cpu")  # one world-1 group for this worker's runs (train keeps it)


def train_one(cfg: dict) -> dict:
    """Train one run config dict in this process (its distributed world already set up);
    its record: held-out losses, parameters HyDRA ended with, time, work done, adapter."""
    from megalora.umm.config import RunConfig
    from megalora.umm.train import train

    run = RunConfig.from_dict(cfg)
    tick, wall = time.process_time(), time.perf_counter()
    out = train(run)
    ev, steps = out["eval"], run.train.steps
    return {"loss": ev["text"] + ev["image"], "text": ev["text"], "image": ev["image"],
            "hydra_params": (out.get("hydra") or {}).get("params"),
            "cpu_seconds": time.process_time() - tick,
            "wall_seconds": time.perf_counter() - wall,
            "step_seconds": out["step_seconds"], "step_cpu_seconds": out["step_cpu_seconds"],
            "steps": steps,
            "sequences": steps * run.train.micro_batch_size * run.train.num_microbatches,
            "out_dir": run.train.out_dir, "adapter": out.get("adapter")}


def _train_worker(configs, results_dir):
    """Train each run config dict in this process (world 1), one JSON result per run."""
    import contextlib

    from megalora.umm.session import teardown

    _quiet_world_1()
    for key, cfg in configs:
        with open(os.path.join(results_dir, key + ".log"), "w") as fh, \
                contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
            record = train_one(cfg)
        _save(os.path.join(results_dir, key + ".json"), record)
    teardown()


def _distributed_worker(rank, world, cfg):
    return train_one(cfg)


def train_distributed(runs, results_dir, world: int) -> Dict[str, dict]:
    """Like ``train_many``, but each run on ``world`` CPU processes in turn (TP / SP / PP
    layouts); rank 0's record is kept."""
    from megalora.testing.dist import run_distributed

    os.makedirs(results_dir, exist_ok=True)
    for key, cfg in runs:
        path = os.path.join(results_dir, key + ".json")
        if not os.path.exists(path):
            _save(path, run_distributed(world, _distributed_worker, (cfg,), timeout=3600)[0])
    return {k: json.load(open(os.path.join(results_dir, k + ".json"))) for k, _ in runs}


def _spawn(target, todo, args, jobs):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(todo[i::jobs], *args))
             for i in range(min(jobs, len(todo)))]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return [p.exitcode for p in procs]


def train_many(runs, results_dir, jobs):
    os.makedirs(results_dir, exist_ok=True)
    todo = [(k, c) for k, c in runs if not os.path.exists(os.path.join(results_dir, k + ".json"))]
    if any(_spawn(_train_worker, todo, (results_dir,), jobs)):
        raise SystemExit("a training worker failed; see the .log files in " + results_dir)
    return {k: json.load(open(os.path.join(results_dir, k + ".json"))) for k, _ in runs}


def _eval_worker(items, results_dir, function, kwargs):
    from megalora.umm.config import RunConfig

    _quiet_world_1()
    module, name = function.split(":")
    fn = getattr(importlib.import_module(module), name)
    for key, cfg in items:
        record = fn(RunConfig.from_dict(cfg), **kwargs)
        _save(os.path.join(results_dir, key + ".eval.json"), record)


def evaluate_many(runs, results_dir, jobs, function: str, **kwargs) -> Dict[str, dict]:
    """``function`` ("module:name") called as f(run, **kwargs) on each trained run, in worker
    processes; its dict is cached as <key>.eval.json."""
    todo = [(k, c) for k, c in runs
            if not os.path.exists(os.path.join(results_dir, k + ".eval.json"))]
    if any(_spawn(_eval_worker, todo, (results_dir, function, kwargs), jobs)):
        raise SystemExit("an evaluation worker failed; its traceback is above")
    return {k: json.load(open(os.path.join(results_dir, k + ".eval.json"))) for k, _ in runs}

"""Shared by the experiment scripts: train many run configs, one process per job, each
result cached as JSON next to its log (a rerun trains only what is missing)."""

from __future__ import annotations

import json
import os
import time


def _train_worker(configs, results_dir):
    """Train each run config dict in this process (world 1), one JSON result per run."""
    import contextlib

    import torch

    from megalora.distributed import init
    from megalora.umm.config import RunConfig
    from megalora.umm.session import teardown
    from megalora.umm.train import train

    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(name, None)
    torch.set_num_threads(1)
    init(1, 1, device="cpu")  # one world-1 group for this worker's runs (train keeps it)
    for key, cfg in configs:
        run = RunConfig.from_dict(cfg)
        tick = time.process_time()
        with open(os.path.join(results_dir, key + ".log"), "w") as fh, \
                contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
            out = train(run)
        ev = out["eval"]
        record = {"loss": ev["text"] + ev["image"], "text": ev["text"], "image": ev["image"],
                  "hydra_params": (out.get("hydra") or {}).get("params"),
                  "cpu_seconds": time.process_time() - tick, "steps": run.train.steps,
                  "sequences": run.train.steps * run.train.micro_batch_size
                  * run.train.num_microbatches}
        with open(os.path.join(results_dir, key + ".json"), "w") as fh:
            json.dump(record, fh)
    teardown()


def train_many(runs, results_dir, jobs):
    import multiprocessing as mp

    os.makedirs(results_dir, exist_ok=True)
    todo = [(k, c) for k, c in runs if not os.path.exists(os.path.join(results_dir, k + ".json"))]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_train_worker, args=(todo[i::jobs], results_dir))
             for i in range(min(jobs, len(todo)))]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise SystemExit("a training worker failed; see the .log files in " + results_dir)
    return {k: json.load(open(os.path.join(results_dir, k + ".json"))) for k, _ in runs}

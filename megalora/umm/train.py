"""``megalora train``: LoRA fine-tuning of the UMM with Megatron's own schedules.

    torchrun --nproc_per_node=2 -m megalora train --config launch/configs/umm_tiny.yaml
    launch/torchrun.sh umm_tiny     # or launch/sbatch.sh, launch/srun.sh, launch/mpirun.sh

Each step runs ``num_microbatches`` microbatches per data-parallel rank through megatron-core's
forward/backward schedule (no pipelining or 1F1B; on CPU inside the CPU harness), then one
AdamW step on the adapters (``megalora.umm.optim``). Rank 0 shows a progress bar (text loss,
image loss, tokens/s, ETA) and writes TensorBoard scalars. Checkpoints are periodic and atomic;
a run restarts from the newest one (exact resume: adapter, optimizer, data position, dropout
counters, LR step, the hooks' state). SIGTERM (SLURM preemption) makes every rank finish the
step, save and stop.

What is built comes from ``megalora.umm.session``; training methods (Pareto LoRA, HyDRA, MARS's
probes, yours) are trainer hooks (``megalora.umm.hooks``): this module knows the protocol, not
the methods.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from megalora.umm.config import RunConfig
from megalora.umm.hooks import TrainerHook, gradient_hook, overrides
from megalora.umm.nonfinite import check_adapter_finite, nonfinite_problem, on_nonfinite
from megalora.umm.progress import ProgressLog
from megalora.umm.session import TrainingSession, evaluate, global_scalars, parallel_session

logger = logging.getLogger("megalora")


class _Preemption:
    """SIGTERM -> finish the current step, checkpoint, stop (all ranks agree each step)."""

    def __init__(self):
        self.flag = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.flag = True

    def agreed(self, device) -> bool:
        flag = torch.tensor([1.0 if self.flag else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def train(run: RunConfig, max_steps_this_run: int = 0,
          hooks: Sequence[TrainerHook] = ()) -> dict:
    """Train per ``run``; returns {"losses": [...], "eval": {...}, "adapter": path, "step",
    "stopped_early", "step_seconds" and "step_cpu_seconds" (mean wall and process CPU seconds
    of this invocation's optimisation steps, checkpoints excluded), and each hook's ``finish``
    value under its name}. The run's methods (``megalora.umm.methods``) come first, then
    ``hooks``. ``max_steps_this_run`` > 0 stops (with a checkpoint) after that many steps of
    this invocation, as a preemption would."""
    from megalora.umm.methods import method_hooks
    from megalora.umm.model import loss_convention

    hooks = method_hooks(run) + list(hooks)
    gradient_hook(hooks)  # at most one hook produces the gradients; names are unique
    preempt, lock = _Preemption(), None
    try:
        with parallel_session(run) as device:
            torch.manual_seed(run.train.seed)
            lock, ckpt = _claim_out_dir(run)
            session = TrainingSession.build(run, device)
            if dist.get_rank() == 0:
                print(session.lora_report, flush=True)
                print(loss_convention(run), flush=True)
            for hook in hooks:
                hook.setup(session)
            return _train_session(session, hooks, preempt, ckpt, max_steps_this_run)
    finally:
        preempt.restore()
        if lock is not None:
            lock.release()


def _claim_out_dir(run: RunConfig):
    """(rank 0's lock on out_dir or None, the checkpoint to resume or None); every rank agrees
    (see ``megalora.umm.rundir``)."""
    from megalora.errors import agree
    from megalora.umm.run_checkpoint import latest_checkpoint
    from megalora.umm.rundir import claim

    lock, ckpt = None, None
    with agree("train.out_dir"):
        ckpt = latest_checkpoint(run.train.out_dir) if run.train.resume else None
        if dist.get_rank() == 0:
            lock = claim(run.train.out_dir, fresh=ckpt is None)
    return lock, ckpt


def _train_session(session: TrainingSession, hooks: List[TrainerHook], preempt,
                   ckpt: Optional[str], max_steps_this_run: int) -> dict:
    run = session.run
    eval_start = session.evals.state_dict() if session.evals else None
    start = _resume(session, hooks, ckpt)
    session.log = ProgressLog(run, start, dist.get_rank() == 0)
    try:
        if ckpt:
            session.log.message(f"resumed from {ckpt} at step {start}")
        for hook in hooks:
            hook.start(session, start)
        result = _loop(session, hooks, preempt, start, max_steps_this_run)
        _summarise(session, result["losses"], start, ckpt)
        completed = not result["stopped_early"]
        if completed:
            check_adapter_finite(session.model, run.train.steps)
            result.update(_finish(session, eval_start))
        for hook in hooks:
            result[hook.name] = hook.finish(session, completed)
    finally:
        session.log.close()
    return result


def _resume(session: TrainingSession, hooks: List[TrainerHook], ckpt: Optional[str]) -> int:
    """The last step already done, after loading ``ckpt`` (0 without one). Every file is read
    and every setting checked, on every rank, before anything is loaded."""
    from megalora.errors import agree
    from megalora.umm.run_checkpoint import (apply_checkpoint, check_resumable, hook_states,
                                             read_checkpoint)

    if not ckpt:
        return 0
    with agree("resume"):
        state = read_checkpoint(ckpt)
        check_resumable(ckpt, state, session.run.to_dict())
        session.stream.load_state_dict(state["stream"])
    apply_checkpoint(ckpt, state, session.model, session.optimizer)
    saved = hook_states(state)
    for hook in hooks:
        hook.load_state_dict(saved.get(hook.name), state["step"])
    return state["step"]


def _step(session: TrainingSession, hooks: List[TrainerHook], step: int, lr: float,
          skipped_in_a_row: int) -> Optional[tuple]:
    """One optimisation step: (global loss scalars, grad norm), or None when it was skipped
    for non-finite values."""
    session.optimizer.zero_grad()
    batches = [session.stream.next_batch().to(session.device)
               for _ in range(session.run.train.num_microbatches)]
    producer = gradient_hook(hooks)
    if producer is not None:
        stats = producer.forward_backward(step, session, batches)
    else:
        stats = session.forward_backward(batches)
        session.optimizer.reduce()
    for hook in hooks:
        hook.before_optimizer_step(step, session)
    scalars = global_scalars(stats, session.device)
    problem = nonfinite_problem(session.model, scalars)
    if problem:
        on_nonfinite(session.run.train, step, problem, lr, skipped_in_a_row + 1,
                     session.log.message)
        return None
    return scalars, session.optimizer.step(lr, reduced=True)


def _loop(session: TrainingSession, hooks: List[TrainerHook], preempt, start: int,
          max_steps_this_run: int) -> dict:
    """The optimisation steps; checkpoints periodically, at the end and on preemption."""
    from megatron.core import parallel_state as ps

    from megalora.umm.optim import lr_at

    run, log = session.run, session.log
    history, stop, step, skipped = [], False, start, 0
    spent = [0.0, 0.0]  # wall and this process's CPU seconds in _step (methods' overhead)
    tokens_per_step = run.train.micro_batch_size * run.train.num_microbatches * \
        run.data.seq_length * ps.get_data_parallel_world_size()
    for step in range(start + 1, run.train.steps + 1):
        tick, cpu = time.time(), time.process_time()
        lr = lr_at(step - 1, lr=run.train.lr, min_lr=run.train.min_lr,
                   warmup=run.train.warmup_steps, total=run.train.steps)
        done = _step(session, hooks, step, lr, skipped)
        spent[0] += time.time() - tick
        spent[1] += time.process_time() - cpu
        skipped = 0 if done is not None else skipped + 1
        if done is not None:
            scalars, norm = done
            history.append(scalars)
            for hook in hooks:
                hook.after_optimizer_step(step, session, scalars)
            extra = " ".join(p for p in (h.progress() for h in hooks
                                         if overrides(h, "progress")) if p)
            log.step(step, scalars, lr, norm, tokens_per_step / max(time.time() - tick, 1e-9),
                     run.train.log_every, extra)
        preempted = preempt.agreed(session.device)
        stop = preempted or bool(max_steps_this_run and step - start >= max_steps_this_run)
        if stop or (run.train.save_every and step % run.train.save_every == 0) \
                or step == run.train.steps:
            _save(session, hooks, step, preempted)
        if stop:
            log.message(f"stopping at step {step} (checkpoint saved); rerun to resume")
            break
    steps = max(step - start, 1)
    return {"losses": history, "step": step, "stopped_early": bool(stop),
            "step_seconds": spent[0] / steps, "step_cpu_seconds": spent[1] / steps}


def _save(session: TrainingSession, hooks: List[TrainerHook], step: int,
          preempted: bool) -> None:
    """A checkpoint of ``step`` (never of inf/nan values); after a preemption, each node's local
    rank 0 tells its launcher wrapper (``megalora.elastic``) through $MEGALORA_PREEMPT_FILE that
    it was saved (``save_checkpoint`` returns on every rank only once all have written)."""
    from megalora.atomic import atomic_write_bytes
    from megalora.umm.run_checkpoint import save_checkpoint

    check_adapter_finite(session.model, step)
    states = {h.name: s for h in hooks if (s := h.state_dict()) is not None}
    save_checkpoint(session.run.train.out_dir, step, session.model, session.optimizer,
                    session.stream.state_dict(), session.run.to_dict(),
                    extra={"hooks": states})
    report = os.environ.get("MEGALORA_PREEMPT_FILE")
    # each node's first process: every node's wrapper (one torchrun per node) needs the report
    if preempted and report and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        atomic_write_bytes(report, f"{step}\n".encode())


def _summarise(session: TrainingSession, history: List[dict], start: int,
               ckpt: Optional[str]) -> None:
    run, log = session.run, session.log
    if len(history) >= 2:
        k = min(5, len(history) // 2)
        mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
        log.message(f"text loss {mean(history[:k], 'text'):.3f} -> "
                    f"{mean(history[-k:], 'text'):.3f}, image loss "
                    f"{mean(history[:k], 'image'):.3f} -> {mean(history[-k:], 'image'):.3f} "
                    f"(means of the first/last {k} steps of this run)")
    elif start >= run.train.steps:
        log.message(f"train.steps={run.train.steps} already reached at {ckpt}; nothing to "
                    "train (new train.out_dir or train.resume=false to start over)")


def _finish(session: TrainingSession, eval_start) -> dict:
    import megalora

    run, log = session.run, session.log
    out = {}
    if session.evals is not None:
        session.evals.load_state_dict(eval_start)
        out["eval"] = evaluate(session.runner, run, session.evals, session.device)
        log.scalars("eval", out["eval"], run.train.steps)
        log.message(f"held-out: text {out['eval']['text']:.4f}  image {out['eval']['image']:.4f}")
    out["adapter"] = os.path.join(run.train.out_dir, "adapter.safetensors")
    megalora.save_adapter(session.runner, out["adapter"],
                          extra={"steps": str(run.train.steps)})
    log.message(f"adapter saved to {out['adapter']}")
    return out

"""``megalora train``: LoRA fine-tuning of the UMM with Megatron's own schedules.

    torchrun --nproc_per_node=2 -m megalora train --config launch/configs/umm_tiny.yaml
    launch/torchrun.sh umm_tiny     # or launch/sbatch.sh, launch/srun.sh, launch/mpirun.sh

Each step runs ``num_microbatches`` microbatches per data-parallel rank through megatron-core's
forward/backward schedule (no pipelining or 1F1B; on CPU inside the CPU harness), then one
AdamW step on the adapters (``megalora.umm.optim``). Rank 0 shows a progress bar (text loss,
image loss, tokens/s, ETA) and writes TensorBoard scalars. Checkpoints are periodic and atomic;
a run restarts from the newest one (exact resume: adapter, optimizer, data position, dropout
counters, LR step). SIGTERM (SLURM preemption) makes every rank finish the step, save and exit 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megalora.umm.config import RunConfig
from megalora.umm.nonfinite import check_adapter_finite, nonfinite_problem, on_nonfinite
from megalora.umm.progress import ProgressLog

logger = logging.getLogger("megalora")


class _Preemption:
    """SIGTERM -> finish the current step, checkpoint, exit 0 (all ranks agree each step)."""

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


def _setup(run: RunConfig):
    """Process group + model parallel state; returns the device."""
    from megatron.core import parallel_state as ps

    from megalora.distributed import init

    tp, pp = run.parallel.tensor_parallel, run.parallel.pipeline_parallel
    env = init(tp, pp, device=run.train.device)
    logger.info("megalora: %s", env.describe())
    if not ps.is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp,
                                     pipeline_model_parallel_size=pp)
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _datasets(run: RunConfig):
    from megalora.umm.data import UMMDataset
    from megalora.umm.synthetic import SyntheticSpec, synthetic_samples

    m, d = run.model, run.data
    dims = dict(base_vocab=m.base_vocab, image_tokens=m.image_tokens, visual_dim=m.visual_dim)
    pixels = dict(with_pixels=run.vision.enabled, pixel_size=run.vision.image_size)
    if d.path:
        train = UMMDataset.open(d.path, **dims)
    else:
        train = UMMDataset.from_samples(synthetic_samples(SyntheticSpec(
            num_samples=d.synthetic_samples, seq_length=d.seq_length, seed=d.seed, **dims,
            **pixels)), **dims)
    held_out = None
    if d.eval_samples and not d.path:
        held_out = UMMDataset.from_samples(synthetic_samples(SyntheticSpec(
            num_samples=d.eval_samples, seq_length=d.seq_length, seed=d.seed + 1_000_003,
            **dims, **pixels)), **dims)
    return train, held_out


def _streams(run: RunConfig, train, held_out):
    from megatron.core import parallel_state as ps

    from megalora.umm.data import DataStream

    common = dict(micro_batch_size=run.train.micro_batch_size, seq_length=run.data.seq_length,
                  special=train.special, dp_rank=ps.get_data_parallel_rank(),
                  dp_size=ps.get_data_parallel_world_size())
    stream = DataStream(train, seed=run.data.seed, **common)
    evals = DataStream(held_out, seed=0, shuffle=False, **common) if held_out else None
    return stream, evals


def _forward_step_func(run: RunConfig, loss_weights: Optional[Dict[str, float]] = None):
    """``loss_weights``: objective name (a key of the model's losses) -> weight; default the
    model's text and image loss weights."""
    import megalora
    from megalora.testing.tiny_gpt import causal_mask

    weights = loss_weights or {"text": run.model.text_loss_weight,
                               "image": run.model.image_loss_weight}

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        if run.lora.routing == "modality":
            megalora.set_head_ids(model, batch.modality)
        mask = causal_mask(batch.tokens.shape[1]).to(batch.tokens.device)
        out = model(batch, mask)

        def loss_func(losses: Dict[str, torch.Tensor]):
            loss = sum(w * losses[name] for name, w in weights.items())
            # clones: the schedule divides the returned loss in place by the microbatch count
            report = {k: v.detach().clone() for k, v in losses.items()}
            report["loss"] = loss.detach().clone()
            return loss, report

        return out, loss_func

    return forward_step


def _run_microbatches(model, run, batches, forward_only=False,
                      loss_weights: Optional[Dict[str, float]] = None) -> List[dict]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=_forward_step_func(run, loss_weights), data_iterator=iter(batches),
        model=model,
        num_microbatches=len(batches), seq_length=run.data.seq_length,
        micro_batch_size=run.train.micro_batch_size, forward_only=forward_only)


def _grad_step(run: RunConfig, runner, model, optimizer, engine, batches, step: int):
    """Forward + backward of one step into the gradients the optimizer reads: vanilla, or
    Pareto LoRA's per-objective passes. Returns (loss stats or None off the last stage,
    whether the gradients are already reduced)."""
    from megalora.umm.optim import loss_scalars

    def run_pass(loss_weights=None):  # a list in the order of engine.objectives
        named = dict(zip(engine.objectives, loss_weights)) if loss_weights else None
        return loss_scalars(_run_microbatches(runner, run, batches, loss_weights=named))

    if engine is None:
        return run_pass(), False
    weights = [run.model.image_loss_weight if name == "image" else run.model.text_loss_weight
               for name in engine.objectives]
    return engine.gradients(step, weights, run_pass, optimizer, model)


def _global_scalars(stats: Optional[dict], device) -> dict:
    """Last-stage losses to every rank, averaged over data parallel."""
    from megatron.core import parallel_state as ps

    keys = ("text", "image", "loss", "text_tokens", "image_tokens")
    t = torch.tensor([float(stats[k]) if stats else 0.0 for k in keys], dtype=torch.float64,
                     device=device)
    if dist.is_initialized():
        dist.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
        dist.all_reduce(t, group=ps.get_data_parallel_group())
        t[:3] /= ps.get_data_parallel_world_size()
    return dict(zip(keys, t.tolist()))


def evaluate(model, run: RunConfig, stream, device, max_batches: int = 8) -> dict:
    """Held-out text and image losses (forward only)."""
    from megalora.umm.optim import loss_scalars

    model.eval()
    results = []
    steps = min(max_batches, max(1, stream.steps_per_epoch))
    with torch.no_grad():
        for _ in range(steps):
            results += _run_microbatches(model, run, [stream.next_batch().to(device)],
                                         forward_only=True)
    model.train()
    return _global_scalars(loss_scalars(results), device)


def _build(run: RunConfig, device):
    import megalora
    from megalora.umm.model import build_umm

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda and run.train.bf16 else torch.float32
    model = build_umm(run, dtype=dtype, cpu=not cuda)
    if run.model.hf_checkpoint:  # the pretrained base, before the adapters are added
        from megalora.umm.hf import import_llama
        import_llama(model, run.model.hf_checkpoint)
    if cuda:
        model.cuda()
    report = megalora.apply_lora(model, run.lora)
    return model, report


def _optimizer(run: RunConfig, model, device):
    """(optimizer, module to run the forward through) per ``train.optimizer``."""
    from megatron.core import parallel_state as ps

    from megalora.umm.optim import AdapterOptimizer, MegatronAdapterOptimizer

    t = run.train
    if t.optimizer == "megatron":
        # Megatron picks its optimizer class from the trainable parameters' dtype: bf16 ones
        # get fp32 main copies (also with an fp32 base and lora.dtype=bfloat16)
        dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
        if torch.float16 in dtypes:
            raise ValueError("lora.dtype=float16 needs loss scaling, which train.optimizer="
                             "megatron is not set up for here: use lora.dtype=bfloat16 or "
                             "train.optimizer=torch")
        if torch.bfloat16 in dtypes and device.type != "cuda":
            raise ValueError("megatron-core's mixed-precision optimizer takes CUDA tensors only: "
                             "on CPU use train.optimizer=torch with bf16 adapters (lora.dtype)")
        opt = MegatronAdapterOptimizer(model, model.config, lr=t.lr, weight_decay=t.weight_decay,
                                       clip_grad=t.clip_grad, bf16=torch.bfloat16 in dtypes)
        return opt, opt.module
    opt = AdapterOptimizer(model, lr=t.lr, weight_decay=t.weight_decay, clip_grad=t.clip_grad,
                           dp_group=ps.get_data_parallel_group(),
                           mp_group=ps.get_model_parallel_group())
    return opt, model


def train(run: RunConfig, max_steps_this_run: int = 0, on_step=None) -> dict:
    """Train per ``run``; returns {"losses": [...], "eval": {...}, "adapter": path,
    "pareto": [per-step group statistics when pareto.mode is on], ...}.
    ``max_steps_this_run`` > 0 stops (with a checkpoint) after that many steps of this
    invocation, as a preemption would. ``on_step(step, model, scalars)`` is called on every
    rank after each optimizer step (MARS's convergence probes use it)."""
    from megalora.testing.cpu import cpu_megatron

    device = _setup(run)
    torch.manual_seed(run.train.seed)
    harness = cpu_megatron() if device.type == "cpu" else contextlib.nullcontext()
    preempt, lock = _Preemption(), None
    try:
        with harness:
            lock, ckpt = _claim_out_dir(run)
            job = _make_job(run, device, preempt, on_step)
            return _train_job(job, ckpt, max_steps_this_run)
    finally:
        preempt.restore()
        if lock is not None:
            lock.release()


def _claim_out_dir(run: RunConfig):
    """(rank 0's lock on out_dir or None, the checkpoint to resume or None); every rank agrees
    (see ``megalora.umm.rundir``)."""
    from megalora.errors import agree
    from megalora.umm.checkpointing import latest_checkpoint
    from megalora.umm.rundir import claim

    lock, ckpt = None, None
    with agree("train.out_dir"):
        ckpt = latest_checkpoint(run.train.out_dir) if run.train.resume else None
        if dist.get_rank() == 0:
            lock = claim(run.train.out_dir, fresh=ckpt is None)
    return lock, ckpt


def _make_job(run: RunConfig, device, preempt, on_step) -> "_Job":
    from megalora.errors import agree

    model, report = _build(run, device)
    if dist.get_rank() == 0:
        print(report, flush=True)
    optimizer, runner = _optimizer(run, model, device)
    hydra = None
    if run.hydra.enabled:
        from megalora.hydra.scheduler import HydraScheduler
        hydra = HydraScheduler.for_run(run, model)
    engine = None
    if run.pareto.enabled:
        from megalora.pareto.engine import ParetoEngine
        engine = ParetoEngine(run.pareto, model, run.model.num_layers)
    with agree("data"):  # a dataset missing or broken on one node stops every rank with it
        train_set, held_out = _datasets(run)
        stream, evals = _streams(run, train_set, held_out)
    return _Job(run, device, model, runner, optimizer, engine, stream, preempt,
                on_step=on_step, hydra=hydra, evals=evals)


def _train_job(job: "_Job", ckpt: Optional[str], max_steps_this_run: int) -> dict:
    run, rank0 = job.run, dist.get_rank() == 0
    eval_start = job.evals.state_dict() if job.evals else None
    start = _resume(job, ckpt)
    job.log = ProgressLog(run, start, rank0)
    if job.engine is not None and rank0:
        from megalora.pareto.engine import trim_history
        trim_history(run.train.out_dir, start)
    if ckpt:
        job.log.message(f"resumed from {ckpt} at step {start}")
    try:
        result = _loop(job, start, max_steps_this_run)
        _summarise(job, result["losses"], start, ckpt)
        if not result["stopped_early"]:
            check_adapter_finite(job.model, run.train.steps)
            result.update(_finish(run, job.runner, job.evals, eval_start, job.device, job.log))
            if job.hydra is not None:
                from megalora.hydra.report import finish
                result["hydra"] = finish(job.hydra, run, rank0)
                job.log.message(f"HyDRA: {result['hydra']['params']:,} of "
                                f"{job.hydra.budget:,} budget parameters; ranks in "
                                f"{result['hydra']['config']}, {result['hydra']['plot']}")
    finally:
        job.log.close()
    return result


@dataclasses.dataclass
class _Job:
    """What one training run holds (built once by ``train``)."""

    run: RunConfig
    device: torch.device
    model: torch.nn.Module
    runner: torch.nn.Module
    """The module the forward runs through (Megatron's DDP wrapper or the model)."""
    optimizer: object
    engine: object
    """ParetoEngine or None."""
    stream: object
    preempt: _Preemption
    log: Optional[ProgressLog] = None
    on_step: Optional[object] = None
    """Called as on_step(step, model, scalars) after each optimizer step."""
    hydra: Optional[object] = None
    """HydraScheduler or None."""
    evals: Optional[object] = None
    """The held-out stream, or None."""
    skipped_in_a_row: int = 0
    """Consecutive steps skipped for non-finite values (train.nonfinite=skip)."""


def _resume(job: _Job, ckpt: Optional[str]) -> int:
    """The last step already done, after loading ``ckpt`` (0 without one). Every file is read
    and every setting checked, on every rank, before anything is loaded."""
    from megalora.errors import agree
    from megalora.umm.checkpointing import apply_checkpoint, check_resumable, read_checkpoint

    if not ckpt:
        return 0
    with agree("resume"):
        state = read_checkpoint(ckpt)
        check_resumable(ckpt, state, job.run.to_dict())
        extra = state.get("extra", {})
        if job.hydra is not None and "hydra" not in extra:
            raise ValueError(f"{ckpt} was saved without HyDRA (hydra.enabled=false): resume it "
                             "the same way, or start afresh with train.resume=false")
        saved = extra.get("pareto_loss_weights")
        if job.engine is not None and saved is not None and \
                len(saved) != len(job.engine.objectives):
            raise ValueError(f"{ckpt}: saved with {len(saved)} Pareto objectives, this run has "
                             f"pareto.objectives={job.engine.objectives}; keep the objectives "
                             "of the run you resume, or start afresh with train.resume=false")
        job.stream.load_state_dict(state["stream"])
    apply_checkpoint(ckpt, state, job.model, job.optimizer)
    if job.engine is not None and saved is not None:
        job.engine.loss_weights = saved
    if job.hydra is not None:
        job.hydra.load_state_dict(extra["hydra"], state["step"])
    return state["step"]


def _step(job: _Job, step: int, lr: float) -> Optional[tuple]:
    """One optimisation step: (global loss scalars, grad norm), or None when it was skipped
    for non-finite values."""
    job.optimizer.zero_grad()
    batches = [job.stream.next_batch().to(job.device)
               for _ in range(job.run.train.num_microbatches)]
    stats, reduced = _grad_step(job.run, job.runner, job.model, job.optimizer, job.engine,
                                batches, step)
    if not reduced:  # reduce first, so that the finiteness check sees the final gradients
        job.optimizer.reduce()
    scalars = _global_scalars(stats, job.device)
    problem = nonfinite_problem(job.model, scalars)
    if problem:
        job.skipped_in_a_row += 1
        on_nonfinite(job.run.train, step, problem, lr, job.skipped_in_a_row, job.log.message)
        return None
    job.skipped_in_a_row = 0
    return scalars, job.optimizer.step(lr, reduced=True)


def _loop(job: _Job, start: int, max_steps_this_run: int) -> dict:
    """The optimisation steps; checkpoints periodically, at the end and on preemption."""
    from megatron.core import parallel_state as ps

    from megalora.umm.optim import lr_at

    run, engine, log = job.run, job.engine, job.log
    history, pareto_history, stop, step = [], [], False, start
    tokens_per_step = run.train.micro_batch_size * run.train.num_microbatches * \
        run.data.seq_length * ps.get_data_parallel_world_size()
    for step in range(start + 1, run.train.steps + 1):
        tick = time.time()
        lr = lr_at(step - 1, lr=run.train.lr, min_lr=run.train.min_lr,
                   warmup=run.train.warmup_steps, total=run.train.steps)
        done = _step(job, step, lr)
        if done is not None:
            scalars, norm = done
            history.append(scalars)
            _after_step(job, step, scalars)
            log.step(step, scalars, lr, norm, tokens_per_step / max(time.time() - tick, 1e-9),
                     run.train.log_every, engine.summary() if engine is not None else "")
            if engine is not None and engine.last is not None and engine.last["step"] == step:
                pareto_history.append(engine.last)
        preempted = job.preempt.agreed(job.device)
        stop = preempted or bool(max_steps_this_run and step - start >= max_steps_this_run)
        if stop or (run.train.save_every and step % run.train.save_every == 0) \
                or step == run.train.steps:
            _save(job, step, preempted)
        if stop:
            log.message(f"stopping at step {step} (checkpoint saved); rerun to resume")
            break
    return {"losses": history, "step": step, "stopped_early": bool(stop),
            "pareto": pareto_history}


def _after_step(job: _Job, step: int, scalars: dict) -> None:
    """What follows an optimizer step: the caller's hook, HyDRA, Pareto's log."""
    if job.on_step is not None:
        job.on_step(step, job.model, scalars)
    if job.hydra is not None:
        from megalora.umm.model import loss_weights
        job.hydra.after_step(step, job.optimizer, sum(
            w * scalars[k] for k, w in loss_weights(job.run).items()))
    if job.engine is not None and job.engine.last is not None \
            and job.engine.last["step"] == step:
        job.log.pareto(job.engine.last, job.run)


def _save(job: _Job, step: int, preempted: bool) -> None:
    """A checkpoint of ``step`` (never of inf/nan values); after a preemption, each node's local
    rank 0 tells its launcher wrapper (``megalora.elastic``) through $MEGALORA_PREEMPT_FILE that
    it was saved (``save_checkpoint`` returns on every rank only once all have written)."""
    from megalora.atomic import atomic_write_bytes
    from megalora.umm.checkpointing import save_checkpoint

    check_adapter_finite(job.model, step)
    extra = {"pareto_loss_weights": job.engine.loss_weights} if job.engine else {}
    if job.hydra is not None:
        extra["hydra"] = job.hydra.state_dict()
    save_checkpoint(job.run.train.out_dir, step, job.model, job.optimizer,
                    job.stream.state_dict(), job.run.to_dict(), extra=extra)
    report = os.environ.get("MEGALORA_PREEMPT_FILE")
    # each node's first process: every node's wrapper (one torchrun per node) needs the report
    if preempted and report and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        atomic_write_bytes(report, f"{step}\n".encode())


def _summarise(job: _Job, history: List[dict], start: int, ckpt: Optional[str]) -> None:
    run, log = job.run, job.log
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


def _finish(run: RunConfig, model, evals, eval_start, device, log) -> dict:
    import megalora

    out = {}
    if evals is not None:
        evals.load_state_dict(eval_start)
        out["eval"] = evaluate(model, run, evals, device)
        log.scalars("eval", out["eval"], run.train.steps)
        log.message(f"held-out: text {out['eval']['text']:.4f}  image {out['eval']['image']:.4f}")
    out["adapter"] = os.path.join(run.train.out_dir, "adapter.safetensors")
    megalora.save_adapter(model, out["adapter"], extra={"steps": str(run.train.steps)})
    log.message(f"adapter saved to {out['adapter']}")
    return out

"""MARS calibration probes: short training runs over (vision rank, LLM rank, data size).

Each probe is the trainer (``megalora.umm.train.train``) on one process (TP = PP = 1) with
the LLM adapters at rank r_l, the in-loop vision encoder's at r_v (``rank_pattern
{"vision.*": r_v}``), alpha = 2 r for both (a scale of 2 whatever the rank, as in MARS), a
constant learning rate after warmup, and D synthetic training samples. It records the
held-out loss at the end and a convergence time per module group.

**Convergence time** (MARS leaves it undefined; ours, in steps, measured in the joint run):
every ``every`` steps the held-out loss is evaluated three times, with all adapters, with
the ``vision`` group's (every adapter under ``vision.``) switched off and with the ``llm``
group's (the rest) switched off. The loss a group removes is its contribution c_g(t); t_g is
the first evaluated step at which c_g (a 3-point running mean) reaches ``fraction`` (0.9) of
its largest value in the probe. A group whose contribution still rises (its last quarter
of evaluations adds more than 1 - fraction of the peak) or never lowers the loss is
*censored* (t_g = None) and left out of the convergence fit. The curves are kept in the probe
records, so times are recomputed for another ``fraction`` without training again. With
``contribution="train"`` the same three losses are taken on the first training batches instead
(fixed, a stream of their own): on EmojiCap the vision adapters never lowered the held-out loss,
so a held-out convergence time did not exist for them (docs/pareto-emojicap.md,
MARS section). Measured and
rejected first: the relative drift of the adapter deltas over a window, |W(t) - W(t-w)| / |W(t)|,
falls like w / t while adapters grow at a constant learning rate, whatever the rank (tiny UMM,
40 steps, ranks 1-16: the same curve within 10 %), so it measures the probe length, not the
module; per-module gradient norms were flat at the clip threshold.

Probes are cached, one JSON file each under ``<out>/probes/``, written atomically: a search
that is interrupted or re-fitted re-runs nothing it has. ``jobs`` worker processes share the
pending probes (each a world-1 gloo group of its own).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from megalora.atomic import atomic_write_bytes
from megalora.umm.hooks import TrainerHook


CONTRIBUTION_ON = ("heldout", "train")
"""Where a probe can measure a group's loss contribution (``ContributionTracker``'s data)."""


@dataclass(frozen=True)
class ProbeSpec:
    r_v: int
    r_l: int
    samples: int
    steps: int
    batch: Optional[int] = None
    """Micro-batch size (None: the config's)."""
    lr: Optional[float] = None
    """Constant learning rate (None: the config's peak lr)."""
    contribution_on: str = "heldout"
    """Where a group's loss contribution is measured (one of ``CONTRIBUTION_ON``): ``heldout``
    (the held-out set) or ``train`` (the first training batches, the same ones at every
    evaluation); kept in the probe's record."""

    @property
    def key(self) -> str:
        """The cache name: everything that changes the probe's training or its record."""
        key = f"rv{self.r_v}_rl{self.r_l}_d{self.samples}_s{self.steps}"
        return key + (f"_b{self.batch}" if self.batch else "") + \
            (f"_lr{self.lr:g}" if self.lr else "") + \
            ("" if self.contribution_on == "heldout" else f"_c{self.contribution_on}")


def probe_overrides(base: dict, r_v: int, r_l: int, samples: int, steps: int, out_dir: str,
                    micro_batch_size: Optional[int] = None, lr: Optional[float] = None
                    ) -> dict:
    """A run config dict for one probe (or, with the full data size and steps, a final run)."""
    run = json.loads(json.dumps(base))  # deep copy of plain data
    lora = run["lora"]
    lora["rank"], lora["alpha"] = r_l, 2.0 * r_l
    lora["rank_pattern"] = {"vision.*": r_v, **{k: v for k, v in lora.get("rank_pattern", {})
                                                 .items() if k != "vision.*"}}
    lora["alpha_pattern"] = {"vision.*": 2.0 * r_v, **{k: v for k, v in
                                                       lora.get("alpha_pattern", {}).items()
                                                       if k != "vision.*"}}
    run["parallel"] = {"tensor_parallel": 1, "pipeline_parallel": 1, "sequence_parallel": False}
    if run["data"].get("path"):  # a dataset: a subset of it (all of it at full size)
        if samples < data_size(base):
            run["data"]["max_samples"] = samples
    else:
        run["data"]["synthetic_samples"] = samples
    t = run["train"]
    if lr:
        t["lr"] = lr
    t.update(steps=steps, out_dir=out_dir, save_every=0, tensorboard=False, resume=False,
             log_every=10 ** 9, min_lr=t["lr"], warmup_steps=min(t["warmup_steps"], steps - 1))
    if micro_batch_size:
        t["micro_batch_size"] = micro_batch_size
    return run


def data_size(base: dict) -> int:
    """The training-set size of the run config dict ``base``: its synthetic sample count, or
    its dataset's (``data.max_samples`` when set): the data size D of MARS's laws."""
    d, m = base["data"], base["model"]
    if not d.get("path"):
        return int(d["synthetic_samples"])
    if d.get("max_samples"):
        return int(d["max_samples"])
    from megalora.umm.data import UMMDataset

    return len(UMMDataset.open(d["path"], base_vocab=m["base_vocab"],
                               image_tokens=m["image_tokens"], visual_dim=m["visual_dim"],
                               verify=False))


def weighted_loss(run, scalars: dict) -> float:
    """The model's loss from its text and image parts
    (``megalora.umm.model.objective_weights``)."""
    from megalora.umm.model import objective_weights

    return sum(w * scalars[name] for name, w in objective_weights(run).items())


def module_group(module_name: str) -> str:
    """MARS's two rank groups: ``vision`` (the in-loop encoder's adapters) or ``llm``."""
    return "vision" if module_name.startswith("vision.") else "llm"


class ContributionTracker(TrainerHook):
    """A trainer hook (``megalora.umm.hooks``): every ``every`` steps, the loss on fixed batches
    (held-out ones, or with ``data="train"`` the first training batches) with all adapters,
    with the vision group's switched off (its B factors zeroed, then restored bit for bit) and
    with the LLM group's switched off. A group's contribution is the loss it removes."""

    name = "mars_contributions"

    def __init__(self, run, every: int, eval_sequences: int = 8, data: str = "heldout"):
        self.run, self.every, self.data = run, every, data
        # a fixed number of held-out sequences whatever the probe's micro-batch size
        self.eval_batches = max(1, -(-eval_sequences // run.train.micro_batch_size))
        self.steps: List[int] = []
        self.curve: Dict[str, List[float]] = {"vision": [], "llm": []}
        self._evals = None

    def _loss(self, model) -> float:
        from megalora.umm.session import evaluate

        self._evals.load_state_dict(self._start)  # the same held-out batches every time
        return weighted_loss(self.run, evaluate(model, self.run, self._evals,
                                                next(model.parameters()).device,
                                                max_batches=self.eval_batches))

    @torch.no_grad()
    def _without(self, model, group: str) -> float:
        from megalora.inject import lora_modules

        saved = [(m.lora_B, m.lora_B.detach().clone()) for m in lora_modules(model)
                 if module_group(m.lora_name) == group]
        for b, _ in saved:
            b.zero_()
        try:
            return self._loss(model)
        finally:
            for b, value in saved:
                b.copy_(value)

    def after_optimizer_step(self, step: int, session, scalars) -> None:
        if step % self.every and step != self.run.train.steps:
            return
        if self._evals is None:
            from megalora.umm.session import build_datasets, build_streams

            train, held_out = build_streams(self.run, *build_datasets(self.run))
            # "train": a stream of its own from the training set's start (the trainer's
            # stream is not touched), so every evaluation sees the same batches
            self._evals = train if self.data == "train" else held_out
            self._start = self._evals.state_dict()
        full = self._loss(session.model)
        self.steps.append(step)
        for group in ("vision", "llm"):
            self.curve[group].append(self._without(session.model, group) - full)


def convergence_step(steps: Sequence[int], contribution: Sequence[float],
                     fraction: float) -> Optional[int]:
    """The first evaluated step at which a group's contribution (3-point running mean) reaches
    ``fraction`` of its largest value in the probe; None (censored) when it is still rising
    (the last quarter of the evaluations added more than ``1 - fraction`` of the peak) or
    never positive (after smoothing)."""
    if len(contribution) < 3 or never_helps(contribution):
        return None
    smooth = running_mean(contribution)
    peak = max(smooth)
    tail = max(1, len(smooth) // 4)
    if contribution[-1] - contribution[-1 - tail] > (1 - fraction) * peak:
        return None  # still rising: the last quarter added more than the tolerance
    first = next(i for i, c in enumerate(smooth) if c >= fraction * peak)
    return None if first == len(smooth) - 1 else steps[first]


def never_helps(contribution: Sequence[float]) -> bool:
    """Whether a group's smoothed contribution is never positive: its adapters never lowered
    the loss, even where one noisy evaluation was positive (EmojiCap's held-out vision curves,
    [-0.02, 0.004, -0.01, ...]); no convergence time exists then."""
    return max(running_mean(contribution)) <= 0


def running_mean(values: Sequence[float], width: int = 3) -> List[float]:
    """Centred running mean (shorter at the ends): held-out losses of a few batches are noisy."""
    half = width // 2
    return [sum(values[max(0, i - half):i + half + 1]) / len(values[max(0, i - half):i + half + 1])
            for i in range(len(values))]


def run_probe(spec: ProbeSpec, base: dict, out: str, every: int, fraction: float) -> dict:
    """Train one probe in this process (a world-1 process group must be possible)."""
    from megalora.umm.config import RunConfig
    from megalora.umm.train import train

    cfg = probe_overrides(base, spec.r_v, spec.r_l, spec.samples, spec.steps,
                          os.path.join(out, "runs", spec.key), spec.batch, spec.lr)
    run = RunConfig.from_dict(cfg)
    tracker = ContributionTracker(run, every, data=spec.contribution_on)
    tick = time.process_time()
    result = train(run, hooks=[tracker])
    ev = result["eval"]
    return {**dataclasses.asdict(spec), "loss": weighted_loss(run, ev), "text": ev["text"],
            "image": ev["image"],
            "t_vision": convergence_step(tracker.steps, tracker.curve["vision"], fraction),
            "t_llm": convergence_step(tracker.steps, tracker.curve["llm"], fraction),
            "eval_steps": tracker.steps, "contribution": tracker.curve,
            "cpu_seconds": time.process_time() - tick,
            "sequences": spec.steps * run.train.micro_batch_size * run.train.num_microbatches}


def _probe_path(out: str, spec: ProbeSpec) -> str:
    return os.path.join(out, "probes", spec.key + ".json")


def load_cached(out: str, spec: ProbeSpec) -> Optional[dict]:
    path = _probe_path(out, spec)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None  # a torn or foreign file: run the probe again


def _worker(specs: List[ProbeSpec], base: dict, out: str, every: int, fraction: float) -> None:
    import logging

    from megalora.distributed import init
    from megalora.umm.session import teardown

    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(name, None)  # a world of one, on a port of its own
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    # one process group for all of this worker's probes (each train() keeps a caller's group)
    init(1, 1, device=(base.get("train") or {}).get("device", "auto"))
    try:
        for spec in specs:
            log = os.path.join(out, "runs", spec.key + ".log")  # the trainer's own output
            os.makedirs(os.path.dirname(log), exist_ok=True)
            with open(log, "w") as fh, contextlib.redirect_stdout(fh), \
                    contextlib.redirect_stderr(fh):
                record = run_probe(spec, base, out, every, fraction)
            atomic_write_bytes(_probe_path(out, spec), json.dumps(record, indent=1).encode())
    finally:
        teardown()


def run_probes(specs: Sequence[ProbeSpec], base: dict, out: str, *, jobs: int = 1,
               every: int = 5, fraction: float = 0.9, progress=None) -> List[dict]:
    """Every probe's record, running the ones not cached on ``jobs`` processes."""
    import multiprocessing as mp

    os.makedirs(os.path.join(out, "probes"), exist_ok=True)
    todo = [s for s in specs if load_cached(out, s) is None]
    if todo:
        if progress:
            progress(f"running {len(todo)} probes ({len(specs) - len(todo)} cached) on "
                     f"{min(jobs, len(todo))} processes")
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(todo[i::jobs], base, out, every, fraction))
                 for i in range(min(jobs, len(todo)))]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        failed = [p.exitcode for p in procs if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"{len(failed)} probe worker(s) failed (exit codes {failed}); "
                               "the probes that finished are cached, rerun to continue")
    records = [load_cached(out, s) for s in specs]
    missing = [s.key for s, r in zip(specs, records) if r is None]
    if missing:
        raise RuntimeError(f"probes without results: {missing}")
    return records

"""The trainer's rank-0 output: a progress bar on a terminal, periodic lines in logs (torchrun,
SLURM) and TensorBoard scalars (the trainer's, and any hook's through ``scalars``). Silent on
other ranks."""

from __future__ import annotations

import logging
import os
import sys
import time

from megalora.umm.config import RunConfig

logger = logging.getLogger("megalora")


class ProgressLog:
    """Rank-0 progress bar (tqdm) and TensorBoard scalars; silent elsewhere."""

    def __init__(self, run: RunConfig, start: int, rank0: bool):
        self.rank0, self.writer, self.bar = rank0, None, None
        self.start, self.total, self.t0 = start, run.train.steps, time.time()
        if not rank0:
            return
        from tqdm import tqdm

        # a bar only on a terminal; logs (torchrun, SLURM) get the periodic lines below
        self.bar = tqdm(total=run.train.steps, initial=start, desc="train", unit="step",
                        dynamic_ncols=True, disable=not sys.stderr.isatty())
        if run.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(os.path.join(run.train.out_dir, "tensorboard"))
            except ImportError as exc:
                logger.warning("megalora: TensorBoard logging off (%s)", exc)

    def step(self, step: int, scalars: dict, lr: float, norm: float, tok_s: float,
             every: int, extra: str = "") -> None:
        if not self.rank0:
            return
        self.bar.update(1)
        self.bar.set_postfix(text=f"{scalars['text']:.3f}", image=f"{scalars['image']:.3f}",
                             tok_s=f"{tok_s:.0f}")
        if self.writer is not None:
            for name in ("text", "image", "loss"):
                self.writer.add_scalar(f"loss/{name}", scalars[name], step)
            self.writer.add_scalar("train/lr", lr, step)
            self.writer.add_scalar("train/grad_norm", norm, step)
            self.writer.add_scalar("train/tokens_per_s", tok_s, step)
        if step % every == 0 or step == 1:
            # the same ETA as the bar's, for logs (torchrun, SLURM) where the bar is off
            eta = (time.time() - self.t0) / max(1, step - self.start) * (self.total - step)
            self.message(f"step {step:5d}  text {scalars['text']:.4f}  image "
                         f"{scalars['image']:.4f}  lr {lr:.2e}  grad {norm:.3f}  "
                         f"{tok_s:.0f} tok/s  ETA {int(eta) // 60}:{int(eta) % 60:02d}"
                         + (f"  [{extra}]" if extra else ""))

    def scalars(self, tag: str, values: dict, step: int) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{tag}/{name}", value, step)

    def message(self, text: str) -> None:
        if self.rank0:
            if self.bar is not None and not self.bar.disable:
                self.bar.write(text)
            else:
                print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()

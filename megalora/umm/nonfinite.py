"""inf/nan in training: found in the step it happens, never saved.

Megatron's fp32 optimizer reports success on inf/nan gradients and would write them into the
adapter (and every checkpoint after it). So each step, before the optimizer step, the trainer
checks the global losses and every adapter gradient (``megalora.grads.grads_finite``, one
collective): every rank sees the same answer. Then ``train.nonfinite`` decides: ``stop`` (a
clear error; nothing of that step is saved, the last checkpoint stays the newest) or ``skip``
(no update for that step; ``train.max_nonfinite_skips`` in a row stop the run). Before any
checkpoint or adapter is written, the adapter itself is checked too (an update can overflow).
"""

from __future__ import annotations

import math
from typing import Callable

from megalora.errors import NonFiniteError


def nonfinite_problem(model, scalars: dict) -> str:
    """What is inf/nan in this step ("" when nothing); the same answer on every rank (the
    losses are global already, the gradient check is a collective)."""
    from megalora.grads import grads_finite

    bad = [f"{k} loss {scalars[k]}" for k in ("text", "image") if not math.isfinite(scalars[k])]
    if not grads_finite(model):
        bad.append("gradients")
    return ", ".join(bad)


def on_nonfinite(train, step: int, problem: str, lr: float, in_a_row: int,
                 message: Callable[[str], None]) -> None:
    """Skip the step (say so) or raise ``NonFiniteError``, per ``train`` (a TrainConfig)."""
    from megalora.umm.run_checkpoint import latest_checkpoint

    if train.nonfinite == "skip" and in_a_row <= train.max_nonfinite_skips:
        message(f"step {step}: non-finite {problem}: step skipped, no update ({in_a_row} in a "
                f"row; train.max_nonfinite_skips={train.max_nonfinite_skips})")
        return
    try:
        last = latest_checkpoint(train.out_dir)
    except ValueError:
        last = None
    why = f"{in_a_row} steps in a row" if train.nonfinite == "skip" else "train.nonfinite=stop"
    raise NonFiniteError(
        f"step {step}: non-finite {problem} ({why}). Nothing from this step was saved; the last "
        f"checkpoint is {last or 'none'}. Lower train.lr (now {train.lr:g}, {lr:.2e} at this "
        "step) or lengthen train.warmup_steps, check the data, or set train.nonfinite=skip to "
        "skip such steps")


def check_adapter_finite(model, step: int) -> None:
    """Refuse (on every rank: a collective) to save an adapter holding inf/nan."""
    from megalora.grads import params_finite

    if not params_finite(model):
        raise NonFiniteError(f"after step {step} the adapter holds inf/nan values (the update "
                             "overflowed); it was not saved. Lower train.lr and resume from the "
                             "last checkpoint")

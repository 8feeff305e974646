"""The trainer's hook protocol: how a training method plugs into ``megalora train``.

The trainer (``megalora.umm.train``) knows this protocol, not the methods. Pareto LoRA
(``megalora.pareto.hook``), HyDRA (``megalora.hydra.hook``) and MARS's probes
(``megalora.mars.probes``) are hooks; ``megalora.umm.methods`` turns a run config into its
method hooks, and ``train(run, hooks=[...])`` takes more. To add a method, subclass
``TrainerHook`` and override what it needs (docs/training-hooks.md has a worked example):

    class FreezeImageHead(TrainerHook):
        name = "freeze_image_head"

        def before_optimizer_step(self, step, session):
            for item in megalora.lora_parameters(session.model):
                if item.factor == "lora_B":
                    megalora.grad_of(item.param)[1].zero_()

One step of the trainer, and where each hook is called (every rank, in list order):

    zero_grad; draw the microbatches
    gradients  = hook.forward_backward(step, session, batches)     # at most one hook; else
                 session.forward_backward(batches) + optimizer.reduce()
    hook.before_optimizer_step(step, session)     # reduced gradients (grad_of); change them
    inf/nan check (train.nonfinite); optimizer.step(lr)
    hook.after_optimizer_step(step, session, scalars)
    progress line (+ hook.progress()); checkpoint (+ hook.state_dict())

Before the first step: ``setup(session)`` once the model, optimizer and data exist; then on a
resume ``load_state_dict(state, step)`` (after the adapter and optimizer are restored); then
``start(session, step)``. After the last step: ``finish(session, completed)``, whose value is
the train result's entry under ``name``.

Rules a hook keeps so that runs stay exact and ranks agree: anything a hook decides that
changes the update must be the same on every rank (derive it from all-reduced values, or
broadcast it); anything it needs to continue exactly after a resume goes in ``state_dict``
(JSON-able: it is written into the checkpoint's state.json); it writes files from rank 0 only.
"""

from __future__ import annotations

from typing import Any, List, Optional


class TrainerHook:
    """A training method's hooks into the trainer; every method is optional."""

    name: str = "hook"
    """Its key in checkpoints and in the train result (unique within a run)."""

    def setup(self, session) -> None:
        """Once, after the model, optimizer and data streams exist, before any resume."""

    def load_state_dict(self, state: Optional[dict], step: int) -> None:
        """On a resume from the checkpoint of ``step``: what ``state_dict`` returned then, or
        None when that checkpoint had nothing for this hook. Raise ValueError (saying what to
        do) for a state this run cannot continue."""

    def start(self, session, step: int) -> None:
        """Once before the first step of this invocation; ``step`` is the last step already
        done (0 for a fresh run)."""

    def forward_backward(self, step: int, session, batches: List[Any]) -> Optional[dict]:
        """Produce this step's gradients instead of the trainer's one pass: the gradients must
        be reduced when it returns (``session.optimizer.reduce()``). Returns the loss
        statistics of the last pipeline stage (None elsewhere), as
        ``session.forward_backward`` does. Only one hook of a run may override this."""
        raise NotImplementedError

    def before_optimizer_step(self, step: int, session) -> None:
        """The gradients are reduced (``megalora.grads.grad_of``); change them in place."""

    def after_optimizer_step(self, step: int, session, scalars: dict) -> None:
        """After the update; ``scalars``: the step's global losses (text, image, loss)."""

    def progress(self) -> str:
        """A few words for the progress line ("" for none)."""
        return ""

    def state_dict(self) -> Optional[dict]:
        """What a resume needs (JSON-able), or None."""
        return None

    def finish(self, session, completed: bool) -> Any:
        """After the last step (``completed``) or a stop for preemption; the value goes into
        the train result under ``name``."""
        return None


def overrides(hook: TrainerHook, method: str) -> bool:
    """Whether ``hook``'s class overrides ``TrainerHook.<method>``."""
    return getattr(type(hook), method) is not getattr(TrainerHook, method)


def gradient_hook(hooks: List[TrainerHook]) -> Optional[TrainerHook]:
    """The hook that produces the gradients, if any; more than one is an error."""
    found = [h for h in hooks if overrides(h, "forward_backward")]
    if len(found) > 1:
        raise ValueError(f"hooks {[h.name for h in found]} each produce the step's gradients "
                         "(forward_backward); a run can use one of them")
    names = [h.name for h in hooks]
    if len(set(names)) != len(names):
        raise ValueError(f"hook names must be unique within a run, got {names}")
    return found[0] if found else None

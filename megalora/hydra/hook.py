"""HyDRA in the trainer: the ``HydraScheduler`` behind the trainer-hook protocol
(``megalora.umm.hooks``).

After every optimizer step the scheduler records the step's per-module gradient norms and the
model's weighted loss, and every ``hydra.every`` steps it may move the ranks (which also resets
those modules' optimizer moments). Its whole state goes into each checkpoint, so a resume
continues the same schedule; at the end of a completed run it writes the final allocation
(``hydra_ranks.yaml``) and its heatmap.
"""

from __future__ import annotations

from typing import Optional

from megalora.umm.hooks import TrainerHook


class HydraHook(TrainerHook):
    """``hydra.enabled: true`` of a run config."""

    name = "hydra"

    def __init__(self, run):
        self.run = run
        self.scheduler = None

    def setup(self, session) -> None:
        from megalora.hydra.scheduler import HydraScheduler

        self.scheduler = HydraScheduler.for_run(self.run, session.model)

    def load_state_dict(self, state: Optional[dict], step: int) -> None:
        if state is None:
            raise ValueError(f"the checkpoint of step {step} was saved without HyDRA "
                             "(hydra.enabled=false): resume it the same way, or start afresh "
                             "with train.resume=false")
        self.scheduler.load_state_dict(state, step)

    def after_optimizer_step(self, step: int, session, scalars: dict) -> None:
        loss = sum(w * scalars[name] for name, w in session.objective_weights.items())
        self.scheduler.after_step(step, session.optimizer, loss)

    def state_dict(self) -> Optional[dict]:
        return self.scheduler.state_dict()

    def finish(self, session, completed: bool) -> Optional[dict]:
        """The final allocation's summary (ranks, parameters, budget, output paths)."""
        if not completed:
            return None
        from megalora.hydra.report import finish

        summary = finish(self.scheduler, self.run, session.log.rank0)
        session.log.message(f"HyDRA: {summary['params']:,} of {self.scheduler.budget:,} budget "
                            f"parameters; ranks in {summary['config']}, {summary['plot']}")
        return summary

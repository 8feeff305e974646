"""Pareto LoRA in the trainer: the ``ParetoEngine`` behind the trainer-hook protocol
(``megalora.umm.hooks``).

It produces each step's gradients (``forward_backward``: the exact per-objective passes and
their combination, or the cheap mode's single weighted pass), logs each exact step's per-group
statistics (TensorBoard ``pareto/<group>/...``, ``out_dir/pareto.jsonl``, the progress line),
and checkpoints the cheap mode's multipliers so a resume continues exactly.
"""

from __future__ import annotations

from typing import List, Optional

from megalora.umm.hooks import TrainerHook


class ParetoHook(TrainerHook):
    """``pareto.mode: exact | cheap`` of a run config."""

    name = "pareto"

    def __init__(self, run):
        self.run = run
        self.engine = None
        self.history: List[dict] = []

    def setup(self, session) -> None:
        from megalora.pareto.engine import ParetoEngine

        self.engine = ParetoEngine(self.run.pareto, session.model, self.run.model.num_layers)

    def load_state_dict(self, state: Optional[dict], step: int) -> None:
        if state is None:
            return  # saved without Pareto LoRA: start with neutral multipliers
        saved = state["multipliers"]
        if len(saved) != len(self.engine.objectives):
            raise ValueError(f"the checkpoint of step {step} was saved with {len(saved)} Pareto "
                             f"objectives, this run has pareto.objectives="
                             f"{self.engine.objectives}; keep the objectives of the run you "
                             "resume, or start afresh with train.resume=false")
        self.engine.multipliers = list(saved)
        if self.engine.gradnorm is not None and state.get("gradnorm") is not None:
            self.engine.gradnorm.load_state_dict(state["gradnorm"])

    def start(self, session, step: int) -> None:
        from megalora.pareto.engine import trim_history

        if session.log.rank0:  # a resumed or restarted run must not append to a stale history
            trim_history(self.run.train.out_dir, step)

    def forward_backward(self, step: int, session, batches) -> Optional[dict]:
        from megalora.umm.model import objective_weights

        objectives = self.engine.objectives
        model_weights = list(objective_weights(self.run, objectives).values())

        def run_pass(pass_weights):  # one weight per objective, in the engine's order
            return session.forward_backward(batches, dict(zip(objectives, pass_weights)))

        from megalora.umm.session import global_scalars

        stats, reduced = self.engine.gradients(
            step, model_weights, run_pass, session.optimizer, session.model,
            global_losses=lambda found: global_scalars(found, session.device))
        if not reduced:
            session.optimizer.reduce()
        return stats

    def after_optimizer_step(self, step: int, session, scalars: dict) -> None:
        last = self.engine.last
        if last is None or last["step"] != step:
            return  # a cheap step, or an exact one that found inf/nan
        self.history.append(last)
        if self.run.pareto.history and session.log.rank0:
            from megalora.pareto.engine import write_history
            write_history(self.run.train.out_dir, last)
        for g, group in enumerate(last["groups"]):
            if max(last["norms"][g]) == 0:
                continue
            values = {f"norm_{o}": last["norms"][g][k] for k, o in enumerate(last["objectives"])}
            values.update({f"weight_{o}": last["weights"][g][k]
                           for k, o in enumerate(last["objectives"])})
            values.update(cos=last["cos"][g], ratio=last["ratio"][g])
            session.log.scalars(f"pareto/{group}", values, step)

    def progress(self) -> str:
        return self.engine.summary()

    def state_dict(self) -> Optional[dict]:
        gradnorm = self.engine.gradnorm
        return {"multipliers": list(self.engine.multipliers),
                "gradnorm": None if gradnorm is None else gradnorm.state_dict()}

    def finish(self, session, completed: bool) -> List[dict]:
        """Every exact step's statistics of this invocation."""
        return self.history

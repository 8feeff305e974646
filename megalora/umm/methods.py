"""The training methods a run config switches on, as trainer hooks (``megalora.umm.hooks``):
``hydra.enabled`` -> ``HydraHook``, ``pareto.mode: exact|cheap`` -> ``ParetoHook``. The trainer
asks this module for a run's hooks; it does not know the methods. A new method adds its
config section (``megalora.umm.config``) and one line here."""

from __future__ import annotations

from typing import List

from megalora.umm.config import RunConfig
from megalora.umm.hooks import TrainerHook


def method_hooks(run: RunConfig) -> List[TrainerHook]:
    """The hooks of the methods ``run`` enables, in the order the trainer calls them."""
    hooks: List[TrainerHook] = []
    if run.hydra.enabled:
        from megalora.hydra.hook import HydraHook
        hooks.append(HydraHook(run))
    if run.pareto.enabled:
        from megalora.pareto.hook import ParetoHook
        hooks.append(ParetoHook(run))
    return hooks

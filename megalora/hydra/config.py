"""The ``hydra`` section of a run config (HyDRA rank scheduling; see ``scheduler``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class HydraConfig:
    """The ``hydra`` section of a run config."""

    enabled: bool = False
    budget_rank: int = 0
    """The budget is the adapter parameters of every module at this uniform rank (0: half of
    lora.rank). Adapters are built at lora.rank, the most a module can get."""
    every: int = 10
    """Steps between decisions."""
    freeze: float = 0.7
    """No changes after this fraction of train.steps."""
    r_min: int = 1
    """Smallest rank of any module."""
    candidates: int = 32
    """Allocations scored per decision."""
    explore: int = 3
    """Decisions that try global draws before the regressor decides."""
    margin: float = 0.5
    """Predicted gain (in standard deviations of the observed outcomes) a change needs over
    keeping the current allocation."""
    max_change: int = 1
    """Most a module's rank moves per decision (0: no limit); each lost rank is truncated by
    SVD and resets that module's optimizer moments, so large jumps cost training progress."""
    step_size: float = 0.15
    """Standard deviation of the knob perturbations."""
    seed: int = 0

    def validate(self, lora_rank: int) -> None:
        b = self.budget_rank or max(1, lora_rank // 2)
        if not 1 <= b <= lora_rank:
            raise ValueError(f"hydra.budget_rank={self.budget_rank} must be in [1, lora.rank="
                             f"{lora_rank}] (adapters are built at lora.rank)")
        if not 1 <= self.r_min <= b:
            raise ValueError(f"hydra.r_min={self.r_min} must be in [1, budget rank {b}]")
        if self.every < 1 or self.candidates < 3 or min(self.explore, self.margin,
                                                          self.max_change) < 0:
            raise ValueError("hydra.every must be >= 1, hydra.candidates >= 3, hydra.explore, "
                             "hydra.margin and hydra.max_change >= 0")
        if not 0 < self.freeze <= 1 or self.step_size <= 0:
            raise ValueError("hydra.freeze must be in (0, 1] and hydra.step_size > 0")

    def budget_rank_for(self, lora_rank: int) -> int:
        return self.budget_rank or max(1, lora_rank // 2)

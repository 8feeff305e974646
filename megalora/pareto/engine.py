"""Per-objective LoRA gradients and their Pareto integration inside a training step.

``exact`` mode: for each objective k (text CE and image regression, or text split into
``lm`` and ``caption``: see ``OBJECTIVE_SETS``) one forward + backward through
the whole model and pipeline with loss w_k L_k (w = the model's objective weights), the gradients
reduced as usual (data parallel, sequence-parallel partial sums) and copied to buffer k (memory:
K copies of the adapter gradients). Dropout counters are rewound between the passes so every
objective sees the same masks. Then per group: the distributed Gram matrix, the rule's weights
(``megalora.pareto.solver``) and the combination written back into the gradients the optimizer
reads (Megatron's ``main_grad`` or ``.grad``) by the C++ extension. With the ``sum`` rule this
reproduces vanilla LoRA exactly (K times the compute).

``cheap`` mode: the exact step every ``every`` steps; in between one pass whose objective
weights are the model's multiplied by ``multipliers``, the weights the last exact step found
for the whole model (the rule applied to the sum of the groups' Gram matrices), i.e. the cost
of vanilla LoRA.

The trainer drives this through ``megalora.pareto.hook.ParetoHook`` (the trainer-hook
protocol); the engine itself knows nothing of the trainer.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from megalora import reductions
from megalora.atomic import atomic_write_bytes
from megalora.pareto import groups as grouping
from megalora.pareto.gradnorm import GradNormWeights
from megalora.pareto.solver import RULES, integrate, integrate_one

OBJECTIVE_SETS = ({"text", "image"}, {"lm", "caption", "image"})
"""The allowed objective lists (any order): each partitions the model's loss, so the ``sum``
rule is vanilla LoRA. ``lm`` is text with no image before it in its sequence, ``caption`` the
text after an image (image-conditioned); both use the text loss weight."""


@dataclass
class ParetoConfig:
    """The ``pareto`` section of a run config."""

    mode: str = "off"
    """``off`` (vanilla LoRA), ``exact`` (per-objective gradients every step) or ``cheap``
    (exact every ``every`` steps, the weights reused as objective-weight multipliers in
    between)."""
    rule: str = "pareto"
    """``pareto`` (MGDA on conflict, rescale on imbalance, else sum), or the baselines ``sum``,
    ``mgda``, ``pcgrad``, ``fixed``, ``balance`` (every group rescaled to equal norms every
    step) and ``gradnorm`` (learned whole-model weights, Chen et al. 2018)."""
    groups: str = "layer"
    """``model``, ``layer``, ``layer_group:N`` or ``module`` (see megalora.pareto.groups)."""
    tau: float = 10.0
    """Norm ratio above which non-conflicting gradients are rescaled to equal strength."""
    restore: bool = True
    """Scale a combined direction up to the plain sum's norm when it is shorter."""
    conflict: float = 0.0
    """Rule ``pareto``: the cosine below which two objectives conflict (MGDA's combination).
    The paper's test is 0; a negative value ignores cosines that are sampling noise (on
    EmojiCap the per-layer cosine lies within +-0.05 and its sign flips step to step,
    docs/pareto-emojicap.md)."""
    every: int = 10
    """Cheap mode: steps between exact weight computations."""
    objectives: List[str] = dataclasses.field(default_factory=lambda: ["text", "image"])
    """The objectives whose gradients are combined: ``[text, image]`` or
    ``[lm, caption, image]`` (text split by whether an image precedes it)."""
    fixed_weights: Optional[List[float]] = None
    """Rule ``fixed``: one weight per objective, in the order of ``objectives``."""
    history: bool = True
    """Write per-group statistics to out_dir/pareto.jsonl (for ``megalora pareto-plot``)."""
    gradnorm_alpha: float = 1.5
    """Rule ``gradnorm``: the restoring force's exponent (GradNorm's alpha; LibMTL's 1.5)."""
    gradnorm_lr: float = 0.025
    """Rule ``gradnorm``: Adam's learning rate for the weights' logits."""

    def __post_init__(self) -> None:
        if self.mode is False:  # YAML 1.1 reads a bare `off` as false
            self.mode = "off"
        if self.mode not in ("off", "exact", "cheap"):
            raise ValueError(f"pareto.mode must be off, exact or cheap, got {self.mode!r}")
        if self.rule not in RULES:
            raise ValueError(f"pareto.rule must be one of {RULES}, got {self.rule!r}")
        if not self.tau >= 1.0:
            raise ValueError(f"pareto.tau must be >= 1 (a norm ratio), got {self.tau}")
        if not -1.0 <= self.conflict <= 0.0:
            raise ValueError(f"pareto.conflict must be a cosine in [-1, 0], got {self.conflict}")
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"pareto.every must be a positive int, got {self.every!r}")
        self.objectives = list(self.objectives)
        if (len(set(self.objectives)) != len(self.objectives)
                or set(self.objectives) not in OBJECTIVE_SETS):
            raise ValueError(f"pareto.objectives must be [text, image] or [lm, caption, image] "
                             f"(any order), got {self.objectives}")
        if self.rule == "fixed" and (self.fixed_weights is None
                                     or len(self.fixed_weights) != len(self.objectives)):
            raise ValueError(f"pareto.rule=fixed needs pareto.fixed_weights with "
                             f"{len(self.objectives)} numbers ({', '.join(self.objectives)})")
        if not (self.gradnorm_alpha >= 0 and self.gradnorm_lr > 0):
            raise ValueError(f"pareto.gradnorm_alpha must be >= 0 and pareto.gradnorm_lr > 0, "
                             f"got {self.gradnorm_alpha} and {self.gradnorm_lr}")
        grouping.group_names(self.groups, 10 ** 6)  # the spelling; layer counts checked later

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _grad_tensor(param: torch.nn.Parameter) -> torch.Tensor:
    main = getattr(param, "main_grad", None)
    if main is not None:
        return main
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    return param.grad


class ParetoEngine:
    """Buffers, Gram matrices and weights for one model (all chunks of this rank)."""

    def __init__(self, cfg: ParetoConfig, model, num_layers: int):
        from megatron.core import parallel_state as ps

        from megalora.grads import lora_parameters

        self.cfg = cfg
        self.items = lora_parameters(model)
        self.names = grouping.group_names(cfg.groups, num_layers)
        self.group_ids = [grouping.group_of(it.name, cfg.groups, num_layers)
                          for it in self.items]
        tp_rank = ps.get_tensor_model_parallel_rank() if ps.is_initialized() else 0
        self.counted = [it.tp_sharded or tp_rank == 0 for it in self.items]
        self.mp_group = ps.get_model_parallel_group() if ps.is_initialized() else None
        self.objectives = list(cfg.objectives)
        self.buffers = [[torch.zeros(it.param.shape, dtype=torch.float32,
                                     device=it.param.device) for it in self.items]
                        for _ in self.objectives]
        self.multipliers = [1.0] * len(self.objectives)
        """Cheap mode: what multiplies each objective's model weight between exact steps."""
        self.gradnorm = (GradNormWeights(len(self.objectives), cfg.gradnorm_alpha,
                                         cfg.gradnorm_lr) if cfg.rule == "gradnorm" else None)
        self.last: Optional[dict] = None

    def exact_due(self, step: int) -> bool:
        """Exact mode: every step; cheap mode: steps 1, 1 + every, ..."""
        return self.cfg.mode == "exact" or (step - 1) % self.cfg.every == 0

    def gradients(self, step: int, model_weights: Sequence[float], run_pass, optimizer, model,
                  global_losses=None):
        """One step's gradients. ``run_pass(weights)`` runs forward + backward of all
        microbatches and returns the last stage's loss stats (None elsewhere); ``optimizer``
        has ``zero_grad()`` and ``reduce()``; ``global_losses(stats)`` (rule ``gradnorm``,
        called on every rank) returns the objectives' losses, the same on every rank.
        Returns (stats, whether reduced)."""
        from megalora.runtime import runtimes

        if not self.exact_due(step):
            return run_pass([b * w for b, w in zip(model_weights, self.multipliers)]), False
        counts = [rt.forward_count for rt in runtimes(model)]
        stats = None
        for k in range(len(self.objectives)):
            for rt, count in zip(runtimes(model), counts):
                rt.forward_count = count  # the same dropout masks for every objective
            optimizer.zero_grad()
            got = run_pass(exact_pass_weights(model_weights, k))
            stats = stats or got
            optimizer.reduce()
            self.capture(k)
        losses = None
        if self.gradnorm is not None:
            found = global_losses(stats)
            losses = [w * found[o] for w, o in zip(model_weights, self.objectives)]
        if stats is not None:  # the pass's "loss" had the other objectives weighted 0
            stats["loss"] = sum(w * stats[o] for w, o in zip(model_weights, self.objectives))
        self.combine(step, losses)
        return stats, True

    def grads(self) -> List[torch.Tensor]:
        """The gradient tensors the optimizer will read."""
        return [_grad_tensor(it.param) for it in self.items]

    def capture(self, k: int) -> None:
        """Copy the current (reduced) gradients into objective ``k``'s buffers."""
        for buf, grad in zip(self.buffers[k], self.grads()):
            buf.copy_(grad)

    def combine(self, step: int, losses: Optional[Sequence[float]] = None) -> dict:
        """Gram matrices, weights per group, combined gradients written back; returns stats.
        ``losses``: the objectives' weighted losses (rule ``gradnorm`` only)."""
        gram = grouping.distributed_gram(self.buffers, self.counted, self.group_ids,
                                         len(self.names), self.mp_group)
        if not torch.isfinite(gram).all():
            # an objective's gradient holds inf/nan (the Gram is the same on every rank): pass
            # it on to the gradients, so that the trainer's finiteness check stops or skips
            # this step instead of the solver failing on one group
            for grad in self.grads():
                grad.fill_(float("nan"))
            self.last = None
            return None
        orders = None
        if self.cfg.rule == "pcgrad":  # PCGrad's shuffles, the same on every rank
            gen = torch.Generator().manual_seed(step)
            k = len(self.objectives)
            orders = [[torch.randperm(k, generator=gen).tolist() for _ in range(k)]
                      for _ in self.names]
        if self.gradnorm is not None:  # one learned weight per objective, for every group
            norms = gram.sum(0).diagonal().clamp_min(0).sqrt()
            whole = self.gradnorm.step(norms.tolist(), losses)
            weights, fired = whole.expand(len(self.names), -1), ["gradnorm"] * len(self.names)
        else:
            weights, fired = integrate(gram, self.cfg.rule, self.cfg.tau, self.cfg.restore,
                                       self.cfg.fixed_weights, orders, conflict=self.cfg.conflict)
            whole, _ = integrate_one(gram.sum(0), self.cfg.rule, self.cfg.tau, self.cfg.restore,
                                     self.cfg.fixed_weights, conflict=self.cfg.conflict)
        reductions.combine(self.buffers, weights.to(torch.float32), self.group_ids,
                           out=self.grads())
        self.multipliers = whole.tolist()
        self.last = self._stats(step, gram, weights, fired)
        return self.last

    def _stats(self, step, gram, weights, fired) -> dict:
        """Norms per objective; for two objectives their cosine and norm ratio, for more the
        smallest pairwise cosine and the largest / smallest norm."""
        norms = gram.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
        cos = gram / (norms.unsqueeze(-1) * norms.unsqueeze(-2)).clamp_min(1e-30)
        k = len(self.objectives)
        off = ~torch.eye(k, dtype=torch.bool)
        cos_min = cos[:, off].min(dim=1).values if k > 1 else torch.ones(len(self.names))
        ratio = norms.max(dim=1).values / norms.min(dim=1).values.clamp_min(1e-30)
        if k == 2:  # |g_0| / |g_1|: also says which of the two is stronger
            ratio = norms[:, 0] / norms[:, 1].clamp_min(1e-30)
        return {"step": step, "objectives": self.objectives, "groups": self.names,
                "gram": gram.tolist(), "norms": norms.tolist(), "cos": cos_min.tolist(),
                "ratio": ratio.tolist(), "weights": weights.tolist(), "fired": fired,
                "multipliers": list(self.multipliers)}

    def summary(self) -> str:
        """For the progress line: how often each rule fired over the groups with gradients."""
        if self.last is None:
            return ""
        live = [f for f, n in zip(self.last["fired"], self.last["norms"]) if max(n) > 0]
        counts = {f: live.count(f) for f in dict.fromkeys(live)}
        return " ".join(f"{f} {c}/{len(live)}" for f, c in counts.items())


def write_history(out_dir: str, stats: dict) -> None:
    """Append one step's statistics to out_dir/pareto.jsonl (rank 0 calls it)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "pareto.jsonl"), "a") as fh:
        fh.write(json.dumps(stats) + "\n")


def trim_history(out_dir: str, up_to_step: int) -> None:
    """Drop the rows after ``up_to_step`` (all of them for a fresh start) so that a resumed or
    restarted run does not append to a stale history (rank 0 calls it)."""
    path = os.path.join(out_dir, "pareto.jsonl")
    if not os.path.isfile(path):
        return
    with open(path) as fh:
        keep = [line for line in fh if line.strip() and json.loads(line)["step"] <= up_to_step]
    atomic_write_bytes(path, "".join(keep).encode())


def read_history(path: str) -> List[Dict]:
    if os.path.isdir(path):
        path = os.path.join(path, "pareto.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist: run with pareto.mode=exact|cheap and "
                                "pareto.history=true")
    with open(path) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    if not rows:
        raise ValueError(f"{path!r} is empty")
    return rows


def exact_pass_weights(model_weights: Sequence[float], k: int) -> List[float]:
    """Objective weights of objective ``k``'s own pass: its model weight, zero for the
    others."""
    return [w if i == k else 0.0 for i, w in enumerate(model_weights)]

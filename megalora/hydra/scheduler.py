"""HyDRA's dynamic rank schedule inside the trainer (a reconstruction: research notes §2.2).

Every ``hydra.every`` steps (until ``hydra.freeze`` of the run) the scheduler

1. closes the window: the relative fall of the mean training loss over it is the observed
   outcome of the allocation that ran in it;
2. scores candidate allocations (the current knobs and Gaussian perturbations of them: a
   trust region, see ``allocation.Knobs``) with a small regressor (scikit-learn: standardised
   features, ridge regression) trained on every (features, outcome) pair so far. Features: how
   the allocation's parameter shares (attention vs MLP, deep vs shallow layers, QKV vs output
   projection, fc1 vs fc2) differ from the measured per-rank gradient-norm shares of the window,
   their squares, the fraction of training done and the last outcome. The first
   ``hydra.explore`` decisions explore (perturbations) to give the model data;
3. applies the best (switching only if its predicted outcome beats keeping the current one by
   ``hydra.margin`` standard deviations of the outcomes), moving each module at most
   ``hydra.max_change`` ranks toward it: modules that lose rank are truncated by SVD
   (``masking.truncate_``, optimizer moments of that module reset), modules that gain rank
   switch on ranks whose B is zero (no change to the output). Measured on the tiny UMM: jumping
   straight to each chosen allocation (no limit, global candidates) cost 47 % of held-out loss
   against uniform ranks (3 seeds, 150 steps).

Gradient norms are summed over TP where a factor is sharded and over pipeline stages into one
vector of every module (all-reduced each step, so every rank holds the same window and a
checkpoint resumes it exactly); the chosen knobs are broadcast from rank 0, the budget is a
global count, and after each change the effective parameters (all-reduced over the pipeline)
are checked against it. One JSON line per decision goes to ``out_dir/hydra.jsonl``.
"""

from __future__ import annotations

import json
import os
import random
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megalora.hydra import masking
from megalora.hydra.config import HydraConfig
from megalora.hydra.allocation import ATTENTION, Knobs, Module, position, ranks_for, \
    step_toward, uniform_budget


def _gather_stages(obj, pp_group) -> list:
    """``obj`` of every pipeline stage (a list of one outside pipeline parallelism)."""
    if pp_group is None or not dist.is_initialized() or dist.get_world_size(pp_group) == 1:
        return [obj]
    parts = [None] * dist.get_world_size(pp_group)
    dist.all_gather_object(parts, obj, group=pp_group)
    return parts


def _gather_modules(local: Dict[str, masking.LoRAMixin], pp_group) -> List[Module]:
    mine = [Module(n, masking.rank_cost(m), masking.max_rank(m)) for n, m in local.items()]
    return sorted((Module(*x) for part in _gather_stages(mine, pp_group) for x in part),
                  key=lambda m: m.name)


def shares(values: Dict[str, float]) -> List[float]:
    """attention, deep-half, qkv-within-attention, fc1-within-MLP shares of ``values``."""
    depth: Dict[str, int] = {}
    for n in values:
        stack, layer, _ = position(n)
        depth[stack] = max(depth.get(stack, 0), layer + 1)
    sums = {"attn": 0.0, "mlp": 0.0, "deep": 0.0, "qkv": 0.0, "fc1": 0.0}
    for n, v in values.items():
        stack, layer, kind = position(n)
        sums["attn" if kind in ATTENTION else "mlp"] += v
        sums["deep"] += v if 2 * layer >= depth[stack] else 0.0
        sums["qkv"] += v if kind == "linear_qkv" else 0.0
        sums["fc1"] += v if kind == "linear_fc1" else 0.0
    total = max(sums["attn"] + sums["mlp"], 1e-30)
    return [sums["attn"] / total, sums["deep"] / total,
            sums["qkv"] / max(sums["attn"], 1e-30), sums["fc1"] / max(sums["mlp"], 1e-30)]


class HydraScheduler:
    def __init__(self, cfg: HydraConfig, model, total_steps: int, out_dir: str,
                 tp_group=None, pp_group=None):
        self.cfg, self.total = cfg, total_steps
        self.model, self.out_dir = model, out_dir
        self.tp_group, self.pp_group = tp_group, pp_group
        self.local = dict(masking.adapted_modules(model))
        # collectives run on the adapters' device (NCCL takes CUDA tensors only)
        self.device = next(iter(self.local.values())).lora_A.device if self.local \
            else torch.device("cpu")
        self.modules = _gather_modules(self.local, pp_group)
        self.index = {m.name: i for i, m in enumerate(self.modules)}
        lora_rank = max(m.max_rank for m in self.modules)
        self.budget = uniform_budget(self.modules, cfg.budget_rank_for(lora_rank))
        self.knobs = Knobs()
        self.ranks = ranks_for(self.knobs, self.modules, self.budget, cfg.r_min)
        self.initial_ranks = dict(self.ranks)
        for name, m in self.local.items():
            masking.start_at(m, self.ranks[name])
        self.rng = random.Random(cfg.seed)
        self.observations: List[List] = []  # [features, outcome]
        self.pending: Optional[List[float]] = None  # features of the window now running
        self.window_loss: List[float] = []
        self.window_sig = [0.0] * len(self.modules)
        self.prev_loss: Optional[float] = None
        self.last_outcome = 0.0
        self.decisions = 0

    @classmethod
    def for_run(cls, run, model) -> "HydraScheduler":
        """The trainer's scheduler for ``run`` (a RunConfig) on this rank's ``model``."""
        import importlib.util

        from megatron.core import parallel_state as ps

        missing = [m for m in ("sklearn", "matplotlib") if importlib.util.find_spec(m) is None]
        if missing:
            raise ImportError(f"hydra.enabled=true needs {' and '.join(missing)}: pip install "
                              "'megalora[hydra]' (scikit-learn, matplotlib), or set "
                              "hydra.enabled=false")
        return cls(run.hydra, model, run.train.steps, run.train.out_dir,
                   tp_group=ps.get_tensor_model_parallel_group(),
                   pp_group=ps.get_pipeline_model_parallel_group())

    def scales(self) -> Dict[str, float]:
        """Every module's LoRA scale (gathered over pipeline stages)."""
        mine = {n: float(m.lora_settings.scale) for n, m in self.local.items()}
        return {k: v for part in _gather_stages(mine, self.pp_group) for k, v in part.items()}

    # ------------------------------------------------------------------ signals
    def _grad_sq(self) -> torch.Tensor:
        """Squared gradient norm of every module, over TP and pipeline stages (float64)."""
        from megalora.grads import grad_of, lora_parameters

        # one device->host copy per step: the squared norms stay on the device until stacked
        rows, sharded, norms = [], [], []
        for item in lora_parameters(self.model):
            g = grad_of(item.param)
            if item.factor in ("lora_A", "lora_B") and g is not None:
                rows.append(self.index[item.module])
                sharded.append(item.tp_sharded)
                norms.append(g.detach().double().pow(2).sum())
        vec = torch.zeros(2, len(self.modules), dtype=torch.float64, device=self.device)
        if norms:
            vec.index_put_((torch.tensor(sharded, device=self.device).long(),
                            torch.tensor(rows, device=self.device)), torch.stack(norms),
                           accumulate=True)
        if self.tp_group is not None and dist.get_world_size(self.tp_group) > 1:
            dist.all_reduce(vec[1], group=self.tp_group)  # sum the shards; replicated: once
        total = vec[0] + vec[1]
        if self.pp_group is not None and dist.get_world_size(self.pp_group) > 1:
            dist.all_reduce(total, group=self.pp_group)
        return total.cpu()

    def after_step(self, step: int, optimizer, loss: float) -> Optional[dict]:
        """Called on every rank after each optimizer step; returns the decision, if any."""
        sig = self._grad_sq()
        self.window_sig = [a + float(b) for a, b in zip(self.window_sig, sig)]
        self.window_loss.append(float(loss))
        if step % self.cfg.every or step > self.cfg.freeze * self.total or step >= self.total:
            return None
        return self._decide(step, optimizer)

    # ------------------------------------------------------------------ decisions
    def _features(self, ranks: Dict[str, int], importance: Dict[str, float],
                  t: float) -> List[float]:
        cost = {m.name: m.cost for m in self.modules}
        alloc = shares({n: k * cost[n] for n, k in ranks.items()})
        diff = [a - g for a, g in zip(alloc, shares(importance))]
        return diff + [d * d for d in diff] + [t, self.last_outcome]

    def _move(self, knobs: Knobs) -> Dict[str, int]:
        """The ranks a decision for ``knobs`` gives: their allocation, reached gradually."""
        target = ranks_for(knobs, self.modules, self.budget, self.cfg.r_min)
        return step_toward(self.ranks, target, self.modules, self.budget, self.cfg.max_change)

    def _candidates(self) -> List[Knobs]:
        """The current knobs, the neutral (uniform) ones, and perturbations of the current ones
        (a trust region: with a handful of observations the regressor extrapolates badly far
        from where it has data)."""
        out = [self.knobs, Knobs()]  # the uniform start stays an option: moves can be undone
        for _ in range(self.cfg.candidates - 2):
            v = [x + self.rng.gauss(0, self.cfg.step_size) for x in self.knobs.vector()]
            out.append(Knobs.clipped(*v))
        return out

    def _choose(self, cands: List[Knobs], importance, t: float):
        if self.decisions < self.cfg.explore or len(self.observations) < 2:
            return cands[2 + self.decisions % (len(cands) - 2)] if len(cands) > 2 \
                else cands[-1], "explore", None
        from sklearn.linear_model import Ridge
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        x = [o[0] for o in self.observations]
        y = [o[1] for o in self.observations]
        model = make_pipeline(StandardScaler(), Ridge(alpha=1.0)).fit(x, y)
        pred = model.predict([self._features(self._move(c), importance, t) for c in cands])
        best = int(pred.argmax())
        spread = float(torch.tensor(y, dtype=torch.float64).std()) if len(y) > 1 else 0.0
        if best != 0 and pred[best] - pred[0] <= self.cfg.margin * spread:
            best = 0
        return cands[best], ("model" if best else "keep"), float(pred[best])

    def _decide(self, step: int, optimizer) -> dict:
        loss = sum(self.window_loss) / len(self.window_loss)
        if self.pending is not None and self.prev_loss is not None:
            self.last_outcome = (self.prev_loss - loss) / max(abs(self.prev_loss), 1e-12)
            self.observations.append([self.pending, self.last_outcome])
        importance = {m.name: self.window_sig[i] / max(self.ranks[m.name], 1)
                      for i, m in enumerate(self.modules)}
        t = step / self.total
        knobs, why, predicted = self._choose(self._candidates(), importance, t)
        self.knobs = self._agree(knobs)
        ranks = self._move(self.knobs)
        self._apply(ranks, optimizer)
        self.pending = self._features(ranks, importance, t)
        self.prev_loss, self.window_loss = loss, []
        self.window_sig = [0.0] * len(self.modules)
        self.decisions += 1
        params = masking.effective_parameters(self.model, self.pp_group)
        if params > self.budget:
            raise RuntimeError(f"HyDRA: {params:,} effective adapter parameters exceed the "
                               f"budget of {self.budget:,} (a bug: please report it)")
        record = {"step": step, "knobs": self.knobs.vector(), "why": why,
                  "predicted": predicted, "loss": loss, "params": params,
                  "budget": self.budget, "ranks": dict(self.ranks)}
        if not dist.is_initialized() or dist.get_rank() == 0:
            os.makedirs(self.out_dir, exist_ok=True)
            with open(os.path.join(self.out_dir, "hydra.jsonl"), "a") as fh:
                fh.write(json.dumps(record) + "\n")
        return record

    def _agree(self, knobs: Knobs) -> Knobs:
        """Rank 0's knobs everywhere (every rank computes the same; this makes it certain)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return knobs
        v = torch.tensor(knobs.vector(), dtype=torch.float64, device=self.device)
        dist.broadcast(v, src=0)
        return Knobs(*[float(x) for x in v])

    def _apply(self, ranks: Dict[str, int], optimizer) -> None:
        for name, m in self.local.items():
            old, new = self.ranks[name], ranks[name]
            if new < old:
                masking.truncate_(m, new, seed=self.cfg.seed + self.decisions)
                if optimizer is not None:
                    masking.reset_optimizer(optimizer, [m.lora_A, m.lora_B])
            elif new > old:
                masking.set_rank(m, new)
        self.ranks = ranks

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {"knobs": self.knobs.vector(), "ranks": self.ranks,
                "observations": self.observations, "pending": self.pending,
                "window_loss": self.window_loss, "window_sig": self.window_sig,
                "prev_loss": self.prev_loss, "last_outcome": self.last_outcome,
                "decisions": self.decisions, "rng": repr(self.rng.getstate()),
                "budget": self.budget}

    def load_state_dict(self, state: dict, step: int) -> None:
        """Resume at ``step``: masks from the checkpoint's allocation, the log trimmed to it."""
        import ast

        if state["budget"] != self.budget:
            raise ValueError(f"the checkpoint's HyDRA budget is {state['budget']:,} parameters, "
                             f"this run's {self.budget:,}: keep hydra.budget_rank and lora.rank "
                             "of the run you resume")
        self.knobs = Knobs(*state["knobs"])
        for name, m in self.local.items():  # the weights are the checkpoint's already
            masking.set_rank(m, state["ranks"][name])
        self.ranks = dict(state["ranks"])
        for key in ("observations", "pending", "window_loss", "window_sig", "prev_loss",
                    "last_outcome", "decisions"):
            setattr(self, key, state[key])
        self.rng.setstate(ast.literal_eval(state["rng"]))
        path = os.path.join(self.out_dir, "hydra.jsonl")
        if (not dist.is_initialized() or dist.get_rank() == 0) and os.path.isfile(path):
            with open(path) as fh:
                kept = [line for line in fh if line.strip() and json.loads(line)["step"] <= step]
            from megalora.atomic import atomic_write_bytes
            atomic_write_bytes(path, "".join(kept).encode())

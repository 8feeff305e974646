"""GradNorm (Chen et al., ICML 2018) as a Pareto LoRA baseline: objective weights learned so
that each weighted objective's gradient norm tracks its relative training rate.

As LibMTL implements it (research notes, pareto_asym_emu2.md §2.6): weights w = K softmax(s);
G_k = w_k |g_k|; the relative inverse training rate r_k = (L_k / L_k(0)) / mean_j (L_j /
L_j(0)); the target mean(G) r_k^alpha is held constant and s takes one Adam step on
sum_k |G_k - target_k|. The update uses the weights from before that step (detached), the
same on every rank (the losses and norms it sees are global). Here |g_k| is the norm of
objective k's gradient over every adapter parameter (the Gram matrices' diagonals summed over
groups) and L_k(0) is the loss at the first step GradNorm sees (LibMTL: the first epoch's mean).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


class GradNormWeights:
    """The learned weights of K objectives. Adam (betas 0.9, 0.999) is written out so that
    ``state_dict`` is plain JSON (the trainer's state.json) and a resume is exact."""

    BETAS, EPS = (0.9, 0.999), 1e-8

    def __init__(self, k: int, alpha: float, lr: float):
        self.k, self.alpha, self.lr = k, alpha, lr
        self.logits = torch.zeros(k, dtype=torch.float64)
        self.moments = [torch.zeros(k, dtype=torch.float64) for _ in range(2)]
        self.steps = 0
        self.initial: Optional[torch.Tensor] = None

    def weights(self) -> torch.Tensor:
        """The current weights [K] (sum K)."""
        return self.k * torch.softmax(self.logits, 0)

    def step(self, norms: Sequence[float], losses: Sequence[float]) -> torch.Tensor:
        """The weights for this step's gradients (before learning from them), then one Adam
        step of GradNorm's loss on ``norms`` (|g_k|) and ``losses`` (L_k)."""
        norms = torch.as_tensor(norms, dtype=torch.float64)
        losses = torch.as_tensor(losses, dtype=torch.float64)
        if not (torch.isfinite(norms).all() and torch.isfinite(losses).all()):
            raise ValueError(f"GradNorm needs finite norms and losses, got {norms.tolist()}, "
                             f"{losses.tolist()}")
        used = self.weights()
        if self.initial is None:
            self.initial = losses.clamp_min(1e-12)
        logits = self.logits.clone().requires_grad_(True)
        g = self.k * torch.softmax(logits, 0) * norms
        rate = losses / self.initial
        target = (g.mean() * (rate / rate.mean()) ** self.alpha).detach()
        (grad,) = torch.autograd.grad((g - target).abs().sum(), logits)
        self.steps += 1
        (b1, b2), (m, v) = self.BETAS, self.moments
        m.mul_(b1).add_(grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        m_hat, v_hat = m / (1 - b1 ** self.steps), v / (1 - b2 ** self.steps)
        self.logits -= self.lr * m_hat / (v_hat.sqrt() + self.EPS)
        return used

    def state_dict(self) -> dict:
        """Plain lists and numbers (JSON keeps float64 exactly)."""
        return {"logits": self.logits.tolist(), "moments": [m.tolist() for m in self.moments],
                "steps": self.steps,
                "initial": None if self.initial is None else self.initial.tolist()}

    def load_state_dict(self, state: dict) -> None:
        t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
        self.logits = t(state["logits"])
        self.moments = [t(m) for m in state["moments"]]
        self.steps = int(state["steps"])
        self.initial = None if state["initial"] is None else t(state["initial"])

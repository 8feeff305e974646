"""Per-objective gradient reductions: Gram matrices and weighted combinations, per group.

With K objectives (text loss, image loss, ...) each holding gradients for the same P tensors
(thousands of LoRA factors), Pareto/MGDA-style methods need

    gram(grads, groups)  -> G [num_groups, K, K] (fp32),  G[g,i,j] = sum_{p in g} <g_i^p, g_j^p>
    combine(grads, weights, groups, out) -> out[p] = sum_k weights[group(p), k] * g_k^p

Both run as one pass over all tensors in the compiled extension ``megalora._C`` (CPU always,
CUDA when built with it): fp32 accumulation, 64-bit offsets, a fixed reduction order (the same
bits every run, any thread count). ``backend="torch"`` (and ``auto`` when the extension is not
built) uses a pure-PyTorch fallback: ``torch._foreach_*`` over the tensor lists plus a loop over
the K(K+1)/2 pairs, equal up to float32 rounding. ``norms``/``cosines`` read the Gram matrix.
"""

from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Union

import torch

from megalora import extension

logger = logging.getLogger("megalora")
_announced = set()

GradLists = Sequence[Sequence[torch.Tensor]]
Groups = Optional[Union[Sequence[int], torch.Tensor]]


def _groups_tensor(groups: Groups, num_tensors: int, num_groups: Optional[int]):
    if groups is None:
        g = torch.zeros(num_tensors, dtype=torch.int64)
    else:
        g = torch.as_tensor(groups, dtype=torch.int64).cpu()
    if num_groups is None:
        num_groups = int(g.max()) + 1 if g.numel() else 1
    return g, num_groups


def _choose(backend: str, what: str) -> str:
    if backend not in ("auto", "ext", "torch"):
        raise ValueError(f"{what}: backend must be 'auto', 'ext' or 'torch', got {backend!r}")
    if backend == "ext":
        extension.require()
        return "ext"
    if backend == "auto":
        backend = "ext" if extension.load() is not None else "torch"
        if backend == "torch" and "fallback" not in _announced:
            _announced.add("fallback")
            logger.info("megalora: gradient reductions use the PyTorch fallback (%s)",
                        extension.unavailable_reason())
    return backend


def gram(grads: GradLists, groups: Groups = None, num_groups: Optional[int] = None,
         backend: str = "auto") -> torch.Tensor:
    """[num_groups, K, K] float32 inner products of the K gradient lists, per parameter group.

    ``groups``: one group index per tensor (default: one group). ``num_groups`` defaults to
    max(groups) + 1; groups without tensors give zero matrices.
    """
    grads = [list(lst) for lst in grads]
    g, num_groups = _groups_tensor(groups, len(grads[0]) if grads else 0, num_groups)
    if _choose(backend, "gram") == "ext":
        return extension.require().gram(grads, g, num_groups)
    return _gram_torch(grads, g, num_groups)


def combine(grads: GradLists, weights: torch.Tensor, groups: Groups = None,
            out: Optional[List[torch.Tensor]] = None, accumulate: bool = False,
            backend: str = "auto") -> List[torch.Tensor]:
    """out[p] = sum_k weights[group(p), k] * grads[k][p] (+ out[p] when ``accumulate``).

    ``weights``: [num_groups, K] (or [K] for one group). ``out`` defaults to new float32 tensors;
    pass Megatron's ``main_grad`` buffers (any of fp32/bf16/fp16) to write in place. Returns out.
    """
    grads = [list(lst) for lst in grads]
    weights = torch.as_tensor(weights, dtype=torch.float32)
    if weights.dim() == 1:
        weights = weights.unsqueeze(0)
    g, _ = _groups_tensor(groups, len(grads[0]) if grads else 0, weights.shape[0])
    if out is None:
        out = [torch.zeros_like(t, dtype=torch.float32) for t in grads[0]]
        accumulate = False
    if _choose(backend, "combine") == "ext":
        extension.require().combine(grads, weights, g, list(out), accumulate)
        return out
    _combine_torch(grads, weights, g, out, accumulate)
    return out


def norms(gram_matrix: torch.Tensor) -> torch.Tensor:
    """[G, K] gradient norms per group (sqrt of the diagonal)."""
    return gram_matrix.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()


def cosines(gram_matrix: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """[G, K, K] cosine similarities per group (0 where a gradient is zero)."""
    n = norms(gram_matrix)
    return gram_matrix / (n.unsqueeze(-1) * n.unsqueeze(-2)).clamp_min(eps)


# ---------------------------------------------------------------------- PyTorch fallback
def _check(grads, what: str):
    if not 1 <= len(grads) <= 8:
        raise ValueError(f"{what}: need 1 to 8 gradient lists, got {len(grads)}")
    for k, lst in enumerate(grads[1:], 1):
        if len(lst) != len(grads[0]):
            raise ValueError(f"{what}: list {k} has {len(lst)} tensors but list 0 has "
                             f"{len(grads[0])}")
        for p, (t, ref) in enumerate(zip(lst, grads[0])):
            if t.shape != ref.shape or t.dtype != ref.dtype or t.device != ref.device:
                raise ValueError(f"{what}: tensor {p} of list {k} is {tuple(t.shape)} "
                                 f"{t.dtype} on {t.device} but list 0 has {tuple(ref.shape)} "
                                 f"{ref.dtype} on {ref.device}")


def _gram_torch(grads, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    _check(grads, "gram")
    K = len(grads)
    device = grads[0][0].device if grads[0] else torch.device("cpu")
    out = torch.zeros(num_groups, K, K, dtype=torch.float64, device=device)
    if not grads[0]:
        return out.float()
    flat = [[t.float() for t in lst] for lst in grads]
    index = groups.to(device)
    for i in range(K):
        for j in range(i, K):
            products = torch._foreach_mul(flat[i], flat[j])
            sums = torch.stack([p.sum() for p in products]).double()
            total = torch.zeros(num_groups, dtype=torch.float64, device=device).index_add(
                0, index, sums)
            out[:, i, j] = total
            out[:, j, i] = total
    return out.float()


def _combine_torch(grads, weights, groups: torch.Tensor, out, accumulate: bool) -> None:
    _check(grads, "combine")
    if len(out) != len(grads[0]):
        raise ValueError(f"combine: out has {len(out)} tensors but the lists have "
                         f"{len(grads[0])}")
    if not out:
        return
    w = weights.tolist()
    g = groups.tolist()
    acc = [o.float() if accumulate else torch.zeros_like(o, dtype=torch.float32) for o in out]
    for k, lst in enumerate(grads):
        torch._foreach_add_(acc, torch._foreach_mul([t.float() for t in lst],
                                                    [w[gp][k] for gp in g]))
    torch._foreach_copy_(out, acc)

"""Tensor-parallel collectives for the rank-r LoRA activations, as tiny autograd Functions.

Each takes its process group explicitly, says what forward and backward do, and is the identity
when the group has one rank. Tensors are [T, c] with T = tokens (sequence-major, so splitting
dim 0 splits the sequence, as Megatron's sequence parallelism does).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

# torch 2.13 deprecates the *_tensor names in favour of *_single; keep both working.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_size(group: Optional[dist.ProcessGroup]) -> int:
    """World size of ``group``; 1 when torch.distributed is not initialised or group is None."""
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group: Optional[dist.ProcessGroup]) -> int:
    """This process's rank in ``group``; 0 when not distributed."""
    if group is None or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Out-of-place SUM all-reduce (no autograd)."""
    if group_size(group) == 1:
        return x
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def all_gather_dim0(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0, in rank order (no autograd)."""
    world = group_size(group)
    if world == 1:
        return x
    x = x.contiguous()
    out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
    _all_gather(out, x, group=group)
    return out


def reduce_scatter_dim0(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over ranks, then keep this rank's 1/world slice of dim 0 (no autograd)."""
    world = group_size(group)
    if world == 1:
        return x
    if x.shape[0] % world:
        raise ValueError(f"reduce-scatter: dim 0 ({x.shape[0]}) is not divisible by the "
                         f"tensor-parallel size {world}; the sequence length must divide by TP")
    x = x.contiguous()
    out = x.new_empty((x.shape[0] // world,) + tuple(x.shape[1:]))
    _reduce_scatter(out, x, group=group)
    return out


def _slice_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    world = group_size(group)
    width = x.shape[-1] // world
    return x[..., group_rank(group) * width:(group_rank(group) + 1) * width].contiguous()


def _gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    moved = x.movedim(-1, 0).contiguous()
    gathered = all_gather_dim0(moved, group)
    return gathered.movedim(0, -1).contiguous()


class _CopyToTP(torch.autograd.Function):
    """forward: identity; backward: all-reduce (sum) the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """forward: all-reduce (sum); backward: identity."""

    @staticmethod
    def forward(ctx, x, group):
        return all_reduce_sum(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherSeq(torch.autograd.Function):
    """forward: all-gather along dim 0 (sequence); backward: reduce-scatter along dim 0."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_dim0(grad, ctx.group), None


class _ReduceScatterSeq(torch.autograd.Function):
    """forward: reduce-scatter along dim 0 (sequence); backward: all-gather along dim 0."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_dim0(grad, ctx.group), None


class _GatherLastDim(torch.autograd.Function):
    """forward: all-gather along the last dim; backward: keep this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _slice_last_dim(grad, ctx.group), None


class _ScatterLastDim(torch.autograd.Function):
    """forward: keep this rank's slice of the last dim; backward: all-gather along it."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _slice_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last_dim(grad, ctx.group), None


def _apply(fn, x: torch.Tensor, group) -> torch.Tensor:
    return x if group_size(group) == 1 else fn.apply(x, group)


def copy_to_tp(x, group):
    """forward: identity; backward: all-reduce. For a replicated input feeding sharded maths."""
    return _apply(_CopyToTP, x, group)


def reduce_from_tp(x, group):
    """forward: all-reduce; backward: identity. Sums partial products of sharded inputs."""
    return _apply(_ReduceFromTP, x, group)


def gather_seq(x, group):
    """forward: all-gather sequence shards; backward: reduce-scatter."""
    return _apply(_GatherSeq, x, group)


def reduce_scatter_seq(x, group):
    """forward: reduce-scatter into sequence shards; backward: all-gather."""
    return _apply(_ReduceScatterSeq, x, group)


def gather_last_dim(x, group):
    """forward: all-gather along the last dim; backward: slice."""
    return _apply(_GatherLastDim, x, group)


def scatter_last_dim(x, group):
    """forward: slice the last dim; backward: all-gather."""
    return _apply(_ScatterLastDim, x, group)

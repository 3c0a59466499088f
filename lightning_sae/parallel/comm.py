"""Collectives of the latent-sharded SAE, with the gradients its maths needs.

The loss on every rank of a latent group is the sum of terms computed identically on every
member (the reconstruction error, AuxK, ...) and of each member's share of the terms that sum
over latents (L1, L0, ...). Two autograd functions then give every parameter its exact
gradient (the pattern of Megatron-LM's tensor parallelism):

- :func:`reduce_from_shards`: a partial sum over latents (a partial decode) becomes the full sum
  on every member; forward all-reduce, backward identity, since each member's loss holds the
  replicated term once and its gradient w.r.t. the partial is that term's gradient.
- :func:`copy_to_shards`: a replicated tensor (``b_dec``) enters a member's latent slice;
  forward identity, backward all-reduce, since the replicated tensor's gradient is the sum of
  every slice's contribution.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import FunctionCtx


class _ReduceFromShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _CopyToShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _GatherRows(torch.autograd.Function):
    """Concatenate every member's ``[n_r, ...]`` rows (equal n_r); backward: the sum over members
    of the gradient of this member's rows (an all-reduce then a slice: gloo has no
    reduce-scatter)."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group, ctx.n = group, x.shape[0]
        ctx.rank = dist.get_rank(group)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n], None


def reduce_from_shards(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    return x if group is None else _ReduceFromShards.apply(x, group)


def copy_to_shards(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    return x if group is None else _CopyToShards.apply(x, group)


def gather_rows(x: Tensor, group: dist.ProcessGroup | None, differentiable: bool = False) -> Tensor:
    """Every member's rows concatenated in member order (all members pass equal shapes)."""
    if group is None:
        return x
    if differentiable:
        return _GatherRows.apply(x, group)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


def gather_last(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Every member's ``[..., m]`` concatenated along the last dimension (no gradient)."""
    if group is None:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def all_reduce(
    x: Tensor, group: dist.ProcessGroup | None, op: dist.ReduceOp = dist.ReduceOp.SUM
) -> Tensor:
    """In place when ``group`` is set; ``x`` itself otherwise."""
    if group is not None:
        dist.all_reduce(x, op=op, group=group)
    return x

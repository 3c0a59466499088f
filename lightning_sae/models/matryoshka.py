"""Matryoshka SAE: nested prefixes of a BatchTopK dictionary, each reconstructing the input.

After Bussmann et al. 2025 and Nabeshima 2024 ("Matryoshka sparse autoencoders"). Training the
first m latents to reconstruct the input on their own, for every prefix size m in a ladder,
pushes general features into the early latents and specific ones later, and discourages
feature absorption.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from lightning_sae.models.base import SAEOutput
from lightning_sae.models.sparse import (
    SparseCode,
    bag_offsets,
    decode_with_latent_bags,
    decoder_gradient_by_latent,
)
from lightning_sae.models.topk import BatchTopKSAE


class MatryoshkaSAE(BatchTopKSAE):
    """BatchTopK whose loss is the mean (or sum) of the reconstruction losses of nested prefixes.

    The dictionary is split into consecutive groups; prefix m is groups 0..m. Prefix m
    reconstructs x with only its latents (plus ``b_dec``), and the loss is the mean over
    prefixes of each prefix's squared error (logged as ``train/loss/prefix_mse``), plus AuxK.
    The mean (the default; ``prefix_loss`` picks the sum) keeps the term on the scale of a
    single MSE, so its balance with AuxK carries over from BatchTopK; the full-dictionary MSE
    is the last prefix's and is still logged as ``train/mse``. Every prefix sum comes out of
    one pass of the decoder: per-group partial reconstructions (``extras["group_x_hat"]``,
    [groups, n, d], one sparse decode a group on CPU), whose running sum over groups the loss
    takes inside one autograd function (:func:`prefix_squared_errors`), forward and backward;
    :meth:`prefix_reconstructions` builds the prefixes themselves when they are wanted.

    Args:
        group_sizes: latents per group, in order, summing to d_sae. Default: prefixes of
            d_sae/16, d_sae/8, d_sae/4, d_sae/2 and d_sae (groups d_sae/16, d_sae/16, d_sae/8,
            d_sae/4, d_sae/2).
        prefix_loss: ``mean`` (default) or ``sum`` of the prefixes' squared errors. The sum is
            the form of Bussmann et al. and SAELens; it weighs reconstruction n_prefixes times
            as much against AuxK (Adam's steps do not scale with the loss, that balance does).
        **kwargs: everything :class:`BatchTopKSAE` takes (k, threshold_momentum, aux_k,
            aux_coefficient, decode_impl, ...).
    """

    def __init__(
        self,
        *args: Any,
        group_sizes: list[int] | None = None,
        prefix_loss: Literal["mean", "sum"] = "mean",
        **kwargs: Any,
    ) -> None:
        if prefix_loss not in ("mean", "sum"):
            raise ValueError(
                f"prefix_loss must be 'mean' or 'sum', got {prefix_loss!r}: "
                "set model.init_args.prefix_loss."
            )
        super().__init__(*args, **kwargs)
        if group_sizes is None:
            group_sizes = [self.d_sae // 16, self.d_sae // 16, self.d_sae // 8, self.d_sae // 4]
            group_sizes.append(self.d_sae - sum(group_sizes))
        if any(size <= 0 for size in group_sizes) or sum(group_sizes) != self.d_sae:
            raise ValueError(
                f"group_sizes must be positive and sum to d_sae={self.d_sae}, got {group_sizes}: "
                "fix model.init_args.group_sizes."
            )
        self.group_sizes = list(group_sizes)
        self.register_buffer("group_ends", torch.tensor(group_sizes).cumsum(0), persistent=False)

    def group_decode(self, code: SparseCode, acts: Tensor | None) -> Tensor:
        """Each group's share of the reconstruction, [n_groups, n, d_out], without bias.

        Group-major, so that each group's rows are one contiguous block (its slab of the
        gradient too, which the decode's backward reads group by group)."""
        ends = self.local_group_ends()
        if self.decodes_code_sparsely(code):
            group = torch.bucketize(code.indices, ends, right=True)
            compiling = torch.compiler.is_compiling()
            spare = None if compiling else self.__dict__.pop("_spare_groups", None)
            return decode_groups(code, group, len(ends), self.W_dec, spare)
        sizes = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()
        W_dec = self.W_dec.to(acts.dtype)
        parts = zip(acts.split(sizes, -1), W_dec.split(sizes), strict=True)
        return torch.stack([a @ w for a, w in parts])

    def local_group_ends(self) -> Tensor:
        """Where each group ends among the latents this module holds (all of them here; a
        latent-sharded member holds a slice, ``parallel/sharded.py``)."""
        return self.group_ends

    def forward_normalized(self, x_n: Tensor) -> SAEOutput:
        code, pre_acts = self._encode(x_n)
        acts = None if self.decodes_code_sparsely(code) else code.to_dense(self.d_sae)
        groups = self.group_decode(code, acts)
        lead = x_n.shape[:-1]
        out = _GroupsOutput(
            self.b_dec,
            acts=None if acts is None else acts.reshape(*lead, self.d_sae),
            pre_acts=pre_acts.reshape(*lead, self.d_sae),
            extras={"group_x_hat": groups, "encoder_input": x_n},
            code=code,
            acts_shape=(*lead, self.d_sae),
        )
        if torch.compiler.is_compiling():
            out.x_hat = out.x_hat  # a compiled forward returns it made, not a recipe
        return out

    def prefix_reconstructions(self, out: SAEOutput) -> Tensor:
        """Every prefix's reconstruction of ``out``'s rows, [n, n_groups, d_out]: prefix m
        decodes groups 0..m alone, plus ``b_dec`` (the training loss never builds these)."""
        return (out.extras["group_x_hat"].cumsum(0) + self.b_dec).transpose(0, 1)

    def loss_terms(self, x_n: Tensor, out: SAEOutput) -> dict[str, Tensor]:
        x = x_n.reshape(-1, self.d_out)
        # In training on CPU the errors' tensor is handed back after each backward and reused:
        # a fresh [n, groups, d] tensor is a fresh mapping whose page faults cost about as much
        # as the cumulative sum itself (as the pre-activations, TopKSAE.recycle).
        reuse = self.training and x.device.type == "cpu" and not torch.compiler.is_compiling()
        pool = self.__dict__.setdefault("_spare_errors", []) if reuse else None
        groups = out.extras["group_x_hat"]
        per_prefix, x_hat = _PrefixSquaredErrors.apply(groups, self.b_dec, x, pool)
        if isinstance(out, _GroupsOutput) and not out.has_x_hat():
            # The last prefix's error holds the full reconstruction: AuxK's residual and the
            # step's statistics read it from there rather than from a second pass over groups.
            out.x_hat = x_hat.reshape(*out.acts_shape[:-1], self.d_out)
        reduced = per_prefix.sum() if self.hparams.prefix_loss == "sum" else per_prefix.mean()
        terms = {"prefix_mse": reduced}
        if self.hparams.aux_coefficient > 0:
            terms["auxk"] = self.hparams.aux_coefficient * self.auxk_loss(x_n, out)
        return terms

    def recycle(self, out: SAEOutput) -> None:
        # The groups' table is written into again by the next training step's decode (CPU:
        # a fresh 42 MB tensor at batch 4096 x 5 groups x 512 cost about as much in page
        # faults as the decode itself). Nothing reads it after the step: the backward needs
        # only the errors' tensor and the code (as the pre-activations, TopKSAE.recycle).
        super().recycle(out)
        groups = out.extras["group_x_hat"]
        compiled = hasattr(self.forward_normalized, "_torchdynamo_orig_callable")
        sparse = out.code is not None and self.decodes_code_sparsely(out.code)
        if self.training and sparse and groups.device.type == "cpu" and not compiled:
            self._spare_groups = groups

    def train(self, mode: bool = True) -> MatryoshkaSAE:
        if not mode:
            self.__dict__.pop("_spare_errors", None)
            self.__dict__.pop("_spare_groups", None)
        return super().train(mode)


def decode_groups(
    code: SparseCode, group: Tensor, n_groups: int, W_dec: Tensor, spare: Tensor | None = None
) -> Tensor:
    """[n_groups, n, d]: slab g is the decode of ``code``'s entries in group g (``group``, that
    of each entry), into ``spare`` when it fits; ``W_dec``'s gradient summed per latent as in
    :func:`decode_with_latent_bags`, the values' by embedding_bag.

    On CPU one decode a group, each [n, d] into its slab: embedding_bag cannot write into a
    given tensor, and one decode with a bag per (row, group) made a fresh [n, n_groups, d]
    tensor every step, whose page faults cost about as much as the decode (at batch 4096,
    5 groups, d 512: 37 ms against 20 ms for the decodes by group and the copies, one
    thread). Each group's [n, d] output is freed once copied and the next takes its memory.
    The entries are put in group order once (a counting sort: each entry's rank within its
    group, in row order), so that each group's decode reads a slice; selecting each group's
    entries apart took about twice the operations, each a wait for a thread on a shared CPU.
    Elsewhere (and under compile, where the groups' sizes are data) one decode with a bag per
    (row, group), viewed group-major."""
    n = code.n_rows
    if W_dec.device.type != "cpu" or torch.compiler.is_compiling():
        # Entries are sorted by (sample, latent) and groups are latent ranges, so bag ids
        # sample * n_groups + group are already ascending.
        by_row = SparseCode(
            code.indices,
            code.values,
            n * n_groups,
            code.rows * n_groups + group,
            grouped=code.latent_order(),  # the same entries: one sort for both gradients
        )
        decoded = decode_with_latent_bags(by_row, W_dec)
        return decoded.view(n, n_groups, -1).transpose(0, 1)
    in_group = F.one_hot(group, n_groups)
    rank = in_group.cumsum(0).gather(1, group[:, None]).squeeze(1)  # from 1, in row order
    sizes = in_group.sum(0)
    starts = sizes.cumsum(0) - sizes
    order = torch.empty_like(rank).scatter_(0, starts[group] + rank - 1, torch.arange(len(rank)))
    bags = group * n + code.rows  # each entry's row of the table viewed as [n_groups * n, d]
    offsets = bag_offsets(bags, n_groups * n)  # of the bags in group order
    indices, values = code.indices[order], code.values[order]
    W_rows = W_dec.detach().to(code.values.dtype)  # the weight's gradient comes below
    parts = []
    for g, (start, size) in enumerate(torch.stack([starts, sizes], 1).tolist()):
        part = slice(start, start + size)
        group_offsets = offsets[g * n : (g + 1) * n] - start
        parts.append(
            F.embedding_bag(
                indices[part], W_rows, group_offsets, mode="sum", per_sample_weights=values[part]
            )
        )
    table = _StackGroups.apply([] if spare is None else [spare], *parts)
    if not (torch.is_grad_enabled() and W_dec.requires_grad):
        return table
    flat = table.view(n_groups * n, -1)
    entry_values = code.values.detach().reshape(-1)
    flat = decoder_gradient_by_latent(flat, W_dec, entry_values, bags, code.latent_order())
    return flat.view_as(table)


class _StackGroups(torch.autograd.Function):
    """``torch.stack(parts)`` into ``spare[0]`` when it fits (``spare``, a list, holds it);
    backward: each part its slab of the gradient."""

    @staticmethod
    def forward(ctx: FunctionCtx, spare: list[Tensor], *parts: Tensor) -> Tensor:  # type: ignore[override]
        shape = (len(parts), *parts[0].shape)
        fits = bool(spare) and (spare[0].shape, spare[0].dtype, spare[0].device) == (
            shape,
            parts[0].dtype,
            parts[0].device,
        )
        return torch.stack(parts, out=spare[0]) if fits else torch.stack(parts)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return None, *grad.unbind(0)


class _PrefixSquaredErrors(torch.autograd.Function):
    """Mean over rows of each prefix's squared error, from the groups' partial reconstructions,
    and the full reconstruction (the groups summed, plus ``b_dec``) beside it.

    With ``P[g]`` group g's share of the reconstruction, prefix m's error is ``E_m = P_0 +
    ... + P_m + b_dec - x``. Forward: ``E_0 = P_0 + (b_dec - x)`` and ``E_m = E_{m-1} + P_m``,
    group by group into a [groups, n, d] tensor (one pass, where a cumulative sum and then the
    shift took two); the full reconstruction is ``E_last + x``, so the step need not sum
    the groups a second time for it. Backward, with ``w_m`` the gradient of prefix m's value:
    group g enters every prefix from g on, so its gradient is ``sum over m >= g of 2 w_m E_m /
    n`` (plus the reconstruction's gradient, when it has one), a running sum from the last
    group down, scaled as it goes (one pass), in place in ``E``; ``b_dec`` gets group 0's (it
    is in every prefix), ``x`` minus that (``x`` cancels out of the reconstruction). Through
    autograd's ``cumsum``, ``sub``, ``pow`` and their backward this took about eight
    [groups, n, d] tensors; here ``E`` is the only one, and it becomes the gradient of ``P``.
    Sums in float32 at least (under bf16 autocast ``P`` is bf16), the gradient of ``P`` in its
    dtype.

    ``pool`` (a list, or None) lends ``E``: the forward takes a tensor from it when one fits,
    and the backward puts ``E`` back once the gradient in it is handed on (the backward that
    reads it runs before any later forward can take it).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, groups: Tensor, b_dec: Tensor, x: Tensor, pool: list[Tensor] | None
    ) -> tuple[Tensor, Tensor]:
        # Gradients that are not wanted (the reconstruction's, in a training step) come as None
        # rather than as tensors of zeros to add.
        ctx.set_materialize_grads(False)
        dtype = functools.reduce(torch.promote_types, (groups.dtype, b_dec.dtype, x.dtype))
        dtype = torch.promote_types(dtype, torch.float32)
        spare = pool.pop() if pool else None
        fits = spare is not None and (spare.shape, spare.dtype, spare.device) == (
            groups.shape,
            dtype,
            groups.device,
        )
        errors = spare if fits else groups.new_empty(groups.shape, dtype=dtype)
        shift = b_dec.to(dtype) - x.to(dtype)
        torch.add(shift, groups[0], out=errors[0])
        for group in range(1, groups.shape[0]):
            torch.add(errors[group - 1], groups[group], out=errors[group])
        x_hat = (errors[-1] + x.to(dtype)).to(torch.promote_types(groups.dtype, b_dec.dtype))
        ctx.save_for_backward(errors)
        ctx.dtypes, ctx.pool = (groups.dtype, b_dec.dtype, x.dtype), pool
        # Squared norms of each (row, prefix) first: a reduction over the contiguous last
        # dimension, several times faster than one over rows and features at once.
        per_row = torch.linalg.vector_norm(errors, dim=2).square_()
        return per_row.sum(1) / errors.shape[1], x_hat

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, grad_per_prefix: Tensor | None, grad_x_hat: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        # The gradient is made in place of the saved errors: a second backward through a
        # retained graph fails autograd's version check rather than reading gradients.
        (errors,) = ctx.saved_tensors
        groups_dtype, b_dec_dtype, x_dtype = ctx.dtypes
        n_groups, n = errors.shape[:2]
        if grad_per_prefix is None:
            grad_per_prefix = errors.new_zeros(n_groups)
        scales = (2 / n) * grad_per_prefix.to(errors.dtype)
        grad = errors
        grad[-1].mul_(scales[-1])
        if grad_x_hat is not None:
            grad[-1] += grad_x_hat.to(errors.dtype)
        for group in range(n_groups - 2, -1, -1):
            # grad[group] = grad[group + 1] + scales[group] * grad[group]
            torch.addcmul(grad[group + 1], grad[group], scales[group], out=grad[group])
        grad_b_dec = grad_x = None
        if ctx.needs_input_grad[1]:
            grad_b_dec = grad[0].sum(0).to(b_dec_dtype)
        if ctx.needs_input_grad[2]:
            grad_x = grad[0].neg() if grad_x_hat is None else grad_x_hat - grad[0]
            grad_x = grad_x.to(x_dtype)
        grad_groups = grad.to(groups_dtype) if ctx.needs_input_grad[0] else None
        if ctx.pool is not None:
            ctx.pool[:] = [errors]
        return grad_groups, grad_b_dec, grad_x, None


class _GroupsOutput(SAEOutput):
    """A Matryoshka forward's output whose ``x_hat`` (the groups summed, plus ``b_dec``) is made
    on first use. In a training step the prefix loss sets it first, from its own running sums
    (:meth:`MatryoshkaSAE.loss_terms`): one pass over the [n, groups, d] table fewer."""

    def __init__(self, b_dec: Tensor, **kwargs: Any) -> None:
        self._x_hat: Tensor | None = None
        self.b_dec = b_dec
        super().__init__(x_hat=None, **kwargs)  # type: ignore[arg-type]

    @property  # type: ignore[override]
    def x_hat(self) -> Tensor:
        if self._x_hat is None:
            groups = self.extras["group_x_hat"]
            lead = self.acts_shape[:-1]
            self._x_hat = (groups.sum(0) + self.b_dec).reshape(*lead, groups.shape[-1])
        return self._x_hat

    @x_hat.setter
    def x_hat(self, value: Tensor | None) -> None:
        self._x_hat = value

    def has_x_hat(self) -> bool:
        return self._x_hat is not None


def prefix_squared_errors(
    groups: Tensor, b_dec: Tensor, x: Tensor, pool: list[Tensor] | None = None
) -> Tensor:
    """``(groups.cumsum(0) + b_dec - x).pow(2).sum(-1).mean(1)``, the mean over the rows of
    each prefix's squared error, [n_groups], from ``groups`` [n_groups, n, d] (each group's
    share of the reconstruction of ``x`` [n, d], without ``b_dec``), with one
    [n_groups, n, d] tensor instead of autograd's several, lent by ``pool`` when it has one
    (:class:`_PrefixSquaredErrors`)."""
    return _PrefixSquaredErrors.apply(groups, b_dec, x, pool)[0]

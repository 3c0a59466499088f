"""Decoding from the active latents alone, and the encoder's gradient through them alone.

Decoding: (indices, values) summed by ``embedding_bag``.

Only a small fraction of d_sae latents is nonzero per sample (k in TopK, L0 in a trained ReLU
SAE), so the decoder can sum those rows instead of multiplying by a mostly-zero matrix.
``embedding_bag(mode="sum", per_sample_weights=...)`` does that sum and its backward in one
fused op; whether it beats the dense product depends on the density and the hardware, so
``decode_impl="auto"`` picks by a density cut-off measured per device type.

Encoding: a TopK-family SAE computes the dense pre-activations ``x W_enc + b`` [n, d_sae] to
select, but only the selected entries reach the loss. :func:`sparse_encoder_values` gathers them
with a backward that sends the gradient through those entries alone (as sparsify does): the
weight gradient is ``embedding_bag`` over the rows that selected each latent, so no dense
[n, d_sae] gradient and no second [d_in, n] x [n, d_sae] product are made. Always exact, not a
choice by density: it costs O(nnz * d_in) against the dense backward's O(n * d_sae * d_in).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx

DecodeImpl = Literal["auto", "dense", "sparse"]

# Largest density (active latents / d_sae) at which ``auto`` decodes sparsely, per device type.
# Measured with ``python benchmarks/train_step.py --decode-sweep`` (forward + backward,
# docs/benchmarks.md): on a 2-core CPU at batch 4096, d_in 512, d_sae 8192 sparse took 0.46-0.74x
# the dense time at 512 active latents (1/16) and 1.15-1.26x at 1024; on an H200 at batch 4096,
# d_in 768, d_sae 24576 it took 0.65x at 256 and 1.27x at 512, so about 1/64 there.
SPARSE_DECODE_MAX_DENSITY = {"cpu": 1 / 16, "cuda": 1 / 64}


def bag_offsets(rows: Tensor, n_rows: int) -> Tensor:
    """Start of each row's run in ``rows`` (ascending row ids), as embedding_bag wants them."""
    counts = torch.bincount(rows, minlength=n_rows)
    return counts.cumsum(0) - counts


class LatentOrder:
    """The entries of a code grouped by latent, sorted once: the weight gradients of the encoder
    and of the decoder both sum per latent (:func:`_sum_per_latent`), over the same entries.

    The stable sort keeps each latent's entries in entry order, so the sums are reproducible
    (and the stable integer sort is the faster one on CPU). On a shared CPU the sort's two
    threads can wait on each other for hundreds of milliseconds (docs/benchmarks.md), so one
    sort a step instead of two matters beyond its own few milliseconds.
    """

    def __init__(self, latents: Tensor) -> None:
        self.latents = latents.reshape(-1)
        self._sorted: tuple[int, Tensor, Tensor] | None = None

    def sorted(self, d_sae: int) -> tuple[Tensor, Tensor]:
        """(order, starts): the entries' positions sorted by latent, and where the run of each
        of the ``d_sae`` latents begins in that order."""
        if self._sorted is None or self._sorted[0] != d_sae:
            by_latent, order = self.latents.sort(stable=True)
            latents = torch.arange(d_sae, device=by_latent.device)
            self._sorted = (d_sae, order, torch.searchsorted(by_latent, latents))
        return self._sorted[1], self._sorted[2]


@dataclass
class SparseCode:
    """The nonzero activations of ``n_rows`` samples, without the zeros.

    Either ``indices`` and ``values`` are ``[n_rows, k]`` (the same count for every sample, as in
    TopK) and ``rows`` is None, or they are flat ``[nnz]`` with ``rows`` giving each entry's
    sample in ascending order (as in BatchTopK, where the count varies).
    """

    indices: Tensor
    values: Tensor
    n_rows: int
    rows: Tensor | None = None
    # The entries grouped by latent, made on first use (latent_order); a code over the same
    # entries in other bags (Matryoshka's groups) may share its parent's.
    grouped: LatentOrder | None = field(default=None, repr=False, compare=False)

    def latent_order(self) -> LatentOrder:
        if self.grouped is None:
            self.grouped = LatentOrder(self.indices)
        return self.grouped

    @classmethod
    def from_mask(cls, mask: Tensor, values: Tensor) -> SparseCode:
        """The entries of ``values`` [n_rows, d_sae] where ``mask`` is set, flat and sorted by
        (sample, latent), as embedding_bag's offsets need."""
        rows, indices = mask.nonzero(as_tuple=True)
        return cls(indices, values[rows, indices], mask.shape[0], rows)

    def to_dense(self, d_sae: int) -> Tensor:
        dense = self.values.new_zeros(self.n_rows, d_sae)
        if self.rows is None:
            return dense.scatter(1, self.indices, self.values)
        return dense.index_put((self.rows, self.indices), self.values)

    def decode(self, W_dec: Tensor) -> Tensor:
        """sum_i values_i * W_dec[indices_i] per sample, shape [n_rows, d_in]; no bias.

        Computed in the dtype of ``values``: embedding_bag is not an autocast op, so under bf16
        autocast the float32 decoder is cast here, as autocast casts a matmul's weight.
        """
        W_dec = W_dec.to(self.values.dtype)
        if self.rows is None:
            return F.embedding_bag(self.indices, W_dec, mode="sum", per_sample_weights=self.values)
        offsets = bag_offsets(self.rows, self.n_rows)
        return F.embedding_bag(
            self.indices, W_dec, offsets, mode="sum", per_sample_weights=self.values
        )


# Columns per group in the first stage of :func:`row_top_k` on CPU, for rows wide against k.
# Measured (one thread, batch 4096, k 32, docs/benchmarks.md): groups of 32 took 62-65 ms against
# torch.topk's 86-95 ms at d 8192 and 98 ms against 181 ms at d 24576; groups of 16 and 64 were
# slower than 32.
ROW_TOP_K_GROUP = 32


def row_top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of each row of ``scores`` [n, d], unsorted: (values, columns),
    as ``scores.topk(k, dim=1, sorted=False)``.

    torch's CPU top-k costs 10-25 ns an entry. On CPU this splits each row into groups of
    columns, takes every group's maximum (one vectorised pass), the k groups with the largest
    maxima, and the top k of those groups' entries alone, so the two top-k's see ``d / group +
    k * group`` entries instead of ``d``. Exact: with m the k-th largest group maximum, every
    group left out has its maximum at most m and the k groups kept hold k entries of at least
    m, so every entry above the kept entries' k-th largest is among them. Which of several
    entries tied at the k-th value are kept is the kernels' choice, as it is between torch's
    own top-k kernels.

    Two layouts of the groups, each where it measured faster (docs/benchmarks.md):

    - rows wide against k (``d / 32 >= 4k``, e.g. 8192 or 24576 latents at k 32): runs of
      :data:`ROW_TOP_K_GROUP` consecutive columns, whose kept entries are copied run by run
      (rows too large for the cache: few memory lines per kept group);
    - narrower rows (e.g. 1536 latents at k 16-64): interleaved groups (group j holds columns
      j, j + d/g, j + 2d/g, ...), whose maxima are an elementwise maximum of g slices of the
      row, of the size g that the two top-k's see fewest entries at; used only where those are
      at most half of d (:func:`_interleaved_group_size`).
    """
    n, d = scores.shape
    if scores.device.type != "cpu" or not scores.is_contiguous():
        return scores.topk(k, dim=1, sorted=False)
    if d % ROW_TOP_K_GROUP == 0 and d // ROW_TOP_K_GROUP >= 4 * k:
        return _top_k_through_runs(scores, k, ROW_TOP_K_GROUP)
    group = _interleaved_group_size(d, k)
    if group is None:
        return scores.topk(k, dim=1, sorted=False)
    return _top_k_through_interleaved_groups(scores, k, group)


def _top_k_through_runs(scores: Tensor, k: int, group: int) -> tuple[Tensor, Tensor]:
    """:func:`row_top_k` with groups of ``group`` consecutive columns."""
    n, d = scores.shape
    n_groups = d // group
    best = scores.view(n, n_groups, group).amax(2).topk(k, dim=1, sorted=False).indices
    first_of_row = torch.arange(n, device=scores.device)[:, None] * n_groups
    kept = scores.view(n * n_groups, group).index_select(0, (best + first_of_row).view(-1))
    values, slots = kept.view(n, k * group).topk(k, dim=1, sorted=False)
    return values, best.gather(1, slots // group) * group + slots % group


def _interleaved_group_size(d: int, k: int) -> int | None:
    """The number of columns g per interleaved group (a divisor of d, at least k groups) at
    which the two top-k's of :func:`row_top_k` see fewest entries, ``d / g + k * g`` (near
    sqrt(d / k)); None when that is more than half of d. Measured (one thread, 1024 rows; d 768,
    1536 and 3072, k 8-192): 0.2-0.8 of torch.topk's time where at most 0.42 d entries are
    seen, 0.6-0.9 at 0.5 d, 0.8-1.6 above."""
    sizes = [g for g in range(2, d // k + 1) if d % g == 0]
    if not sizes:
        return None
    group = min(sizes, key=lambda g: d // g + k * g)
    return group if 2 * (d // group + k * group) <= d else None


def _top_k_through_interleaved_groups(scores: Tensor, k: int, group: int) -> tuple[Tensor, Tensor]:
    """:func:`row_top_k` with ``d / group`` groups, group j the columns j + i * (d / group)."""
    n, d = scores.shape
    n_groups = d // group
    slices = scores.view(n, group, n_groups)  # slices[r, i, j] = scores[r, j + i * n_groups]
    best = slices.amax(1).topk(k, dim=1, sorted=False).indices  # [n, k] group numbers
    kept = slices.gather(2, best[:, None, :].expand(n, group, k))  # [n, group, k]
    values, slots = kept.view(n, group * k).topk(k, dim=1, sorted=False)
    return values, best.gather(1, slots % k) + slots // k * n_groups


def largest_of_batch(scores: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """The ``count`` largest entries of ``scores`` [n, d]: their values and flat positions
    (``row * d + column``), positions ascending. Of entries tied at the cut-off, the first in
    flat order are kept (:func:`keep_above_and_first_ties`), so a batch split over ranks in
    row order keeps the same entries (BatchTopK's global top-k).

    On CPU through group maxima, as :func:`row_top_k` per row, against one top-k over all
    ``n * d`` entries (that flat top-k cost about one encoder product, most of a BatchTopK
    step: docs/benchmarks.md). The flat entries are cut into groups of up to
    :data:`ROW_TOP_K_GROUP` consecutive ones (a group may span two rows), and the ``floor`` is
    the ``count``-th largest group maximum. Exact: the ``count`` groups with the largest maxima
    hold ``count`` entries of at least the floor, so the cut-off (the ``count``-th largest entry)
    is at least the floor, and every entry at or above the cut-off, ties included, lies in a
    group whose maximum reaches the floor. The entries of those groups that reach the floor (few
    more than ``count`` unless the large entries crowd into the same groups) are gathered in
    flat order, and the cut-off is the ``count``-th largest of them. Groups are made smaller
    where ``count`` is a large share of the batch, so that at least half of the groups can be
    left out; below groups of 4 the flat top-k runs. On CUDA, where compacting the candidates
    would be a synchronisation and the flat top-k is a radix select, the flat top-k runs
    directly (not measured on a GPU).
    """
    if count == 0:
        return scores.new_empty(0), torch.empty(0, dtype=torch.long, device=scores.device)
    flat_scores = scores.reshape(-1)
    group = ROW_TOP_K_GROUP
    while group >= 4 and (flat_scores.numel() % group or flat_scores.numel() // group < 2 * count):
        group //= 2
    if scores.device.type != "cpu" or group < 4:
        cutoff = flat_scores.topk(count, sorted=False).values.min()
        ties = count - (flat_scores > cutoff).sum()
        keep = keep_above_and_first_ties(flat_scores, cutoff, ties)
        flat = torch.nonzero_static(keep, size=count).squeeze(1)  # no host synchronisation
        return flat_scores[flat], flat
    groups = flat_scores.view(-1, group)
    maxima = groups.amax(1)
    floor = maxima.topk(count, sorted=False).values.min()
    reaching = (maxima >= floor).nonzero().squeeze(1)  # ascending: the groups in flat order
    members = groups.index_select(0, reaching)
    slots, offsets = (members >= floor).nonzero(as_tuple=True)  # row-major: flat order kept
    candidates = members[slots, offsets]
    flat = reaching[slots] * group + offsets
    cutoff = candidates.kthvalue(candidates.numel() - count + 1).values
    keep = keep_above_and_first_ties(candidates, cutoff, count - (candidates > cutoff).sum())
    return candidates[keep], flat[keep]


def keep_above_and_first_ties(scores: Tensor, cutoff: Tensor, ties: Tensor | int) -> Tensor:
    """The mask of ``scores`` above ``cutoff`` and of the first ``ties`` (in flat order) equal
    to it.

    Which entries tied at a top-k's cut-off are kept is otherwise the implementation's choice,
    and it differs between one top-k over a batch and a cut-off shared by ranks that each hold
    part of it; ties are common in activations (identical tokens at the same position, e.g.
    every context's first token, give identical rows).
    """
    tied = scores == cutoff
    tie_number = tied.flatten().cumsum(0).view_as(scores)
    return (scores > cutoff) | (tied & (tie_number <= ties))


def check_decode_impl(decode_impl: str) -> None:
    if decode_impl not in ("auto", "dense", "sparse"):
        raise ValueError(
            f"decode_impl must be 'auto', 'dense' or 'sparse', got {decode_impl!r}: "
            "set model.init_args.decode_impl."
        )


def decodes_sparsely(
    decode_impl: DecodeImpl, active_per_sample: float, d_sae: int, device: torch.device
) -> bool:
    """Whether to decode from (indices, values): as configured, or for ``auto`` by density."""
    if decode_impl == "auto":
        max_density = SPARSE_DECODE_MAX_DENSITY.get(device.type, 1 / 64)
        return active_per_sample <= max_density * d_sae
    return decode_impl == "sparse"


def _entry_rows(indices: Tensor, rows: Tensor | None) -> Tensor:
    """The sample of each entry of a code, flat: ``rows`` itself, or ``i // k`` for [n, k]."""
    if rows is not None:
        return rows
    n, k = indices.shape
    return torch.arange(n * k, device=indices.device) // k


def _sum_per_latent(
    grouped: LatentOrder, rows: Tensor, table: Tensor, weights: Tensor, d_sae: int
) -> Tensor:
    """[d_sae, table's width]: for each latent j, the sum over the entries of j of ``weights[e] *
    table[rows[e]]``: one ``embedding_bag`` with a bag per latent (entries in ``grouped``'s order,
    rows along). The weight gradient of a sparse encode or decode; torch's own embedding_bag
    weight backward took 30-40 ms more for 131k entries of 512 features on one CPU thread."""
    order, starts = grouped.sorted(d_sae)
    return F.embedding_bag(
        rows[order], table, starts, mode="sum", per_sample_weights=weights[order]
    )


class _SparseEncoderGather(torch.autograd.Function):
    """``pre_acts`` at the code's entries; gradients for x, W_enc and bias through those alone.

    ``pre_acts`` (detached) is ``F.linear(x, W_enc.T, bias - source @ W_enc)`` (``source`` None:
    no such term); the forward only gathers from it, so the values are those of the dense pass
    bit for bit. Backward, with g the gradient of the gathered values: ``dbias[j] = sum of g over
    the entries of latent j``; ``dW_enc[:, j] = sum of g * x[row]`` over the same entries, one
    ``embedding_bag`` of x with a bag per latent, less ``source * dbias[j]``; ``dsource = -W_enc
    dbias``; ``dx[row] = sum of g * W_enc[:, j]`` over the row's entries (a sparse decode with
    W_enc^T). The source term (an SAE's ``b_dec`` subtracted from its input) is an in-place
    rank-1 update of the weight gradient here, where autograd would make a [d_in, d_sae] outer
    product and a second [d_in, d_sae] tensor for its sum with this one. Gradients come in the
    parameters' dtype (float32 under bf16 autocast: no bf16 rounding of the sums, where the
    dense path would round its bf16 product).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        pre_acts: Tensor,
        x: Tensor,
        W_enc: Tensor,
        bias: Tensor,
        source: Tensor | None,
        indices: Tensor,
        rows: Tensor | None,
        grouped: LatentOrder,
    ) -> Tensor:
        ctx.save_for_backward(x, W_enc, source, indices, rows)
        ctx.bias_dtype, ctx.grouped = bias.dtype, grouped
        if rows is None:
            return pre_acts.gather(1, indices)
        return pre_acts[rows, indices]

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, grad_values: Tensor
    ) -> tuple[Tensor | None, ...]:
        x, W_enc, source, indices, rows = ctx.saved_tensors
        needs_x, needs_W, needs_bias, needs_source = ctx.needs_input_grad[1:5]
        d_sae = W_enc.shape[1]
        grad = grad_values.reshape(-1).to(W_enc.dtype)
        latents = indices.reshape(-1)
        grad_x = grad_W = grad_bias = grad_source = None
        # g summed per latent: the bias's gradient, and what the source's terms are made of.
        per_latent = grad.new_zeros(d_sae).index_add_(0, latents, grad)
        if needs_W:
            entry_rows = _entry_rows(indices, rows)
            table = x.to(W_enc.dtype)
            grad_W_rows = _sum_per_latent(ctx.grouped, entry_rows, table, grad, d_sae)
            if source is not None:
                grad_W_rows.addr_(per_latent, source.to(W_enc.dtype), alpha=-1)
            grad_W = grad_W_rows.T
        if needs_bias:
            grad_bias = per_latent.to(ctx.bias_dtype)
        if needs_source:
            grad_source = -(W_enc @ per_latent).to(source.dtype)
        if needs_x:
            code = SparseCode(latents if rows is not None else indices, grad, x.shape[0], rows)
            if rows is None:
                code.values = grad.view_as(indices)
            grad_x = code.decode(W_enc.T).to(x.dtype)
        return None, grad_x, grad_W, grad_bias, grad_source, None, None, None


def sparse_encoder_values(
    code: SparseCode,
    pre_acts: Tensor,
    x: Tensor,
    W_enc: Tensor,
    bias: Tensor,
    source: Tensor | None = None,
) -> Tensor:
    """``pre_acts`` [n, d_sae] at ``code``'s entries (shaped as ``code.values``), differentiable
    with respect to ``x`` [n, d_in], ``W_enc`` [d_in, d_sae], ``bias`` [d_sae] and ``source``
    [d_in] through those entries alone; ``pre_acts`` must equal ``F.linear(x, W_enc.T, bias -
    source @ W_enc)`` (without the source term when it is None; an SAE's ``input_offset``)
    computed without a graph. Without a gradient to compute this is the plain gather."""
    inputs = (x, W_enc, bias) if source is None else (x, W_enc, bias, source)
    if torch.is_grad_enabled() and any(tensor.requires_grad for tensor in inputs):
        return _SparseEncoderGather.apply(
            pre_acts, x, W_enc, bias, source, code.indices, code.rows, code.latent_order()
        )
    if code.rows is None:
        return pre_acts.gather(1, code.indices)
    return pre_acts[code.rows, code.indices]


class _DecoderGradientByLatent(torch.autograd.Function):
    """The identity on a sparse decode's output, giving ``W_dec`` its gradient: for latent j,
    the sum over the entries of j of ``value * grad[bag]``, one ``embedding_bag`` with a bag
    per latent (as the encoder's weight gradient in :class:`_SparseEncoderGather`).

    embedding_bag's own weight backward took 30-40 ms more for 131k entries of 512 features
    on one CPU thread (docs/benchmarks.md); results are equal in float32.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, decoded: Tensor, W_dec: Tensor, values: Tensor, bags: Tensor,
        grouped: LatentOrder,
    ) -> Tensor:  # fmt: skip
        ctx.save_for_backward(values, bags)
        ctx.W_dec_shape, ctx.W_dec_dtype, ctx.grouped = W_dec.shape, W_dec.dtype, grouped
        return decoded.view_as(decoded)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, grad: Tensor
    ) -> tuple[Tensor | None, ...]:
        values, bags = ctx.saved_tensors
        grad_W = None
        if ctx.needs_input_grad[1]:
            dtype = ctx.W_dec_dtype
            grad_W = _sum_per_latent(
                ctx.grouped, bags, grad.to(dtype), values.to(dtype), ctx.W_dec_shape[0]
            )
        return grad, grad_W, None, None, None


def decode_with_latent_bags(code: SparseCode, W_dec: Tensor) -> Tensor:
    """``code.decode(W_dec)``, with the same values and gradients, whose backward computes
    ``W_dec``'s gradient by :class:`_DecoderGradientByLatent` instead of embedding_bag's own
    weight backward (the values' gradient is still embedding_bag's). On CPU only, where it was
    measured faster; elsewhere ``code.decode`` itself."""
    if not (torch.is_grad_enabled() and W_dec.requires_grad and W_dec.device.type == "cpu"):
        return code.decode(W_dec)
    detached = SparseCode(code.indices, code.values, code.n_rows, code.rows)
    decoded = detached.decode(W_dec.detach())
    bags = _entry_rows(code.indices, code.rows)
    values = code.values.detach().reshape(-1)
    return _DecoderGradientByLatent.apply(decoded, W_dec, values, bags, code.latent_order())


def decoder_gradient_by_latent(
    decoded: Tensor, W_dec: Tensor, values: Tensor, bags: Tensor, grouped: LatentOrder
) -> Tensor:
    """``decoded`` [n_bags, d] itself, through which ``W_dec`` gets the gradient of a sparse
    decode of entries (``values``, each entry's bag ``bags``, latents in ``grouped``) summed
    per latent (:class:`_DecoderGradientByLatent`), for a decode made without ``W_dec``'s own
    gradient (:func:`decode_with_latent_bags` is the one-call form)."""
    return _DecoderGradientByLatent.apply(decoded, W_dec, values, bags, grouped)

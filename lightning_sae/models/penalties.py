"""Loss terms shared by several variants."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from lightning_sae.models.sparse import SparseCode

OrthogonalityShape = Literal["sigmoid", "power", "linear"]


class _PerEntry(torch.autograd.Function):
    """``per_latent[indices]``, whose gradient sums each latent's entries with ``index_add_``.

    Autograd's own backward of the gather (index_put with accumulate) adds a latent's many
    entries in an order that varies between runs on a multi-threaded CPU, so two identical runs
    drifted apart; ``index_add_`` adds them in entry order on CPU (as the sparse encoder's bias
    gradient, ``models/sparse.py``), in the gradient's own dtype.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, per_latent: Tensor, indices: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(indices)
        ctx.n_latents = per_latent.shape[0]
        return per_latent[indices]

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (indices,) = ctx.saved_tensors
        summed = torch.zeros(ctx.n_latents, dtype=grad.dtype, device=grad.device)
        return summed.index_add_(0, indices, grad), None


def l1_penalty(acts: Tensor, decoder_norms: Tensor | None = None) -> Tensor:
    """Mean over the batch of sum_j |a_j| (times ||W_dec_j|| when decoder norms are given).

    Summed over the batch before weighting: one pass over the [batch, d_sae] activations
    forward and one backward, instead of materialising |a| * norms.
    """
    per_feature = acts.abs().reshape(-1, acts.shape[-1]).sum(0)
    if decoder_norms is not None:
        per_feature = per_feature * decoder_norms
    return per_feature.sum() / max(acts.numel() // acts.shape[-1], 1)


def l1_penalty_of_code(code: SparseCode, decoder_norms: Tensor | None = None) -> Tensor:
    """:func:`l1_penalty` of the dense activations ``code`` stands for, from its entries alone
    (a zero adds nothing to the sum)."""
    magnitudes = code.values.abs()
    if decoder_norms is not None:
        magnitudes = magnitudes * _PerEntry.apply(decoder_norms, code.indices)
    return magnitudes.sum() / max(code.n_rows, 1)


def tanh_penalty_of_code(
    code: SparseCode, scale: float, decoder_norms: Tensor | None = None
) -> Tensor:
    """:func:`tanh_penalty` of the dense activations ``code`` stands for (tanh(0) = 0)."""
    weighted = code.values.abs()
    if decoder_norms is not None:
        weighted = weighted * _PerEntry.apply(decoder_norms, code.indices)
    return torch.tanh(scale * weighted).sum() / max(code.n_rows, 1)


def tanh_penalty(acts: Tensor, scale: float, decoder_norms: Tensor | None = None) -> Tensor:
    """Mean over the batch of sum_j tanh(scale * |a_j| * ||W_dec_j||).

    Saturates for large activations, so unlike L1 it does not shrink features that are clearly
    on; it approaches a count of active features as ``scale`` grows.
    """
    weighted = acts.abs() if decoder_norms is None else acts.abs() * decoder_norms
    return torch.tanh(scale * weighted).sum(-1).mean()


def orthogonality_penalty(
    W_dec: Tensor,
    active: Tensor,
    shape: OrthogonalityShape = "sigmoid",
    power: float = 2.0,
) -> tuple[Tensor, Tensor]:
    """Penalise each active feature's cosine similarity with its nearest decoder neighbour.

    For every feature active in the batch, ``c`` is the cosine similarity between its decoder
    row and the nearest other row (the mean over ties, so that several equally close neighbours
    share the push). Gradient reaches the neighbour's row even when the neighbour itself was
    inactive: otherwise a rarely firing feature could park its decoder on an active one's.

    Returns ``(mean f(c) over active features, mean c)``, both zero when nothing fired.
    """
    active_idx = active.nonzero().squeeze(-1)
    if active_idx.numel() == 0:
        zero = W_dec.sum() * 0
        return zero, zero.detach()
    directions = W_dec / W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    sims = directions[active_idx] @ directions.T
    sims = sims.scatter(1, active_idx[:, None], float("-inf"))
    nearest = sims.max(dim=1, keepdim=True).values
    ties = sims == nearest
    cos = sims.where(ties, 0).sum(1) / ties.sum(1)
    return shaped_orthogonality(cos, shape, power)


def shaped_orthogonality(
    cos: Tensor, shape: OrthogonalityShape, power: float
) -> tuple[Tensor, Tensor]:
    """``(mean f(cos), mean cos)`` for the nearest-neighbour cosines of the active features."""
    if shape == "sigmoid":
        values = torch.sigmoid(10 * (cos - 0.5))
    elif shape == "power":
        values = cos.clamp_min(0).pow(power)
    elif shape == "linear":
        values = cos
    else:
        raise ValueError(f"orthogonality_shape must be sigmoid, power or linear, got {shape!r}.")
    return values.mean(), cos.mean().detach()


def approx_l0_indicator(acts: Tensor, epsilon: float) -> Tensor:
    """Differentiable stand-in for 1[a > 0]: a / (a + epsilon), for non-negative activations.

    It is 0 at a = 0, 1/2 at a = epsilon and tends to 1 for a >> epsilon. Smaller ``epsilon``
    counts more like a true L0; larger ``epsilon`` keeps a usable gradient
    (epsilon / (a + epsilon)^2) for activations well above zero.
    """
    return acts / (acts + epsilon)


def frequency_floor_penalty(frequencies: Tensor, min_frequency: float) -> Tensor:
    """sum_j ReLU(log10 s_min - log10 s_j): a cost for every feature firing less than s_min.

    Features with a frequency of exactly zero give no gradient through any batch statistic (a
    ReLU feature that never fires has no gradient at all), so they are left out of the sum
    rather than contributing an infinite constant.
    """
    firing = frequencies > 0
    # clamp before the log: torch.where would otherwise send NaN gradients from log10(0)
    log_s = torch.log10(frequencies.clamp_min(torch.finfo(frequencies.dtype).tiny))
    shortfall = torch.relu(math.log10(min_frequency) - log_s)
    return torch.where(firing, shortfall, 0).sum()

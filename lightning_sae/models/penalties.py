"""Loss terms shared by several variants."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

OrthogonalityShape = Literal["sigmoid", "power", "linear"]


def l1_penalty(acts: Tensor, decoder_norms: Tensor | None = None) -> Tensor:
    """Mean over the batch of sum_j |a_j| (times ||W_dec_j|| when decoder norms are given)."""
    weighted = acts.abs() if decoder_norms is None else acts.abs() * decoder_norms
    return weighted.sum(-1).mean()


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
    if shape == "sigmoid":
        values = torch.sigmoid(10 * (cos - 0.5))
    elif shape == "power":
        values = cos.clamp_min(0).pow(power)
    elif shape == "linear":
        values = cos
    else:
        raise ValueError(f"orthogonality_shape must be sigmoid, power or linear, got {shape!r}.")
    return values.mean(), cos.mean().detach()

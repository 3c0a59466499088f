"""Nearest-neighbour cosine similarity between sets of directions."""

from __future__ import annotations

import torch
from torch import Tensor


def _unit_rows(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def max_cosine_similarity(
    queries: Tensor, keys: Tensor, exclude_self: bool = False, block_size: int = 8192
) -> tuple[Tensor, Tensor]:
    """For each query row, the max cosine similarity with any key row, and that key's index.

    Exact, in blocks of ``block_size`` queries so that memory stays at block_size x n_keys.
    ``exclude_self`` skips the diagonal when queries and keys are the same set.
    """
    q, k = _unit_rows(queries.float()), _unit_rows(keys.float())
    values, indices = [], []
    for start in range(0, q.shape[0], block_size):
        sims = q[start : start + block_size] @ k.T
        if exclude_self:
            rows = torch.arange(sims.shape[0], device=sims.device)
            sims[rows, rows + start] = float("-inf")
        best = sims.max(dim=1)
        values.append(best.values)
        indices.append(best.indices)
    return torch.cat(values), torch.cat(indices)


def mean_max_cosine_similarity(reference: Tensor, learned: Tensor) -> Tensor:
    """MMCS: mean over reference rows of the max cosine similarity with any learned row."""
    return max_cosine_similarity(reference, learned)[0].mean()

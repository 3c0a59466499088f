"""Decoder geometry of a latent-sharded dictionary without gathering it on one rank.

Each member in turn broadcasts its slice of decoder rows to the latent group; every member
compares that block with its own rows (the project's nearest-neighbour search, so the torch
and faiss backends both apply) and the per-row maxima are reduced with MAX. A rank holds at
most two slices at once, never the whole decoder.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_sae.metrics.similarity import Backend, max_cosine_similarity
from lightning_sae.parallel.comm import all_reduce
from lightning_sae.parallel.sharded import LatentShard


def sharded_self_max_cosine(W_dec: Tensor, shard: LatentShard, backend: Backend = "auto") -> Tensor:
    """Every dictionary row's max cosine similarity with any other row, on every member, in
    global feature order (the sharded
    :func:`~lightning_sae.metrics.similarity.self_max_cosine_similarity`). ``W_dec`` is the
    member's rows, one per local feature (a cross-layer transcoder's of every layer)."""
    group = shard.latent_group
    if group is None:
        return max_cosine_similarity(W_dec, W_dec, exclude_self=True, backend=backend)[0]
    blocks = []
    for member in range(shard.latent_size):
        block = W_dec.detach().clone() if member == shard.latent_rank else torch.empty_like(W_dec)
        dist.broadcast(block, dist.get_global_rank(group, member), group=group)
        mine = member == shard.latent_rank
        best = max_cosine_similarity(block, W_dec, exclude_self=mine, backend=backend)[0]
        blocks.append(all_reduce(best.contiguous(), group, dist.ReduceOp.MAX))
    return shard.in_global_order(torch.cat(blocks))


def sharded_max_cosine_to(
    queries: Tensor, W_dec: Tensor, shard: LatentShard, backend: Backend = "auto"
) -> Tensor:
    """Each query row's max cosine similarity with any dictionary row, ``[n_queries]``."""
    best = max_cosine_similarity(queries, W_dec, backend=backend)[0].contiguous()
    return all_reduce(best, shard.latent_group, dist.ReduceOp.MAX)

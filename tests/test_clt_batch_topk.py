"""A BatchTopK cross-layer transcoder keeps the same entries tied at its cut-off in one process,
under DDP and latent-sharded, in both of its scopes (per layer, over all layers).

As for the SAE (tests/test_batch_topk_ties.py): identical rows put the cut-off on a tie, and
keeping every tied entry (``scores >= cutoff``) kept more than k x batch, and another set on two
ranks than in one process. The rule is the SAE's: of the tied entries, the first in the whole
batch's order (row, then layer for the all-layers scope, then feature).
"""

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_sae.models.clt import BatchTopKCrossLayerTranscoder
from lightning_sae.parallel.layers import sharded_class
from lightning_sae.parallel.sharded import LatentShard

K, ROWS, N_LAYERS, D_SAE = 2, 8, 2, 6
ABOVE, TIES, TIE = 9, 10, 5.0  # of the k x rows = 16 kept: 9 above the cut, 7 of 10 ties
SCOPES = ("layer", "all")


def make(scope: str) -> BatchTopKCrossLayerTranscoder:
    return BatchTopKCrossLayerTranscoder(d_in=4, d_sae=D_SAE, n_layers=N_LAYERS, k=K,
                                         topk_scope=scope).train()  # fmt: skip


def tied_scores(scope: str) -> torch.Tensor:
    """Selection scores as the CLT groups them ([groups, rows, features]: a group per layer, or
    one over every layer's features), each group's cut-off inside a run of ``TIES`` equal values
    spread over the rows and features (both halves of each)."""
    groups, width = (N_LAYERS, D_SAE) if scope == "layer" else (1, N_LAYERS * D_SAE)
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(groups, ROWS * width, generator=g) + 0.5  # positive, below every tie
    for group in scores:
        places = torch.randperm(ROWS * width, generator=g)
        group[places[:ABOVE]] = torch.arange(ABOVE, dtype=torch.float) + 10
        group[places[ABOVE : ABOVE + TIES]] = TIE
    return scores.view(groups, ROWS, width)


def halves(scores: torch.Tensor, scope: str, mesh: str, rank: int) -> torch.Tensor:
    """A rank's part of the scores: its rows (``2x1``, DDP alike), or its half of every layer's
    features (``1x2``)."""
    if mesh == "2x1":
        return scores.chunk(2, dim=1)[rank]
    if scope == "layer":
        return scores.chunk(2, dim=2)[rank]
    by_layer = scores.view(1, ROWS, N_LAYERS, D_SAE)
    return by_layer.chunk(2, dim=3)[rank].reshape(1, ROWS, -1)


def joined(parts: list[torch.Tensor], scope: str, mesh: str) -> torch.Tensor:
    if mesh == "2x1":
        return torch.cat(parts, dim=1)
    if scope == "layer":
        return torch.cat(parts, dim=2)
    return torch.cat([p.view(1, ROWS, N_LAYERS, -1) for p in parts], 3).view(1, ROWS, -1)


def _rank(rank: int, port: int, out: Path) -> None:
    """DDP, then latent sharding both ways a 2-process mesh can split (1x2: each rank holds
    half of every layer's features; 2x1: half of the rows)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        everyone = dist.group.WORLD
        shards = {
            "1x2": LatentShard(D_SAE, rank, 2, 1, everyone, None, everyone),
            "2x1": LatentShard(D_SAE, 0, 1, 2, None, everyone, everyone),
        }
        for scope in SCOPES:
            clt = make(scope)
            mask = clt.keep_mask(halves(tied_scores(scope), scope, "2x1", rank))
            torch.save(mask, out / f"ddp-{scope}-rank{rank}.pt")
            for mesh, shard in shards.items():
                clt = make(scope)
                clt.__class__ = sharded_class(BatchTopKCrossLayerTranscoder)
                clt.shard, clt.d_sae = shard, shard.local_size
                mask = clt.keep_mask(halves(tied_scores(scope), scope, mesh, rank))
                torch.save(mask, out / f"{mesh}-{scope}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ties_at_the_cut_off_keep_k_per_row_in_one_process_and_on_every_2_rank_mesh(
    tmp_path: Path,
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_rank, args=(port, tmp_path), nprocs=2)
    for scope in SCOPES:
        scores = tied_scores(scope)
        flat = scores.flatten(1)
        for group in flat:  # the cut falls inside the ties, and they straddle every half
            assert (group > TIE).sum() == ABOVE and (group == TIE).sum() == TIES
        tied = scores == TIE
        assert all(half.any() for half in tied.chunk(2, dim=1)), scope
        assert all(half.any() for half in tied.chunk(2, dim=2)), scope

        single = make(scope).keep_mask(scores)
        assert (single.flatten(1).sum(1) == K * ROWS).all(), scope
        # The first ties in flat (row, then feature) order, and everything above.
        first = tied.flatten(1).cumsum(1) <= K * ROWS - ABOVE
        assert torch.equal(single.flatten(1), (flat > TIE) | (tied.flatten(1) & first)), scope

        for run, mesh in (("ddp", "2x1"), ("1x2", "1x2"), ("2x1", "2x1")):
            files = [tmp_path / f"{run}-{scope}-rank{r}.pt" for r in (0, 1)]
            parts = [torch.load(file, weights_only=True) for file in files]
            assert torch.equal(joined(parts, scope, mesh), single), f"{run} {scope}"

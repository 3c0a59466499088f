"""BatchTopK keeps the same entries tied at its cut-off in one process and over gloo ranks, for
the SAE and for the cross-layer transcoder (per layer and over all layers).

Identical activation rows are common (identical tokens at the same position: every context's
first token), so the cut-off often falls on a tie. One process kept ``k * n`` entries and
chose among the tied ones as its top-k happened to; two ranks kept every tied entry
(``pre_acts >= cutoff``), one more than one process: a 12-step skip transcoder under DDP ended
5e-4 from one process (tests/test_ddp.py, with the default gradient clipping). The CLT kept
every tied entry even in one process (19 of 16 on the batch below). The rule now: of the tied
entries, the first in the whole batch's order (row, then layer for the CLT's all-layers scope,
then feature).

One spawn of two gloo processes serves every test (each process startup costs seconds): DDP,
then latent sharding both ways a 2-process mesh can split (1x2: each rank holds half of the
features, of every layer for a CLT; 2x1: half of the rows).
"""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_sae.models.clt import BatchTopKCrossLayerTranscoder
from lightning_sae.models.sparse import largest_of_batch
from lightning_sae.models.topk import BatchTopKSAE

K, ROWS, D_SAE = 2, 8, 6
N_LAYERS, ABOVE, TIES, TIE = 2, 9, 10, 5.0  # CLT: of k x rows = 16 kept, 9 above, 7 of 10 ties
SCOPES = ("layer", "all")


def tied_batch() -> torch.Tensor:
    """Pre-activations whose cut-off (the 16th largest of 48) falls inside a run of equal
    values, spread over both halves of the batch (each half a rank's rows)."""
    torch.manual_seed(0)
    scores = torch.randn(ROWS, D_SAE) - 3  # below every tied value
    scores[:, :2] = torch.arange(ROWS * 2, dtype=torch.float).view(ROWS, 2) + 10  # 16 largest..
    scores[1:, 1] = 5.0  # ..but 7 of them now tie at 5, the cut-off: 9 above, 7 tied
    scores[0, 2] = scores[6, 3] = scores[7, 4] = 5.0  # 10 ties in both halves, 7 kept
    return scores


def one_process_mask(scores: torch.Tensor) -> torch.Tensor:
    sae = BatchTopKSAE(d_in=4, d_sae=D_SAE, k=K)
    code = sae._batch_top_k(scores)
    return code.to_dense(D_SAE) != 0


def make_clt(scope: str) -> BatchTopKCrossLayerTranscoder:
    return BatchTopKCrossLayerTranscoder(d_in=4, d_sae=D_SAE, n_layers=N_LAYERS, k=K,
                                         topk_scope=scope).train()  # fmt: skip


def tied_scores(scope: str) -> torch.Tensor:
    """A CLT's selection scores as it groups them ([groups, rows, features]: a group per layer,
    or one over every layer's features), each group's cut-off inside a run of ``TIES`` equal
    values spread over the rows and features."""
    groups, width = (N_LAYERS, D_SAE) if scope == "layer" else (1, N_LAYERS * D_SAE)
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(groups, ROWS * width, generator=g) + 0.5  # positive, below every tie
    for group in scores:
        places = torch.randperm(ROWS * width, generator=g)
        group[places[:ABOVE]] = torch.arange(ABOVE, dtype=torch.float) + 10
        group[places[ABOVE : ABOVE + TIES]] = TIE
    return scores.view(groups, ROWS, width)


def clt_part(scores: torch.Tensor, scope: str, mesh: str, rank: int) -> torch.Tensor:
    """A rank's part of a CLT's scores: its rows (``2x1``, DDP alike), or its half of every
    layer's features (``1x2``)."""
    if mesh == "2x1":
        return scores.chunk(2, dim=1)[rank]
    if scope == "layer":
        return scores.chunk(2, dim=2)[rank]
    by_layer = scores.view(1, ROWS, N_LAYERS, D_SAE)
    return by_layer.chunk(2, dim=3)[rank].reshape(1, ROWS, -1)


def clt_joined(parts: list[torch.Tensor], scope: str, mesh: str) -> torch.Tensor:
    if mesh == "2x1":
        return torch.cat(parts, dim=1)
    if scope == "layer":
        return torch.cat(parts, dim=2)
    return torch.cat([p.view(1, ROWS, N_LAYERS, -1) for p in parts], 3).view(1, ROWS, -1)


def _rank(rank: int, port: int, world: int, out: Path) -> None:
    from lightning_sae.parallel.layers import sharded_class
    from lightning_sae.parallel.sharded import LatentShard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        sae = BatchTopKSAE(d_in=4, d_sae=D_SAE, k=K).train()
        code = sae._batch_top_k(tied_batch().chunk(world)[rank])
        torch.save(code.to_dense(D_SAE) != 0, out / f"sae-ddp-rank{rank}.pt")

        everyone = dist.group.WORLD
        shards = {
            "1x2": LatentShard(D_SAE, rank, world, 1, everyone, None, everyone),
            "2x1": LatentShard(D_SAE, 0, 1, world, None, everyone, everyone),
        }
        sae_parts = {"1x2": tied_batch().chunk(world, dim=1)[rank],
                     "2x1": tied_batch().chunk(world)[rank]}  # fmt: skip
        for mesh, shard in shards.items():
            part = sae_parts[mesh]
            sae = BatchTopKSAE(d_in=4, d_sae=D_SAE, k=K).train()
            sae.__class__ = sharded_class(BatchTopKSAE)
            sae.shard, sae.d_sae = shard, part.shape[1]
            mask = sae._batch_top_k(part).to_dense(part.shape[1]) != 0
            torch.save(mask, out / f"sae-{mesh}-rank{rank}.pt")

        for scope in SCOPES:
            mask = make_clt(scope).keep_mask(clt_part(tied_scores(scope), scope, "2x1", rank))
            torch.save(mask, out / f"clt-ddp-{scope}-rank{rank}.pt")
            for mesh, shard in shards.items():
                clt = make_clt(scope)
                clt.__class__ = sharded_class(BatchTopKCrossLayerTranscoder)
                clt.shard, clt.d_sae = shard, shard.local_size
                mask = clt.keep_mask(clt_part(tied_scores(scope), scope, mesh, rank))
                torch.save(mask, out / f"clt-{mesh}-{scope}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The masks two gloo ranks keep, in every setting above, as ``<name>-rank<r>.pt``."""
    out = tmp_path_factory.mktemp("ties")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_rank, args=(port, 2, out), nprocs=2)
    return out


def saved(folder: Path, name: str) -> list[torch.Tensor]:
    return [torch.load(folder / f"{name}-rank{r}.pt", weights_only=True) for r in (0, 1)]


def test_ties_at_the_cut_off_keep_the_first_entries_in_row_order() -> None:
    scores = tied_batch()
    values, flat = largest_of_batch(scores, K * ROWS)
    above = (scores > 5).sum().item()
    ties = (scores == 5).flatten().nonzero().squeeze(1)
    assert above == 9 and ties.numel() == 10  # the cut falls inside the ties
    expected = torch.cat([(scores > 5).flatten().nonzero().squeeze(1), ties[: K * ROWS - above]])
    assert torch.equal(flat, expected.sort().values)
    assert torch.equal(values, scores.flatten()[flat])  # a third of the batch: the flat top-k
    # The same rows widened by columns far below the cut: few enough kept that the search goes
    # through group maxima (groups of 16 flat entries, some spanning two rows). It keeps the
    # same entries, at their positions in the wider rows.
    wide = torch.cat([scores, torch.full((ROWS, 64 - D_SAE), -10.0)], dim=1)
    values_wide, flat_wide = largest_of_batch(wide, K * ROWS)
    assert torch.equal(flat_wide, flat // D_SAE * 64 + flat % D_SAE)
    assert torch.equal(values_wide, values)


def test_global_top_k_over_two_gloo_ranks_keeps_one_process_entries(ranks: Path) -> None:
    single = one_process_mask(tied_batch())
    assert single.sum() == K * ROWS
    assert torch.equal(torch.cat(saved(ranks, "sae-ddp")), single)


def test_latent_sharded_batch_top_k_keeps_one_process_entries(ranks: Path) -> None:
    single = one_process_mask(tied_batch())
    for mesh, dim in (("1x2", 1), ("2x1", 0)):
        assert torch.equal(torch.cat(saved(ranks, f"sae-{mesh}"), dim=dim), single), mesh


@pytest.mark.parametrize("scope", SCOPES)
def test_clt_ties_keep_k_per_row_in_one_process_and_on_every_2_rank_mesh(
    ranks: Path, scope: str
) -> None:
    scores = tied_scores(scope)
    flat, tied = scores.flatten(1), scores == TIE
    for group in flat:  # the cut falls inside the ties, which straddle every half
        assert (group > TIE).sum() == ABOVE and (group == TIE).sum() == TIES
    assert all(half.any() for dim in (1, 2) for half in tied.chunk(2, dim=dim))

    single = make_clt(scope).keep_mask(scores)
    assert (single.flatten(1).sum(1) == K * ROWS).all()
    # Everything above, and the first ties in flat (row, then feature) order.
    first = tied.flatten(1).cumsum(1) <= K * ROWS - ABOVE
    assert torch.equal(single.flatten(1), (flat > TIE) | (tied.flatten(1) & first))
    for run, mesh in (("ddp", "2x1"), ("1x2", "1x2"), ("2x1", "2x1")):
        parts = saved(ranks, f"clt-{run}-{scope}")
        assert torch.equal(clt_joined(parts, scope, mesh), single), run

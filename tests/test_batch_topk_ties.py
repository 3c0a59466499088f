"""BatchTopK keeps the same entries tied at its cut-off in one process and over gloo ranks.

Identical activation rows are common (identical tokens at the same position: every context's
first token), so the cut-off often falls on a tie. One process kept ``k * n`` entries and
chose among the tied ones as its top-k happened to; two ranks kept every tied entry
(``pre_acts >= cutoff``), one more than one process: a 12-step skip transcoder under DDP ended
5e-4 from one process (tests/test_ddp.py, with the default gradient clipping).
"""

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_sae.models.sparse import largest_of_batch
from lightning_sae.models.topk import BatchTopKSAE

K, ROWS, D_SAE = 2, 8, 6


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


def _rank(rank: int, port: int, world: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        sae = BatchTopKSAE(d_in=4, d_sae=D_SAE, k=K).train()
        half = tied_batch().chunk(world)[rank]
        code = sae._batch_top_k(half)
        torch.save(code.to_dense(D_SAE) != 0, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ties_at_the_cut_off_keep_the_first_entries_in_row_order() -> None:
    scores = tied_batch()
    values, flat = largest_of_batch(scores, K * ROWS)
    above = (scores > 5).sum().item()
    ties = (scores == 5).flatten().nonzero().squeeze(1)
    assert above == 9 and ties.numel() == 10  # the cut falls inside the ties
    expected = torch.cat([(scores > 5).flatten().nonzero().squeeze(1), ties[: K * ROWS - above]])
    assert torch.equal(flat, expected.sort().values)
    assert torch.equal(values, scores.flatten()[flat])
    # The flat path (a count no two-stage split helps, as on CUDA) keeps the same entries.
    values_flat, flat_flat = largest_of_batch(scores, K * ROWS + 1)  # per_row: every column
    assert torch.equal(flat_flat, torch.cat([flat, ties[K * ROWS - above :][:1]]).sort().values)


def test_global_top_k_over_two_gloo_ranks_keeps_one_process_entries(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_rank, args=(port, 2, tmp_path), nprocs=2)
    ranks = torch.cat([torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)])
    single = one_process_mask(tied_batch())
    assert single.sum() == K * ROWS
    assert torch.equal(ranks, single)


def _sharded_rank(rank: int, port: int, world: int, out: Path) -> None:
    """Latent sharding, both ways a 2-process mesh can split: the features over the two ranks
    (1x2: each holds half of every row's latents), then the rows (2x1)."""
    from lightning_sae.parallel.layers import sharded_class
    from lightning_sae.parallel.sharded import LatentShard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        everyone = dist.group.WORLD
        meshes = {
            "1x2": (LatentShard(D_SAE, rank, world, 1, everyone, None, everyone),
                    tied_batch().chunk(world, dim=1)[rank]),
            "2x1": (LatentShard(D_SAE, 0, 1, world, None, everyone, everyone),
                    tied_batch().chunk(world)[rank]),
        }  # fmt: skip
        for name, (shard, part) in meshes.items():
            sae = BatchTopKSAE(d_in=4, d_sae=D_SAE, k=K).train()
            sae.__class__ = sharded_class(BatchTopKSAE)
            sae.shard, sae.d_sae = shard, part.shape[1]
            mask = sae._batch_top_k(part).to_dense(part.shape[1]) != 0
            torch.save(mask, out / f"{name}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_latent_sharded_batch_top_k_keeps_one_process_entries(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_sharded_rank, args=(port, 2, tmp_path), nprocs=2)
    single = one_process_mask(tied_batch())
    for name, dim in (("1x2", 1), ("2x1", 0)):
        parts = [torch.load(tmp_path / f"{name}-rank{r}.pt", weights_only=True) for r in (0, 1)]
        assert torch.equal(torch.cat(parts, dim=dim), single), name

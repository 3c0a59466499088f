"""A latent-sharded TopK's AuxK sends candidates for dead latents only (docs/distributed.md).

Each member of a latent group sends ``min(aux_k, the most dead latents any member holds)``
candidates per row to the others: nothing while no latent is dead (the members' dead counts,
one number each, say so), and as many as the deadest member holds otherwise, not ``aux_k``.
The AuxK term stays the one-process term. One gloo launch of two processes, a 1x2 mesh (the
dictionary split in two). Cost: about 10 s (two processes importing torch).
"""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lightning_sae.parallel.sharded as sharded
from lightning_sae.models.topk import TopKSAE
from lightning_sae.parallel.layers import sharded_class
from lightning_sae.parallel.sharded import LatentShard, slice_to_shard

D_IN, D_SAE, K, AUX_K, ROWS = 16, 32, 4, 8, 24
WINDOW = 64
# Global latents dead in each case; member 0 holds latents 0-15, member 1 holds 16-31.
CASES = {"none dead": [], "3 dead, all on member 0": [1, 5, 9], "2 + 1 dead": [2, 7, 20]}


def new_sae() -> TopKSAE:
    return TopKSAE(d_in=D_IN, d_sae=D_SAE, k=K, aux_k=AUX_K, dead_window_tokens=WINDOW)


def batch() -> torch.Tensor:
    return torch.randn(ROWS, D_IN, generator=torch.Generator().manual_seed(0))


def auxk_term(sae: TopKSAE, x: torch.Tensor, dead: list[int]) -> float:
    sae.tokens_since_fired.zero_()
    sae.tokens_since_fired[dead] = WINDOW
    x_n = sae.normalize(x)
    return float(sae.auxk_loss(x_n, sae.forward_normalized(x_n)))


def _rank(rank: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        everyone = dist.group.WORLD
        shard = LatentShard(D_SAE, rank, 2, 1, everyone, None, everyone)
        sae = new_sae()
        sae.__class__ = sharded_class(TopKSAE)
        slice_to_shard(sae, shard)
        x = shard.gather_rows(batch().chunk(2)[rank])  # the member's rows joined: the batch
        sent: dict[str, list[tuple[int, ...]]] = {}
        terms = {}
        real_gather = sharded.gather_last
        for case, dead in CASES.items():
            widths: list[tuple[int, ...]] = []

            def recording(t: torch.Tensor, group: object, widths: list = widths) -> torch.Tensor:
                widths.append(tuple(t.shape))
                return real_gather(t, group)

            local_dead = [i - shard.start for i in dead if shard.start <= i < shard.stop]
            sharded.gather_last = recording
            try:
                sae.tokens_since_fired.zero_()
                sae.tokens_since_fired[local_dead] = WINDOW
                x_n = sae.normalize(x)
                output = sae.forward_normalized(x_n)
                widths.clear()  # the forward's own top-k gather is not AuxK's
                terms[case] = float(sae.auxk_loss(x_n, output))
            finally:
                sharded.gather_last = real_gather
            sent[case] = widths
        torch.save({"sent": sent, "terms": terms}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("sharded_auxk")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_rank, args=(port, out), nprocs=2)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def test_auxk_sends_no_candidates_while_no_latent_is_dead(two_ranks: list[dict]) -> None:
    for report in two_ranks:  # the dead counts, one number per member, and nothing more
        assert report["sent"]["none dead"] == [(1,)]
        assert report["terms"]["none dead"] == 0.0


def test_auxk_sends_as_many_candidates_as_the_deadest_member_holds(two_ranks: list) -> None:
    one_process = new_sae()  # the same weights: the init is seeded by init_seed alone
    for case, most_dead in [("3 dead, all on member 0", 3), ("2 + 1 dead", 2)]:
        for report in two_ranks:  # every member sends the same width: a member with fewer pads
            assert report["sent"][case] == [(1,), (ROWS, most_dead)], case
        expected = auxk_term(one_process, batch(), CASES[case])
        for report in two_ranks:
            assert report["terms"][case] == pytest.approx(expected, rel=1e-5), case

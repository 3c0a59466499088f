"""A latent-sharded TopK's AuxK sends candidates for dead latents only (docs/distributed.md).

Each member of a latent group sends ``min(aux_k, the most dead latents any member holds)``
candidates per row to the others: nothing while no latent is dead (the members' dead counts,
one number each, say so), and as many as the deadest member holds otherwise, not ``aux_k``.
The AuxK term stays the one-process term. One gloo launch of two processes, a 1x2 mesh (the
dictionary split in two). Cost: about 10 s (two processes importing torch).
"""

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import lightning_sae.parallel.sharded as sharded
from lightning_sae.models.topk import TopKSAE
from lightning_sae.parallel.layers import sharded_class
from lightning_sae.parallel.sharded import LatentShard, slice_to_shard

sys.path.insert(0, str(Path(__file__).parent))
from _gloo import reports_of_ranks  # noqa: E402

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


def _report(rank: int, world: int) -> dict:
    everyone = dist.group.WORLD
    shard = LatentShard(D_SAE, rank, world, 1, everyone, None, everyone)
    sae = new_sae()
    sae.__class__ = sharded_class(TopKSAE)
    slice_to_shard(sae, shard)
    x = shard.gather_rows(batch().chunk(2)[rank])  # the member's rows joined: the batch
    sent: dict[str, list[tuple[int, ...]]] = {}
    terms = {}
    real_gather = sharded.gather_last
    for case, dead in CASES.items():
        held = [i - shard.start for i in dead if shard.start <= i < shard.stop]
        sae.tokens_since_fired.zero_()
        sae.tokens_since_fired[held] = WINDOW
        x_n = sae.normalize(x)
        output = sae.forward_normalized(x_n)
        widths: list[tuple[int, ...]] = []

        def recording(t: torch.Tensor, group: object, widths: list = widths) -> torch.Tensor:
            widths.append(tuple(t.shape))
            return real_gather(t, group)

        sharded.gather_last = recording  # what AuxK sends, from here on
        try:
            terms[case] = float(sae.auxk_loss(x_n, output))
        finally:
            sharded.gather_last = real_gather
        sent[case] = widths
    return {"sent": sent, "terms": terms}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return reports_of_ranks(_report, 2, tmp_path_factory.mktemp("sharded_auxk"))


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

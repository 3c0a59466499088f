"""Data-informed init of a latent-sharded dictionary by k-means: no rank builds the whole.

``kmeans`` and ``outliers`` cluster the sample with faiss. Under latent sharding each member of
a latent group runs faiss's k-means on its own centroids (``parallel/kmeans.py``); the members'
rows joined must be the one-process init's, and no rank may allocate a tensor as large as the
dictionary. One gloo launch of two processes checks both meshes a pair of ranks can form (1x2:
the dictionary split in two; 2x1: each rank a whole copy) against the one-process init.
"""

import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_sae.callbacks.init import METHODS as ALL_METHODS
from lightning_sae.callbacks.init import DataInformedInit
from lightning_sae.models.clt import JumpReLUCrossLayerTranscoder
from lightning_sae.models.standard import StandardSAE
from lightning_sae.parallel.kmeans import _SplitRandom, sharded_spherical_kmeans
from lightning_sae.parallel.sharded import LatentShard

sys.path.insert(0, str(Path(__file__).parent))
from _gloo import reports_of_ranks  # noqa: E402

# The dictionary's 32 rows are a size no other tensor of the init has (the sample's 48 rows,
# 16 per member, width 16, 3 rare rows), so a tensor with a dimension of 32 is the dictionary.
D_IN, D_SAE, N = 16, 32, 48
METHODS = ("kmeans", "outliers")


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered_sample() -> torch.Tensor:
    """Rows drawn from 6 directions, some repeated exactly: k-means with 32 centroids then has
    empty clusters at every iteration, which faiss refills by splitting donors (a donor often
    on the other member)."""
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(6, D_IN, generator=g)
    rows = directions[torch.randint(0, 6, (N,), generator=g)]
    noisy = torch.rand(N, generator=g) < 0.5
    return rows + noisy[:, None] * 0.05 * torch.randn(N, D_IN, generator=g) + 0.1


def one_process(method: str) -> dict[str, torch.Tensor]:
    init = DataInformedInit(method=method, n_samples=N, rare_fraction=0.1)
    return init.initial_weights(clustered_sample(), StandardSAE(d_in=D_IN, d_sae=D_SAE))


# A cross-layer transcoder of 3 layers, 32 features each, reading 16 and writing 8 wide.
LAYERS, CLT_OUT = 3, 8


def clt_sample() -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [N, 3, 16], outputs [N, 3, 8]): each layer reads the clustered rows mixed its
    own way and writes a fixed map of what it reads, so the layers' samples differ."""
    g = torch.Generator().manual_seed(1)
    x = clustered_sample()
    inputs = torch.stack([x @ torch.randn(D_IN, D_IN, generator=g) for _ in range(LAYERS)], 1)
    outputs = torch.relu(inputs) @ torch.randn(D_IN, CLT_OUT, generator=g)
    return inputs, outputs + torch.arange(LAYERS)[:, None]


def clt(shard: LatentShard | None = None) -> JumpReLUCrossLayerTranscoder:
    module = JumpReLUCrossLayerTranscoder(d_in=D_IN, d_sae=D_SAE, n_layers=LAYERS, d_out=CLT_OUT)
    if shard is not None:
        module.shard = shard  # what shard_of reads: its features per layer are the shard's
    return module


def clt_init(method: str, shard: LatentShard | None = None) -> dict[str, torch.Tensor]:
    init = DataInformedInit(method=method, n_samples=N, rare_fraction=0.1)
    x_n, y_n = clt_sample()
    return init.initial_weights(x_n, clt(shard), y_n, shard)


class LargestTensors(TorchDispatchMode):
    """The shapes of every tensor the torch operations inside it create."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[torch.Size] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.shapes.append(tensor.shape)
        return out


def _report(rank: int, world: int) -> dict:
    everyone = dist.group.WORLD
    meshes = {
        "1x2": LatentShard(D_SAE, rank, world, 1, everyone, None, everyone),
        "2x1": LatentShard(D_SAE, 0, 1, world, None, everyone, everyone),
    }
    report = {}
    for mesh, shard in meshes.items():
        sae = StandardSAE(d_in=D_IN, d_sae=D_SAE)
        sae.shard = shard  # what shard_of reads: the dictionary's size is the shard's
        for method in METHODS:
            init = DataInformedInit(method=method, n_samples=N, rare_fraction=0.1)
            with LargestTensors() as created:
                weights = init.initial_weights(clustered_sample(), sae, None, shard)
            report[mesh, method] = weights, created.shapes
        for method in ALL_METHODS:  # a CLT's slice of every layer
            report[mesh, "clt", method] = clt_init(method, shard)
    return report


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return reports_of_ranks(_report, 2, tmp_path_factory.mktemp("sharded_init"))


@pytest.mark.parametrize("method", METHODS)
def test_members_rows_joined_are_the_one_process_init(two_ranks: list, method: str) -> None:
    whole = one_process(method)
    # 1x2: each rank holds half of the latents, 2x1: each the whole dictionary.
    for mesh, parts in (("1x2", [r["1x2", method][0] for r in two_ranks]),
                        ("2x1", [two_ranks[0]["2x1", method][0]])):  # fmt: skip
        joined = {"W_dec": torch.cat([p["W_dec"] for p in parts]),
                  "W_enc": torch.cat([p["W_enc"] for p in parts], dim=1)}  # fmt: skip
        for key, value in joined.items():
            torch.testing.assert_close(value, whole[key], msg=f"{mesh} {method} {key}")
        for part in parts:
            torch.testing.assert_close(part["b_dec"], whole["b_dec"])
    for rank in two_ranks:  # the two copies of the 2x1 mesh agree
        for key, value in rank["2x1", method][0].items():
            assert torch.equal(value, two_ranks[0]["2x1", method][0][key]), key


@pytest.mark.parametrize("method", METHODS)
def test_no_member_allocates_a_dictionary_sized_tensor(two_ranks: list, method: str) -> None:
    for rank in two_ranks:
        weights, shapes = rank["1x2", method]
        assert weights["W_dec"].shape == (D_SAE // 2, D_IN)
        whole = [shape for shape in shapes if D_SAE in shape]
        assert not whole, f"{method}: a member created tensors of shapes {whole}"
        largest = max(shapes, key=lambda shape: shape.numel())
        assert largest.numel() <= N * D_IN, largest  # the sample is the largest
    # The one-process init does build it (the check sees what it should).
    with LargestTensors() as created:
        one_process(method)
    assert any(D_SAE in shape for shape in created.shapes)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_a_sharded_clt_members_features_of_every_layer_are_the_one_process_init(
    two_ranks: list, method: str
) -> None:
    """Member t holds features [16 t, 16 (t + 1)) of each layer: its rows of every W_dec[s]
    and columns of every layer's encoder are those of the one-process init."""
    whole = clt_init(method)
    assert set(whole) == {"b_dec", "W_enc", *(f"W_dec.{s}" for s in range(LAYERS))}
    for source in range(LAYERS):  # a feature's whole slab is a unit direction
        norms = whole[f"W_dec.{source}"].flatten(1).norm(dim=1)
        torch.testing.assert_close(norms, torch.ones(D_SAE))
    parts = [rank["1x2", "clt", method] for rank in two_ranks]
    for key, value in whole.items():
        dim = {"b_dec": None, "W_enc": 2}.get(key, 0)
        joined = parts[0][key] if dim is None else torch.cat([p[key] for p in parts], dim=dim)
        torch.testing.assert_close(joined, value, msg=f"{method} {key}")
        torch.testing.assert_close(two_ranks[1]["2x1", "clt", method][key], value)


def test_kmeans_with_sharded_centroids_is_faiss_kmeans() -> None:
    """Bit for bit on one process: seeding, splits of empty clusters, restarts, the
    subsampling of large samples, and the n == k corner (each case hits its branch)."""
    rng = np.random.default_rng(0)
    repeated = rng.normal(size=(6, D_IN))[rng.integers(0, 6, N)]
    cases = [  # (points, k, restarts, expected splits)
        (unit(repeated), D_SAE, 1, True),
        (unit(repeated + 0.05 * rng.normal(size=repeated.shape)), 3, 5, False),
        (unit(rng.normal(size=(600, 8))), 2, 1, False),  # 600 > 2 * 256: faiss subsamples
        (unit(rng.normal(size=(D_SAE, D_IN))), D_SAE, 1, False),
    ]
    for data, k, restarts, splits in cases:
        reference = faiss.Kmeans(data.shape[1], k, niter=25, nredo=restarts, seed=7, spherical=True)
        reference.cp.min_points_per_centroid = 1
        reference.train(data)
        assert (sum(s["nsplit"] for s in reference.iteration_stats) > 0) == splits
        ours = sharded_spherical_kmeans(data, k, 7, [0, k], None, torch.device("cpu"), restarts)
        assert np.array_equal(ours.centroids, reference.centroids)
        assert np.array_equal(ours.assignment, reference.index.search(data, 1)[1][:, 0])


def test_split_generator_is_faiss_generator() -> None:
    faiss_generator, ours = faiss.RandomGenerator(1234), _SplitRandom()
    expected = np.array([faiss_generator.rand_float() for _ in range(5000)], dtype=np.float32)
    ours._ensure(5000)
    assert np.array_equal(ours._drawn[:5000], expected)

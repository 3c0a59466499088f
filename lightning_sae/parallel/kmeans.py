"""faiss's spherical k-means with its centroids sharded over a latent group.

``DataInformedInit``'s ``kmeans`` and ``outliers`` take dictionary rows from ``faiss.Kmeans``
(spherical, seeded from random points, 25 Lloyd iterations, best of ``restarts``). Under latent
sharding no rank may hold every centroid, so each member of the latent group runs the same
algorithm on its own centroids only, step for step as faiss runs it in one process (read in
faiss 1.15's ``Clustering.cpp`` and ``impl/ClusteringHelpers.cpp``):

- seeding: every rank draws faiss's permutation (``faiss.rand_perm``, the same seed) and takes
  the points of its own centroids. faiss seeds from random points, not k-means++, so this needs
  no communication.
- assignment: each member searches its centroids with faiss (``IndexFlatIP``); one all_gather
  of (inner product, centroid index) pairs per iteration gives every rank each point's nearest
  centroid over the whole dictionary (a tie goes to the lower index, as in faiss).
- update: each member sums the points assigned to its centroids, in point order and in
  float32 as faiss does, and divides by the count; the counts follow from the assignment,
  which every rank knows.
- empty clusters: faiss's split (a donor drawn by its generator, seeded 1234, with
  probability from the cluster sizes) is decided identically on every rank; the donor's owner
  broadcasts its centroid, one row per split.
- restarts: the objective (the sum of the best inner products) is known on every rank, so
  every rank keeps the same restart.

So a member's centroids are rows ``owned`` of the one-process ``faiss.Kmeans`` centroids, to
float rounding (BLAS may round an inner product differently when the centroids come in other
blocks; only a near-tie can then pick another centroid).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from lightning_sae.metrics.similarity import import_faiss

# faiss's ClusteringParameters the one-process init uses (callbacks/init.py).
NITER = 25
MAX_POINTS_PER_CENTROID = 256
_REDO_SEED_STRIDE = 15486557  # faiss: seed + 1 + redo * 15486557
_SPLIT_SEED = 1234  # faiss's split_clusters seeds its own generator with 1234 on every call
_SPLIT_EPS = np.float32(1 / 1024)


@dataclass
class ShardedKMeans:
    """A member's part of a k-means: its centroids (the rows ``owned`` of the whole), and each
    point's nearest centroid over the whole (index, inner product), known on every member."""

    centroids: np.ndarray  # [len(owned), d], float32
    owned: range
    assignment: np.ndarray  # [n], int64
    similarity: np.ndarray  # [n], float32


def even_bounds(k: int, members: int) -> list[int]:
    """Member ``t`` owns centroids ``[bounds[t], bounds[t + 1])``: ``k`` split evenly."""
    return [t * k // members for t in range(members + 1)]


def faiss_permutation(n: int, seed: int) -> np.ndarray:
    """faiss's ``rand_perm(n, seed)``, the permutation its seeding and subsampling draw."""
    faiss = import_faiss()
    perm = np.empty(n, dtype=np.int32)
    faiss.rand_perm(faiss.swig_ptr(perm), n, seed)
    return perm.astype(np.int64)


def nearest_centroids(
    data: np.ndarray,
    centroids: np.ndarray,
    owned: range,
    group: dist.ProcessGroup | None,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """Every point's nearest centroid over the latent group, (index [n], inner product [n]):
    each member searches its own centroids, then one all_gather of the pairs."""
    faiss = import_faiss()
    n = len(data)
    pairs = np.full((n, 2), (-np.inf, -1.0))
    if len(owned):
        index = faiss.IndexFlatIP(data.shape[1])
        index.add(centroids)
        similarity, found = index.search(data, 1)
        pairs[:, 0], pairs[:, 1] = similarity[:, 0], found[:, 0] + owned.start
    pairs = torch.from_numpy(pairs)  # float64 holds a float32 and an index exactly
    if group is not None:
        parts = [torch.empty_like(pairs, device=device) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, pairs.to(device), group=group)
        pairs = torch.stack(parts).cpu()  # [members, n, 2], members in centroid order
    else:
        pairs = pairs[None]
    # The first member holding the best inner product: the lowest index among ties.
    member = (pairs[..., 0] == pairs[..., 0].max(0).values).int().argmax(0)
    best = pairs[member, torch.arange(n)].numpy()
    return best[:, 1].astype(np.int64), best[:, 0].astype(np.float32)


class _SplitRandom:
    """faiss's ``RandomGenerator(1234)`` (std::mt19937) as ``split_clusters`` draws from it:
    ``rand_float() = mt() / float(mt.max())``. numpy's legacy generator is the same Mersenne
    Twister with the same seeding, read here in blocks (tested against faiss's own)."""

    def __init__(self) -> None:
        self._state = np.random.RandomState(_SPLIT_SEED)
        self._drawn = np.empty(0, dtype=np.float32)
        self._used = 0

    def _ensure(self, count: int) -> None:
        missing = self._used + count - len(self._drawn)
        if missing > 0:
            raw = self._state.randint(0, 2**32, size=max(missing, 4096), dtype=np.uint32)
            fresh = raw.astype(np.float32) / np.float32(4294967295.0)
            self._drawn = np.concatenate([self._drawn[self._used :], fresh])
            self._used = 0

    def donor(self, counts: np.ndarray, n: int) -> int:
        """faiss's pick of the cluster to split for an empty one: clusters ``0, 1, ...`` in a
        cycle, each taken with probability (size - 1) / (n - k), at most 10 k tries; then the
        largest."""
        k = len(counts)
        p = ((counts.astype(np.float64) - 1.0) / np.float64(np.float32(n - k))).astype(np.float32)
        for _ in range(10):  # one cycle over the clusters at a time: usually the first hits
            self._ensure(k)
            hits = np.flatnonzero(self._drawn[self._used : self._used + k] < p)
            if len(hits):
                self._used += int(hits[0]) + 1
                return int(hits[0])
            self._used += k
        return int(np.argmax(counts))


def _split_empty_clusters(
    centroids: np.ndarray,
    counts: np.ndarray,
    owned: range,
    bounds: Sequence[int],
    n: int,
    group: dist.ProcessGroup | None,
    device: torch.device,
) -> None:
    """faiss's ``split_clusters`` on sharded centroids (in place): each empty cluster becomes a
    copy of a donor, both nudged apart by 1/1024 in alternate coordinates, and the donor's
    count is shared between them. Every rank takes the same decisions from the counts."""
    d = centroids.shape[1]
    up = np.where(np.arange(d) % 2 == 0, 1 + _SPLIT_EPS, 1 - _SPLIT_EPS).astype(np.float32)
    down = np.where(np.arange(d) % 2 == 0, 1 - _SPLIT_EPS, 1 + _SPLIT_EPS).astype(np.float32)
    random = _SplitRandom()
    for empty in np.flatnonzero(counts == 0).tolist():  # a split empties no other cluster
        donor = random.donor(counts, n)
        if donor in owned:
            row = torch.from_numpy(centroids[donor - owned.start].copy())
        else:
            row = torch.empty(d)
        if group is not None:
            owner = int(np.searchsorted(bounds, donor, side="right")) - 1
            row = row.to(device)
            dist.broadcast(row, group=group, group_src=owner)
        row = row.cpu().numpy()
        if empty in owned:
            centroids[empty - owned.start] = row * up
        if donor in owned:
            centroids[donor - owned.start] *= down
        counts[empty] = counts[donor] / np.float32(2)
        counts[donor] -= counts[empty]


def _normalize_rows(centroids: np.ndarray) -> None:
    """faiss's ``fvec_renorm_L2`` (its spherical post-processing), in place."""
    if len(centroids):
        import_faiss().normalize_L2(centroids)


def sharded_spherical_kmeans(
    data: np.ndarray,
    k: int,
    seed: int,
    bounds: Sequence[int],
    group: dist.ProcessGroup | None,
    device: torch.device,
    restarts: int = 1,
) -> ShardedKMeans:
    """``faiss.Kmeans(d, k, niter=25, nredo=restarts, seed=seed, spherical=True)`` trained on
    ``data`` ([n, d] float32 unit rows, the same on every member), with this member's
    centroids only: rows ``[bounds[t], bounds[t + 1])`` for member ``t`` of ``group`` (None:
    one process, ``bounds = [0, k]``). Every member of the group calls it together. The
    assignment returned is that of all of ``data`` to the final centroids, as
    ``kmeans.index.search(data, 1)``."""
    member = 0 if group is None else dist.get_rank(group)
    owned = range(bounds[member], bounds[member + 1])
    n_all = len(data)
    if n_all < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n_all}.")
    train = data
    if n_all > k * MAX_POINTS_PER_CENTROID:  # faiss trains on a random subset
        train = data[faiss_permutation(n_all, seed)[: k * MAX_POINTS_PER_CENTROID]]
    n = len(train)
    if n == k:  # faiss's corner case: the points are the centroids, as they are
        centroids = train[owned.start : owned.stop].copy()
    else:
        centroids = _lloyd(train, k, seed, owned, bounds, group, device, restarts)
    assignment, similarity = nearest_centroids(data, centroids, owned, group, device)
    return ShardedKMeans(centroids, owned, assignment, similarity)


def _lloyd(
    train: np.ndarray,
    k: int,
    seed: int,
    owned: range,
    bounds: Sequence[int],
    group: dist.ProcessGroup | None,
    device: torch.device,
    restarts: int,
) -> np.ndarray:
    """faiss's ``Clustering::train`` loop on this member's centroids: the best of ``restarts``
    runs of ``NITER`` iterations, each stopped early once the objective repeats exactly."""
    n = len(train)
    best, best_objective = None, np.float32(-np.inf)  # inner products: higher is better
    for redo in range(restarts):
        seeds = faiss_permutation(n, seed + 1 + redo * _REDO_SEED_STRIDE)
        centroids = train[seeds[owned.start : owned.stop]].copy()
        _normalize_rows(centroids)
        previous = None
        for _ in range(NITER):
            assignment, similarity = nearest_centroids(train, centroids, owned, group, device)
            objective = np.cumsum(similarity, dtype=np.float32)[-1]  # faiss sums in order
            counts = np.bincount(assignment, minlength=k).astype(np.float32)
            centroids = np.zeros_like(centroids)
            mine = (assignment >= owned.start) & (assignment < owned.stop)
            np.add.at(centroids, assignment[mine] - owned.start, train[mine])  # point order
            local = counts[owned.start : owned.stop]
            filled = local > 0
            centroids[filled] *= (np.float32(1) / local[filled])[:, None]
            _split_empty_clusters(centroids, counts, owned, bounds, n, group, device)
            _normalize_rows(centroids)
            if previous is not None and previous != 0 and objective == previous:
                break  # faiss's early stop (threshold 0: the objective did not change)
            previous = objective
        if objective > best_objective:
            best, best_objective = centroids, objective
    return best

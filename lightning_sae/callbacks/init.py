"""Data-informed initialisation of the dictionary at fit start.

After the informed-initialisation experiments on toy superposition data (reference 001): decoder
rows from conventional schemes (``orthogonal``, ``xavier``) or from the data itself (``data``:
random samples, ``svd``: top singular directions, ``kmeans``: centroids, ``outliers``: the
"rare features" left after subtracting each sample's nearest centroid).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_sae.callbacks._reporting import decided, sae_input_and_target, saes
from lightning_sae.metrics.similarity import import_faiss
from lightning_sae.models.base import stepping_alone
from lightning_sae.models.transcoder import cross_directions
from lightning_sae.parallel.comm import all_reduce
from lightning_sae.parallel.kmeans import (
    MAX_POINTS_PER_CENTROID,
    NITER,
    even_bounds,
    sharded_spherical_kmeans,
)
from lightning_sae.parallel.members import placement_of
from lightning_sae.parallel.sharded import LatentShard, shard_of

Method = Literal["orthogonal", "xavier", "data", "svd", "kmeans", "outliers"]
METHODS = ("orthogonal", "xavier", "data", "svd", "kmeans", "outliers")
BiasInit = Literal["geometric_median", "mean", "keep"]
# Offsets keep the callback's draws apart from other RNG streams seeded with the same small
# integer (the toy data draws its ground-truth features from seed 0: an orthogonal init drawn
# from the same stream would start next to them).
_SAMPLE_SEED_OFFSET = 0x1A17_5A3D
_GENERATOR_SEED_OFFSET = 0x6E0_1E7
# A cross-layer transcoder's source layers draw apart: layer l's seeds are offset by l strides.
_LAYER_SEED_STRIDE = 0x2545_F491


def _unit_rows(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def geometric_median(x: Tensor, max_iter: int = 200, tol: float = 1e-7) -> Tensor:
    """The point minimising the sum of Euclidean distances to the rows of ``x`` (Weiszfeld).

    Written here because no maintained library in our dependencies provides it (the
    ``geom_median`` package is unmaintained, scipy and torch have none), and Weiszfeld's
    iteration is a few lines: re-weight each row by its inverse distance to the current estimate.
    """
    x64 = x.double()
    median = x64.mean(0)
    for _ in range(max_iter):
        weights = 1.0 / (x64 - median).norm(dim=1).clamp_min(1e-12)
        updated = (weights[:, None] * x64).sum(0) / weights.sum()
        converged = (updated - median).norm() <= tol * median.norm().clamp_min(1.0)
        median = updated
        if converged:
            break
    return median.to(x.dtype)


# Random rows are drawn in blocks of this many latents, block b from its own seed, so that a
# member of a latent group draws its slice of the rows alone, equal to that slice of the whole.
_BLOCK_ROWS = 256
_BLOCK_SEED_STRIDE = 0x9E37_79B9


def _random_rows(latents: range, d: int, seed: int, uniform: bool = False) -> Tensor:
    """Rows ``latents`` of a random [*, d] matrix (standard normal, or uniform in [-1, 1)),
    drawn block by block: any range of latents comes out the same alone as in the whole."""
    if len(latents) == 0:
        return torch.empty(0, d)
    first, last = latents.start // _BLOCK_ROWS, -(-latents.stop // _BLOCK_ROWS)
    blocks = []
    for block in range(first, last):
        generator = torch.Generator().manual_seed(seed + _BLOCK_SEED_STRIDE * (block + 1))
        rows = torch.empty(_BLOCK_ROWS, d)
        if uniform:
            blocks.append(rows.uniform_(-1, 1, generator=generator))
        else:
            blocks.append(rows.normal_(generator=generator))
    rows = torch.cat(blocks) if blocks else torch.empty(0, d)
    offset = first * _BLOCK_ROWS
    return rows[latents.start - offset : latents.stop - offset]


def _whole(d_sae: int) -> range:
    return range(d_sae)


def orthogonal_directions(
    d_sae: int,
    d_in: int,
    seed: int,
    latents: range | None = None,
    sum_over_latents: Callable[[Tensor], Tensor] = lambda gram: gram,
) -> Tensor:
    """Orthogonal init, rows scaled to unit norm: the orthogonal factor of a Gaussian matrix A
    (its polar factor, A (A^T A)^{-1/2} on A's range), so columns are orthonormal when d_sae >=
    d_in and rows when d_sae <= d_in. Rows ``latents`` only (default all): a member of a latent
    group passes its range and the sum of A^T A over the group (``sum_over_latents``), the one
    quantity that couples the rows."""
    latents = _whole(d_sae) if latents is None else latents
    a = _random_rows(latents, d_in, seed).double()
    eigenvalues, vectors = torch.linalg.eigh(sum_over_latents(a.T @ a))
    rank = min(d_sae, d_in)  # a Gaussian matrix has full rank
    eigenvalues, vectors = eigenvalues[-rank:], vectors[:, -rank:]
    return _unit_rows((a @ (vectors * eigenvalues.rsqrt()) @ vectors.T).float())


def xavier_directions(d_sae: int, d_in: int, seed: int, latents: range | None = None) -> Tensor:
    """Xavier-uniform init, rows scaled to unit norm (the scale of the uniform goes with the
    normalisation: rows uniform in the cube, then unit). Rows ``latents`` only (default all)."""
    return _unit_rows(_random_rows(_whole(d_sae) if latents is None else latents, d_in, seed, True))


def sample_directions(
    x: Tensor, d_sae: int, generator: torch.Generator, latents: range | None = None
) -> Tensor:
    """Directions of ``d_sae`` distinct random samples; rows ``latents`` only (default all)."""
    chosen = torch.randperm(len(x), generator=generator)[:d_sae]
    if latents is not None:
        chosen = chosen[latents.start : latents.stop]
    return _unit_rows(x[chosen.to(x.device)])


def svd_directions(
    x: Tensor, d_sae: int, seed: int, latents: range | None = None, top: Tensor | None = None
) -> Tensor:
    """Top right-singular directions of the sample (sign: mean projection positive), the rest
    random. Rows ``latents`` only (default all); ``top``, the singular directions when already
    computed (a latent group shares one rank's)."""
    latents = _whole(d_sae) if latents is None else latents
    top = top_singular_directions(x, d_sae) if top is None else top.to(x.device)
    mine = top[latents.start : min(latents.stop, len(top))]
    rest = range(max(latents.start, len(top)), latents.stop)
    return torch.cat([mine, _unit_rows(_random_rows(rest, x.shape[1], seed)).to(x.device)])


def top_singular_directions(x: Tensor, d_sae: int) -> Tensor:
    """The first min(d_sae, rank) right-singular directions of the sample, each signed so that
    the sample's projections on it sum to a positive number."""
    _, _, vh = torch.linalg.svd(x.float(), full_matrices=False)
    top = vh[: min(d_sae, len(vh))]
    return top * torch.where((x.float() @ top.T).sum(0) < 0, -1.0, 1.0)[:, None]


def _unit_data(points: Tensor) -> np.ndarray:
    """The rows faiss clusters: unit float32 rows on the host."""
    return _unit_rows(points.float()).cpu().contiguous().numpy()


def _spherical_kmeans(
    points: Tensor, k: int, seed: int, restarts: int = 1
) -> tuple[Tensor, Tensor]:
    """(unit centroids [k, d], nearest centroid of each point) by faiss k-means on unit rows.

    With ``restarts`` > 1 faiss keeps the best of that many runs (k-means from random points
    can settle in a local optimum, e.g. one centroid for two clusters).
    """
    faiss = import_faiss()
    data = _unit_data(points)
    kmeans = faiss.Kmeans(data.shape[1], k, niter=NITER, nredo=restarts, seed=seed, spherical=True)
    kmeans.cp.min_points_per_centroid = 1  # small samples are fine; don't warn about them
    kmeans.cp.max_points_per_centroid = MAX_POINTS_PER_CENTROID
    kmeans.train(data)
    assignment = torch.from_numpy(kmeans.index.search(data, 1)[1][:, 0]).long()
    return _unit_rows(torch.from_numpy(kmeans.centroids).float()), assignment


def _member_bounds(shard: LatentShard) -> list[int]:
    """The dictionary's latents of each member of the shard's latent group."""
    return [t * shard.local_size for t in range(shard.latent_size + 1)]


def kmeans_directions(x: Tensor, d_sae: int, seed: int, shard: LatentShard | None = None) -> Tensor:
    """Spherical k-means centroids of the sample, one per feature. With ``shard`` (every member
    of its latent group calls this together), this member's rows only: faiss's k-means run
    with each member holding its own centroids (``parallel/kmeans.py``)."""
    if shard is None:
        return _spherical_kmeans(x, d_sae, seed)[0].to(x.device)
    part = sharded_spherical_kmeans(
        _unit_data(x), d_sae, seed, _member_bounds(shard), shard.latent_group, x.device
    )
    return _unit_rows(torch.from_numpy(part.centroids).float()).to(x.device)


# Few clusters, cheap to restart; a centroid caught on the rare inputs would hide them.
_OUTLIER_RESTARTS = 5


def outlier_directions(
    x: Tensor,
    d_sae: int,
    rare_fraction: float,
    generator: torch.Generator,
    seed: int,
    shard: LatentShard | None = None,
) -> Tensor:
    """The "rare features" init: a ``rare_fraction`` of rows from poorly explained inputs.

    Common features dominate the sample; the centroids of a k-means with as many clusters as
    rare rows wanted approximate them. Subtracting from each input its projection on its nearest
    centroid leaves what the common structure does not explain; the inputs where that residual is
    the largest fraction of the input give the rare rows (their normalised residuals). The other
    rows are random samples, as in ``data``. With ``shard``, this member's rows only (see
    :func:`_sharded_outlier_directions`).
    """
    n_rare = max(1, round(rare_fraction * d_sae))
    if shard is not None:
        return _sharded_outlier_directions(x, d_sae, n_rare, generator, seed, shard)
    centroids, assignment = _spherical_kmeans(x, n_rare, seed, restarts=_OUTLIER_RESTARTS)
    nearest = centroids[assignment].to(x.device)
    residual = x - (x * nearest).sum(1, keepdim=True) * nearest
    unexplained = residual.norm(dim=1) / x.norm(dim=1).clamp_min(1e-12)
    rare = _unit_rows(residual[unexplained.topk(n_rare).indices])
    return torch.cat([rare, sample_directions(x, d_sae - n_rare, generator)])


def _sharded_outlier_directions(
    x: Tensor,
    d_sae: int,
    n_rare: int,
    generator: torch.Generator,
    seed: int,
    shard: LatentShard,
) -> Tensor:
    """A member's rows of :func:`outlier_directions`; every member of the latent group calls it
    together with the same sample.

    The ``n_rare`` centroids are split evenly over the members (``parallel/kmeans.py``); each
    member measures the inputs nearest to its centroids, one all_reduce gives every member every
    input's unexplained fraction (so all pick the same rare inputs), and each member receives
    the residuals of its rare rows from their centroids' owners (one reduce per member holding
    rare rows). The sample rows are picked by index, as ``data`` does.
    """
    group, members = shard.latent_group, shard.latent_size
    part = sharded_spherical_kmeans(
        _unit_data(x), n_rare, seed, even_bounds(n_rare, members), group, x.device,
        restarts=_OUTLIER_RESTARTS,
    )  # fmt: skip
    centroids = _unit_rows(torch.from_numpy(part.centroids).float()).to(x.device)
    assignment = torch.from_numpy(part.assignment).to(x.device)
    mine = ((assignment >= part.owned.start) & (assignment < part.owned.stop)).nonzero()[:, 0]
    nearest = centroids[assignment[mine] - part.owned.start]
    residual = x[mine] - (x[mine] * nearest).sum(1, keepdim=True) * nearest
    unexplained = x.new_zeros(len(x))  # each input's value from its centroid's owner
    unexplained[mine] = residual.norm(dim=1) / x[mine].norm(dim=1).clamp_min(1e-12)
    all_reduce(unexplained, group)
    rare_inputs = unexplained.topk(n_rare).indices
    row_of_input = torch.full((len(x),), -1, dtype=torch.long, device=x.device)
    row_of_input[mine] = torch.arange(len(mine), device=x.device)
    rare = x.new_empty(0, x.shape[1])
    for member in range(members):
        first, stop = member * shard.local_size, min((member + 1) * shard.local_size, n_rare)
        if first >= stop:
            continue
        rows = row_of_input[rare_inputs[first:stop]]
        received = x.new_zeros(stop - first, x.shape[1])  # zeros where another member owns it
        received[rows >= 0] = residual[rows[rows >= 0]]
        if group is not None:
            dist.reduce(received, group_dst=member, group=group)
        if member == shard.latent_rank:
            rare = _unit_rows(received)
    samples = range(max(shard.start, n_rare) - n_rare, max(shard.stop, n_rare) - n_rare)
    return torch.cat([rare, sample_directions(x, d_sae - n_rare, generator, samples)])


def _dictionary_size(sae: LightningModule) -> int:
    """Latents of the whole dictionary (a latent-sharded SAE holds a slice of them); a
    cross-layer transcoder's per layer."""
    shard = shard_of(sae)
    if shard is not None:
        return shard.d_sae
    return sae.d_sae if getattr(sae, "n_layers", None) is not None else sae.W_dec.shape[0]


def _copy_weights(sae: LightningModule, weights: dict[str, Tensor]) -> None:
    for key, value in weights.items():  # a CLT's decoders are W_dec.<source layer>
        tensor = functools.reduce(getattr, key.split("."), sae)
        tensor.copy_(value.to(tensor))


def _from_rank_zero(x: Tensor, shard: LatentShard) -> Tensor:
    """The mesh's first rank's ``x`` on every rank (``x`` has the same shape everywhere)."""
    if shard.world_group is not None:
        dist.broadcast(x, group=shard.world_group, group_src=0)
    return x


def _gram_sum(shard: LatentShard | None, like: Tensor) -> Callable[[Tensor], Tensor]:
    """Sum of a member's A^T A over its latent group (on the device, for NCCL)."""
    if shard is None or shard.latent_group is None:
        return lambda gram: gram
    return lambda gram: shard.sum_over_latents(gram.to(like.device)).to(gram.device)


class DataInformedInit(Callback):
    """Initialise decoder, encoder and ``b_dec`` from a data sample when a fit starts.

    Runs once, on a fresh fit only: not when resuming (``trainer.ckpt_path`` set, or this
    callback's restored state says it already ran). The sample comes from the datamodule's
    ``sample(n, seed)``; if the SAE normalises inputs and has not fitted its scale yet, the scale
    is fitted on the sample first (``fit_input_scale``), and everything below happens in the
    SAE's normalised space. The weights are computed on rank 0 and broadcast, so DDP ranks stay
    identical. Under ``latent_parallel`` no rank builds the whole dictionary: every rank draws
    the sample and each member computes its own latents, equal to that slice of the one-process
    weights (``kmeans`` and ``outliers`` run faiss's k-means with each member holding its own
    centroids, ``parallel/kmeans.py``; see :meth:`initial_weights`).

    ``b_dec`` is set first (geometric median or mean of the sample), then decoder rows (unit
    norm) from the sample centred on it by ``method``:

    - ``orthogonal`` / ``xavier``: conventional data-free schemes.
    - ``data``: random samples.
    - ``svd``: the top singular directions of the sample, the remaining rows random.
    - ``kmeans``: spherical k-means centroids (faiss).
    - ``outliers``: ``rare_fraction`` of the rows from inputs poorly explained by their nearest
      centroid, the rest random samples.

    The encoder becomes the decoder's transpose (``encoder: transpose``) or stays (``keep``).

    A transcoder's decoder writes another site than its encoder reads: ``b_dec`` and the
    decoder rows come from the output site's sample, and ``transpose`` gives each encoder
    column the input-site direction that predicts its decoder row over the sample
    (``models.transcoder.cross_directions``).

    A cross-layer transcoder is initialised layer by layer: ``b_dec[t]`` from layer ``t``'s
    outputs, and source layer ``s``'s features as a transcoder's from that layer's inputs to
    every output they write (see :meth:`_cross_layer_weights`).

    In an ``SAEGroup`` every member is initialised this way from the same sample (its own
    hook's activations), exactly as it would be alone.

    Args:
        method: how decoder rows are chosen.
        n_samples: inputs drawn for the initialisation (at least d_sae for the data methods).
        b_dec: ``geometric_median``, ``mean`` or ``keep``.
        encoder: ``transpose`` or ``keep``.
        rare_fraction: ``outliers``: fraction of rows taken from rare-feature residuals.
        seed: seed of the sample and of this callback's generator.
    """

    def __init__(
        self,
        method: Method = "kmeans",
        n_samples: int = 16384,
        b_dec: BiasInit = "geometric_median",
        encoder: Literal["transpose", "keep"] = "transpose",
        rare_fraction: float = 0.05,
        seed: int = 0,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
        if b_dec not in ("geometric_median", "mean", "keep"):
            raise ValueError(f"b_dec must be geometric_median, mean or keep, got {b_dec!r}.")
        if encoder not in ("transpose", "keep"):
            raise ValueError(f"encoder must be transpose or keep, got {encoder!r}.")
        if not 0 < rare_fraction < 1:
            raise ValueError(f"rare_fraction must be in (0, 1), got {rare_fraction}.")
        self.method, self.n_samples, self.b_dec, self.encoder = method, n_samples, b_dec, encoder
        self.rare_fraction, self.seed = rare_fraction, seed
        self.has_run = False

    @torch.no_grad()
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.has_run or trainer.ckpt_path is not None:
            rank_zero_info("DataInformedInit: resuming, so the weights are left as restored.")
            self.has_run = True
            return
        named = saes(pl_module)
        for name, sae in named.items():
            d_sae = _dictionary_size(sae)
            if self.method in ("data", "kmeans", "outliers") and self.n_samples < d_sae:
                raise ValueError(
                    f"DataInformedInit(method={self.method!r}) needs at least d_sae={d_sae} "
                    f"samples{f' (member {name!r})' if name else ''}, got "
                    f"n_samples={self.n_samples}: raise n_samples."
                )
        sample = getattr(trainer.datamodule, "sample", None)
        if not callable(sample):
            raise ValueError(
                "DataInformedInit needs a datamodule with sample(n, seed); this run has none."
            )
        # Every rank fits the scale (an all-reduce) and every member of a latent group computes
        # its slice; otherwise only rank 0 needs the sample.
        needs_scale = any(not bool(sae.input_scale_fitted) for sae in named.values())
        sharded = any(shard_of(sae) is not None for sae in named.values())
        # A placed member's rank decides for it alone (parallel/members.py).
        placed = placement_of(pl_module) is not None
        drawn = None
        if needs_scale or sharded or placed or trainer.is_global_zero:
            drawn = sample(self.n_samples, seed=self.seed + _SAMPLE_SEED_OFFSET)
        weights = {}
        for name, sae in named.items():
            x = target = None
            if drawn is not None:
                x, target = sae_input_and_target(pl_module, name, drawn)
                x, target = x.to(sae.device), (x if target is x else target.to(sae.device))
            if not bool(sae.input_scale_fitted):
                if placed:  # one rank holds the member: its scale is fitted as in one process
                    with stepping_alone():
                        sae.fit_input_scale(x, target)
                else:
                    sae.fit_input_scale(x, target)
            shard = shard_of(sae)
            if shard is not None or placed or trainer.is_global_zero:
                y_n = None if target is x else sae.normalize_target(target)
                computed = self.initial_weights(sae.normalize(x), sae, y_n, shard)
                if shard is None:
                    weights[name] = computed
                else:  # this member's slice, computed here
                    _copy_weights(sae, computed)
        # The unsharded SAEs' weights are rank 0's, so DDP ranks stay identical (a placed
        # member's are its own rank's).
        weights = decided(trainer, pl_module, weights)
        for name, computed in weights.items():
            _copy_weights(named[name], computed)
        self.has_run = True
        rank_zero_info(f"DataInformedInit: decoder from {self.method}, b_dec from {self.b_dec}.")

    def initial_weights(
        self,
        x_n: Tensor,
        pl_module: LightningModule,
        y_n: Tensor | None = None,
        shard: LatentShard | None = None,
    ) -> dict[str, Tensor]:
        """New W_dec (and W_enc, b_dec as configured), on CPU, from a normalised sample; for a
        transcoder ``y_n`` is the output site's sample of the same rows.

        With ``shard`` (a latent-sharded SAE's; every rank calls this together, each with the
        same sample), this member's latents only: its rows of W_dec and columns of W_enc, equal
        to that slice of the whole. ``b_dec`` is global rank 0's. The data-free methods draw
        their random rows by blocks of latents and ``orthogonal`` sums A^T A over the latent
        group, ``data`` and ``svd`` pick their rows by index; ``kmeans`` and ``outliers`` run
        faiss's k-means with each member holding its own centroids, exchanging each sample's
        nearest centroid per iteration (``parallel/kmeans.py``), so no rank holds them all.
        """
        if getattr(pl_module, "n_layers", None) is not None:
            return self._cross_layer_weights(x_n, pl_module, y_n, shard)
        d_sae = _dictionary_size(pl_module)
        latents = None if shard is None else range(shard.start, shard.stop)
        target = x_n if y_n is None else y_n
        b_dec = pl_module.b_dec.detach().clone() if self.b_dec == "keep" else self._centre(target)
        if shard is not None:  # one centring for every member
            b_dec = _from_rank_zero(b_dec.to(target).contiguous(), shard)
        centred = target - b_dec
        W_dec = self._directions(centred, d_sae, latents, shard)
        weights = {"W_dec": W_dec.float().cpu(), "b_dec": b_dec.float().cpu()}
        if self.encoder == "transpose" and y_n is not None:
            W_enc = pl_module.restart_encoder_directions(W_dec.to(x_n), x_n, centred).T
            weights["W_enc"] = W_enc.float().cpu().contiguous()
        elif self.encoder == "transpose":
            weights["W_enc"] = weights["W_dec"].T.contiguous()
        return weights

    def _centre(self, target: Tensor) -> Tensor:
        """``b_dec`` of a sample [n, d] (geometric median or mean)."""
        return geometric_median(target) if self.b_dec == "geometric_median" else target.mean(0)

    def _directions(
        self, centred: Tensor, d_sae: int, latents: range | None, shard: LatentShard | None,
        layer: int = 0,
    ) -> Tensor:  # fmt: skip
        """Unit decoder rows ``latents`` (default all) of a ``d_sae``-row dictionary for the
        centred sample, by ``method``; ``layer`` (a CLT's source layer) offsets every seed, so
        that each layer draws its own rows and layer 0 those of an SAE."""
        seed = self.seed + _GENERATOR_SEED_OFFSET + layer * _LAYER_SEED_STRIDE
        generator = torch.Generator().manual_seed(seed)
        width = centred.shape[1]
        if self.method == "orthogonal":
            return orthogonal_directions(d_sae, width, seed, latents, _gram_sum(shard, centred))
        if self.method == "xavier":
            return xavier_directions(d_sae, width, seed, latents)
        if self.method == "data":
            return sample_directions(centred, d_sae, generator, latents)
        if self.method == "svd":
            top = None
            if shard is not None:  # one rank's singular vectors, so every member's agree
                top = _from_rank_zero(top_singular_directions(centred, d_sae).contiguous(), shard)
            return svd_directions(centred, d_sae, seed, latents, top)
        if self.method == "kmeans":
            return kmeans_directions(centred, d_sae, self.seed + layer, shard)
        return outlier_directions(
            centred, d_sae, self.rare_fraction, generator, self.seed + layer, shard
        )

    def _cross_layer_weights(
        self, x_n: Tensor, clt: LightningModule, y_n: Tensor | None, shard: LatentShard | None
    ) -> dict[str, Tensor]:
        """A cross-layer transcoder's weights from its normalised sample (``x_n`` [n, layers,
        d_in], ``y_n`` [n, layers, d_out]): ``b_dec[t]`` from layer ``t``'s outputs; the
        features of source layer ``s`` as a transcoder's from that layer's inputs to what they
        write, every output from layer ``s`` on (centred and joined, so that a decoder row is
        the feature's whole slab at unit norm); the encoder column the input direction that
        predicts it (:func:`~lightning_sae.models.transcoder.cross_directions`). With ``shard``
        (a member holds features ``[start, stop)`` of every layer), those features of every
        layer, equal to that slice of the whole."""
        if y_n is None:
            raise ValueError("a cross-layer transcoder's init needs the output sample y_n.")
        d_sae, layers = _dictionary_size(clt), clt.n_layers
        latents = None if shard is None else range(shard.start, shard.stop)
        if self.b_dec == "keep":
            b_dec = clt.b_dec.detach().clone()
        else:
            b_dec = torch.stack([self._centre(y_n[:, target]) for target in range(layers)])
        if shard is not None:  # one centring for every member
            b_dec = _from_rank_zero(b_dec.to(y_n).contiguous(), shard)
        weights = {"b_dec": b_dec.float().cpu()}
        encoders = []
        for source in range(layers):
            written = (y_n[:, source:] - b_dec[source:]).flatten(1)
            rows = self._directions(written, d_sae, latents, shard, layer=source)
            weights[f"W_dec.{source}"] = rows.reshape(len(rows), layers - source, -1).float().cpu()
            if self.encoder == "transpose":
                encoders.append(cross_directions(rows.to(x_n), x_n[:, source], written).T)
        if encoders:
            weights["W_enc"] = torch.stack(encoders).float().cpu().contiguous()
        return weights

    def state_dict(self) -> dict[str, Any]:
        return {"has_run": self.has_run}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.has_run = state_dict["has_run"]

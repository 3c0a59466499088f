"""Data-informed initialisation of the dictionary at fit start.

After the informed-initialisation experiments on toy superposition data (reference 001): decoder
rows from conventional schemes (``orthogonal``, ``xavier``) or from the data itself (``data``:
random samples, ``svd``: top singular directions, ``kmeans``: centroids, ``outliers``: the
"rare features" left after subtracting each sample's nearest centroid).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_sae.callbacks._reporting import decided, sae_input_and_target, saes
from lightning_sae.metrics.similarity import import_faiss
from lightning_sae.models.base import stepping_alone
from lightning_sae.parallel.members import placement_of
from lightning_sae.parallel.sharded import shard_of

Method = Literal["orthogonal", "xavier", "data", "svd", "kmeans", "outliers"]
METHODS = ("orthogonal", "xavier", "data", "svd", "kmeans", "outliers")
BiasInit = Literal["geometric_median", "mean", "keep"]
# Offsets keep the callback's draws apart from other RNG streams seeded with the same small
# integer (the toy data draws its ground-truth features from seed 0: an orthogonal init drawn
# from the same stream would start next to them).
_SAMPLE_SEED_OFFSET = 0x1A17_5A3D
_GENERATOR_SEED_OFFSET = 0x6E0_1E7


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


def _random_directions(n: int, d: int, generator: torch.Generator) -> Tensor:
    return _unit_rows(torch.randn(n, d, generator=generator))


def orthogonal_directions(d_sae: int, d_in: int, generator: torch.Generator) -> Tensor:
    """Orthogonal init (rows orthonormal when d_sae <= d_in), rows scaled to unit norm."""
    weight = torch.empty(d_sae, d_in)
    torch.nn.init.orthogonal_(weight, generator=generator)
    return _unit_rows(weight)


def xavier_directions(d_sae: int, d_in: int, generator: torch.Generator) -> Tensor:
    """Xavier-uniform init, rows scaled to unit norm."""
    weight = torch.empty(d_sae, d_in)
    torch.nn.init.xavier_uniform_(weight, generator=generator)
    return _unit_rows(weight)


def sample_directions(x: Tensor, d_sae: int, generator: torch.Generator) -> Tensor:
    """Directions of ``d_sae`` distinct random samples."""
    chosen = torch.randperm(len(x), generator=generator)[:d_sae]
    return _unit_rows(x[chosen.to(x.device)])


def svd_directions(x: Tensor, d_sae: int, generator: torch.Generator) -> Tensor:
    """Top right-singular directions of the sample (sign: mean projection positive); the rest
    random."""
    _, _, vh = torch.linalg.svd(x.float(), full_matrices=False)
    top = vh[: min(d_sae, len(vh))]
    top = top * torch.where((x.float() @ top.T).sum(0) < 0, -1.0, 1.0)[:, None]
    rest = _random_directions(d_sae - len(top), x.shape[1], generator).to(x.device)
    return torch.cat([top, rest])


def _spherical_kmeans(
    points: Tensor, k: int, seed: int, restarts: int = 1
) -> tuple[Tensor, Tensor]:
    """(unit centroids [k, d], nearest centroid of each point) by faiss k-means on unit rows.

    With ``restarts`` > 1 faiss keeps the best of that many runs (k-means from random points
    can settle in a local optimum, e.g. one centroid for two clusters).
    """
    faiss = import_faiss()
    data = _unit_rows(points.float()).cpu().contiguous().numpy()
    kmeans = faiss.Kmeans(data.shape[1], k, niter=25, nredo=restarts, seed=seed, spherical=True)
    kmeans.cp.min_points_per_centroid = 1  # small samples are fine; don't warn about them
    kmeans.train(data)
    assignment = torch.from_numpy(kmeans.index.search(data, 1)[1][:, 0]).long()
    return _unit_rows(torch.from_numpy(kmeans.centroids).float()), assignment


def kmeans_directions(x: Tensor, d_sae: int, seed: int) -> Tensor:
    """Spherical k-means centroids of the sample, one per feature."""
    return _spherical_kmeans(x, d_sae, seed)[0].to(x.device)


def outlier_directions(
    x: Tensor, d_sae: int, rare_fraction: float, generator: torch.Generator, seed: int
) -> Tensor:
    """The "rare features" init: a ``rare_fraction`` of rows from poorly explained inputs.

    Common features dominate the sample; the centroids of a k-means with as many clusters as
    rare rows wanted approximate them. Subtracting from each input its projection on its nearest
    centroid leaves what the common structure does not explain; the inputs where that residual is
    the largest fraction of the input give the rare rows (their normalised residuals). The other
    rows are random samples, as in ``data``.
    """
    n_rare = max(1, round(rare_fraction * d_sae))
    # Few clusters, cheap to restart; a centroid caught on the rare inputs would hide them.
    centroids, assignment = _spherical_kmeans(x, n_rare, seed, restarts=5)
    nearest = centroids[assignment].to(x.device)
    residual = x - (x * nearest).sum(1, keepdim=True) * nearest
    unexplained = residual.norm(dim=1) / x.norm(dim=1).clamp_min(1e-12)
    rare = _unit_rows(residual[unexplained.topk(n_rare).indices])
    return torch.cat([rare, sample_directions(x, d_sae - n_rare, generator)])


def _dictionary_size(sae: LightningModule) -> int:
    """Latents of the whole dictionary (a latent-sharded SAE holds a slice of them)."""
    shard = shard_of(sae)
    return sae.W_dec.shape[0] if shard is None else shard.d_sae


class DataInformedInit(Callback):
    """Initialise decoder, encoder and ``b_dec`` from a data sample when a fit starts.

    Runs once, on a fresh fit only: not when resuming (``trainer.ckpt_path`` set, or this
    callback's restored state says it already ran). The sample comes from the datamodule's
    ``sample(n, seed)``; if the SAE normalises inputs and has not fitted its scale yet, the scale
    is fitted on the sample first (``fit_input_scale``), and everything below happens in the
    SAE's normalised space. The weights are computed on rank 0 and broadcast, so DDP ranks stay
    identical.

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
        # Every rank fits the scale (an all-reduce); only rank 0 needs the sample otherwise.
        needs_scale = any(not bool(sae.input_scale_fitted) for sae in named.values())
        # A placed member's rank decides for it alone (parallel/members.py); else rank 0.
        placed = placement_of(pl_module) is not None
        decides = trainer.is_global_zero or placed
        drawn = None
        if needs_scale or decides:
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
            if decides:
                y_n = None if target is x else sae.normalize_target(target)
                weights[name] = self.initial_weights(sae.normalize(x), sae, y_n)
        weights = decided(trainer, pl_module, weights)
        for name, sae in named.items():
            for key, value in weights[name].items():
                shard = shard_of(sae)  # a latent-sharded SAE takes its slice of the latents
                if shard is not None and key in ("W_dec", "W_enc"):
                    value = shard.local_part(value, 0 if key == "W_dec" else 1)
                getattr(sae, key).copy_(value.to(getattr(sae, key)))
        self.has_run = True
        rank_zero_info(f"DataInformedInit: decoder from {self.method}, b_dec from {self.b_dec}.")

    def initial_weights(
        self, x_n: Tensor, pl_module: LightningModule, y_n: Tensor | None = None
    ) -> dict[str, Tensor]:
        """New W_dec (and W_enc, b_dec as configured), on CPU, from a normalised sample; for a
        transcoder ``y_n`` is the output site's sample of the same rows."""
        generator = torch.Generator().manual_seed(self.seed + _GENERATOR_SEED_OFFSET)
        d_sae, d_in = _dictionary_size(pl_module), pl_module.W_dec.shape[1]
        target = x_n if y_n is None else y_n
        b_dec = pl_module.b_dec.detach()
        if self.b_dec == "geometric_median":
            b_dec = geometric_median(target)
        elif self.b_dec == "mean":
            b_dec = target.mean(0)
        centred = target - b_dec
        if self.method == "orthogonal":
            W_dec = orthogonal_directions(d_sae, d_in, generator)
        elif self.method == "xavier":
            W_dec = xavier_directions(d_sae, d_in, generator)
        elif self.method == "data":
            W_dec = sample_directions(centred, d_sae, generator)
        elif self.method == "svd":
            W_dec = svd_directions(centred, d_sae, generator)
        elif self.method == "kmeans":
            W_dec = kmeans_directions(centred, d_sae, self.seed)
        else:
            W_dec = outlier_directions(centred, d_sae, self.rare_fraction, generator, self.seed)
        weights = {"W_dec": W_dec.float().cpu(), "b_dec": b_dec.float().cpu()}
        if self.encoder == "transpose" and y_n is not None:
            W_enc = pl_module.restart_encoder_directions(W_dec.to(x_n), x_n, centred).T
            weights["W_enc"] = W_enc.float().cpu().contiguous()
        elif self.encoder == "transpose":
            weights["W_enc"] = weights["W_dec"].T.contiguous()
        return weights

    def state_dict(self) -> dict[str, Any]:
        return {"has_run": self.has_run}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.has_run = state_dict["has_run"]

"""Synthetic activations in superposition with known ground-truth features.

After the toy setup of Sharkey et al. (2022 sparse-coding interim report): ``n_features`` random
unit vectors in ``d_in`` dimensions, feature i firing with probability proportional to
``decay**i``, magnitudes uniform(0, 1), on average ``mean_active`` features per sample and at
least one. Optional correlation between features goes through a Gaussian copula: features are
grouped in blocks that share a latent factor, which correlates their firing while leaving each
feature's firing probability exactly as specified.

Two options reproduce the generator of the public toy-model code the informed-initialisation
post (reference 001) credits (HoagyC/sparse_coding, ``replicate_toy_models.py``):
``correlation_mode="per_batch"`` draws one correlated Gaussian vector per batch from a random
covariance and scales every feature's probability by its normal CDF (so firing probabilities
change from batch to batch while features within a batch fire independently), and
``empty_sample_rule="uniform_unit"`` gives each sample with no active feature one feature chosen
uniformly at random, at magnitude 1. ``fixed_train_set`` turns the endless stream into a fixed
training set of ``batches_per_epoch`` batches, iterated in the same order every epoch.

Every batch is a pure function of (seed, split, epoch, batch index), so a resumed run sees the
same data as an uninterrupted one, and under DDP each rank takes its slice of the same global
batch, so a DDP run sees what a single process with the same global batch sees.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning import LightningDataModule
from torch import Tensor

from lightning_sae.data.identity import IdentifiedData

Preset = Literal["128x256", "128x512", "128x1024"]
CorrelationMode = Literal["block", "per_batch"]
EmptySampleRule = Literal["frequency", "uniform_unit", "allow"]
PRESETS: dict[str, tuple[int, int]] = {
    "128x256": (256, 128),
    "128x512": (512, 128),
    "128x1024": (1024, 128),
}
_SPLIT_SEED_OFFSET = {"train": 0, "val": 1_000_003}


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ToySuperposition:
    """The generative model: ground-truth features and firing probabilities."""

    def __init__(
        self,
        n_features: int,
        d_in: int,
        mean_active: float,
        decay: float,
        correlation: float,
        correlation_block: int,
        seed: int,
        correlation_mode: CorrelationMode = "block",
        empty_sample_rule: EmptySampleRule = "frequency",
    ) -> None:
        for name, value in (("mean_active", mean_active), ("decay", decay)):
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}: set data.{name}.")
        if not 0 <= correlation < 1:
            raise ValueError(f"correlation must be in [0, 1), got {correlation}.")
        if not 0 < mean_active <= n_features:
            raise ValueError(f"mean_active must be in (0, n_features], got {mean_active}.")
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay}: set data.decay.")
        if correlation_mode not in ("block", "per_batch"):
            raise ValueError(
                f"correlation_mode must be 'block' or 'per_batch', got {correlation_mode!r}: "
                "set data.correlation_mode."
            )
        if correlation_mode == "per_batch" and correlation != 0:
            raise ValueError(
                "correlation is the within-block factor of correlation_mode 'block'; "
                f"'per_batch' has its own random covariance: set data.correlation: 0 "
                f"(got {correlation})."
            )
        if empty_sample_rule not in ("frequency", "uniform_unit", "allow"):
            raise ValueError(
                "empty_sample_rule must be 'frequency', 'uniform_unit' or 'allow', got "
                f"{empty_sample_rule!r}: set data.empty_sample_rule."
            )
        self.n_features, self.d_in, self.seed = n_features, d_in, seed
        self.mean_active, self.decay = mean_active, decay
        self.correlation_mode, self.empty_sample_rule = correlation_mode, empty_sample_rule
        generator = torch.Generator().manual_seed(seed)
        features = torch.randn(n_features, d_in, generator=generator)
        self.features = features / features.norm(dim=1, keepdim=True)
        self.firing_probability = self._probabilities(n_features, mean_active, decay)
        self.correlation = correlation
        self.block_of_feature = torch.randperm(n_features, generator=generator) // correlation_block
        self.n_blocks = int(self.block_of_feature.max()) + 1
        self.covariance_factor = (
            self._reference_covariance_factor(n_features, generator)
            if correlation_mode == "per_batch"
            else None
        )

    @staticmethod
    def _probabilities(n: int, mean_active: float, decay: float) -> Tensor:
        """p_i proportional to decay**i, capped at 1, summing to mean_active."""
        shape = decay ** torch.arange(n, dtype=torch.float64)
        low, high = 0.0, 1.0 / float(shape.min())
        for _ in range(100):  # bisection on the scale: the cap makes sum(p) nonlinear in it
            mid = (low + high) / 2
            if (shape * mid).clamp(max=1).sum() < mean_active:
                low = mid
            else:
                high = mid
        return (shape * high).clamp(max=1).float()

    @staticmethod
    def _reference_covariance_factor(n: int, generator: torch.Generator) -> Tensor:
        """Cholesky factor of the reference's covariance: a symmetrised uniform(0, 1) matrix,
        its diagonal raised by 1.001 x |smallest eigenvalue| when that is negative."""
        uniform = torch.rand(n, n, generator=generator, dtype=torch.float64)
        covariance = (uniform + uniform.T) / 2
        smallest = float(torch.linalg.eigvalsh(covariance)[0])
        if smallest < 0:
            covariance -= 1.001 * smallest * torch.eye(n, dtype=torch.float64)
        return torch.linalg.cholesky(covariance)

    def batch_probability(self, generator: torch.Generator) -> Tensor:
        """Per-batch firing probabilities of correlation_mode 'per_batch'.

        Normal CDF of one correlated Gaussian draw, times decay**i, scaled so that the mean
        over features is mean_active / n_features (values above 1 then fire always).
        """
        assert self.covariance_factor is not None
        z = self.covariance_factor @ torch.randn(
            self.n_features, generator=generator, dtype=torch.float64
        )
        shape = torch.special.ndtr(z) * self.decay ** torch.arange(
            self.n_features, dtype=torch.float64
        )
        return (shape * (self.mean_active / self.n_features) / shape.mean()).float()

    def sample_codes(self, n: int, generator: torch.Generator) -> Tensor:
        """[n, n_features] non-negative codes (magnitude of each active feature, else 0)."""
        if self.correlation_mode == "per_batch":
            p = self.batch_probability(generator)
            active = torch.rand(n, self.n_features, generator=generator) <= p
        else:
            p = self.firing_probability
            noise = torch.randn(n, self.n_features, generator=generator)
            if self.correlation > 0:
                shared = torch.randn(n, self.n_blocks, generator=generator)
                noise = (1 - self.correlation) ** 0.5 * noise + self.correlation**0.5 * shared[
                    :, self.block_of_feature
                ]
            active = noise < torch.special.ndtri(p)
        silent = (~active.any(1)).nonzero().squeeze(1)
        if self.empty_sample_rule == "frequency" and len(silent):
            # One feature drawn by firing probability; its magnitude is drawn like any other.
            forced = torch.multinomial(p, len(silent), replacement=True, generator=generator)
            active[silent, forced] = True
        codes = torch.rand(n, self.n_features, generator=generator) * active
        if self.empty_sample_rule == "uniform_unit" and len(silent):
            # The reference's rule: a feature chosen uniformly, at magnitude exactly 1.
            forced = torch.randint(self.n_features, (len(silent),), generator=generator)
            codes[silent, forced] = 1.0
        return codes

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` samples of shape [n, d_in]; one matmul, no per-sample Python loop."""
        return self.sample_codes(n, generator) @ self.features


class ToyBatches:
    """Iterable of global batches, sliced per rank, whose position survives a checkpoint.

    It has a length, so Lightning does not prefetch, and ``state_dict`` is the exact position.
    """

    def __init__(
        self,
        model: ToySuperposition,
        batch_size: int,
        n_batches: int,
        split: str,
        fresh_each_epoch: bool = True,
        fixed: bool = False,
    ) -> None:
        self.model, self.batch_size, self.n_batches, self.split = (
            model,
            batch_size,
            n_batches,
            split,
        )
        self.fresh_each_epoch = fresh_each_epoch
        self.fixed = fixed  # a fixed training set: every epoch replays epoch 0's batches
        self.epoch, self.next_index = 0, 0

    def __len__(self) -> int:
        return self.n_batches

    def batch(self, epoch: int, index: int) -> Tensor:
        if self.fixed:
            epoch = 0
        seed = (
            self.model.seed
            + _SPLIT_SEED_OFFSET[self.split]
            + 7919 * (epoch * self.n_batches + index)
        )
        return self.model.sample(self.batch_size, torch.Generator().manual_seed(seed))

    def __iter__(self) -> Iterator[Tensor]:
        rank, world = _rank_and_world()
        if self.batch_size % world:
            raise ValueError(
                f"data.batch_size={self.batch_size} is the global batch and must divide evenly "
                f"over {world} processes: choose a multiple of {world}."
            )
        if not self.fresh_each_epoch:
            # Validation: every pass is the whole split from its first batch, even after a pass
            # cut short (the sanity check reads 2 batches), so every reported metric covers it.
            self.next_index = 0
        elif self.next_index >= self.n_batches:  # the previous pass ran to its end
            self.epoch, self.next_index = self.epoch + 1, 0
        while self.next_index < self.n_batches:
            x = self.batch(self.epoch, self.next_index)
            self.next_index += 1
            yield x.chunk(world)[rank]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "next_index": self.next_index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.next_index = state["epoch"], state["next_index"]


class ToySuperpositionDataModule(IdentifiedData, LightningDataModule):
    """Toy superposition data with the ground-truth feature matrix exposed.

    Args:
        n_features: number of ground-truth features.
        d_in: dimension they are compressed into.
        preset: ``128x256``, ``128x512`` or ``128x1024`` (d_in x n_features, as in the
            informed-initialisation experiments); overrides n_features and d_in.
        mean_active: expected number of active features per sample.
        decay: geometric decay of firing probability with feature index.
        correlation: in [0, 1); correlation of the latent factor within a block of features.
        correlation_block: features per correlated block.
        batch_size: global batch size (split evenly across DDP ranks).
        batches_per_epoch: training batches per epoch (each epoch draws fresh samples, unless
            ``fixed_train_set``).
        val_batches: validation batches (the same ones every pass, always all of them).
        seed: seed of the features and of every sample.
        correlation_mode: ``block`` (the copula above, strength ``correlation``) or
            ``per_batch`` (the reference generator: firing probabilities redrawn per batch from
            a random covariance; ``correlation`` must stay 0).
        empty_sample_rule: what a sample with no active feature gets: ``frequency`` (one
            feature drawn by firing probability, uniform magnitude), ``uniform_unit`` (the
            reference's rule: a uniformly chosen feature at magnitude 1) or ``allow`` (it stays
            the zero vector).
        fixed_train_set: train on a fixed set of ``batches_per_epoch * batch_size`` samples,
            the same batches in the same order every epoch, instead of fresh samples.
    """

    def __init__(
        self,
        n_features: int = 512,
        d_in: int = 256,
        preset: Preset | None = None,
        mean_active: float = 5.0,
        decay: float = 0.99,
        correlation: float = 0.0,
        correlation_block: int = 8,
        batch_size: int = 1024,
        batches_per_epoch: int = 1000,
        val_batches: int = 8,
        seed: int = 0,
        correlation_mode: CorrelationMode = "block",
        empty_sample_rule: EmptySampleRule = "frequency",
        fixed_train_set: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("batches_per_epoch", batches_per_epoch)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}: set data.{name}.")
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}.")
            n_features, d_in = PRESETS[preset]
        self.save_hyperparameters()
        self.d_in, self.n_features = d_in, n_features
        self.toy = ToySuperposition(
            n_features,
            d_in,
            mean_active,
            decay,
            correlation,
            correlation_block,
            seed,
            correlation_mode,
            empty_sample_rule,
        )
        self.train_batches = ToyBatches(
            self.toy, batch_size, batches_per_epoch, "train", fixed=fixed_train_set
        )
        self.val_data = ToyBatches(self.toy, batch_size, val_batches, "val", fresh_each_epoch=False)

    def data_identity(self) -> dict[str, Any]:
        """The generating parameters, the batch size and the seed: the samples of global batch
        ``i`` depend on them all. Fresh samples follow the global batch index whatever the
        epoch length, so ``batches_per_epoch`` counts only as a fixed training set's size."""
        hp = self.hparams
        names = ("mean_active", "decay", "correlation", "correlation_block", "seed")
        identity = {
            "n_features": self.n_features,
            "d_in": self.d_in,
            **{name: hp[name] for name in names},
            "correlation_mode": hp.correlation_mode,
            "empty_sample_rule": hp.empty_sample_rule,
            "fixed_train_set": hp.fixed_train_set,
            "batch_size": hp.batch_size,
        }
        if hp.fixed_train_set:
            identity["batches_per_epoch"] = hp.batches_per_epoch
        return identity

    @property
    def ground_truth_features(self) -> Tensor:
        """[n_features, d_in] unit rows."""
        return self.toy.features

    def sample(self, n: int, seed: int | None = None) -> Tensor:
        """``n`` fresh training-distribution samples, e.g. for data-informed initialisation."""
        seed = self.toy.seed + 104_729 if seed is None else seed
        return self.toy.sample(n, torch.Generator().manual_seed(seed))

    def train_dataloader(self) -> ToyBatches:
        return self.train_batches

    def val_dataloader(self) -> ToyBatches:
        return self.val_data

    def test_dataloader(self) -> ToyBatches:
        return self.val_data

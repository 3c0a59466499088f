"""Synthetic activations in superposition with known ground-truth features.

After the toy setup of Sharkey et al. (2022 sparse-coding interim report): ``n_features`` random
unit vectors in ``d_in`` dimensions, feature i firing with probability proportional to
``decay**i``, magnitudes uniform(0, 1), on average ``mean_active`` features per sample and at
least one. Optional correlation between features goes through a Gaussian copula: features are
grouped in blocks that share a latent factor, which correlates their firing while leaving each
feature's firing probability exactly as specified.

Every batch is a pure function of (seed, split, epoch, batch index), so a resumed run sees the
same data as an uninterrupted one, and under DDP each rank takes its slice of the same global
batch, so a DDP run sees what a single process with the same global batch sees.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
import torch.distributed as dist
from lightning import LightningDataModule
from torch import Tensor

Preset = Literal["128x256", "128x512", "128x1024"]
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
    ) -> None:
        if not 0 <= correlation < 1:
            raise ValueError(f"correlation must be in [0, 1), got {correlation}.")
        if not 0 < mean_active <= n_features:
            raise ValueError(f"mean_active must be in (0, n_features], got {mean_active}.")
        self.n_features, self.d_in, self.seed = n_features, d_in, seed
        generator = torch.Generator().manual_seed(seed)
        features = torch.randn(n_features, d_in, generator=generator)
        self.features = features / features.norm(dim=1, keepdim=True)
        self.firing_probability = self._probabilities(n_features, mean_active, decay)
        self.correlation = correlation
        self.block_of_feature = torch.randperm(n_features, generator=generator) // correlation_block
        self.n_blocks = int(self.block_of_feature.max()) + 1

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

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` samples of shape [n, d_in]; one matmul, no per-sample Python loop."""
        p = self.firing_probability
        noise = torch.randn(n, self.n_features, generator=generator)
        if self.correlation > 0:
            shared = torch.randn(n, self.n_blocks, generator=generator)[:, self.block_of_feature]
            noise = (1 - self.correlation) ** 0.5 * noise + self.correlation**0.5 * shared
        active = noise < torch.special.ndtri(p)
        silent = ~active.any(1)
        if silent.any():
            forced = torch.multinomial(p, int(silent.sum()), replacement=True, generator=generator)
            active[silent.nonzero().squeeze(1), forced] = True
        magnitudes = torch.rand(n, self.n_features, generator=generator) * active
        return magnitudes @ self.features


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
    ) -> None:
        self.model, self.batch_size, self.n_batches, self.split = (
            model,
            batch_size,
            n_batches,
            split,
        )
        self.fresh_each_epoch = fresh_each_epoch
        self.epoch, self.next_index = 0, 0

    def __len__(self) -> int:
        return self.n_batches

    def batch(self, epoch: int, index: int) -> Tensor:
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


class ToySuperpositionDataModule(LightningDataModule):
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
        batches_per_epoch: training batches per epoch (each epoch draws fresh samples).
        val_batches: validation batches (the same ones every pass, always all of them).
        seed: seed of the features and of every sample.
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
    ) -> None:
        super().__init__()
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}.")
            n_features, d_in = PRESETS[preset]
        self.save_hyperparameters()
        self.d_in, self.n_features = d_in, n_features
        self.toy = ToySuperposition(
            n_features, d_in, mean_active, decay, correlation, correlation_block, seed
        )
        self.train_batches = ToyBatches(self.toy, batch_size, batches_per_epoch, "train")
        self.val_data = ToyBatches(self.toy, batch_size, val_batches, "val", fresh_each_epoch=False)

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

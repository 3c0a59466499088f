"""What the monitoring callbacks share: the run folder, the batch tensor, writing to loggers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning import Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor


def run_dir(trainer: Trainer) -> Path:
    """The run folder for PNGs. Call it on every rank: ``trainer.log_dir`` broadcasts."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def batch_tensor(batch: Any) -> Tensor:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def log_scalars(trainer: Trainer, metrics: dict[str, float]) -> None:
    """Write straight to every logger at the current step, as LearningRateMonitor does.

    ``self.log`` from a hook that fires every N steps would be dropped whenever N is not a
    multiple of ``log_every_n_steps``. Loggers write on rank 0 only.
    """
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


def log_histogram(trainer: Trainer, name: str, values: Tensor) -> None:
    """A histogram to each logger that has them (W&B, TensorBoard); others get the scalars."""
    values = values.detach().float().cpu()
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            logger.log_metrics(
                {name: wandb.Histogram(values.numpy(), num_bins=64)}, step=trainer.global_step
            )
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_histogram(name, values, global_step=trainer.global_step)

"""The Trainer the in-process tests use: quiet, no logger, no validation unless asked."""

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


def quiet_trainer(
    max_steps: int, callbacks: list[L.Callback] | None = None, **kwargs: Any
) -> L.Trainer:
    """Checkpointing is on only when a ModelCheckpoint is among ``callbacks``; ``kwargs``
    override any default."""
    callbacks = callbacks or []
    options: dict[str, Any] = {
        "max_steps": max_steps,
        "callbacks": callbacks,
        "logger": False,
        "enable_checkpointing": any(isinstance(c, ModelCheckpoint) for c in callbacks),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
    }
    return L.Trainer(**{**options, **kwargs})

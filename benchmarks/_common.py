"""What the benchmark scripts share (each runs as ``python benchmarks/NAME.py``, so this folder is
on ``sys.path`` and they import it as ``_common``)."""

from __future__ import annotations

from typing import Any

import lightning as L

# A Trainer that only trains: no logger, checkpoints, progress bar, summary or validation, so a
# timing measures the steps alone.
QUIET = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "limit_val_batches": 0,
    "num_sanity_val_steps": 0,
}


def quiet_trainer(**kwargs: Any) -> L.Trainer:
    """``L.Trainer(**kwargs)`` with the :data:`QUIET` settings (which ``kwargs`` may override)."""
    return L.Trainer(**{**QUIET, **kwargs})

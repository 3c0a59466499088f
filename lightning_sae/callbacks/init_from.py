"""A new run from trained weights: ``init_from``, the way to train a checkpoint on other data.

A resume (``--ckpt_path``) continues a run exactly and is refused on other data (see
:mod:`lightning_sae.data.identity`). Fine-tuning a trained SAE on another dataset, seed or
hook of the same width is a new run: :class:`InitFrom` copies the checkpoint's weights into the
module when the fit starts, and nothing else: the optimizer starts fresh, the loop at step 0,
the callbacks with their own state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from lightning_sae.callbacks.init import DataInformedInit
from lightning_sae.files import load_torch_file
from lightning_sae.models import variant_class
from lightning_sae.models.group import SAEGroup, names_group
from lightning_sae.parallel.checkpoint import consolidate_checkpoint, is_sharded_checkpoint


def checkpoint_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The module weights of a Lightning checkpoint (a ``.ckpt`` file, or a latent-sharded
    folder, reassembled) and the class path it records, if any; nothing is unpickled."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        checkpoint = consolidate_checkpoint(path)
    elif path.is_file():
        checkpoint = load_torch_file(path)
    elif path.is_dir():
        raise ValueError(
            f"init_from {path} is a folder without a checkpoint: pass a Lightning checkpoint "
            "(.ckpt, e.g. a run's checkpoints/last.ckpt) or a latent-sharded checkpoint folder."
        )
    else:
        raise ValueError(f"init_from {path} does not exist: pass a .ckpt file of a trained run.")
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"init_from {path} holds no weights (no state_dict): is it a checkpoint?")
    return state, checkpoint.get("hyper_parameters", {}).get("_class_path")


def _check_class(module: LightningModule, class_path: str | None, path: str) -> None:
    if class_path is None:  # a checkpoint of a Python run: the weights' names and shapes decide
        return
    if names_group(class_path):
        expected: type = SAEGroup
    else:
        expected = variant_class(class_path, f"init_from {path} (_class_path)")
    if not isinstance(module, expected):  # a latent-sharded module subclasses its variant
        raise ValueError(
            f"init_from {path} holds a {class_path.rpartition('.')[2]}, but the model is a "
            f"{type(module).__name__}: set the model's class_path to the checkpoint's class."
        )


def load_weights(module: LightningModule, path: str | Path) -> None:
    """Copy the weights (parameters and buffers) of checkpoint ``path`` into ``module``; every
    name and shape must match, else one line names the first that differ."""
    state, class_path = checkpoint_weights(path)
    _check_class(module, class_path, str(path))
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    resized = [
        f"{name} {list(state[name].shape)} there, {list(own[name].shape)} here"
        for name in own
        if name in state and state[name].shape != own[name].shape
    ]
    if missing or unexpected or resized:
        found = [*resized]
        if missing:
            found.append(f"missing: {', '.join(missing[:4])}")
        if unexpected:
            found.append(f"not in the model: {', '.join(unexpected[:4])}")
        raise ValueError(
            f"init_from {path}: its weights do not fit the model ({'; '.join(found)}). Configure "
            "the model as the checkpoint's (d_in, d_sae, variant options)."
        )
    with torch.no_grad():
        for name, value in own.items():
            value.copy_(state[name])


class InitFrom(Callback):
    """Start a fit from the weights of a trained checkpoint, on any data.

    Weights only: the module's parameters and buffers (its input scale, thresholds and dead
    clocks, so the SAE computes what it computed) are copied from ``path`` when the fit is set
    up; the optimizer, the learning-rate schedule and the loop start fresh at step 0, and no
    callback state is read. The data may differ from the checkpoint's (that is the point: a
    resume onto other data is refused). Every process reads the file, before a latent-sharded
    module is sliced, so it works alike on one process, under DDP and under ``latent_parallel``.

    On the command line: ``lightning-sae fit --init_from PATH`` (or ``init_from: PATH`` in the
    fit config). A resumed fit (``--ckpt_path``) restores the checkpoint's weights over these,
    so a run started with ``init_from`` resumes with the same config.

    Args:
        path: a Lightning checkpoint (``.ckpt``) or a latent-sharded checkpoint folder.
    """

    def __init__(self, path: str) -> None:
        self.path = str(path)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if any(isinstance(callback, DataInformedInit) for callback in trainer.callbacks):
            raise ValueError(
                "init_from and DataInformedInit both choose the initial weights: remove one "
                "(DataInformedInit would overwrite the checkpoint's weights)."
            )
        load_weights(pl_module, self.path)
        rank_zero_info(f"InitFrom: weights from {self.path}; optimizer and step start fresh.")

    def state_dict(self) -> dict[str, Any]:
        return {"path": self.path}  # where the run's weights came from, for the record

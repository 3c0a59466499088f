"""What the callbacks share: the run folder, the SAEs a module holds and their inputs, writing
to loggers."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning import LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from matplotlib.figure import Figure
from torch import Tensor, nn

from lightning_sae.models.base import SparseAutoencoder
from lightning_sae.models.group import SAEGroup
from lightning_sae.parallel.members import gather_objects, placement_of
from lightning_sae.parallel.sharded import shard_of
from lightning_sae.plots import figure_image, save_figure


def run_dir(trainer: Trainer) -> Path:
    """The run folder: the first logger's ``save_dir``, else ``trainer.default_root_dir``.

    Under ``lightning-sae fit`` both are the run folder. In a plain ``Trainer`` a logger's
    ``save_dir`` is where the user asked for output, while ``default_root_dir`` falls back to
    the working directory when not given. Both are the same on every rank.
    """
    save_dir = trainer.loggers[0].save_dir if trainer.loggers else None
    return Path(save_dir if save_dir is not None else trainer.default_root_dir)


def figures_dir(trainer: Trainer) -> Path:
    """Where the callbacks' PNGs go: one folder per run, whatever logger (or none) is used.

    Not the logger's version folder: a resumed run keeps adding to the same figures, and a run
    without a logger still writes them.
    """
    return run_dir(trainer) / "figures"


def batch_tensor(batch: Any) -> Tensor:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def batch_rows(batch: Any) -> int:
    """Rows (tokens) in a batch: a tensor's, or, for one served per hook, any hook's (the rows
    are aligned across hooks)."""
    x = batch_tensor(batch)
    return next(iter(x.values())).shape[0] if isinstance(x, Mapping) else x.shape[0]


def saes(pl_module: LightningModule) -> dict[str, SparseAutoencoder]:
    """The SAEs a callback acts on, by name: a group's members, or the module itself as ``""``.

    Callbacks keep one state per name; ``""`` keeps a single SAE's logs, files and checkpoint
    state exactly as they were before groups existed.
    """
    if isinstance(pl_module, SAEGroup):
        return pl_module.named_saes()
    return {"": pl_module}


def decoder_parameters(sae: SparseAutoencoder) -> list[Tensor]:
    """The decoder's parameters, each with one feature per row along dim 0: ``[W_dec]``, or a
    cross-layer transcoder's one per source layer (``[d_sae, n_targets, d_out]``, a feature's
    row being everything it writes)."""
    W_dec = sae.W_dec
    return list(W_dec) if isinstance(W_dec, nn.ParameterList) else [W_dec]


def decoder_rows(sae: SparseAutoencoder) -> Tensor:
    """One direction per feature as rows of one matrix, what decoder geometry measures:
    ``W_dec``, or for a cross-layer transcoder each feature's direction in its own layer's
    output (the slabs differ in width from layer to layer)."""
    W_dec = sae.W_dec
    if isinstance(W_dec, nn.ParameterList):
        return torch.cat([W[:, 0] for W in W_dec])
    return W_dec


def feature_count(sae: SparseAutoencoder) -> int:
    """Features in all: ``d_sae``, or ``n_layers * d_sae`` for a cross-layer transcoder."""
    return getattr(sae, "n_features", sae.d_sae)


def member_names(pl_module: LightningModule) -> list[str]:
    """The names of every SAE of the module, held here or not (``[""]`` for a single SAE): what
    a callback reads from the logged metrics, which every rank logs for every member."""
    if placement_of(pl_module) is not None:
        return list(pl_module.member_names)
    return list(saes(pl_module))


def measures_here(trainer: Trainer, pl_module: LightningModule) -> bool:
    """Whether this rank measures (and decides for) its SAEs: rank 0 under DDP (the others get
    its decisions by :func:`decided`); every rank where the measurement is collective (latent
    sharding) or where each member is held by one rank (member placement)."""
    return (
        trainer.is_global_zero
        or shard_of(pl_module) is not None
        or placement_of(pl_module) is not None
    )


def decided(trainer: Trainer, pl_module: LightningModule, decisions: Any) -> Any:
    """Per-SAE decisions (weights, plans) as every rank applies them: rank 0's, broadcast; each
    rank's own under member placement, where a member's rank alone decides for it (a member
    split over a block of ranks: the block's first rank, broadcast over the block). Every rank
    calls this."""
    if placement_of(pl_module) is None:
        return trainer.strategy.broadcast(decisions, src=0)
    blocks = getattr(pl_module, "blocks", {})
    for name in [name for name in pl_module.member_names if name in decisions]:
        if name in blocks:  # the block's ranks reach this name in the same order
            carried = [decisions[name]]
            dist.broadcast_object_list(carried, group=blocks[name], group_src=0)
            decisions[name] = carried[0]
    return decisions


def gathered(pl_module: LightningModule, values: dict[str, Any]) -> dict[str, Any]:
    """Per-SAE values to report, complete on rank 0 (which logs): under member placement each
    member's from its (first) rank, in the group's order (every rank calls this); elsewhere
    ``values``."""
    placement = placement_of(pl_module)
    if placement is None:
        return values
    joined = {
        name: value
        for rank, rank_values in enumerate(gather_objects(values))
        for name, value in rank_values.items()
        if placement[name] == rank
    }
    return {name: joined[name] for name in pl_module.member_names if name in joined}


def reports_for(trainer: Trainer, pl_module: LightningModule, name: str) -> bool:
    """Whether this rank's measurement of SAE ``name`` is the one logged: rank 0's, or under
    member placement the member's (first) rank's (see :func:`gathered`)."""
    placement = placement_of(pl_module)
    return trainer.is_global_zero if placement is None else placement[name] == trainer.global_rank


def sae_input(pl_module: LightningModule, name: str, batch: Any) -> Tensor:
    """SAE ``name``'s input in a batch (or a datamodule sample): its hook's tensor in a group,
    the input site's for a transcoder."""
    return sae_input_and_target(pl_module, name, batch)[0]


def sae_input_and_target(
    pl_module: LightningModule, name: str, batch: Any
) -> tuple[Tensor, Tensor]:
    """(input, target) of SAE ``name`` in a batch: the same tensor for an SAE; a transcoder's
    input and output sites (:meth:`SparseAutoencoder.input_and_target`)."""
    if name:
        return pl_module.members[name].input_and_target(pl_module.input_of(name, batch))
    return pl_module.input_and_target(batch)


def scoped(name: str, key: str) -> str:
    """A log key (or folder) of SAE ``name``: ``<name>/<key>`` in a group, ``key`` alone."""
    return f"{name}/{key}" if name else key


def per_sae_state(states: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A callback's checkpoint state: a single SAE's as it always was, a group's by member."""
    return states[""] if set(states) == {""} else {"members": states}


def states_by_sae(state_dict: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The inverse of :func:`per_sae_state`."""
    return dict(state_dict["members"]) if "members" in state_dict else {"": state_dict}


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


def log_figure(trainer: Trainer, name: str, draw: Callable[[], Figure], png: Path | None) -> None:
    """The figure ``draw()`` makes, as an image to TensorBoard and W&B (tag ``<name>_figure``)
    and as a PNG file.

    Call it on rank 0 only. The figure is drawn only when a logger takes images or ``png`` is
    set, and rendered once for all loggers; the PNG is written whether or not any logger is
    active.
    """
    takes_images = [
        logger for logger in trainer.loggers if isinstance(logger, (TensorBoardLogger, WandbLogger))
    ]
    if not takes_images and png is None:
        return
    figure = draw()
    image = figure_image(figure) if takes_images else None
    for logger in takes_images:
        if isinstance(logger, WandbLogger):
            logger.log_image(f"{name}_figure", [image], step=trainer.global_step)
        else:
            logger.experiment.add_image(
                f"{name}_figure", image, global_step=trainer.global_step, dataformats="HWC"
            )
    if png is not None:
        save_figure(figure, png)

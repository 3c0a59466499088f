"""The figures a run ends with: loss / L0 / FVU curves, feature density on the validation
samples, and a sweep's L0-FVU frontier."""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from torch import Tensor

from lightning_sae.callbacks._reporting import (
    figures_dir,
    gathered,
    log_figure,
    member_names,
    saes,
    scoped,
)
from lightning_sae.metrics.reconstruction import FiringCounts
from lightning_sae.parallel.members import placement_of
from lightning_sae.parallel.sharded import shard_of
from lightning_sae.plots import density_figure, frontier_figure, training_curves_figure

CURVE_KEYS = ("loss", "l0", "fvu")
Series = dict[str, list[float]]  # "step" and each of CURVE_KEYS, aligned


class TrainingFigures(Callback):
    """Keeps each SAE's loss, L0 and FVU over training and draws, at the end of a fit:

    - ``figures/training_curves.png``: loss, L0 and FVU against the step, training (read every
      ``every_n_steps``) and validation (every validation pass), one line per SAE;
    - ``figures/feature_density.png`` (``figures/<member>/feature_density.png`` in a group):
      the histogram of log10 firing frequency of each feature on the last validation pass's
      samples; its "never" bar is the final table's dead fraction;
    - for an ``SAEGroup`` of several members, ``figures/frontier.png``: each member's final
      validation FVU against its L0 (training values when no validation ran).

    Each also goes to TensorBoard / W&B as an image (``curves/training_figure``,
    ``[<member>/]val/log10_density_figure``, ``frontier/l0_fvu_figure``). Reading the values is a
    few scalars per record and drawing happens once, so the callback costs nothing per step.
    The history is in the state dict: the curves of a resumed run start at step 0. ``validate``
    alone (no fit) draws the density figure when its pass ends.

    A latent-sharded module's validation counts hold each member's slice (a cross-layer
    transcoder's of every layer) at its global index, so syncing them gives the whole's.

    Args:
        every_n_steps: training values are recorded every this many steps (default: the
            trainer's ``log_every_n_steps``).
        save_png: write the PNGs (the loggers that take images get them either way).
        dead_log10: where never-firing features sit on the density histogram's axis.
    """

    def __init__(
        self, every_n_steps: int | None = None, save_png: bool = True, dead_log10: float = -10.0
    ) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1 or null, got {every_n_steps}.")
        self.every_n_steps, self.save_png, self.dead_log10 = every_n_steps, save_png, dead_log10
        self.train: dict[str, Series] = {}  # by SAE name ("" for a single SAE)
        self.val: dict[str, Series] = {}
        self.val_counts: dict[str, tuple[Tensor, int]] = {}  # last validation pass's firings

    # ----------------------------------------------------------------- recording
    def _record(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        metrics, history = trainer.callback_metrics, getattr(self, stage)
        for name in member_names(pl_module):  # every rank logs every member's values
            values = {key: metrics.get(scoped(name, f"{stage}/{key}")) for key in CURVE_KEYS}
            if all(value is None for value in values.values()):
                continue
            series = history.setdefault(name, {"step": [], **{key: [] for key in CURVE_KEYS}})
            if series["step"] and series["step"][-1] == trainer.global_step:
                for key in ("step", *CURVE_KEYS):  # a pass repeated at one step: keep the last
                    series[key].pop()
            series["step"].append(float(trainer.global_step))
            for key, value in values.items():
                series[key].append(math.nan if value is None else float(value))

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        every = self.every_n_steps or trainer.log_every_n_steps or 1
        step = trainer.global_step
        if step % every == 0 or step == 1 or step == trainer.max_steps:
            self._record(trainer, pl_module, "train")

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The counts are read before Lightning computes and resets the metric; syncing them is a
        # collective that every rank joins (callbacks run on every rank).
        if trainer.sanity_checking:
            return
        # A latent-sharded module's counts are synced like DDP's: each member added its slice.
        # A placed member's metric saw the whole batch on its own rank: read as it is (a member
        # split over a block: synced over the block), and every rank's joined (rank 0 draws).
        placed = placement_of(pl_module) is not None
        found = {}
        for name, sae in saes(pl_module).items():
            metric = getattr(sae, "val_dead", None)
            if not isinstance(metric, FiringCounts):
                continue
            with metric.sync_context(should_sync=not placed or shard_of(sae) is not None):
                counts, n = metric.counts.detach().cpu().clone(), int(metric.n)
            if n:
                found[name] = (counts, n)
        self.val_counts |= gathered(pl_module, found)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._record(trainer, pl_module, "val")
        if trainer.state.fn == "validate":  # a validate run: its pass is the measurement
            self._draw_density(trainer)

    # ----------------------------------------------------------------- drawing
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._record(trainer, pl_module, "train")  # the last step, whatever the interval
        if not trainer.is_global_zero:
            return
        root = figures_dir(trainer)
        if self.train or self.val:
            log_figure(
                trainer,
                "curves/training",
                lambda: training_curves_figure(self.train, self.val),
                root / "training_curves.png" if self.save_png else None,
            )
        self._draw_density(trainer)
        points = self._final_points()
        if len(points) > 1:
            source = "validation" if set(points) <= set(self.val) else "training"
            log_figure(
                trainer,
                "frontier/l0_fvu",
                lambda: frontier_figure(points, source),
                root / "frontier.png" if self.save_png else None,
            )

    def _draw_density(self, trainer: Trainer) -> None:
        if not trainer.is_global_zero:
            return
        for name, (counts, n) in self.val_counts.items():
            frequency = counts.double() / n
            never = counts == 0
            log10 = frequency.clamp_min(1e-300).log10().float().masked_fill(never, self.dead_log10)
            png = figures_dir(trainer) / scoped(name, "feature_density.png")
            log_figure(
                trainer,
                scoped(name, "val/log10_density"),
                lambda log10=log10, n=n: density_figure(
                    log10,
                    trainer.global_step,
                    self.dead_log10,
                    title=f"Feature density on {n:,} validation tokens",
                ),
                png if self.save_png else None,
            )

    def _final_points(self) -> dict[str, tuple[float, float]]:
        """(L0, FVU) of each member: its last validation values, else its last training ones."""
        points = {}
        for name in [name for name in {**self.train, **self.val} if name]:
            series = self.val.get(name) or self.train[name]
            points[name] = (series["l0"][-1], series["fvu"][-1])
        return points

    # ----------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        return {
            "train": _copy(self.train),
            "val": _copy(self.val),
            "val_counts": {name: [c, n] for name, (c, n) in self.val_counts.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train, self.val = _copy(state_dict["train"]), _copy(state_dict["val"])
        self.val_counts = {name: (c, int(n)) for name, (c, n) in state_dict["val_counts"].items()}


def _copy(history: dict[str, Series]) -> dict[str, Series]:
    return {
        name: {key: list(values) for key, values in series.items()}
        for name, series in history.items()
    }

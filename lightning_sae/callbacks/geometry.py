"""Periodic decoder geometry: MMCS, max-cosine histograms, ground-truth recovery on toy data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from torch import Tensor

from lightning_sae.callbacks._reporting import (
    decoder_rows,
    figures_dir,
    gathered,
    log_figure,
    log_histogram,
    log_scalars,
    measures_here,
    per_sae_state,
    reports_for,
    saes,
    scoped,
    states_by_sae,
)
from lightning_sae.metrics.similarity import (
    Backend,
    mean_max_cosine_similarity,
    random_directions_mmcs,
    resolve_backend,
    self_max_cosine_similarity,
)
from lightning_sae.parallel.geometry import sharded_max_cosine_to, sharded_self_max_cosine
from lightning_sae.parallel.sharded import shard_of
from lightning_sae.plots import max_cosine_figure


def ground_truth_mmcs(ground_truth: Tensor, sae: Any, backend: Backend = "auto") -> float:
    """Mean over ground-truth directions of their max cosine with the SAE's dictionary rows.

    A latent-sharded SAE holds a slice of the rows: the maximum is taken over every member's
    slice, a collective that every member of its latent group must join.
    """
    return _ground_truth_mmcs(ground_truth, decoder_rows(sae).detach(), shard_of(sae), backend)


def _ground_truth_mmcs(ground_truth: Tensor, W_dec: Tensor, shard: Any, backend: Backend) -> float:
    if shard is None:
        return float(mean_max_cosine_similarity(ground_truth.to(W_dec), W_dec, backend=backend))
    return float(sharded_max_cosine_to(ground_truth.to(W_dec), W_dec, shard, backend).mean())


@dataclass
class _Record:
    """One SAE's geometry so far."""

    random_baseline: float | None = None
    first_step_at: dict[str, int] = field(default_factory=dict)
    history: list[tuple[int, float, float | None]] = field(default_factory=list)  # step, mmcs, gt


class FeatureGeometryMonitor(Callback):
    """Every ``every_n_steps`` steps, how close decoder features sit to each other.

    Logs ``geometry/mmcs`` (mean over features of the max cosine similarity to any other
    decoder row, non-unique), the histogram of those max similarities (``geometry/max_cos`` to
    W&B or TensorBoard, its figure as the image ``geometry/max_cos_figure`` there and as
    ``<run folder>/figures/geometry/step<N>.png``),
    and ``geometry/mmcs_random_baseline``, the MMCS of random unit vectors of the decoder's
    shape (computed once). When the datamodule has ``ground_truth_features`` (toy data) it also
    logs ``geometry/gt_mmcs`` and, once each threshold is first reached,
    ``geometry/gt_step_to_<threshold>``; those steps are kept in the state dict, so a resumed run
    reports the first crossing, not a later one. The final weights are measured too, at the end
    of training, when the last step is not a multiple of ``every_n_steps``.

    Weights are identical on every DDP rank, so rank 0 alone measures and logs. In an
    ``SAEGroup`` every member is measured, under ``<member>/geometry/...`` and
    ``figures/<member>/geometry/``, with its own baseline and threshold steps.

    Args:
        every_n_steps: measurement interval in optimizer steps.
        thresholds: ground-truth MMCS levels whose first step is recorded.
        backend: nearest-neighbour backend (``auto``, ``torch``, ``faiss``).
        save_png: also write the histogram as a PNG (the loggers get its image either way).
        baseline_seed: seed of the random directions of the baseline.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        thresholds: list[float] | tuple[float, ...] = (0.95, 0.98, 0.99),
        backend: Backend = "auto",
        save_png: bool = True,
        baseline_seed: int = 0,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}.")
        resolve_backend(backend)  # fail at construction on a bad name
        self.every_n_steps, self.thresholds = every_n_steps, tuple(sorted(thresholds))
        self.backend, self.save_png, self.baseline_seed = backend, save_png, baseline_seed
        self.records: dict[str, _Record] = {}  # by SAE name ("" for a single SAE)
        self.last_step = -1

    # A single SAE's record, as attributes.
    @property
    def first_step_at(self) -> dict[str, int]:
        return self.records.get("", _Record()).first_step_at

    @property
    def history(self) -> list[tuple[int, float, float | None]]:
        return self.records.get("", _Record()).history

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # A latent-sharded decoder is measured by every member, blocked (parallel/geometry.py).
        measures = measures_here(trainer, pl_module)
        if step % self.every_n_steps or step == self.last_step or not measures:
            return
        self.last_step = step
        self.measure(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The curve and the figures end at the weights the run reports, not at the last multiple
        # of every_n_steps before them.
        measures = measures_here(trainer, pl_module)
        if trainer.global_step != self.last_step and measures:
            self.last_step = trainer.global_step
            self.measure(trainer, pl_module)

    @torch.no_grad()
    def measure(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Measure and log now, every SAE of the module; returns the scalars logged."""
        measured = {}
        for name, sae in saes(pl_module).items():
            record = self.records.setdefault(name, _Record())
            W_dec = decoder_rows(sae).detach()
            shard = shard_of(sae)
            # The random baseline is the logging rank's alone (it costs a d_sae x d_sae search).
            baseline_here = shard is None or reports_for(trainer, pl_module, name)
            measured[name] = self._measure(trainer, name, W_dec, record, shard, baseline_here)
        metrics: dict[str, float] = {}
        # Under member placement each rank measured its own members: rank 0 logs them all, and
        # every rank keeps every member's curve (the final table reads it).
        for name, (scalars, max_cos, baseline) in gathered(pl_module, measured).items():
            record = self.records.setdefault(name, _Record())
            if name not in measured:
                record.history.append((trainer.global_step, *self._curve_point(scalars, name)))
            metrics |= self._log(trainer, name, scalars, max_cos, baseline)
        return metrics

    @staticmethod
    def _curve_point(scalars: dict[str, float], name: str) -> tuple[float, float | None]:
        return scalars[scoped(name, "geometry/mmcs")], scalars.get(scoped(name, "geometry/gt_mmcs"))

    def _measure(
        self,
        trainer: Trainer,
        name: str,
        W_dec: Tensor,
        record: _Record,
        shard: Any = None,
        baseline_here: bool = True,
    ) -> tuple[dict[str, float], Tensor, float | None]:
        """(the scalars by log key, each row's max cosine, the random baseline) of one SAE."""
        step = trainer.global_step
        if record.random_baseline is None and baseline_here:
            # Every member's rows: a sharded cross-layer transcoder's of every layer.
            rows = W_dec.shape[0] if shard is None else W_dec.shape[0] * shard.latent_size
            record.random_baseline = random_directions_mmcs(
                rows, W_dec.shape[1], self.baseline_seed, self.backend, device=W_dec.device
            )
        if shard is None:
            max_cos = self_max_cosine_similarity(W_dec, self.backend)
        else:
            max_cos = sharded_self_max_cosine(W_dec, shard, self.backend)
        metrics = {
            "geometry/mmcs": float(max_cos.mean()),
            "geometry/mmcs_random_baseline": record.random_baseline,
        }
        gt_mmcs = None
        ground_truth = getattr(trainer.datamodule, "ground_truth_features", None)
        # Ground truth lives in the data's own space; an SAE on another hook has other widths.
        if ground_truth is not None and ground_truth.shape[1] == W_dec.shape[1]:
            gt_mmcs = _ground_truth_mmcs(ground_truth, W_dec, shard, self.backend)
            metrics["geometry/gt_mmcs"] = gt_mmcs
            for threshold in self.thresholds:
                key = f"{threshold:g}"
                if key not in record.first_step_at and gt_mmcs >= threshold:
                    record.first_step_at[key] = step
                    metrics[f"geometry/gt_step_to_{key}"] = float(step)
        record.history.append((step, metrics["geometry/mmcs"], gt_mmcs))
        metrics = {scoped(name, key): value for key, value in metrics.items()}
        return metrics, max_cos.cpu(), record.random_baseline

    def _log(
        self,
        trainer: Trainer,
        name: str,
        metrics: dict[str, float],
        max_cos: Tensor,
        baseline: float | None,
    ) -> dict[str, float]:
        if not trainer.is_global_zero:  # a sharded member that helped measure: rank 0 logs
            return metrics
        step = trainer.global_step
        log_scalars(trainer, metrics)
        log_histogram(trainer, scoped(name, "geometry/max_cos"), max_cos)
        png = figures_dir(trainer) / scoped(name, "geometry") / f"step{step:07d}.png"
        log_figure(
            trainer,
            scoped(name, "geometry/max_cos"),
            lambda: max_cosine_figure(max_cos, step, baseline),
            png if self.save_png else None,
        )
        return metrics

    def state_dict(self) -> dict[str, Any]:
        states = {
            name: {
                "random_baseline": record.random_baseline,
                "first_step_at": dict(record.first_step_at),
                "history": list(record.history),
            }
            for name, record in (self.records or {"": _Record()}).items()
        }
        return {**per_sae_state(states), "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = state_dict["last_step"]
        self.records = {
            name: _Record(
                state["random_baseline"],
                dict(state["first_step_at"]),
                [tuple(entry) for entry in state["history"]],
            )
            for name, state in states_by_sae(state_dict).items()
        }

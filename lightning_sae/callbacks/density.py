"""Feature firing frequency over a token window, dead fraction, log10-density histograms."""

from __future__ import annotations

from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from torch import Tensor

from lightning_sae.callbacks._reporting import (
    batch_tensor,
    figures_dir,
    log_figure,
    log_histogram,
    log_scalars,
)
from lightning_sae.plots import density_figure


class FeatureDensityMonitor(Callback):
    """Every ``every_n_steps`` steps, report how often each feature fired over a token window.

    Counting covers the last ``window_tokens`` tokens before each report (at most all tokens
    since the previous one) and starts only when that window opens, so the extra encoder pass
    it needs costs nothing outside the window. That pass runs in eval mode
    (``pl_module.measuring()``), so it counts the inference-time code (BatchTopK's and
    Matryoshka's learned threshold, not the batch top-k) and leaves the module's state alone.
    Counts are summed over DDP ranks every counted step, so every rank holds the global counts
    and a checkpoint from rank 0 resumes exactly.

    A report logs ``density/dead_fraction`` (features that never fired in the window),
    ``density/log10_median`` (median log10 frequency of the live ones),
    ``density/dense_fraction`` (features firing on more than 10% of tokens) and
    ``density/window_tokens`` to every logger, the histogram ``density/log10_density`` to W&B or
    TensorBoard, its figure as the image ``density/log10_density_figure`` there, and the figure
    as a PNG in ``<run folder>/figures/density/step<N>.png``.

    Args:
        every_n_steps: report interval in optimizer steps.
        window_tokens: tokens counted before each report; ``None`` counts every token since the
            previous report.
        dead_log10: where dead features sit in the log10 histogram.
        save_png: also write the histogram as a PNG (the loggers get its image either way).
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        window_tokens: int | None = 1_000_000,
        dead_log10: float = -10.0,
        save_png: bool = True,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}.")
        if window_tokens is not None and window_tokens < 1:
            raise ValueError(f"window_tokens must be >= 1 or null, got {window_tokens}.")
        self.every_n_steps, self.window_tokens = every_n_steps, window_tokens
        self.dead_log10, self.save_png = dead_log10, save_png
        self.counts: Tensor | None = None  # float64 [d_sae], global over ranks
        self.tokens = 0
        self.last_report_step = -1
        self.last_density: Tensor | None = None

    def _counting(self, step: int, tokens_per_step: int) -> bool:
        """Whether the batch that completed ``step`` falls inside the window before the report."""
        next_report = -(-step // self.every_n_steps) * self.every_n_steps
        if self.window_tokens is None or step == next_report:
            return True
        return (next_report - step + 1) * tokens_per_step <= self.window_tokens

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        x = batch_tensor(batch)
        if not self._counting(step, x.shape[0] * trainer.world_size):
            return
        # Eval mode: a measurement must not move running state (BatchTopK's threshold).
        with pl_module.measuring():
            fired = (pl_module.encode(x) != 0).sum(0).double()
        counted = torch.cat([fired, fired.new_tensor([x.shape[0]])])
        counted = trainer.strategy.reduce(counted, reduce_op="sum")
        if self.counts is None:
            self.counts = torch.zeros_like(counted[:-1])
        self.counts = self.counts.to(counted.device) + counted[:-1]
        self.tokens += int(counted[-1].item())
        if step % self.every_n_steps == 0 and step != self.last_report_step:
            self._report(trainer, step)

    def _report(self, trainer: Trainer, step: int) -> None:
        density = (self.counts / max(self.tokens, 1)).float().cpu()
        self.last_density, self.last_report_step = density, step
        tokens = self.tokens
        self.counts, self.tokens = None, 0
        if not trainer.is_global_zero:
            return
        dead = density == 0
        log10 = density.clamp_min(1e-30).log10().masked_fill(dead, self.dead_log10)
        live = log10[~dead]
        log_scalars(
            trainer,
            {
                "density/dead_fraction": dead.float().mean().item(),
                "density/log10_median": live.median().item() if len(live) else self.dead_log10,
                "density/dense_fraction": (density > 0.1).float().mean().item(),
                "density/window_tokens": float(tokens),
            },
        )
        log_histogram(trainer, "density/log10_density", log10)
        png = figures_dir(trainer) / "density" / f"step{step:07d}.png"
        figure = density_figure(log10, step, self.dead_log10)
        log_figure(trainer, "density/log10_density", figure, png if self.save_png else None)

    def state_dict(self) -> dict[str, Any]:
        return {
            "counts": None if self.counts is None else self.counts.cpu(),
            "tokens": self.tokens,
            "last_report_step": self.last_report_step,
            "last_density": self.last_density,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.counts = state_dict["counts"]
        self.tokens = state_dict["tokens"]
        self.last_report_step = state_dict["last_report_step"]
        self.last_density = state_dict["last_density"]

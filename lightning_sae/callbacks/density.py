"""Feature firing frequency over a token window, dead fraction, log10-density histograms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from torch import Tensor

from lightning_sae.callbacks._reporting import (
    batch_rows,
    feature_count,
    figures_dir,
    gathered,
    log_figure,
    log_histogram,
    log_scalars,
    per_sae_state,
    sae_input,
    saes,
    scoped,
    states_by_sae,
)
from lightning_sae.parallel.members import placement_of
from lightning_sae.parallel.sharded import shard_of
from lightning_sae.plots import density_figure


@dataclass
class _Window:
    """One SAE's counts since its last report."""

    counts: Tensor | None = None  # float64 [d_sae], global over ranks
    tokens: int = 0
    last_density: Tensor | None = None


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
    as a PNG in ``<run folder>/figures/density/step<N>.png``. In an ``SAEGroup`` each member is
    counted and reported alike, under ``<member>/density/...`` and
    ``figures/<member>/density/``; one all-reduce per counted step carries every member's counts.

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
        self.windows: dict[str, _Window] = {}  # by SAE name ("" for a single SAE)
        self.last_report_step = -1

    @property
    def last_density(self) -> Tensor | None:
        """A single SAE's density at the last report (a group's: ``windows[name]``)."""
        return self.windows.get("", _Window()).last_density

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
        rows = batch_rows(batch)
        if not self._counting(step, rows * trainer.world_size):
            return
        named = saes(pl_module)
        shard = shard_of(pl_module)
        placed = placement_of(pl_module) is not None
        if placed:  # each member counts the whole global batch it trained on, on its own rank
            batch = pl_module.global_batch
        fired = []
        for name, sae in named.items():
            x = sae_input(pl_module, name, batch)
            if shard is not None:  # a latent group encodes its data-parallel slice together
                x = shard.gather_rows(x)
            # Eval mode: a measurement must not move running state (BatchTopK's threshold).
            with sae.measuring():
                fired.append((sae.encode(x) != 0).reshape(len(x), -1).sum(0).double())
        if placed:  # a member split over a block counted its latents: joined over the block
            parts = [
                part if shard_of(sae) is None else shard_of(sae).gather_features(part)
                for sae, part in zip(named.values(), fired, strict=True)
            ]
            tokens = rows * trainer.world_size
        elif shard is None:
            counted = torch.cat([*fired, fired[0].new_tensor([rows])])
            counted = trainer.strategy.reduce(counted, reduce_op="sum")
            tokens = int(counted[-1].item())
            parts = counted[:-1].split([feature_count(sae) for sae in named.values()])
        else:  # each member counted its latents: sum over the data group, join the members'
            parts = [shard.gather_features(shard.sum_over_data(fired[0]))]
            tokens = rows * trainer.world_size
        for name, part in zip(named, parts, strict=True):
            window = self.windows.setdefault(name, _Window())
            if window.counts is None:
                window.counts = torch.zeros_like(part)
            window.counts = window.counts.to(part.device) + part
            window.tokens += tokens
        if step % self.every_n_steps == 0 and step != self.last_report_step:
            self.last_report_step = step
            closed = {name: self._close(self.windows[name]) for name in named}
            for name, (density, tokens) in gathered(pl_module, closed).items():
                self._report(trainer, step, name, density, tokens)

    @staticmethod
    def _close(window: _Window) -> tuple[Tensor, int]:
        """The window's density and token count; the window starts again."""
        density = (window.counts / max(window.tokens, 1)).float().cpu()
        window.last_density, tokens = density, window.tokens
        window.counts, window.tokens = None, 0
        return density, tokens

    def _report(self, trainer: Trainer, step: int, name: str, density: Tensor, tokens: int) -> None:
        if not trainer.is_global_zero:
            return
        dead = density == 0
        log10 = density.clamp_min(1e-30).log10().masked_fill(dead, self.dead_log10)
        live = log10[~dead]
        log_scalars(
            trainer,
            {
                scoped(name, "density/dead_fraction"): dead.float().mean().item(),
                scoped(name, "density/log10_median"): (
                    live.median().item() if len(live) else self.dead_log10
                ),
                scoped(name, "density/dense_fraction"): (density > 0.1).float().mean().item(),
                scoped(name, "density/window_tokens"): float(tokens),
            },
        )
        log_histogram(trainer, scoped(name, "density/log10_density"), log10)
        png = figures_dir(trainer) / scoped(name, "density") / f"step{step:07d}.png"
        log_figure(
            trainer,
            scoped(name, "density/log10_density"),
            lambda: density_figure(log10, step, self.dead_log10),
            png if self.save_png else None,
        )

    def state_dict(self) -> dict[str, Any]:
        states = {
            name: {
                "counts": None if window.counts is None else window.counts.cpu(),
                "tokens": window.tokens,
                "last_density": window.last_density,
            }
            for name, window in (self.windows or {"": _Window()}).items()
        }
        return {**per_sae_state(states), "last_report_step": self.last_report_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_report_step = state_dict["last_report_step"]
        self.windows = {
            name: _Window(state["counts"], state["tokens"], state["last_density"])
            for name, state in states_by_sae(state_dict).items()
        }

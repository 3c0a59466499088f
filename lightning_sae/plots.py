"""Matplotlib figures saved as PNG: feature-density and max-cosine-similarity histograms, curves.

Figures are drawn on an explicit Agg canvas rather than through ``pyplot``: no global figure
state, no display needed, and a user's notebook backend is left alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor


def _new_figure(width: float = 6.0, height: float = 4.0) -> Figure:
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, format="png")
    return path


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG at ``path`` (parent folders created)."""
    return _save(figure, path)


def figure_image(figure: Figure) -> np.ndarray:
    """The figure as an ``[height, width, 3]`` uint8 RGB array, for TensorBoard / W&B images."""
    canvas = figure.canvas
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _title(title: str, step: int | None) -> str:
    return title if step is None else f"{title} (step {step})"


def density_figure(
    log10_density: Tensor, step: int | None = None, dead_value: float = -10.0, bins: int = 40
) -> Figure:
    """Histogram of log10 firing frequency per feature, on an axis that fits the live features.

    Dead features (at or below ``dead_value``) would stretch the axis to ``dead_value`` and
    squeeze every live feature into a few bins, so they are counted in the title and drawn as
    one separate bar just left of the live range instead.
    """
    values = log10_density.detach().float().cpu()
    dead_mask = values <= dead_value
    live = values[~dead_mask].numpy()
    dead = int(dead_mask.sum())
    if len(live):
        low = float(np.floor(live.min() * 2) / 2) - 0.25  # half-decade edges, a little margin
        high = min(float(np.ceil(live.max() * 2) / 2), 0.0)
        high = max(high, low + 0.5)
    else:
        low, high = dead_value, dead_value + 1.0
    figure = _new_figure()
    axes = figure.add_subplot()
    axes.hist(live, bins=bins, range=(low, high), color="tab:blue", label="live")
    if dead:
        width = (high - low) / bins * 2
        x = low - 1.5 * width
        axes.bar(x, dead, width=width, color="tab:red", label=f"dead ({dead})")
        low = x - width
    axes.set_xlim(low, high)
    axes.set_xlabel("log10 firing frequency")
    axes.set_ylabel("features")
    axes.set_title(_title(f"Feature density: {dead}/{len(values)} dead", step))
    axes.legend()
    figure.tight_layout()
    return figure


def log_density_histogram(
    log10_density: Tensor,
    path: str | Path,
    step: int | None = None,
    dead_value: float = -10.0,
    bins: int = 40,
) -> Path:
    """:func:`density_figure` saved as a PNG at ``path``."""
    return _save(density_figure(log10_density, step, dead_value, bins), path)


def max_cosine_figure(
    max_cosine: Tensor,
    step: int | None = None,
    random_baseline: float | None = None,
    bins: int = 60,
    title: str = "Decoder max cosine similarity to another feature",
) -> Figure:
    """Histogram of each feature's max cosine similarity, with MMCS and the random baseline."""
    values = max_cosine.detach().float().cpu()
    figure = _new_figure()
    axes = figure.add_subplot()
    axes.hist(values.numpy(), bins=bins, range=(min(-0.05, float(values.min())), 1.0))
    axes.axvline(float(values.mean()), color="black", linestyle="--", label="MMCS")
    if random_baseline is not None:
        axes.axvline(random_baseline, color="tab:red", linestyle=":", label="random baseline")
    axes.set_xlabel("max cosine similarity")
    axes.set_ylabel("features")
    axes.set_title(_title(title, step))
    axes.legend()
    figure.tight_layout()
    return figure


def max_cosine_histogram(
    max_cosine: Tensor,
    path: str | Path,
    step: int | None = None,
    random_baseline: float | None = None,
    bins: int = 60,
    title: str = "Decoder max cosine similarity to another feature",
) -> Path:
    """:func:`max_cosine_figure` saved as a PNG at ``path``."""
    return _save(max_cosine_figure(max_cosine, step, random_baseline, bins, title), path)


def curves(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    xlabel: str,
    ylabel: str,
    title: str = "",
    hlines: Sequence[float] = (),
) -> Path:
    """One line per named (x, y) series, with optional horizontal reference lines."""
    figure = _new_figure()
    axes = figure.add_subplot()
    for label, (x, y) in series.items():
        axes.plot(list(x), list(y), label=label)
    for level in hlines:
        axes.axhline(level, color="gray", linestyle=":", linewidth=0.8)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if title:
        axes.set_title(title)
    if series:
        axes.legend()
    figure.tight_layout()
    return _save(figure, path)

"""Matplotlib figures saved as PNG: feature-density and max-cosine-similarity histograms, curves.

Figures are drawn on an explicit Agg canvas rather than through ``pyplot``: no global figure
state, no display needed, and a user's notebook backend is left alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

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
    figure.tight_layout()
    figure.savefig(path, dpi=100, format="png")
    return path


def _title(title: str, step: int | None) -> str:
    return title if step is None else f"{title} (step {step})"


def log_density_histogram(
    log10_density: Tensor,
    path: str | Path,
    step: int | None = None,
    dead_value: float = -10.0,
    bins: int = 60,
) -> Path:
    """Histogram of log10 firing frequency per feature; dead features sit at ``dead_value``."""
    values = log10_density.detach().float().cpu()
    dead = int((values <= dead_value).sum())
    figure = _new_figure()
    axes = figure.add_subplot()
    axes.hist(values.numpy(), bins=bins, range=(dead_value - 0.5, 0.0), color="tab:blue")
    axes.set_xlabel(f"log10 firing frequency (dead features at {dead_value:g})")
    axes.set_ylabel("features")
    axes.set_title(_title(f"Feature density: {dead}/{len(values)} dead", step))
    return _save(figure, path)


def max_cosine_histogram(
    max_cosine: Tensor,
    path: str | Path,
    step: int | None = None,
    random_baseline: float | None = None,
    bins: int = 60,
    title: str = "Decoder max cosine similarity to another feature",
) -> Path:
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
    return _save(figure, path)


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
    return _save(figure, path)

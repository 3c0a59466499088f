"""Matplotlib figures saved as PNG: feature-density and max-cosine-similarity histograms,
training curves, the L0-FVU frontier of a sweep, curves.

Figures are drawn on an explicit Agg canvas rather than through ``pyplot``: no global figure
state, no display needed, and a user's notebook backend is left alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogFormatter
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


class _PlainLogFormatter(LogFormatter):
    """Log-axis tick labels as plain numbers (``200``, ``0.06``), on the ticks matplotlib's
    own log formatter would label, minor ones included when the axis spans few decades."""

    def __init__(self) -> None:
        super().__init__(labelOnlyBase=False, minor_thresholds=(2, 0.6))

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:g}" if super().__call__(x, pos) else ""


def _log_scale(axes: Any, which: str) -> None:
    """Put the ``which`` (``x`` or ``y``) axis on a log scale with plain tick labels."""
    getattr(axes, f"set_{which}scale")("log")
    axis = getattr(axes, f"{which}axis")
    axis.set_major_formatter(_PlainLogFormatter())
    axis.set_minor_formatter(_PlainLogFormatter())


def _title(title: str, step: int | None) -> str:
    return title if step is None else f"{title} (step {step})"


def density_figure(
    log10_density: Tensor,
    step: int | None = None,
    dead_value: float = -10.0,
    bins: int = 40,
    title: str = "Feature density",
) -> Figure:
    """Histogram of log10 firing frequency per feature, on an axis that fits the live features.

    Dead features (at or below ``dead_value``) would stretch the axis to ``dead_value`` and
    squeeze every live feature into a few bins, so they are counted in the title and drawn as
    one separate bar, ticked "never", just left of the live range instead.
    """
    values = log10_density.detach().float().cpu()
    dead_mask = values <= dead_value
    live = values[~dead_mask].numpy()
    dead = int(dead_mask.sum())
    if len(live):
        pad = max(0.1, 0.05 * float(live.max() - live.min()))
        low, high = float(live.min()) - pad, min(float(live.max()) + pad, 0.05)
    else:
        low, high = dead_value, dead_value + 1.0
    figure = _new_figure()
    axes = figure.add_subplot()
    axes.hist(live, bins=bins, range=(low, high), color="tab:blue", label="fired")
    axes.set_xlim(low, high)
    ticks = [float(t) for t in axes.get_xticks() if low <= t <= high]
    labels = [f"{t:g}" for t in ticks]
    if dead:
        width = (high - low) / bins * 2
        x = low - 1.5 * width
        axes.bar(x, dead, width=width, color="tab:red", label=f"never fired ({dead})")
        ticks, labels = [x, *ticks], ["never", *labels]
        low = x - width
    axes.set_xticks(ticks, labels)
    axes.set_xlim(low, high)
    axes.set_xlabel("log10 firing frequency (fraction of tokens a feature fires on)")
    axes.set_ylabel("features")
    axes.set_title(_title(f"{title}\n{dead}/{len(values)} dead", step), fontsize="medium")
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
    """Histogram of each feature's max cosine similarity, with MMCS and the random baseline.

    The axis spans the values and the baseline (not all of [-1, 1]), so the bins are readable.
    """
    values = max_cosine.detach().float().cpu()
    marks = [float(values.min()), float(values.max())]
    if random_baseline is not None:
        marks.append(random_baseline)
    low = max(-1.0, float(np.floor(min(marks) * 20) / 20) - 0.05)
    high = min(1.0, float(np.ceil(max(marks) * 20) / 20) + 0.05)
    mmcs = float(values.mean())
    figure = _new_figure()
    axes = figure.add_subplot()
    axes.hist(values.numpy(), bins=bins, range=(low, high))
    axes.axvline(mmcs, color="black", linestyle="--", label=f"MMCS, decoder self = {mmcs:.3f}")
    if random_baseline is not None:
        axes.axvline(
            random_baseline,
            color="tab:red",
            linestyle=":",
            label=f"random directions = {random_baseline:.3f}",
        )
    axes.set_xlim(low, high)
    axes.set_xlabel("max cosine similarity to another decoder row")
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


# The panels of training_curves_figure: (metric, y label, log scale).
CURVE_PANELS = (
    ("loss", "loss", True),
    ("l0", "L0 (features active per token)", True),
    ("fvu", "FVU (fraction of variance unexplained)", True),
)
Series = Mapping[str, Sequence[float]]  # "step" and each metric, aligned


def training_curves_figure(train: Mapping[str, Series], val: Mapping[str, Series]) -> Figure:
    """Loss, L0 and FVU against the optimizer step, one panel each: a line per SAE for training
    (``train[name]``) and markers for validation (``val[name]``). ``name`` is ``""`` for a
    single SAE, a member's name in a group (a colour each, named once in the legend).
    Non-finite and non-positive values are left out (log axes)."""
    figure = _new_figure(12.0, 3.8)
    names = list(dict.fromkeys([*train, *val]))
    colours = {name: f"C{i % 10}" for i, name in enumerate(names)}
    styles = {"train": {"linestyle": "-"}, "val": {"linestyle": "--", "marker": "o"}}
    for index, (key, ylabel, log) in enumerate(CURVE_PANELS):
        axes = figure.add_subplot(1, len(CURVE_PANELS), index + 1)
        for kind, runs in (("train", train), ("val", val)):
            for name, series in runs.items():
                steps, values = _finite(series.get("step", ()), series.get(key, ()), log)
                if steps:
                    axes.plot(steps, values, color=colours[name], markersize=4, **styles[kind])
        if log and axes.has_data():
            _log_scale(axes, "y")
        axes.set_xlabel("optimizer step")
        axes.set_ylabel(ylabel)
        axes.set_title(ylabel.split(" (")[0])
        axes.grid(alpha=0.3, which="both")
    handles = [Line2D([], [], color=colours[name], label=name) for name in names if name]
    handles += [
        Line2D([], [], color="black", label="train", **styles["train"]),
        Line2D([], [], color="black", markersize=4, label="validation", **styles["val"]),
    ]
    figure.axes[0].legend(handles=handles, fontsize="small")
    # Fixed margins rather than tight_layout, which draws the figure once more to measure it.
    figure.subplots_adjust(left=0.06, right=0.99, bottom=0.13, top=0.92, wspace=0.32)
    return figure


def _finite(steps: Sequence[float], values: Sequence[float], positive: bool) -> tuple[list, list]:
    keep = [
        (s, v)
        for s, v in zip(steps, values, strict=False)
        if np.isfinite(v) and (v > 0 or not positive)
    ]
    return [s for s, _ in keep], [v for _, v in keep]


def frontier_figure(
    points: Mapping[str, tuple[float, float]], source: str = "validation"
) -> Figure:
    """FVU against L0 of a sweep's members, each point named; the members no other beats on
    both (lower L0 and lower FVU) are joined: the sparsity-reconstruction frontier."""
    figure = _new_figure(6.0, 4.5)
    axes = figure.add_subplot()
    finite = {n: (l0, fvu) for n, (l0, fvu) in points.items() if np.isfinite([l0, fvu]).all()}
    for name, (l0, fvu) in finite.items():
        axes.scatter([l0], [fvu], color="tab:blue", zorder=3)
        axes.annotate(name, (l0, fvu), textcoords="offset points", xytext=(5, 5))
    best = sorted(
        (l0, fvu)
        for l0, fvu in finite.values()
        if not any(o <= l0 and f <= fvu and (o, f) != (l0, fvu) for o, f in finite.values())
    )
    if len(best) > 1:
        axes.plot(*zip(*best, strict=True), color="tab:blue", alpha=0.5, label="frontier")
        axes.legend()
    if finite and min(l0 for l0, _ in finite.values()) > 0:
        _log_scale(axes, "x")
    axes.set_xlabel("L0 (features active per token)")
    axes.set_ylabel("FVU (fraction of variance unexplained)")
    axes.set_title(f"Sparsity vs reconstruction ({source})")
    axes.grid(alpha=0.3, which="both")
    axes.margins(0.15)
    figure.tight_layout()
    return figure

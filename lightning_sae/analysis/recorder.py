"""Per-feature statistics of SAE activations over token windows, in one pass and bounded memory.

:class:`FeatureRecorder` is fed the activations of whole token windows, ``[windows, positions,
features]``, batch after batch, and keeps per feature:

- firing count, activation sum and a histogram of activations on fixed log10 bins (the bins are
  fixed because a one-pass histogram cannot know a feature's range in advance);
- three running selections of windows, each the best ``k`` by a score, merged with
  ``torch.topk`` every batch, so memory is ``features x k x context`` whatever the token count.
  A window is represented by its maximum activation of the feature and that position; the
  selection keeps the per-token activations of the context around it.

  * ``top``: the score is the window's max activation: the exact top-k contexts;
  * ``uniform``: a uniform random sample of the windows where the feature fires (bottom-k
    sampling: a random key per window, keep the k largest keys);
  * ``weighted``: a sample weighted by activation (Efraimidis-Spirakis: key ``u ** (1 / a)``,
    compared as ``log(u) / a``), which reaches the sparse upper part of the range.

After the pass, :func:`interval_samples` cuts ``(0, max]`` of each feature into equal-width
intervals, as sae-dashboard and Anthropic's feature browser do, and fills each from the two
samples (uniform first): a reader sees contexts from the whole range, not only the top.
Contexts are per window, so one window shows up once per selection even when several of its
tokens fire.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# Activation histogram: 16 bins per decade over [1e-4, 1e4); values outside go to the end bins.
HIST_LOG10_MIN, HIST_LOG10_MAX, HIST_BINS_PER_DECADE = -4.0, 4.0, 16
HIST_BINS = int((HIST_LOG10_MAX - HIST_LOG10_MIN) * HIST_BINS_PER_DECADE)


def hist_edges() -> np.ndarray:
    """The histogram's bin edges (activation values, not log10), ``HIST_BINS + 1`` of them."""
    return np.logspace(HIST_LOG10_MIN, HIST_LOG10_MAX, HIST_BINS + 1)


@dataclass
class Selection:
    """``k`` windows per feature (in no order while recording, best score first from
    :meth:`_RunningSelection.sorted`); an empty slot has window -1 and score -inf.

    ``value`` is the window's max activation, ``position`` where it is (a cached position),
    ``acts[f, slot]`` the feature's activations on positions ``position - left ... + right``.
    """

    score: Tensor  # [F, k] float32, -inf when empty
    value: Tensor  # [F, k] float32
    window: Tensor  # [F, k] int64
    position: Tensor  # [F, k] int64
    acts: Tensor  # [F, k, width] float32


class _RunningSelection:
    def __init__(self, n_features: int, k: int, width: int, device: torch.device) -> None:
        self.k, self.width = k, width
        self.sel = Selection(
            score=torch.full((n_features, k), float("-inf"), device=device),
            value=torch.zeros((n_features, k), device=device),
            window=torch.full((n_features, k), -1, dtype=torch.long, device=device),
            position=torch.zeros((n_features, k), dtype=torch.long, device=device),
            acts=torch.zeros((n_features, k, width), device=device),
        )

    def update(
        self,
        score: Tensor,
        value: Tensor,
        position: Tensor,
        windows: Tensor,
        acts: Tensor,
        left: int,
    ) -> None:
        """Merge the batch's windows in. ``score``, ``value``, ``position``: ``[W, F]`` (score
        -inf where the feature does not fire); ``windows``: ``[W]`` ids; ``acts``: ``[W, P, F]``.

        Slots are unordered (:meth:`sorted` orders them): a window that makes the top k takes
        the slot of one that drops out, so only new entries are written, never the whole
        ``[F, k, width]`` store, and only features where some window beats the current worst
        slot are looked at.
        """
        s, k = self.sel, self.k
        worst = s.score.min(dim=1, keepdim=True).values
        rows = (worst < score.T).any(dim=1).nonzero().squeeze(1)  # -inf never beats
        if len(rows) == 0:
            return
        merged = torch.cat([s.score[rows], score.T[rows]], dim=1)  # [R, k + W]
        chosen = merged.topk(k, dim=1).indices
        picked = torch.zeros_like(merged, dtype=torch.bool).scatter_(1, chosen, True)
        picked &= torch.isfinite(merged)
        new = picked[:, k:]  # [R, W]: windows that enter
        freed = ~picked[:, :k]  # [R, k]: slots they may take (as many as enter, or more)
        # The j-th entering window of a row takes the row's j-th freed slot.
        r, w = new.nonzero(as_tuple=True)
        rank_new = new.long().cumsum(dim=1)[r, w] - 1
        fr, fslot = freed.nonzero(as_tuple=True)
        rank_freed = freed.long().cumsum(dim=1)[fr, fslot] - 1
        slot_of = torch.full((len(rows), k), -1, dtype=torch.long, device=merged.device)
        slot_of[fr, rank_freed] = fslot
        slot = slot_of[r, rank_new]
        f = rows[r]
        p = position[w, f]
        s.score[f, slot] = score[w, f]
        s.value[f, slot] = value[w, f]
        s.window[f, slot] = windows[w]
        s.position[f, slot] = p
        # The context around the max: positions p - left .. p - left + width - 1, zero outside
        # the window.
        q = p[:, None] - left + torch.arange(self.width, device=p.device)
        inside = (q >= 0) & (q < acts.shape[1])
        gathered = acts[w[:, None], q.clamp(0, acts.shape[1] - 1), f[:, None]]
        s.acts[f, slot] = torch.where(inside, gathered, 0.0)

    def sorted(self) -> Selection:
        """The selection with each feature's slots best first (empty slots last)."""
        s = self.sel
        order = s.score.argsort(dim=1, descending=True)
        take = lambda t: t.gather(1, order)  # noqa: E731
        acts = s.acts.gather(1, order[..., None].expand(-1, -1, self.width))
        window = torch.where(torch.isfinite(take(s.score)), take(s.window), -1)
        return Selection(take(s.score), take(s.value), window, take(s.position), acts)


class FeatureRecorder:
    """Running per-feature statistics (see the module docstring).

    Args:
        n_features: features recorded (the columns of the activations passed in).
        n_top: top contexts kept per feature.
        n_samples: size of each of the two random samples (uniform and weighted).
        left, right: tokens of context kept before and after the max position.
        device: where the running state lives (that of the activations).
        seed: seed of the random samples.
    """

    def __init__(
        self,
        n_features: int,
        n_top: int,
        n_samples: int,
        left: int,
        right: int,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> None:
        device = torch.device(device)
        self.n_features, self.left, self.width = n_features, left, left + 1 + right
        self.top = _RunningSelection(n_features, n_top, self.width, device)
        self.uniform = _RunningSelection(n_features, n_samples, self.width, device)
        self.weighted = _RunningSelection(n_features, n_samples, self.width, device)
        self.n_fired = torch.zeros(n_features, dtype=torch.long, device=device)
        self.act_sum = torch.zeros(n_features, dtype=torch.float64, device=device)
        self.hist = torch.zeros(n_features * HIST_BINS, dtype=torch.long, device=device)
        self.n_tokens = 0
        self.generator = torch.Generator(device=device).manual_seed(seed)

    @torch.no_grad()
    def update(self, acts: Tensor, windows: Tensor) -> None:
        """``acts``: ``[W, P, F]`` activations of ``W`` whole windows; ``windows``: their ids."""
        n_windows, positions, n_features = acts.shape
        acts = acts.float()
        self.n_tokens += n_windows * positions
        # One scan for the nonzero entries; counts, sums and the histogram come from them.
        flat = acts.reshape(-1, n_features)
        token, feature = flat.nonzero(as_tuple=True)
        values = flat[token, feature]
        self.n_fired += torch.bincount(feature, minlength=n_features)
        self.act_sum.index_add_(0, feature, values.double())
        bins = ((values.log10() - HIST_LOG10_MIN) * HIST_BINS_PER_DECADE).floor().long()
        self.hist += torch.bincount(
            feature * HIST_BINS + bins.clamp(0, HIST_BINS - 1), minlength=len(self.hist)
        )

        value, position = acts.max(dim=1)  # [W, F]: each window by its max position
        fired = value > 0
        never = torch.tensor(float("-inf"), device=acts.device)
        self.top.update(torch.where(fired, value, never), value, position, windows, acts, self.left)
        for selection, weighted in ((self.uniform, False), (self.weighted, True)):
            u = torch.rand(value.shape, generator=self.generator, device=acts.device)
            key = u.clamp_min(1e-12).log() / value.clamp_min(1e-12) if weighted else u
            selection.update(
                torch.where(fired, key, never), value, position, windows, acts, self.left
            )

    def frequency(self) -> Tensor:
        return self.n_fired.double() / max(self.n_tokens, 1)

    def mean_when_fired(self) -> Tensor:
        return self.act_sum / self.n_fired.clamp_min(1)

    def max_act(self) -> Tensor:
        """Each feature's largest activation (0 for a feature that never fired)."""
        return self.top.sel.value.amax(dim=1).clamp_min(0)

    def histograms(self) -> Tensor:
        return self.hist.view(self.n_features, HIST_BINS)


@dataclass
class Picked:
    """Contexts chosen for display: parallel arrays, one entry per context."""

    feature: np.ndarray  # local feature index (column of the recorded activations)
    kind: np.ndarray  # "top" or "interval"
    rank: np.ndarray  # order within its kind (top: 0 = highest; interval: within the interval)
    interval: np.ndarray  # -1 for top contexts; 0 = lowest interval
    value: np.ndarray
    window: np.ndarray
    position: np.ndarray
    acts: np.ndarray  # [n, width]


def _numpy(selection: Selection) -> dict[str, np.ndarray]:
    return {
        "value": selection.value.cpu().numpy(),
        "window": selection.window.cpu().numpy(),
        "position": selection.position.cpu().numpy(),
        "acts": selection.acts.cpu().numpy(),
    }


def pick_contexts(recorder: FeatureRecorder, n_intervals: int, per_interval: int) -> Picked:
    """The top contexts of every feature, and up to ``per_interval`` sampled contexts in each of
    ``n_intervals`` equal-width intervals of ``(0, max]``, highest interval first.

    A window already among the top contexts is not repeated in an interval, so the highest
    interval is often empty: its contexts are the top ones.
    """
    top, uniform, weighted = (
        _numpy(s.sorted()) for s in (recorder.top, recorder.uniform, recorder.weighted)
    )
    rows: list[tuple[int, str, int, int, str, int, int]] = []
    for f in range(recorder.n_features):
        shown = set()
        for rank in range(top["window"].shape[1]):
            if top["window"][f, rank] >= 0:
                rows.append((f, "top", rank, -1, "top", f, rank))
                shown.add(int(top["window"][f, rank]))
        if not shown or n_intervals == 0:
            continue
        peak = float(top["value"][f, 0])
        chosen: dict[int, list[tuple[str, int]]] = {}
        # Uniform sample first: it represents where the feature fires most often.
        for name, sample in (("uniform", uniform), ("weighted", weighted)):
            for slot in range(sample["window"].shape[1]):
                window = int(sample["window"][f, slot])
                if window < 0 or window in shown:
                    continue
                ratio = float(sample["value"][f, slot]) / peak
                interval = min(int(ratio * n_intervals), n_intervals - 1)
                members = chosen.setdefault(interval, [])
                if len(members) < per_interval:
                    members.append((name, slot))
                    shown.add(window)
        for interval in sorted(chosen, reverse=True):
            source = {"uniform": uniform, "weighted": weighted}
            members = sorted(chosen[interval], key=lambda m: -source[m[0]]["value"][f, m[1]])
            for rank, (name, slot) in enumerate(members):
                rows.append((f, "interval", rank, interval, name, f, slot))

    sources = {"top": top, "uniform": uniform, "weighted": weighted}

    def column(key: str) -> np.ndarray:
        if not rows:
            width = recorder.width
            return np.zeros((0, width) if key == "acts" else 0, dtype=top[key].dtype)
        return np.stack([sources[r[4]][key][r[5], r[6]] for r in rows])

    return Picked(
        feature=np.array([r[0] for r in rows], dtype=np.int64),
        kind=np.array([r[1] for r in rows], dtype=object),
        rank=np.array([r[2] for r in rows], dtype=np.int64),
        interval=np.array([r[3] for r in rows], dtype=np.int64),
        value=column("value"),
        window=column("window"),
        position=column("position"),
        acts=column("acts"),
    )

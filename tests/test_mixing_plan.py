"""The mixing plan with parts that fall by ``decay`` from one refill to the next: every row
served once, every position located (what an exact resume relies on), a buffer resumed mid-pool
serving the same rows, the rows it holds within ``held_rows``, and fewer contexts shared by
consecutive batches than equal parts at the same memory. Index arithmetic and label rows only:
no model."""

import threading
import weakref
from typing import Any

import numpy as np
import pytest
import torch

from lightning_sae.data.loader import (
    Generation,
    MixingBuffer,
    MixingPlan,
    batch_mixing,
    held_generations,
    mixing_summary,
)


def served_layout(plan: MixingPlan, refills: int) -> np.ndarray:
    """[rows, 3]: (refill, generation, row in it) of each served row, in serving order."""
    out, parts = [], {}
    for refill in range(refills):
        if not (pool := plan.pool(refill)):  # a finite plan's end
            break
        for g, _ in pool:
            parts[g] = parts[g] if g in parts else plan.parts(g)
        rows = np.concatenate([parts[g][j] for g, j in pool])
        generations = np.repeat([g for g, _ in pool], [len(parts[g][j]) for g, j in pool])
        order = plan.order(refill)
        out.append(np.stack([np.full(len(order), refill), generations[order], rows[order]], 1))
    return np.concatenate(out)


@pytest.mark.parametrize("total_rows", [None, 57])
def test_a_decaying_plan_serves_every_row_once_and_locates_every_position(
    total_rows: int | None,
) -> None:
    plan = MixingPlan(generation_rows=10, spread=4, seed=[0], total_rows=total_rows, decay=0.5)
    assert plan.part_rows(0) == [5, 3, 1, 1]  # 10 * (8, 4, 2, 1) / 15, rounded, at least one
    assert plan.held_rows() == 5 + 2 * 3 + 3 * 1 + 4 * 1 + 10  # equal parts: 10 * (4 + 3) / 2
    layout = served_layout(plan, 12).tolist()
    served: dict[int, list[int]] = {}
    for position, (refill, g, row) in enumerate(layout):
        served.setdefault(g, []).append(row)
        start = next(p for p, (t, _, _) in enumerate(layout) if t == refill)
        assert plan.locate(position) == (refill, position - start)
    for g in range(6):  # the last generation of the 57 rows holds 7
        assert sorted(served[g]) == list(range(plan.rows(g))), g
    if total_rows is not None:
        assert len(layout) == total_rows  # the finite plan ends after its last part


def test_equal_parts_are_dealt_as_before() -> None:
    """decay 1 keeps the sizes (and so the serving order) of runs made before it existed."""
    for rows, spread in [(10, 3), (16, 16), (3329, 16), (7, 1)]:
        base, extra = divmod(rows, spread)
        plan = MixingPlan(rows, spread, [0])
        assert plan.part_rows(0) == [base + (j < extra) for j in range(spread)]
        assert plan.held_rows() <= rows * (spread + 3) // 2
        assert held_generations(spread) == (spread + 3) / 2


def label_buffer(plan: MixingPlan, live: list[Any]) -> MixingBuffer:
    """A buffer whose generation ``g`` is rows labelled ``g * R + row``; every part tensor made
    is remembered (weakly) in ``live``."""

    def make(g: int, stop: threading.Event) -> Generation:
        labels = g * plan.generation_rows + np.arange(plan.rows(g))
        parts = [{"x": torch.from_numpy(labels[rows])[:, None]} for rows in plan.parts(g)]
        live.extend(weakref.ref(p["x"]) for p in parts)
        return Generation(g, parts, start=g)

    return MixingBuffer(plan, make, threading.Event())


def held(live: list[Any]) -> int:
    return sum(len(t) for ref in live if (t := ref()) is not None)


@pytest.mark.parametrize("decay", [1.0, 0.6])
def test_a_buffer_resumed_mid_pool_serves_the_same_rows_and_holds_at_most_held_rows(
    decay: float,
) -> None:
    """Also with equal parts: a batch straddling two pools once kept the served pool alive
    (200 rows held here, where held_rows is 160)."""
    plan = MixingPlan(generation_rows=40, spread=5, seed=[3], decay=decay)
    live: list[Any] = []
    straight = []
    for rows, resume in label_buffer(plan, live).serve(0, 7):
        straight.append((rows["x"].flatten().tolist(), resume))
        assert held(live) <= plan.held_rows(), len(straight)
        if len(straight) == 60:  # 420 rows: 10 refills, past the smaller first pools
            break
    # Batch 33 starts inside a pool; the resume point saved with batch 32 is the oldest
    # generation that pool still needs.
    refill, offset = plan.locate(33 * 7)
    assert offset > 0 and straight[32][1] == plan.oldest(refill)
    resumed = label_buffer(plan, []).serve(33 * 7, 7)
    again = [next(resumed)[0]["x"].flatten().tolist() for _ in range(60 - 33)]
    resumed.close()
    assert again == [rows for rows, _ in straight[33:]]


def overlap_at(decay: float, batches: int = 60) -> dict[str, float]:
    """Mixing of ``batches`` batches (after the first, smaller pools) of the stream's default
    shape (contexts of 127 rows, batches of 1024, 16 refills) from the largest generation whose
    buffer holds at most 34 batches of rows (its 56 MiB budget's share for the buffer)."""
    context, batch, spread = 127, 1024, 16
    windows = int(34 * batch / (held_generations(spread, decay) * context))
    plan = MixingPlan(windows * context, spread, [0], decay=decay)
    assert plan.held_rows() <= 34 * batch
    first = -(-sum(plan.pool_rows(t) for t in range(spread)) // batch)
    refills = spread + -(-(first + batches) * batch // plan.generation_rows)
    layout = served_layout(plan, refills)
    contexts = layout[:, 1] * windows + layout[:, 2] // context
    blocks = contexts[first * batch : (first + batches) * batch].reshape(batches, batch)
    return mixing_summary(batch_mixing((b, b) for b in blocks))


def test_decaying_parts_share_fewer_contexts_between_batches_at_the_same_memory() -> None:
    """At the same held rows, parts that fall by 0.75 per refill (the stream's default) serve
    more contexts per batch than equal parts, and far fewer of them again in the next batch:
    with equal parts every live context has rows in every pool, so in nearly every batch."""
    equal, decaying = overlap_at(1.0), overlap_at(0.75)
    assert decaying["contexts"] > equal["contexts"], (equal, decaying)
    assert decaying["overlap"] < equal["overlap"] - 0.1, (equal, decaying)

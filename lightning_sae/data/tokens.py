"""Text -> packed token windows of ``context_size``.

Documents are tokenized without special tokens, joined with the tokenizer's end-of-text (or
[SEP]) token, and cut into consecutive windows. With ``prepend_bos`` each window is
``[BOS] + (context_size - 1)`` text tokens (BERT-style tokenizers use [CLS] as BOS). The windows
are then put in an order drawn from ``seed``, so the training and held-out windows are a random
split of the text and the same seed always gives the same windows in the same order.

Text sources:

- ``pydoc_data.topics``: the standard library's help topics (about 465k characters of English,
  about 128k BERT tokens), always available offline;
- a local ``.txt`` / ``.json`` / ``.jsonl`` / ``.parquet`` file, or a folder of them;
- a Hugging Face dataset by name (``NeelNanda/pile-10k``), optionally streamed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

PYDOC_TOPICS = "pydoc_data.topics"
_FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_TOKENIZE_BATCH = 256


class TextSourceError(ValueError):
    """The text of a cache cannot be read: the message names the source and the fix."""


@dataclass(frozen=True)
class TextSource:
    """Where the text comes from; all of it goes into cache fingerprints."""

    name: str = PYDOC_TOPICS
    config: str | None = None
    split: str = "train"
    text_column: str = "text"
    streaming: bool = False

    def fingerprint(self) -> dict[str, Any]:
        return asdict(self)


def iter_documents(source: TextSource) -> Iterator[str]:
    """The source's documents as strings, in a fixed order."""
    if source.name == PYDOC_TOPICS:
        from pydoc_data import topics

        yield from (topics.topics[key] for key in sorted(topics.topics))
        return
    from datasets import load_dataset

    from lightning_sae.data.lm import hub_failure, require_hub

    path = Path(source.name).expanduser()
    if not path.exists():
        if _looks_like_a_path(source.name):
            raise TextSourceError(
                f"dataset file {path} does not exist: set data.init_args.dataset to an existing "
                "file or folder, or to a Hugging Face dataset name."
            )
        require_hub(source.name, "dataset", repo_type="dataset")
        try:
            rows = load_dataset(
                source.name, source.config, split=source.split, streaming=source.streaming
            )
        except (OSError, ConnectionError) as error:  # no network, or not in the local cache
            raise hub_failure(source.name, "dataset", error) from None
        yield from _texts(rows, source)
        return
    files = (
        sorted(p for p in path.rglob("*") if p.suffix in _FILE_BUILDERS)
        if path.is_dir()
        else [path]
    )
    kinds = {_FILE_BUILDERS.get(p.suffix) for p in files}
    if not files or None in kinds or len(kinds) > 1:
        raise TextSourceError(
            f"dataset {source.name!r}: expected one or more files of a single kind among "
            f"{sorted(_FILE_BUILDERS)}, found {[p.name for p in files][:10]}."
        )
    if all(p.stat().st_size == 0 for p in files):
        raise TextSourceError(
            f"dataset {source.name!r} is empty ({len(files)} file(s) of 0 bytes): point "
            "data.init_args.dataset at files that hold text."
        )
    try:
        rows = load_dataset(
            kinds.pop(),
            data_files=[str(p) for p in files],
            split="train",
            streaming=source.streaming,
        )
        yield from _texts(rows, source)
    except TextSourceError:
        raise
    except Exception as error:  # datasets' own errors say little; name the file and the cause
        raise TextSourceError(
            f"dataset {source.name!r} could not be read as {_FILE_BUILDERS[files[0].suffix]} "
            f"({_root_cause(error)}): check the files' format."
        ) from error


def _looks_like_a_path(name: str) -> bool:
    """Whether a dataset name is meant as a local path (hub names look like ``owner/name``)."""
    return Path(name).suffix in _FILE_BUILDERS or name.startswith(("/", ".", "~", os.sep))


def _root_cause(error: BaseException) -> str:
    """The first line of the innermost cause of ``error``."""
    while (inner := error.__cause__ or error.__context__) is not None:
        error = inner
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _texts(rows: Iterable[dict[str, Any]], source: TextSource) -> Iterator[str]:
    for row in rows:
        if source.text_column not in row:
            raise TextSourceError(
                f"dataset {source.name!r} has no column {source.text_column!r}; its columns are "
                f"{sorted(row)}: set data.init_args.text_column."
            )
        yield row[source.text_column]


def special_token_ids(tokenizer: Any) -> tuple[int | None, int | None]:
    """(BOS, document separator): [CLS]/[SEP] for BERT-style tokenizers."""
    bos = tokenizer.bos_token_id
    if bos is None:
        bos = getattr(tokenizer, "cls_token_id", None)
    separator = tokenizer.eos_token_id
    if separator is None:
        separator = getattr(tokenizer, "sep_token_id", None)
    return bos, separator


def _token_chunks(
    documents: Iterable[str], tokenizer: Any, separator: int | None
) -> Iterator[np.ndarray]:
    """Token ids of consecutive batches of documents, each document followed by ``separator``."""
    documents = iter(documents)
    tail = [] if separator is None else [separator]
    while batch := list(islice(documents, _TOKENIZE_BATCH)):
        ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
        yield np.fromiter((t for doc in ids for t in (*doc, *tail)), dtype=np.int64)


def token_windows(
    documents: Iterable[str],
    tokenizer: Any,
    *,
    n_windows: int,
    context_size: int,
    prepend_bos: bool,
    seed: int,
    source_name: str = "the dataset",
) -> np.ndarray:
    """``[n_windows, context_size]`` int32 token windows in an order drawn from ``seed``.

    Only as much text is read as the windows need, so a streamed dataset is never read whole.
    """
    bos, separator = special_token_ids(tokenizer)
    if prepend_bos and bos is None:
        raise ValueError(
            "the tokenizer has no BOS or [CLS] token to prepend: set data.init_args.prepend_bos "
            "to false."
        )
    if context_size < 2:
        raise ValueError(f"context_size must be at least 2, got {context_size}.")
    text_per_window = context_size - int(prepend_bos)
    needed = n_windows * text_per_window
    chunks, have = [], 0
    for chunk in _token_chunks(documents, tokenizer, separator):
        chunks.append(chunk)
        have += len(chunk)
        if have >= needed:
            break
    text = np.concatenate(chunks)[:needed] if chunks else np.zeros(0, dtype=np.int64)
    if len(text) < needed:
        available = len(text) // text_per_window
        raise TextSourceError(
            f"{source_name} yields only {len(text):,} tokens, {available:,} windows of "
            f"context_size {context_size}, but {n_windows:,} are needed: lower "
            "data.init_args.n_tokens / val_tokens or use a larger dataset."
        )
    windows = text.reshape(n_windows, text_per_window)
    if prepend_bos:
        windows = np.concatenate([np.full((n_windows, 1), bos), windows], axis=1)
    order = np.random.default_rng(seed).permutation(n_windows)
    return np.ascontiguousarray(windows[order], dtype=np.int32)


# --------------------------------------------------------------------------- streamed windows
@dataclass(frozen=True)
class TextOptions:
    """The text and how it is cut into windows: the activation cache's text options, grouped
    for modules that read text as they train.

    Args:
        dataset: ``pydoc_data.topics`` (offline), a local .txt/.json/.jsonl/.parquet file or
            folder, or a Hugging Face dataset name.
        dataset_config: Hugging Face dataset configuration name.
        dataset_split: split of a hub dataset.
        text_column: column holding the text.
        streaming: stream a hub dataset instead of downloading it whole.
        context_size: tokens per window (BOS included).
        prepend_bos: start every window with BOS ([CLS] for BERT-style tokenizers).
        exclude_bos: leave the BOS position out of the activations.
    """

    dataset: str = PYDOC_TOPICS
    dataset_config: str | None = None
    dataset_split: str = "train"
    text_column: str = "text"
    streaming: bool = False
    context_size: int = 128
    prepend_bos: bool = True
    exclude_bos: bool = True

    def __post_init__(self) -> None:
        if self.context_size < 2:
            raise ValueError(f"context_size must be at least 2, got {self.context_size}.")

    @property
    def source(self) -> TextSource:
        return TextSource(
            self.dataset, self.dataset_config, self.dataset_split, self.text_column, self.streaming
        )

    @property
    def first_position(self) -> int:
        """First position of a window whose activations are used (1 when BOS is left out)."""
        return int(self.prepend_bos and self.exclude_bos)

    @property
    def positions(self) -> int:
        """Activation rows per window."""
        return self.context_size - self.first_position


class TextPosition(NamedTuple):
    """Where a reader stands: the pass over the text, the document, and the tokens of that
    document (its separator included) already read."""

    epoch: int
    document: int
    offset: int


TEXT_START = TextPosition(0, 0, 0)


class TextWindows:
    """Consecutive ``[n, context_size]`` windows of one of ``n_streams`` streams of the text,
    readable from any :class:`TextPosition` without tokenizing what lies before it.

    Stream ``s`` reads the documents ``d >= start.document`` with ``d % n_streams == s`` (the
    first one from ``start.offset``), so streams read disjoint text. The documents of other
    streams and those before the position are skipped untokenized. With ``wrap`` the stream
    starts a new epoch at ``start`` when its text runs out; without it, running out is a
    :class:`TextSourceError`.
    """

    def __init__(
        self,
        source: TextSource,
        tokenizer: Any,
        options: TextOptions,
        *,
        start: TextPosition = TEXT_START,
        position: TextPosition | None = None,
        stream: int = 0,
        n_streams: int = 1,
        wrap: bool = True,
        source_name: str = "the dataset",
    ) -> None:
        self.source, self.tokenizer, self.options = source, tokenizer, options
        self.start, self.stream, self.n_streams = start, stream, n_streams
        self.wrap, self.source_name = wrap, source_name
        self.bos, self.separator = special_token_ids(tokenizer)
        if options.prepend_bos and self.bos is None:
            raise ValueError(
                "the tokenizer has no BOS or [CLS] token to prepend: set prepend_bos to false."
            )
        self.position = position or start
        self._documents: Iterator[tuple[int, int, np.ndarray]] | None = None
        self._read_in_epoch: int | None = None  # tokens since a fresh epoch began, if one did
        self._current = np.zeros(0, dtype=np.int64)  # the rest of the document being read

    def _tokenized(self, position: TextPosition) -> Iterator[tuple[int, int, np.ndarray]]:
        """(index, offset, tokens) of this stream's documents from ``position`` on: a document's
        tokens and separator, from ``offset`` (``position.offset`` for the first, else 0)."""
        tail = [] if self.separator is None else [self.separator]
        mine = (
            (d, text)
            for d, text in enumerate(iter_documents(self.source))
            if d >= position.document and d % self.n_streams == self.stream
        )
        # Batches growing from one document: a reader that takes a few windows (one of many
        # cursors, a resume) tokenizes little more than it reads.
        size = 1
        while batch := list(islice(mine, size)):
            size = min(2 * size, _TOKENIZE_BATCH)
            ids = self.tokenizer([text for _, text in batch], add_special_tokens=False)
            for (d, _), doc in zip(batch, ids["input_ids"], strict=True):
                offset = position.offset if d == position.document else 0
                yield d, offset, np.array([*doc, *tail], dtype=np.int64)[offset:]

    def _text(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The next ``n`` tokens of text and the document of each, the position moved past
        them."""
        parts, documents, have = [], [], 0
        while have < n:
            if len(self._current) == 0:
                if self._documents is None:
                    self._documents = self._tokenized(self.position)
                    self._read_in_epoch = 0 if self.position == self.start else None
                found = next(self._documents, None)
                if found is None:  # the text ran out
                    # A whole epoch without a token would wrap forever.
                    if not self.wrap or self._read_in_epoch == 0:
                        raise self._too_short(have)
                    self.position = self.start._replace(epoch=self.position.epoch + 1)
                    self.start = self.position
                    self._documents = None
                    continue
                document, offset, self._current = found
                self.position = TextPosition(self.position.epoch, document, offset)
                if self._read_in_epoch is not None:
                    self._read_in_epoch += len(self._current)
                continue
            take = self._current[: n - have]
            parts.append(take)
            documents.append(np.full(len(take), self.position.document))
            have += len(take)
            self._current = self._current[len(take) :]
            self.position = self.position._replace(offset=self.position.offset + len(take))
        return np.concatenate(parts), np.concatenate(documents)

    def _too_short(self, have: int) -> TextSourceError:
        which = f" (stream {self.stream} of {self.n_streams})" if self.n_streams > 1 else ""
        return TextSourceError(
            f"{self.source_name}{which} ran out of text after {have:,} more tokens: it is too "
            "short for the requested windows; lower data.init_args.val_tokens, use fewer "
            "streams, or use a larger dataset."
        )

    def take(self, n: int) -> np.ndarray:
        """The next ``n`` windows as ``[n, context_size]`` int64 token ids."""
        return self.take_labelled(n)[0]

    def take_labelled(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The next ``n`` windows, and the document index of each of their tokens (BOS: the
        document of the token after it), both ``[n, context_size]``."""
        text_per_window = self.options.context_size - int(self.options.prepend_bos)
        tokens, documents = self._text(n * text_per_window)
        windows = tokens.reshape(n, text_per_window)
        documents = documents.reshape(n, text_per_window)
        if self.options.prepend_bos:
            windows = np.concatenate([np.full((n, 1), self.bos), windows], axis=1)
            documents = np.concatenate([documents[:, :1], documents], axis=1)
        return windows, documents


def document_lengths(source: TextSource) -> list[int] | None:
    """Characters of each document, when they can be known without reading a streamed dataset
    whole (``None`` then)."""
    if source.streaming:
        return None
    return [len(text) for text in iter_documents(source)]


class TextCursors:
    """``len(positions)`` readers of one stream of the text, spaced over it, whose windows are
    taken in turn: window ``w`` of the stream comes from cursor ``w % cursors``. Reading many
    places at once puts many documents in every stretch of windows.

    Every cursor reads all of the stream's documents and wraps at the end to ``start``; the
    cursors begin at evenly spaced documents (see :func:`spaced_cursors`), so together they
    read the text in disjoint runs until they drift into each other's.
    """

    def __init__(
        self, open_reader: Callable[[TextPosition], TextWindows], positions: Sequence[TextPosition]
    ) -> None:
        self.readers = [open_reader(position) for position in positions]

    @property
    def positions(self) -> list[TextPosition]:
        return [reader.position for reader in self.readers]

    def take_labelled(self, n: int, first: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Windows ``first .. first + n`` of the stream, their tokens' documents, and each
        window's cursor."""
        cursors = (first + np.arange(n)) % len(self.readers)
        counts = np.bincount(cursors, minlength=len(self.readers))
        windows = np.empty((n, self.readers[0].options.context_size), dtype=np.int64)
        documents = np.empty_like(windows)
        for k, (reader, count) in enumerate(zip(self.readers, counts.tolist(), strict=True)):
            if count:
                windows[cursors == k], documents[cursors == k] = reader.take_labelled(count)
        return windows, documents, cursors


def spaced_cursors(
    start: TextPosition,
    stream: int,
    n_streams: int,
    cursors: int,
    lengths: Sequence[int] | None,
    tokens_before: Callable[[list[tuple[int, int]]], list[int]],
) -> list[TextPosition]:
    """Where each of a stream's ``cursors`` begins: the first at ``start``, the others spaced
    evenly over the characters of the stream's documents from ``start.document`` on (cursor
    ``k`` at the ``k / cursors`` point; ``tokens_before`` maps (document, characters) points to
    tokens into their documents). All cursors read as fast, so they stay evenly spaced and
    together cover the text uniformly. Without the lengths (a streamed dataset) they cannot be
    spaced: one cursor is all that reads distinct text."""
    if cursors == 1:
        return [start]
    if lengths is None:
        return _refuse_cursors(cursors)
    mine = [d for d in range(start.document, len(lengths)) if d % n_streams == stream]
    ends = np.cumsum([lengths[d] for d in mine])
    points = []
    for k in range(1, cursors):
        point = k * int(ends[-1]) // cursors
        i = min(int(np.searchsorted(ends, point, side="right")), len(mine) - 1)
        points.append((mine[i], point - (int(ends[i - 1]) if i else 0)))
    offsets = tokens_before(points)
    positions = [start]
    for (document, _), offset in zip(points, offsets, strict=True):
        if document == start.document:
            offset = max(offset, start.offset)
        positions.append(TextPosition(0, document, offset))
    return positions


def _refuse_cursors(cursors: int) -> list[TextPosition]:
    raise ValueError(
        f"data.init_args.cursors={cursors} spaces cursors over the documents, whose number a "
        "streamed dataset does not tell: set cursors to 1 or text.streaming to false."
    )

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
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

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

"""Reading the files of a cache, export or checkpoint folder: regular files only, bounded.

Such a folder may have been downloaded, so any file in it may be a link to ``/dev/zero`` (read
whole, it grows memory until the machine kills the process), a FIFO (opening it waits forever
for a writer), or far larger than its kind of file ever is. Every metadata file (JSON,
``meta.pt``, a distributed checkpoint's ``.metadata``) is read through :func:`read_bounded`;
checkpoints and weights, which are legitimately large, through :func:`load_torch_file` and
:func:`load_safetensors_file`, which read regular files only and turn a damaged file into one
line naming it.

This module is on the lowest floor: it imports nothing of the project (and torch only when a
torch file is read), so ``data``, ``io``, ``parallel`` and the command line all use it.
"""

from __future__ import annotations

import io
import os
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

# Far above what lightning-sae writes (a manifest of 100k shards is ~15 MiB), far below memory.
JSON_LIMIT = 64 << 20
# A sharded checkpoint's meta.pt: loops, callbacks and hyperparameters, no weights.
METADATA_LIMIT = 1 << 30


class UnreadableFileError(ValueError):
    """A file that is not what its folder says it is: ``"{path} {problem}: {fix}"``. Callers
    with a better fix (a cache: delete and build again) reuse ``problem``."""

    def __init__(self, path: str | Path, problem: str, fix: str) -> None:
        super().__init__(f"{path} {problem}: {fix}.")
        self.path, self.problem = Path(path), problem


def _kind(mode: int) -> str:
    kinds = {
        stat.S_ISDIR: "a folder",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISSOCK: "a socket",
    }
    return next((name for test, name in kinds.items() if test(mode)), "not a plain file")


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"


@contextmanager
def open_regular(path: str | Path, limit: int | None = None) -> Iterator[BinaryIO]:
    """``path`` open for binary reading, if it is a regular file (links are followed) of at
    most ``limit`` bytes; otherwise an :class:`UnreadableFileError` naming it.

    The checks are made on the opened file, so what is checked is what is read. A missing file
    raises ``FileNotFoundError`` as ``open`` does.
    """
    # O_NONBLOCK: opening a FIFO returns at once (and is refused below) instead of waiting.
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableFileError(
                path,
                f"is not a regular file (it is {_kind(info.st_mode)})",
                "a cache, export or checkpoint folder holds only regular files; replace it with "
                "the real file",
            )
        if limit is not None and info.st_size > limit:
            raise UnreadableFileError(
                path,
                f"is {_size(info.st_size)}, larger than the {_size(limit)} this kind of file "
                "may hold",
                "it was not written by lightning-sae (or is damaged); replace it",
            )
        os.set_blocking(descriptor, True)
        file = os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise
    with file:
        yield file


def read_bounded(path: str | Path, limit: int = JSON_LIMIT) -> bytes:
    """The bytes of the regular file ``path``, refused (naming it) beyond ``limit`` bytes."""
    with open_regular(path, limit) as file:
        content = file.read(limit + 1)  # a file that grew since it was checked stops here
    if len(content) > limit:
        raise UnreadableFileError(
            path, f"grew past {_size(limit)} while it was read", "replace it with the real file"
        )
    return content


def read_text_bounded(path: str | Path, limit: int = JSON_LIMIT) -> str:
    """:func:`read_bounded` decoded as UTF-8 (a ``UnicodeDecodeError`` is left to the caller,
    who knows what the file should hold)."""
    return read_bounded(path, limit).decode("utf-8")


def _unsupported(error: Exception) -> str:
    """What torch's restricted unpickler refused, without its advice to unpickle anyway."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    if found:
        return f"the Python object {found.group(1)}"
    found = re.search(r"WeightsUnpickler error: ([^.\n]+)", str(error))
    return found.group(1) if found else "something other than tensors and plain containers"


def load_torch_file(
    path: str | Path, limit: int | None = None, mmap: bool = False, what: str = "checkpoint"
) -> Any:
    """A file written by ``torch.save``, read with ``weights_only=True`` (nothing it holds
    chooses code to run), as one :class:`UnreadableFileError` naming the file when it is not a
    regular file, larger than ``limit``, empty, truncated, or holds Python objects.

    ``mmap`` maps the tensors instead of reading them (for reading a checkpoint's small
    entries without its weights).
    """
    import pickle

    import torch

    with open_regular(path, limit) as file:
        if os.fstat(file.fileno()).st_size == 0:
            raise UnreadableFileError(
                path,
                "is empty (0 bytes)",
                f"the {what} was cut short while it was written or copied; copy it again or use "
                f"another {what}",
            )
        try:
            source = str(path) if mmap else file
            return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as error:
            if "Unsupported global" in str(error) or "WeightsUnpickler" in str(error):
                raise UnreadableFileError(
                    path,
                    f"holds {_unsupported(error)}, which lightning-sae never unpickles (its "
                    f"{what}s hold only tensors and plain values)",
                    f"it was not written by lightning-sae, or was edited; use a {what} a run wrote",
                ) from None
            raise _damaged(path, what, error) from None
        except (RuntimeError, EOFError, ValueError, OSError) as error:
            raise _damaged(path, what, error) from None


def _damaged(path: str | Path, what: str, error: Exception) -> UnreadableFileError:
    detail = str(error).split("\n", 1)[0].split(". ", 1)[0].strip() or type(error).__name__
    return UnreadableFileError(
        path,
        f"is truncated or damaged, not a readable {what} ({detail})",
        f"it was cut short while it was written or copied; copy it again or use another {what}",
    )


def load_safetensors_file(path: str | Path) -> dict[str, Any]:
    """The tensors of a regular ``.safetensors`` file; a truncated or damaged one is one
    :class:`UnreadableFileError` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    with open_regular(path):
        pass  # the weights are memory-mapped by name below, not read whole
    try:
        return load_file(str(path), device="cpu")
    except SafetensorError as error:
        raise UnreadableFileError(
            path,
            f"is not a complete safetensors file ({error})",
            "it is truncated or damaged; export or download the folder again",
        ) from None


def bytes_io(path: str | Path, limit: int = JSON_LIMIT) -> io.BytesIO:
    """:func:`read_bounded` as a file object, for readers that take one (pickle, torch)."""
    return io.BytesIO(read_bounded(path, limit))

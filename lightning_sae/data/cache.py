"""On-disk activation cache: token windows, per-hook ``.npy`` shards, manifests, resume.

Layout of a cache folder::

    tokens.npy                 [n_windows, context_size] int32 windows, in training order
    tokens.json                fingerprint of the windows (model, tokenizer, dataset, ...)
    <hook>/manifest.json       fingerprint (+ hook, dtype), layout, per-shard rows/bytes/sha256
    <hook>/shard_00000.npy     [rows, d_in] activations of ``shard_contexts`` consecutive windows
    <hook>/shard_00000.npy.json  while building: rows/bytes/sha256 of the finished shard

Windows ``[0, n_train_windows)`` are the training split, the rest the held-out split. Row ``r``
of a hook's shards is position ``first_position + r % positions`` of window ``r // positions``.

Every file is written to ``<name>.tmp`` and renamed into place, so a file under its final name
is always complete. A shard is computed from its own windows in a fixed sequence of forward
batches, so a build killed at any point and run again recomputes exactly the missing shards and
ends byte-identical to an uninterrupted build. A finished shard's checksum is recorded beside it
(``<shard>.json``, computed from the bytes as they were written); a resumed build keeps a shard
only if it still matches that record, and recomputes it otherwise. ``manifest.json`` says
``"complete": true`` only after every shard exists, and then holds every checksum (the records
beside the shards are removed).

Opening a complete cache checks that the manifest's shard list is exactly the one its layout
implies (files, rows, total), every shard's and ``tokens.npy``'s ``.npy`` header and size, and
with ``verify="checksum"`` the sha256 of every file read: shards and tokens. A sample of the rows
is checked to be finite, and the reader checks every row it serves (see
:class:`ShardedActivations`). Nothing read from a manifest chooses a path outside the cache or
code to run.

bfloat16 shards are stored as ``uint16`` bit patterns (numpy has no bfloat16); the manifest
records the real dtype and :class:`ShardedActivations` views them back as bfloat16.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from torch import Tensor
from tqdm.auto import tqdm

from lightning_sae.files import UnreadableFileError, open_regular, read_text_bounded

FORMAT = "lightning-sae-activation-cache"
VERSION = 1
STORAGE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
}
_HASH_BLOCK = 1 << 23


# Rows checked when activations are opened: evenly spaced blocks, so a large cache costs a few
# megabytes of reads. The loader checks every row it serves besides.
SAMPLE_BLOCKS = 64
SAMPLE_BLOCK_ROWS = 64


class DataError(ValueError):
    """Activations or a cache that cannot be used; the message names the file and the fix."""


class CacheMismatchError(DataError):
    """An existing cache was built for another configuration."""


class CorruptCacheError(DataError):
    """A cache file is missing, truncated, malformed or does not match its checksum."""


class NonFiniteDataError(DataError):
    """Activations hold NaN or Inf."""


# --------------------------------------------------------------------------- files
class _HashingFile:
    """A write-only file object that hashes what passes through it."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.sha256, self.size = file, hashlib.sha256(), 0

    def write(self, data: bytes | memoryview) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.file.write(data)


def _commit(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    # The rename is durable only once the folder entry is on disk.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_npy_atomic(path: Path, array: np.ndarray) -> tuple[str, int]:
    """Write ``array`` as ``.npy`` via a temporary file; return (sha256, size in bytes)."""
    return write_npy_chunks_atomic(path, [np.ascontiguousarray(array)])


def write_npy_chunks_atomic(path: Path, chunks: Sequence[np.ndarray]) -> tuple[str, int]:
    """Write the row-wise concatenation of C-contiguous ``chunks`` as one ``.npy`` file, via a
    temporary file and without concatenating in memory; return (sha256, size in bytes)."""
    first = chunks[0]
    header = {
        "descr": np.lib.format.dtype_to_descr(first.dtype),
        "fortran_order": False,
        "shape": (sum(len(c) for c in chunks), *first.shape[1:]),
    }
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw:
        file = _HashingFile(raw)
        np.lib.format.write_array_header_1_0(file, header)
        for chunk in chunks:
            file.write(memoryview(chunk).cast("B"))
        raw.flush()
        os.fsync(raw.fileno())
    _commit(tmp, path)
    return file.sha256.hexdigest(), file.size


def write_json_atomic(path: Path, content: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as file:
        json.dump(content, file, indent=2, sort_keys=True)
        file.write("\n")
        file.flush()
        os.fsync(file.fileno())
    _commit(tmp, path)


def _corrupt(path: Path, problem: str, root: Path) -> CorruptCacheError:
    return CorruptCacheError(f"{path} {problem}: delete {root} and build the cache again.")


def read_json(path: Path, root: Path | None = None) -> dict[str, Any] | None:
    """The JSON object in ``path``, or ``None`` when there is no such file. ``root`` is the
    folder the error message tells the user to delete (default: the file's folder)."""
    if not path.exists() and not path.is_symlink():
        return None
    try:
        content = json.loads(read_text_bounded(path))
    except UnreadableFileError as error:
        raise _corrupt(path, error.problem, root or path.parent) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _corrupt(path, f"is not valid JSON ({error})", root or path.parent) from error
    if not isinstance(content, dict):
        raise _corrupt(path, "does not hold a JSON object", root or path.parent)
    return content


def fingerprint_of(path: Path, content: dict[str, Any], root: Path) -> dict[str, Any]:
    """The ``fingerprint`` recorded in a manifest or ``tokens.json``."""
    fingerprint = content.get("fingerprint")
    if not isinstance(fingerprint, dict):
        raise _corrupt(path, "has no fingerprint (it is damaged or was not written here)", root)
    return fingerprint


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open_regular(path) as file:  # a link to /dev/zero would never end
        while block := file.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, expected file size) from an ``.npy`` header, without reading the data."""
    with open(path, "rb") as file:
        version = np.lib.format.read_magic(file)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran_order, dtype = read_header(file)
        if dtype.hasobject:
            raise ValueError("it holds Python objects")
        if fortran_order:
            raise ValueError("it is Fortran-ordered")
        return shape, dtype, file.tell() + int(np.prod(shape)) * dtype.itemsize


def complete_npy(path: Path, rows: int | None, dtype: np.dtype) -> int | None:
    """``d_in`` of a well-formed, untruncated ``[rows, d_in]`` shard, else ``None``."""
    try:
        shape, file_dtype, size = npy_header(path)
    except (OSError, ValueError):
        return None
    if len(shape) != 2 or file_dtype != dtype or (rows is not None and shape[0] != rows):
        return None
    return shape[1] if path.stat().st_size == size else None


# Bit patterns at or above these (sign bit cleared) are Inf or NaN: exponent bits all ones.
_NON_FINITE_BITS = {"float16": 0x7C00, "bfloat16": 0x7F80}


def non_finite_rows(block: np.ndarray, dtype: str) -> np.ndarray | None:
    """Indices of the rows of ``block`` (in storage form: bfloat16 as uint16) that hold NaN or
    Inf, or ``None`` when every value is finite. The common, finite case costs about one read
    of the block and allocates nothing for float32."""
    if len(block) == 0:
        return None
    if dtype == "float32":
        # NaN propagates through max and min, and an Inf is its own extreme.
        if np.isfinite(block.max()) and np.isfinite(block.min()):
            return None
        return np.flatnonzero(~np.isfinite(block).all(axis=1))
    # numpy's float16 arithmetic is slow; the bit patterns tell the same.
    magnitude = block.view(np.uint16) & 0x7FFF
    if int(magnitude.max()) < _NON_FINITE_BITS[dtype]:
        return None
    return np.flatnonzero((magnitude >= _NON_FINITE_BITS[dtype]).any(axis=1))


def record_path(shard: Path) -> Path:
    """Where a finished shard's checksum is recorded until the manifest holds it."""
    return shard.with_name(shard.name + ".json")


def shard_entry(path: Path, rows: int, sha256: str, size: int) -> dict[str, Any]:
    """A shard as the manifest (and the record beside it) lists it."""
    return {"file": path.name, "rows": rows, "bytes": size, "sha256": sha256}


# --------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class CacheLayout:
    """How windows map to shards and rows."""

    n_windows: int
    n_train_windows: int
    context_size: int
    first_position: int
    shard_contexts: int

    @property
    def positions(self) -> int:
        """Rows stored per window."""
        return self.context_size - self.first_position

    @property
    def n_shards(self) -> int:
        return -(-self.n_windows // self.shard_contexts)

    def shard_windows(self, shard: int) -> range:
        start = shard * self.shard_contexts
        return range(start, min(start + self.shard_contexts, self.n_windows))

    def shard_rows(self, shard: int) -> int:
        return len(self.shard_windows(shard)) * self.positions

    @property
    def n_train_rows(self) -> int:
        return self.n_train_windows * self.positions

    @property
    def n_rows(self) -> int:
        return self.n_windows * self.positions


def shard_name(shard: int) -> str:
    return f"shard_{shard:05d}.npy"


def hook_folder(root: Path, hook: str) -> Path:
    return root / hook.replace("/", "_")


def describe_mismatch(found: dict[str, Any], expected: dict[str, Any]) -> str:
    keys = sorted(set(found) | set(expected))
    return "; ".join(
        f"{key}: cache has {found.get(key)!r}, config wants {expected.get(key)!r}"
        for key in keys
        if found.get(key) != expected.get(key)
    )


def _check_fingerprint(path: Path, found: dict[str, Any], expected: dict[str, Any]) -> None:
    if found != expected:
        raise CacheMismatchError(
            f"the cache at {path.parent} was built for another configuration "
            f"({describe_mismatch(found, expected)}). It is never reused silently: delete "
            f"{path.parent}, or point data.init_args.cache_dir at another folder."
        )


# --------------------------------------------------------------------------- reading
class ShardedActivations:
    """Rows of several memory-mapped ``[n_i, d_in]`` arrays, addressed as one ``[N, d_in]``.

    ``names`` (the files, for messages), ``source`` (what holds them) and ``fix`` (what to do
    about bad rows) make the errors say where the problem is. Every row read through
    :meth:`read` or :meth:`gather` is checked to be finite: a NaN or Inf stops the loader with
    an error that names the file and the row, instead of training to NaN.
    """

    def __init__(
        self,
        arrays: Sequence[np.ndarray],
        dtype: str,
        names: Sequence[str] | None = None,
        source: str = "the activations",
        fix: str = "",
    ) -> None:
        if not arrays:
            raise ValueError("no activation arrays to read.")
        self.names = (
            list(names) if names is not None else [f"array {i}" for i in range(len(arrays))]
        )
        widths = {a.shape[1] for a in arrays}
        if len(widths) != 1:
            found = ", ".join(f"{n}: {a.shape[1]}" for n, a in zip(self.names, arrays, strict=True))
            raise ValueError(
                f"activation files disagree on d_in: widths {sorted(widths)} ({found}); every "
                "file must hold vectors of one width."
            )
        self.arrays, self.dtype = list(arrays), dtype
        self.source, self.fix = source, fix
        self.d_in = widths.pop()
        self.offsets = np.cumsum([0] + [len(a) for a in arrays])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shard_bounds(self) -> list[tuple[int, int]]:
        """(start, stop) global rows of each array."""
        return list(zip(self.offsets[:-1].tolist(), self.offsets[1:].tolist(), strict=True))

    def empty(self, n: int) -> np.ndarray:
        return np.empty((n, self.d_in), dtype=self.arrays[0].dtype)

    def _array_of(self, row: int) -> int:
        return int(np.searchsorted(self.offsets, row, side="right")) - 1

    def gather(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``out[i] = row rows[i]``; reads each array once, in ascending row order."""
        out = self.empty(len(rows)) if out is None else out
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        cuts = np.searchsorted(sorted_rows, self.offsets)
        for i, array in enumerate(self.arrays):
            lo, hi = cuts[i], cuts[i + 1]
            if hi > lo:
                out[order[lo:hi]] = array[sorted_rows[lo:hi] - self.offsets[i]]
        self._check_finite(out, lambda j: int(rows[j]), "found sampling rows")
        return out

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def read(self, start: int, stop: int, out: np.ndarray) -> None:
        """Copy rows ``[start, stop)``, which must lie in one array, into ``out``."""
        i = self._array_of(start)
        lo, hi = start - self.offsets[i], stop - self.offsets[i]
        if stop > self.offsets[i + 1]:
            raise ValueError(f"rows {start}:{stop} cross the end of array {i}.")
        out[:] = self.arrays[i][lo:hi]
        self._check_finite(out, lambda j: start + j, f"found reading rows {lo}:{hi}")

    def _check_finite(self, block: np.ndarray, source_row: Callable[[int], int], how: str) -> None:
        """Raise :class:`NonFiniteDataError` naming the file and row of the first non-finite
        row of ``block``; ``source_row(j)`` is the global row that ``block[j]`` came from."""
        bad = non_finite_rows(block, self.dtype)
        if bad is None:
            return
        row = source_row(int(bad[0]))
        i = self._array_of(row)
        raise NonFiniteDataError(
            f"{self.names[i]}: row {row - int(self.offsets[i])} holds NaN or Inf ({how}); "
            f"non-finite activations train to NaN. {self.fix}".rstrip()
        )

    def check_sample(self) -> None:
        """Refuse NaN/Inf and constant data when the activations are opened, from at most
        ``SAMPLE_BLOCKS * SAMPLE_BLOCK_ROWS`` rows in evenly spaced blocks (all rows of small
        data). Constant data (every row the same vector: nothing to learn, FVU undefined) is
        confirmed by reading every row, which happens only when the whole sample is constant."""
        n = len(self)
        if n <= SAMPLE_BLOCKS * SAMPLE_BLOCK_ROWS:
            starts = range(0, n, SAMPLE_BLOCK_ROWS)
        else:
            starts = np.linspace(0, n - SAMPLE_BLOCK_ROWS, SAMPLE_BLOCKS).astype(int).tolist()
        first_row, constant = None, True
        for start in starts:
            stop = min(start + SAMPLE_BLOCK_ROWS, int(self.offsets[self._array_of(start) + 1]))
            block = self.empty(stop - start)
            self.read(start, stop, block)  # raises on a non-finite row
            first_row = block[0].copy() if first_row is None else first_row
            constant = constant and bool((block == first_row).all())
        if n > 1 and constant and self._every_row_is(first_row):
            raise DataError(
                f"every row of the activations in {self.source} is the same vector: there is "
                "nothing to learn (reconstruction error is undefined at zero variance). Check how "
                "the activations were produced."
            )

    def _every_row_is(self, row: np.ndarray) -> bool:
        step = max(1, (1 << 24) // (self.d_in * row.itemsize))  # about 16 MB at a time
        return all(
            bool((array[lo : lo + step] == row).all())
            for array in self.arrays
            for lo in range(0, len(array), step)
        )

    def to_torch(self, array: np.ndarray) -> Tensor:
        tensor = torch.from_numpy(array)
        return tensor.view(torch.bfloat16) if self.dtype == "bfloat16" else tensor


def _manifest_layout(path: Path, manifest: dict[str, Any], root: Path) -> CacheLayout:
    """The layout a manifest records, checked to be well-formed."""
    raw = manifest.get("layout")
    names = [field.name for field in fields(CacheLayout)]
    if (
        not isinstance(raw, dict)
        or sorted(raw) != sorted(names)
        or not all(type(raw[name]) is int for name in names)
    ):
        raise _corrupt(path, f"has no valid layout (integers {', '.join(names)})", root)
    layout = CacheLayout(**raw)
    if not (
        0 < layout.n_train_windows <= layout.n_windows
        and 0 <= layout.first_position < layout.context_size
        and layout.shard_contexts > 0
    ):
        raise _corrupt(path, f"has an impossible layout {raw}", root)
    return layout


def _check_shard_list(
    path: Path, manifest: dict[str, Any], layout: CacheLayout, root: Path
) -> list[dict[str, Any]]:
    """The manifest's shards, which must be exactly those of ``layout``: the rows a shard is
    said to hold decide the training / held-out split, so a list that differs would move rows
    between them."""
    shards = manifest.get("shards")
    if not isinstance(shards, list) or len(shards) != layout.n_shards:
        found = len(shards) if isinstance(shards, list) else "no"
        raise _corrupt(
            path, f"lists {found} shards but its layout has {layout.n_shards} shards", root
        )
    for k, entry in enumerate(shards):
        expected = {"file": shard_name(k), "rows": layout.shard_rows(k)}
        if (
            not isinstance(entry, dict)
            or {key: entry.get(key) for key in expected} != expected
            or type(entry.get("bytes")) is not int
            or not isinstance(entry.get("sha256"), str)
        ):
            raise _corrupt(
                path,
                f"lists shard {k} as {entry!r}, but the layout has {expected['file']} with "
                f"{expected['rows']} rows",
                root,
            )
    return shards


def _check_file(
    path: Path, shape: tuple[int, ...], dtype: np.dtype, size: int | None, root: Path
) -> None:
    """``path`` is a complete ``.npy`` file of ``shape`` and ``dtype`` (and ``size`` bytes, the
    manifest's record, when given)."""
    if not path.is_file():
        raise _corrupt(path, "is missing", root)
    actual = path.stat().st_size
    try:
        found_shape, found_dtype, header_size = npy_header(path)
    except (OSError, ValueError) as error:
        raise _corrupt(path, f"is truncated or not a .npy file ({error})", root) from error
    for expected, whose in ((size, "the manifest says"), (header_size, "its header implies")):
        if expected is not None and actual != expected:
            raise _corrupt(
                path, f"is missing or truncated ({actual} bytes, {whose} {expected})", root
            )
    if found_shape != shape or found_dtype != dtype:
        raise _corrupt(
            path, f"holds {found_dtype} {found_shape}, the manifest says {dtype} {shape}", root
        )


def _check_sha256(path: Path, sha256: str, root: Path) -> None:
    if sha256_file(path) != sha256:
        raise _corrupt(path, "does not match its sha256 checksum: the file is corrupt", root)


def open_hook_cache(
    root: Path,
    hook: str,
    fingerprint: dict[str, Any] | None,
    verify: str = "checksum",
    layout: CacheLayout | None = None,
) -> tuple[ShardedActivations, dict[str, Any]]:
    """Memory-map a complete hook cache after checking it (see the module docstring).

    ``fingerprint=None`` skips the configuration check; ``layout``, when given, must be the
    manifest's. ``verify="checksum"`` also hashes every shard and ``tokens.npy``.
    """
    folder = hook_folder(root, hook)
    path = folder / "manifest.json"
    manifest = read_json(path, root)
    if manifest is None or manifest.get("complete") is not True:
        raise CorruptCacheError(
            f"no complete activation cache for {hook} in {root}: build it with "
            "`lightning-sae cache --config ...` (or let fit's prepare_data build it)."
        )
    found = fingerprint_of(path, manifest, root)
    if fingerprint is not None:
        _check_fingerprint(path, found, fingerprint)
    dtype = found.get("dtype")
    if dtype not in STORAGE_DTYPES:
        raise _corrupt(
            path, f"records the dtype {dtype!r}, not one of {sorted(STORAGE_DTYPES)}", root
        )
    recorded = _manifest_layout(path, manifest, root)
    if layout is not None and recorded != layout:
        raise _corrupt(
            path, f"records the layout {asdict(recorded)}, the configuration {asdict(layout)}", root
        )
    shards = _check_shard_list(path, manifest, recorded, root)
    d_in = manifest.get("d_in")
    if type(d_in) is not int or d_in <= 0:
        raise _corrupt(path, f"records d_in {d_in!r}", root)
    tokens_fingerprint = {k: v for k, v in found.items() if k not in ("hook", "dtype")}
    _check_tokens(root, recorded, tokens_fingerprint, verify)

    arrays, names = [], []
    for k, shard in enumerate(shards):
        shard_path = folder / shard_name(k)
        shape = (recorded.shard_rows(k), d_in)
        _check_file(shard_path, shape, STORAGE_DTYPES[dtype], shard["bytes"], root)
        if verify == "checksum":
            _check_sha256(shard_path, shard["sha256"], root)
        arrays.append(np.load(shard_path, mmap_mode="r", allow_pickle=False))
        names.append(str(shard_path))
    store = ShardedActivations(
        arrays,
        dtype,
        names,
        source=str(folder),
        fix=f"Delete {root} and build the cache again (model_dtype float32 avoids overflow).",
    )
    store.check_sample()
    return store, manifest


def _check_tokens(
    root: Path, layout: CacheLayout, fingerprint: dict[str, Any], verify: str
) -> None:
    """``tokens.npy`` belongs to this cache and, with ``verify="checksum"``, is intact."""
    meta_path, path = root / "tokens.json", root / "tokens.npy"
    meta = read_json(meta_path, root)
    if meta is None:
        raise _corrupt(meta_path, "is missing", root)
    _check_fingerprint(meta_path, fingerprint_of(meta_path, meta, root), fingerprint)
    if not isinstance(meta.get("sha256"), str):
        raise _corrupt(meta_path, "has no sha256 checksum of tokens.npy", root)
    _check_file(path, (layout.n_windows, layout.context_size), np.dtype("<i4"), None, root)
    if verify == "checksum":
        _check_sha256(path, meta["sha256"], root)


def open_activation_files(directory: Path) -> ShardedActivations:
    """Bring-your-own activations: every ``.npy`` / ``.safetensors`` file in ``directory``
    (sorted by name), each holding one ``[n, d_in]`` array, memory-mapped without pickle."""
    files = sorted(p for p in directory.iterdir() if p.suffix in (".npy", ".safetensors"))
    if not files:
        raise ValueError(f"{directory} holds no .npy or .safetensors files of activations.")
    arrays, dtypes = [], set()
    for path in files:
        array, dtype = _npy_array(path) if path.suffix == ".npy" else _safetensors_array(path)
        if array.ndim != 2:
            raise ValueError(f"{path} has shape {array.shape}; activations must be [n, d_in].")
        arrays.append(array)
        dtypes.add(dtype)
    if len(dtypes) > 1:
        raise ValueError(f"activation files in {directory} mix dtypes {sorted(dtypes)}.")
    store = ShardedActivations(
        arrays,
        dtypes.pop(),
        [str(p) for p in files],
        source=str(directory),
        fix="Fix or remove the file: activations must be finite.",
    )
    store.check_sample()
    return store


def _npy_array(path: Path) -> tuple[np.ndarray, str]:
    try:
        npy_header(path)
    except ValueError as error:
        raise ValueError(
            f"{path} is not a plain numeric array ({error}); object (pickled) arrays are never "
            "loaded: save activations as float32/float16 arrays."
        ) from error
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    for name, dtype in STORAGE_DTYPES.items():
        if array.dtype == dtype and name != "bfloat16":
            return array, name
    raise ValueError(
        f"{path} has dtype {array.dtype}; use float32 or float16 (.npy) or bfloat16 (.safetensors)."
    )


_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _safetensors_array(path: Path) -> tuple[np.ndarray, str]:
    """Memory-map the one tensor of a safetensors file (format: u64 header length, JSON header,
    raw little-endian data). The safetensors library validates the header first (its length,
    every tensor's shape and dtype against its data offsets, offsets that tile the data), so
    the map never reaches past the tensor's own bytes."""
    try:
        with safe_open(path, framework="np") as file:
            names = list(file.keys())
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{path} is not a valid safetensors file ({error}); write it with "
            "safetensors.numpy.save_file or safetensors.torch.save_file."
        ) from error
    if len(names) != 1 and "activations" not in names:
        raise ValueError(
            f"{path} holds tensors {sorted(names)}; store one tensor (or name it 'activations')."
        )
    with open(path, "rb") as file:
        header_len = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(header_len))
    info = header["activations" if "activations" in names else names[0]]
    if info["dtype"] not in _SAFETENSORS_DTYPES:
        raise ValueError(f"{path} has dtype {info['dtype']}; use F32, F16 or BF16.")
    dtype = _SAFETENSORS_DTYPES[info["dtype"]]
    start, _ = info["data_offsets"]
    array = np.memmap(
        path,
        dtype=STORAGE_DTYPES[dtype],
        mode="r",
        offset=8 + header_len + start,
        shape=tuple(info["shape"]),
    )
    return array, dtype


# --------------------------------------------------------------------------- building
Compute = Callable[[Tensor], dict[str, Tensor]]


def _to_storage(rows: Tensor, dtype: str) -> Tensor:
    """``rows`` in the storage dtype on the host; from a GPU the copy is asynchronous (into
    pinned memory), so the caller synchronises before reading it."""
    rows = rows.detach().to(getattr(torch, dtype)).contiguous()
    return rows.to("cpu", non_blocking=True) if rows.is_cuda else rows


def host_array(tensor: Tensor) -> np.ndarray:
    """A numpy view of a host tensor (bfloat16 as uint16 bit patterns)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


class CacheBuilder:
    """Builds (or resumes) the cache of ``hooks`` in ``root``.

    ``fingerprint`` identifies the token windows; each hook's manifest adds ``hook`` and
    ``dtype`` to it. A *compute* function maps a ``[batch, context_size]`` token batch to
    ``{hook: [batch, context_size, d_in]}``.
    """

    def __init__(
        self,
        root: Path,
        fingerprint: dict[str, Any],
        layout: CacheLayout,
        hooks: Sequence[str],
        dtype: str,
        batch_contexts: int,
        writers: int = 4,
    ) -> None:
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"cache dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}.")
        self.root, self.fingerprint, self.layout = Path(root), fingerprint, layout
        self.hooks, self.dtype, self.batch_contexts = list(hooks), dtype, batch_contexts
        self.writers = max(1, writers)
        self.np_dtype = STORAGE_DTYPES[dtype]

    def hook_fingerprint(self, hook: str) -> dict[str, Any]:
        return {**self.fingerprint, "hook": hook, "dtype": self.dtype}

    def manifest_path(self, hook: str) -> Path:
        return hook_folder(self.root, hook) / "manifest.json"

    # ----------------------------------------------------------------- state on disk
    def check_existing(self) -> list[str]:
        """Refuse a cache built for another configuration; return the hooks still to build."""
        tokens_path = self.root / "tokens.json"
        tokens_meta = read_json(tokens_path, self.root)
        if tokens_meta is not None:
            found = fingerprint_of(tokens_path, tokens_meta, self.root)
            _check_fingerprint(tokens_path, found, self.fingerprint)
        todo = []
        for hook in self.hooks:
            path = self.manifest_path(hook)
            manifest = read_json(path, self.root)
            if manifest is not None:
                found = fingerprint_of(path, manifest, self.root)
                _check_fingerprint(path, found, self.hook_fingerprint(hook))
            if manifest is None or manifest.get("complete") is not True:
                todo.append(hook)
        return todo

    def prepare(self, hooks: Sequence[str], make_tokens: Callable[[], np.ndarray]) -> None:
        """Write the token windows and incomplete manifests (one process only).

        The cache folder is created only once the windows exist, so a build that fails on its
        text (a missing or empty file) leaves nothing behind.
        """
        if read_json(self.root / "tokens.json", self.root) is None:
            windows = make_tokens()
            expected = (self.layout.n_windows, self.layout.context_size)
            if windows.shape != expected:
                raise ValueError(f"token windows have shape {windows.shape}, expected {expected}.")
            self.root.mkdir(parents=True, exist_ok=True)
            sha, _ = write_npy_atomic(self.root / "tokens.npy", windows.astype(np.int32))
            meta = {"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint}
            write_json_atomic(self.root / "tokens.json", {**meta, "sha256": sha})
        for hook in hooks:
            if read_json(self.manifest_path(hook), self.root) is None:
                self.manifest_path(hook).parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(self.manifest_path(hook), self._manifest(hook, None, None))

    def load_tokens(self) -> np.ndarray:
        meta = read_json(self.root / "tokens.json", self.root)
        path = self.root / "tokens.npy"
        if meta is None or not path.exists() or sha256_file(path) != meta.get("sha256"):
            raise CorruptCacheError(
                f"{path} is missing or does not match tokens.json: delete {self.root} and build "
                "the cache again."
            )
        return np.load(path, allow_pickle=False)

    def verified_shard(self, hook: str, shard: int) -> tuple[str, int] | None:
        """(sha256, bytes) of a finished shard that still matches the checksum recorded when it
        was written; ``None`` when it is absent, unrecorded, torn or damaged."""
        path = hook_folder(self.root, hook) / shard_name(shard)
        try:
            record = read_json(record_path(path))
        except CorruptCacheError:
            return None  # a damaged record: the shard cannot be trusted
        rows = self.layout.shard_rows(shard)
        if (
            record is None
            or {k: record.get(k) for k in ("file", "rows")} != {"file": path.name, "rows": rows}
            or complete_npy(path, rows, self.np_dtype) is None
            or path.stat().st_size != record.get("bytes")
            or sha256_file(path) != record.get("sha256")
        ):
            return None
        return record["sha256"], record["bytes"]

    def check_shards(
        self, hooks: Sequence[str], rank: int = 0, world: int = 1
    ) -> tuple[list[int], dict[tuple[str, int], tuple[str, int]]]:
        """This rank's shards that some hook lacks (absent, torn, or not matching the checksum
        recorded when written), and ``{(hook, shard): (sha256, bytes)}`` of those kept."""
        todo, kept = [], {}
        for shard in range(rank, self.layout.n_shards, world):
            found = {}
            for hook in hooks:
                if (checksum := self.verified_shard(hook, shard)) is None:
                    todo.append(shard)  # the shard's hooks are computed together anyway
                    break
                found[hook, shard] = checksum
            else:
                kept.update(found)
        return todo, kept

    # ----------------------------------------------------------------- compute + write
    def build_shards(
        self,
        hooks: Sequence[str],
        compute: Compute,
        rank: int = 0,
        world: int = 1,
        progress: bool = True,
    ) -> dict[tuple[str, int], tuple[str, int]]:
        """Compute and write this rank's missing shards (shard k belongs to rank k % world).

        Returns ``{(hook, shard): (sha256, bytes)}`` of this rank's shards: those written now
        and those kept because they match their recorded checksums. Writer threads hash and
        write finished shards while the next one is computed; at most ``writers`` shards wait
        in memory.
        """
        todo, written = self.check_shards(hooks, rank, world)
        if not todo:
            return written
        windows = self.load_tokens()
        bar = tqdm(
            total=sum(self.layout.shard_rows(shard) for shard in todo),
            unit="tok",
            unit_scale=True,
            desc=f"caching {', '.join(hooks)}",
            disable=not progress or rank != 0,
            smoothing=0.1,
        )
        with ThreadPoolExecutor(max_workers=self.writers) as writer:
            pending: deque[Future] = deque()
            for shard in todo:
                chunks = self._compute_shard(windows, shard, hooks, compute)
                if len(pending) >= self.writers:
                    written.update(pending.popleft().result())
                pending.append(writer.submit(self._write_shard, shard, chunks))
                bar.update(self.layout.shard_rows(shard))
            while pending:
                written.update(pending.popleft().result())
        bar.close()
        return written

    def _compute_shard(
        self, windows: np.ndarray, shard: int, hooks: Sequence[str], compute: Compute
    ) -> dict[str, list[np.ndarray]]:
        """Per hook, the shard's rows as host arrays, one per forward batch."""
        span, first = self.layout.shard_windows(shard), self.layout.first_position
        chunks: dict[str, list[Tensor]] = {hook: [] for hook in hooks}
        # Always the same forward batches for a shard: its bytes do not depend on where a
        # previous build stopped.
        for start in range(span.start, span.stop, self.batch_contexts):
            stop = min(start + self.batch_contexts, span.stop)
            activations = compute(torch.from_numpy(windows[start:stop].astype(np.int64)))
            for hook in hooks:
                block = activations[hook][:, first:, :]
                chunks[hook].append(_to_storage(block.reshape(-1, block.shape[-1]), self.dtype))
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the asynchronous copies to the host have landed
        host = {hook: [host_array(c) for c in tensors] for hook, tensors in chunks.items()}
        for hook, arrays in host.items():
            self._check_finite(hook, span.start, arrays)
        return host

    def _check_finite(self, hook: str, first_window: int, arrays: list[np.ndarray]) -> None:
        """Stop the build at non-finite activations (in the storage dtype, so a float16
        overflow counts): a cache of them would train to NaN."""
        window = first_window
        for rows in arrays:
            bad = non_finite_rows(rows, self.dtype)
            if bad is not None:
                first = int(bad[0])
                position = self.layout.first_position + first % self.layout.positions
                raise NonFiniteDataError(
                    f"the {hook} activations of window {window + first // self.layout.positions} "
                    f"(position {position}) hold NaN or Inf in {self.dtype}: the model "
                    "overflowed or is broken. Build with data.init_args.model_dtype float32 "
                    "and dtype float32, or check the model."
                )
            window += len(rows) // self.layout.positions

    def _write_shard(
        self, shard: int, chunks: dict[str, list[np.ndarray]]
    ) -> dict[tuple[str, int], tuple[str, int]]:
        """Write the shard of each hook, then record its checksum beside it: a shard with a
        record was finished, and a resumed build can tell whether it still is intact."""
        written = {}
        for hook, arrays in chunks.items():
            path = hook_folder(self.root, hook) / shard_name(shard)
            sha, size = write_npy_chunks_atomic(path, arrays)
            entry = shard_entry(path, self.layout.shard_rows(shard), sha, size)
            write_json_atomic(record_path(path), entry)
            written[hook, shard] = sha, size
        return written

    # ----------------------------------------------------------------- finish
    def finalize(
        self, hooks: Sequence[str], written: dict[tuple[str, int], tuple[str, int]]
    ) -> None:
        """Mark the hooks complete once every shard exists. Shards not in ``written`` must
        match the checksum recorded when they were written (they are hashed from disk); a shard
        is never trusted on its size alone."""
        for hook in hooks:
            folder = hook_folder(self.root, hook)
            shards, d_in = [], None
            for shard in range(self.layout.n_shards):
                path = folder / shard_name(shard)
                rows = self.layout.shard_rows(shard)
                width = complete_npy(path, rows, self.np_dtype)
                checksum = written.get((hook, shard)) or self.verified_shard(hook, shard)
                if width is None or checksum is None:
                    raise CorruptCacheError(
                        f"cannot finish the cache of {hook}: {path} is missing, incomplete or "
                        "does not match its recorded checksum. Run the build again; it resumes."
                    )
                if d_in is not None and width != d_in:
                    raise CorruptCacheError(
                        f"{path} has d_in {width}, other shards {d_in}: delete {self.root} and "
                        "build the cache again."
                    )
                d_in = width
                shards.append(shard_entry(path, rows, *checksum))
            write_json_atomic(self.manifest_path(hook), self._manifest(hook, d_in, shards))
            # The manifest holds every checksum now.
            for shard in range(self.layout.n_shards):
                record_path(folder / shard_name(shard)).unlink(missing_ok=True)

    def _manifest(
        self, hook: str, d_in: int | None, shards: list[dict[str, Any]] | None
    ) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "fingerprint": self.hook_fingerprint(hook),
            "layout": asdict(self.layout),
            "d_in": d_in,
            "complete": shards is not None,
            "shards": shards or [],
        }

    def build(
        self,
        make_tokens: Callable[[], np.ndarray],
        load_compute: Callable[[], Compute],
        progress: bool = True,
        rank: int = 0,
        world: int = 1,
    ) -> bool:
        """Build or resume every hook; returns whether anything was built.

        With ``world > 1`` every rank of an initialised process group must call this: shards
        are split across ranks and rank 0 writes the tokens and manifests.
        """
        hooks = self.check_existing()
        if not hooks:
            return False
        # The model first: an unknown hook fails before minutes of tokenizing.
        compute = load_compute()
        if rank == 0:
            self.prepare(hooks, make_tokens)
        _barrier(world)
        written = self.build_shards(hooks, compute, rank, world, progress)
        if world > 1:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, written)
            written = {key: value for part in gathered for key, value in part.items()}
        if rank == 0:
            self.finalize(hooks, written)
        _barrier(world)
        return True


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()

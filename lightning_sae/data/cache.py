"""On-disk activation cache: token windows, per-hook ``.npy`` shards, manifests, resume.

Layout of a cache folder::

    tokens.npy                 [n_windows, context_size] int32 windows, in training order
    tokens.json                fingerprint of the windows (model, tokenizer, dataset, ...)
    <hook>/manifest.json       fingerprint (+ hook, dtype), layout, per-shard rows/bytes/sha256
    <hook>/shard_00000.npy     [rows, d_in] activations of ``shard_contexts`` consecutive windows

Windows ``[0, n_train_windows)`` are the training split, the rest the held-out split. Row ``r``
of a hook's shards is position ``first_position + r % positions`` of window ``r // positions``.

Every file is written to ``<name>.tmp`` and renamed into place, so a file under its final name
is always complete. A shard is computed from its own windows in a fixed sequence of forward
batches, so a build killed at any point and run again recomputes exactly the missing shards and
ends byte-identical to an uninterrupted build. ``manifest.json`` says ``"complete": true`` only
after every shard exists; its checksums let a reader detect corrupt or truncated shards.

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

FORMAT = "lightning-sae-activation-cache"
VERSION = 1
STORAGE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
}
_HASH_BLOCK = 1 << 23


class CacheMismatchError(ValueError):
    """An existing cache was built for another configuration."""


class CorruptCacheError(RuntimeError):
    """A cache file is missing, truncated or does not match its checksum."""


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


def read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CorruptCacheError(
            f"{path} is not valid JSON ({error}); delete {path.parent} and build again."
        ) from error


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
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
    """Rows of several memory-mapped ``[n_i, d_in]`` arrays, addressed as one ``[N, d_in]``."""

    def __init__(self, arrays: Sequence[np.ndarray], dtype: str) -> None:
        if not arrays:
            raise ValueError("no activation arrays to read.")
        widths = {a.shape[1] for a in arrays}
        if len(widths) != 1:
            raise ValueError(f"activation files disagree on d_in: widths {sorted(widths)}.")
        self.arrays, self.dtype = list(arrays), dtype
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
        return out

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def read(self, start: int, stop: int, out: np.ndarray) -> None:
        """Copy rows ``[start, stop)``, which must lie in one array, into ``out``."""
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        if stop > self.offsets[i + 1]:
            raise ValueError(f"rows {start}:{stop} cross the end of array {i}.")
        out[:] = self.arrays[i][start - self.offsets[i] : stop - self.offsets[i]]

    def to_torch(self, array: np.ndarray) -> Tensor:
        tensor = torch.from_numpy(array)
        return tensor.view(torch.bfloat16) if self.dtype == "bfloat16" else tensor


def open_hook_cache(
    root: Path, hook: str, fingerprint: dict[str, Any] | None, verify: str = "checksum"
) -> tuple[ShardedActivations, dict[str, Any]]:
    """Memory-map a complete hook cache after checking fingerprint, sizes and (optionally)
    checksums. ``fingerprint=None`` skips the configuration check."""
    folder = hook_folder(root, hook)
    manifest = read_json(folder / "manifest.json")
    if manifest is None or not manifest.get("complete"):
        raise CorruptCacheError(
            f"no complete activation cache for {hook} in {root}: build it with "
            "`lightning-sae cache --config ...` (or let fit's prepare_data build it)."
        )
    if fingerprint is not None:
        _check_fingerprint(folder / "manifest.json", manifest["fingerprint"], fingerprint)
    dtype = manifest["fingerprint"]["dtype"]
    arrays = []
    for shard in manifest["shards"]:
        path = folder / shard["file"]
        size = path.stat().st_size if path.exists() else None
        if size != shard["bytes"]:
            raise CorruptCacheError(
                f"shard {path} is missing or truncated ({size} bytes, manifest says "
                f"{shard['bytes']}); delete {root} and build the cache again."
            )
        if verify == "checksum" and sha256_file(path) != shard["sha256"]:
            raise CorruptCacheError(
                f"shard {path} does not match its sha256 checksum: the file is corrupt. "
                f"Delete {root} and build the cache again."
            )
        arrays.append(np.load(path, mmap_mode="r", allow_pickle=False))
    return ShardedActivations(arrays, dtype), manifest


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
    return ShardedActivations(arrays, dtypes.pop())


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
    raw little-endian data)."""
    with open(path, "rb") as file:
        header_len = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(header_len))
    header.pop("__metadata__", None)
    if len(header) != 1 and "activations" not in header:
        raise ValueError(
            f"{path} holds tensors {sorted(header)}; store one tensor (or name it 'activations')."
        )
    info = header["activations"] if "activations" in header else next(iter(header.values()))
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
        tokens_meta = read_json(self.root / "tokens.json")
        if tokens_meta is not None:
            _check_fingerprint(
                self.root / "tokens.json", tokens_meta["fingerprint"], self.fingerprint
            )
        todo = []
        for hook in self.hooks:
            manifest = read_json(self.manifest_path(hook))
            if manifest is not None:
                _check_fingerprint(
                    self.manifest_path(hook), manifest["fingerprint"], self.hook_fingerprint(hook)
                )
            if manifest is None or not manifest.get("complete"):
                todo.append(hook)
        return todo

    def prepare(self, hooks: Sequence[str], make_tokens: Callable[[], np.ndarray]) -> None:
        """Write the token windows and incomplete manifests (one process only)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if read_json(self.root / "tokens.json") is None:
            windows = make_tokens()
            expected = (self.layout.n_windows, self.layout.context_size)
            if windows.shape != expected:
                raise ValueError(f"token windows have shape {windows.shape}, expected {expected}.")
            sha, _ = write_npy_atomic(self.root / "tokens.npy", windows.astype(np.int32))
            meta = {"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint}
            write_json_atomic(self.root / "tokens.json", {**meta, "sha256": sha})
        for hook in hooks:
            if read_json(self.manifest_path(hook)) is None:
                self.manifest_path(hook).parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(self.manifest_path(hook), self._manifest(hook, None, None))

    def load_tokens(self) -> np.ndarray:
        meta = read_json(self.root / "tokens.json")
        path = self.root / "tokens.npy"
        if meta is None or not path.exists() or sha256_file(path) != meta["sha256"]:
            raise CorruptCacheError(
                f"{path} is missing or does not match tokens.json; delete {self.root} and build "
                "again."
            )
        return np.load(path, allow_pickle=False)

    def missing_shards(self, hooks: Sequence[str], rank: int = 0, world: int = 1) -> list[int]:
        """Shards of this rank that some hook lacks (absent, truncated or malformed)."""
        return [
            shard
            for shard in range(rank, self.layout.n_shards, world)
            if any(
                complete_npy(
                    hook_folder(self.root, hook) / shard_name(shard),
                    self.layout.shard_rows(shard),
                    self.np_dtype,
                )
                is None
                for hook in hooks
            )
        ]

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

        Returns ``{(hook, shard): (sha256, bytes)}`` of the shards written. Writer threads hash
        and write finished shards while the next one is computed; at most ``writers`` shards
        wait in memory.
        """
        todo = self.missing_shards(hooks, rank, world)
        if not todo:
            return {}
        windows = self.load_tokens()
        written: dict[tuple[str, int], tuple[str, int]] = {}
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
        return {hook: [host_array(c) for c in tensors] for hook, tensors in chunks.items()}

    def _write_shard(
        self, shard: int, chunks: dict[str, list[np.ndarray]]
    ) -> dict[tuple[str, int], tuple[str, int]]:
        return {
            (hook, shard): write_npy_chunks_atomic(
                hook_folder(self.root, hook) / shard_name(shard), arrays
            )
            for hook, arrays in chunks.items()
        }

    # ----------------------------------------------------------------- finish
    def finalize(
        self, hooks: Sequence[str], written: dict[tuple[str, int], tuple[str, int]]
    ) -> None:
        """Mark the hooks complete once every shard exists; shards written by an earlier run
        (not in ``written``) are hashed from disk."""
        for hook in hooks:
            folder = hook_folder(self.root, hook)
            shards, d_in = [], None
            for shard in range(self.layout.n_shards):
                path = folder / shard_name(shard)
                width = complete_npy(path, self.layout.shard_rows(shard), self.np_dtype)
                if width is None:
                    raise CorruptCacheError(
                        f"cannot finish the cache of {hook}: {path} is missing or incomplete. "
                        "Run the build again; it resumes."
                    )
                if d_in is not None and width != d_in:
                    raise CorruptCacheError(f"{path} has d_in {width}, other shards {d_in}.")
                d_in = width
                sha, size = written.get((hook, shard)) or (sha256_file(path), path.stat().st_size)
                shards.append(
                    {
                        "file": path.name,
                        "rows": self.layout.shard_rows(shard),
                        "bytes": size,
                        "sha256": sha,
                    }
                )
            write_json_atomic(self.manifest_path(hook), self._manifest(hook, d_in, shards))

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

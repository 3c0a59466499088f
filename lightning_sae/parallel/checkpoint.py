"""A latent-sharded checkpoint folder as one ordinary Lightning checkpoint."""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

from lightning_sae.files import METADATA_LIMIT, bytes_io, load_torch_file, open_regular

META_FILENAME = "meta.pt"  # loops, callbacks, hyperparameters: everything but the shards
DCP_METADATA_FILENAME = ".metadata"  # torch's index of the shards, a pickle

# What torch's distributed checkpoint pickles into its index: the metadata classes of these two
# modules, torch sizes, dtypes and layouts, paths, plain containers.
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_SAFE_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout by name
    ("collections", "OrderedDict"),
    *(("pathlib", name) for name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath")),
}


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Unpickles only what a distributed-checkpoint index holds; anything else (a function to
    call, a class of another package) is refused before it is looked up."""

    def find_class(self, module: str, name: str) -> Any:
        found = getattr(torch, name, None) if module == "torch" else None
        if isinstance(found, torch.dtype) or (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module in _DCP_MODULES:
            found = super().find_class(module, name)
            if isinstance(found, type) and found.__module__ == module:
                return found
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")


def check_dcp_metadata(path: Path, expected: Mapping[str, torch.Size] | None = None) -> None:
    """Refuse a sharded folder whose ``.metadata`` would do more than describe its shards.

    torch reads that file with plain ``pickle``, which can run any code a downloaded folder
    chooses; it is read here first with an unpickler that allows only the index's own types.
    Every entry must be a tensor: torch unpickles an entry stored as bytes with plain
    ``pickle`` (and a resume would silently keep its own value where the entry
    replaced one of its tensors). Every shard file it names must be a regular file of the
    folder that holds the bytes it is said to hold. With ``expected`` (flattened name ->
    shape, as torch's checkpoint names them), every expected tensor must be there, in that
    shape.
    """
    index = path / DCP_METADATA_FILENAME
    try:
        metadata = _DCPMetadataUnpickler(bytes_io(index)).load()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError) as error:
        raise ValueError(
            f"{index} refused: {error}. A latent-sharded checkpoint's "
            "index names only torch's checkpoint types; this folder was not written by "
            "lightning-sae's LatentParallelStrategy (or is damaged), so it is not read."
        ) from None
    entries = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(metadata, Metadata) or not isinstance(entries, dict):
        raise ValueError(f"{index} refused: it holds a {type(metadata).__name__}, not an index.")
    stored_as_bytes = sorted(
        name for name, m in entries.items() if isinstance(m, BytesStorageMetadata)
    )
    if stored_as_bytes:
        raise ValueError(
            f"{path} refused: its entries {stored_as_bytes} are stored as bytes (pickled Python "
            "objects, which torch unpickles, running any code they name); lightning-sae's "
            "sharded checkpoints hold only tensors, so this folder was not written by it."
        )
    _check_shard_files(path, metadata)
    for name, shape in (expected or {}).items():
        found = entries.get(name)
        if found is None:
            raise ValueError(
                f"{path} lacks the tensor {name!r} that this run needs; it is incomplete or "
                "was written for another model: resume from a checkpoint of this run."
            )
        if tuple(found.size) != tuple(shape):
            raise ValueError(
                f"{path} holds {name!r} of shape {tuple(found.size)}, this run's is "
                f"{tuple(shape)}: resume with the configuration the checkpoint was trained with."
            )


def _check_shard_files(path: Path, metadata: Metadata) -> None:
    """Every shard file is a regular file inside ``path`` that covers the bytes the index says
    it holds (torch would otherwise read past it, or read a link to /dev/zero without end)."""
    sizes: dict[str, int] = {}
    storage = metadata.storage_data
    for info in storage.values() if isinstance(storage, dict) else [storage]:
        name = getattr(info, "relative_path", None)
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not isinstance(name, str) or not name or Path(name).name != name:
            raise ValueError(f"{path} refused: its index names the shard file {name!r}.")
        if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
            raise ValueError(f"{path} refused: its index places {name} at {offset!r}+{length!r}.")
        if name not in sizes:
            with open_regular(path / name) as file:
                sizes[name] = os.fstat(file.fileno()).st_size
        end = offset + length
        if end > sizes[name]:
            raise ValueError(
                f"{path / name} is truncated: its index says it holds bytes up to {end}, it has "
                f"{sizes[name]}; copy the checkpoint folder again."
            )


def is_sharded_checkpoint(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / META_FILENAME).is_file()


def consolidate_checkpoint(path: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """The full checkpoint of a sharded folder: whole weights and Adam state, in one process.

    torch's ``dcp_to_torch_save`` reassembles every DTensor from its shards; the optimizer state,
    saved by parameter name, is put back into torch's by-index layout. With ``out`` the result
    is also written there, a ``.ckpt`` that a one-process run resumes from and that
    ``lightning-sae export`` reads.
    """
    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise ValueError(
            f"{path} is not a latent-sharded checkpoint folder (it has no {META_FILENAME})."
        )
    check_dcp_metadata(path)
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path, Path(tmp) / "full.pt")
        full = torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=True)
    checkpoint = load_torch_file(path / META_FILENAME, METADATA_LIMIT, what="checkpoint's meta.pt")
    checkpoint["state_dict"] = full["state_dict"]
    for name, shape in checkpoint.pop("viewed_tensors", {}).items():  # saved through a view
        checkpoint["state_dict"][name] = checkpoint["state_dict"][name].reshape(shape)
    optimizer_states = []
    for i, groups in enumerate(checkpoint.pop("optimizer_param_groups", [])):
        saved = full.get(f"optimizer_{i}", {}).get("state", {})
        order = [name for group in groups for name in group["params"]]
        index = {name: j for j, name in enumerate(order)}
        optimizer_states.append(
            {
                "state": {index[name]: saved[name] for name in order if name in saved},
                "param_groups": [
                    {**group, "params": [index[name] for name in group["params"]]}
                    for group in groups
                ],
            }
        )
    checkpoint["optimizer_states"] = optimizer_states
    checkpoint.pop("latent_parallel", None)
    if out is not None:
        torch.save(checkpoint, out)
    return checkpoint

"""A latent-sharded checkpoint folder as one ordinary Lightning checkpoint."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from lightning_sae.parallel.strategy import META_FILENAME


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
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path, Path(tmp) / "full.pt")
        full = torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=True)
    checkpoint = torch.load(path / META_FILENAME, map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = full["state_dict"]
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

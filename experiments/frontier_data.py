"""The files every library of experiments/frontier.py reads and writes (torch + safetensors only).

This module is imported by the project's side and, from their own virtualenvs, by the peers'
sides (experiments/saelens_frontier_side.py, experiments/sparsify_side.py), so it needs nothing
but torch and safetensors.

``WORK/data.safetensors`` holds the training rows ``train`` [n_train, d_in], the held-out rows
``val`` [n_val, d_in] and, per seed, ``order_<seed>`` [steps, batch]: the row indices of every
training batch in training order. Every library trains on ``train[order[step]]`` at ``step``.

After training, each library encodes and decodes the held-out rows with its own inference
model and writes ``WORK/<run>.safetensors``: the reconstructions ``x_hat`` [n_val, d_in], the
number of active latents per row ``active`` [n_val] and the rows each latent fired on
``fired`` [d_sae]. The project's side measures every library from these files alike.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

DATA_FILE = "data.safetensors"


def batch_order(n_train: int, steps: int, batch_size: int, seed: int) -> Tensor:
    """[steps, batch_size] row indices: epochs of fresh permutations, cut at ``steps``."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    epochs = -(-steps * batch_size // n_train)
    order = torch.cat([torch.randperm(n_train, generator=generator) for _ in range(epochs)])
    return order[: steps * batch_size].reshape(steps, batch_size)


def load_data(work: Path) -> dict[str, Tensor]:
    return load_file(str(work / DATA_FILE))


def training_batches(data: dict[str, Tensor], seed: int) -> Tensor:
    """[steps, batch] row indices of the training batches for ``seed``, in training order."""
    return data[f"order_{seed}"]


def serve_runs(train_and_reconstruct: Callable[[Path, dict[str, Tensor], dict], None]) -> None:
    """A peer side's entry point, ``python SIDE.py WORK RUNS_JSON``: every run in one process
    (the peer's imports take longer than a small run), each announced when its file is written."""
    work, runs = Path(sys.argv[1]), json.loads(sys.argv[2])
    data = load_data(work)
    for options in runs:
        train_and_reconstruct(work, data, options)
        print(f"done {options['run']}", flush=True)


@torch.no_grad()
def write_reconstructions(
    work: Path,
    run: str,
    val: Tensor,
    encode_decode: Callable[[Tensor], tuple[Tensor, Tensor]],
    d_sae: int,
    chunk: int = 2048,
) -> Path:
    """Encode and decode ``val`` in chunks with ``encode_decode(x) -> (acts, x_hat)``, where
    ``acts`` is dense [n, d_sae] (or a bool/float mask of the active latents), and write them."""
    x_hats, active = [], []
    fired = torch.zeros(d_sae, dtype=torch.long)
    for part in val.split(chunk):
        acts, x_hat = encode_decode(part)
        on = acts != 0
        active.append(on.sum(-1))
        fired += on.sum(0)
        x_hats.append(x_hat.float())
    x_hat = torch.cat(x_hats)
    if not torch.isfinite(x_hat).all():
        raise ValueError(f"run {run}: the reconstructions hold non-finite values.")
    path = work / f"{run}.safetensors"
    partial = path.with_suffix(".partial")  # renamed when complete: the reader polls for it
    save_file({"x_hat": x_hat.contiguous(), "active": torch.cat(active), "fired": fired}, partial)
    os.replace(partial, path)
    return path

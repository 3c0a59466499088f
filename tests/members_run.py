"""Member-parallel group fits on N CPU processes (gloo), for tests/test_members.py.

Lightning's launcher re-executes this script once per extra rank, so it is a standalone
program; the test imports :func:`fit` to train the one-process reference in-process. One launch
fits the group of :data:`MEMBERS` (three SAEs of different widths on two hooks and a cross-layer
transcoder from one to the other) with every
training-dynamics callback and checkpoints, then, with ``--resume_from``, fits it again from
that checkpoint (its own, written by the first fit, or another launch's, on another number of
ranks). ``--shard l1=2`` splits member l1's latents over two ranks (``member_shards``).
A fit writes ``rank<R>.pt`` (the rank's members' state dicts by name), CSV metrics from rank 0
under ``csv`` and its checkpoints under ``ckpt``, in ``<out>/straight`` and ``<out>/resumed``.
"""

import argparse
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

sys.path.insert(0, str(Path(__file__).parent))
from test_group import TwoHookToy, callbacks, spec  # noqa: E402

from lightning_sae.models.group import SAEGroup  # noqa: E402
from lightning_sae.parallel.members import MemberParallelStrategy  # noqa: E402

STEPS, EVERY = 8, 4
# Widths differ (placement balances them); four members on two or four ranks: more members
# than ranks, or on four, two members split over two ranks each and two whole.
MEMBERS = [
    spec("TopKSAE", "k4", "resid", k=4, lr=3e-3, lr_warmup_steps=3, lr_decay_steps=4),
    spec("StandardSAE", "l1", "mlp", lr=1e-3, l1_coefficient=0.5, d_sae=96),
    spec("BatchTopKSAE", "btk", "resid", k=8, lr=2e-3, d_sae=32),
    # A cross-layer transcoder (one layer: resid -> mlp), which picks its own sites.
    spec(
        "BatchTopKCrossLayerTranscoder", "clt", d_out=48, k=4, lr=2e-3,
        input_hooks=["resid"], output_hooks=["mlp"],
    ),
]  # fmt: skip


def fit(
    out: Path,
    devices: int | None,
    ckpt_path: str | None = None,
    dynamics: bool = True,
    shards: dict[str, int] | None = None,
) -> L.LightningModule:
    """One fit; ``devices=None`` is the plain one-process reference; ``shards`` splits members
    over blocks of ranks (``MemberParallelStrategy(member_shards=...)``)."""
    L.seed_everything(0)
    model = SAEGroup(MEMBERS)
    data = TwoHookToy(val_batches=1, batches_per_epoch=STEPS)
    checkpoint = ModelCheckpoint(
        dirpath=out / "ckpt", filename="{step}", every_n_train_steps=EVERY, save_top_k=-1,
        save_last=True,
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices or 1,
        strategy="auto" if devices is None else MemberParallelStrategy(member_shards=shards),
        max_steps=STEPS,
        val_check_interval=STEPS,
        check_val_every_n_epoch=None,
        log_every_n_steps=1,
        logger=CSVLogger(out, name="csv", version=0),
        callbacks=[*(callbacks() if dynamics else []), checkpoint],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    trainer.fit(model, data, ckpt_path=ckpt_path)
    state: dict[str, Any] = {
        name: {key: value for key, value in member.state_dict().items()}
        for name, member in model.members.items()
    }
    torch.save(state, out / f"rank{trainer.global_rank}.pt")
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--resume_from", type=str, default=None)
    parser.add_argument("--no-dynamics", action="store_true")
    parser.add_argument("--shard", action="append", default=[], help="member=ranks, e.g. l1=2")
    args = parser.parse_args()
    dynamics = not args.no_dynamics
    shards = {name: int(count) for name, count in (s.split("=") for s in args.shard)}
    fit(args.out / "straight", args.devices, dynamics=dynamics, shards=shards)
    if args.resume_from:
        fit(args.out / "resumed", args.devices, args.resume_from, dynamics, shards)


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())

"""Train a small SAE on toy data with N CPU processes (gloo) and save what each rank holds.

Run by tests/test_ddp.py as a subprocess: Lightning's DDP launcher re-executes this script once
per extra rank, so it must be a standalone program. Writes ``rank<R>.pt`` (state dict) and, from
rank 0, the CSV metrics under ``--out``.
"""

import argparse
import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_sae.callbacks.decoder_norm import DecoderNormConstraint
from lightning_sae.data.toy import ToySuperpositionDataModule


def build_callbacks(names: list[str], out: Path, every: int) -> list[L.Callback]:
    callbacks: list[L.Callback] = [DecoderNormConstraint()]
    registry = {
        "resample": ("lightning_sae.callbacks.resampling", "DeadFeatureResampler"),
        "init": ("lightning_sae.callbacks.init", "DataInformedInit"),
        "geometry": ("lightning_sae.callbacks.geometry", "FeatureGeometryMonitor"),
        "density": ("lightning_sae.callbacks.density", "FeatureDensityMonitor"),
    }
    for spec in names:
        name, _, kwargs = spec.partition(":")
        module, cls = registry[name]
        callback_cls = getattr(__import__(module, fromlist=[cls]), cls)
        callbacks.append(callback_cls(**json.loads(kwargs or "{}")))
    callbacks.append(
        ModelCheckpoint(
            dirpath=out / "ckpt", every_n_train_steps=every, save_last=True, save_top_k=-1
        )
    )
    return callbacks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--model", default="lightning_sae.models.standard.StandardSAE")
    parser.add_argument("--model_kwargs", default="{}")
    parser.add_argument("--callbacks", nargs="*", default=[])
    parser.add_argument("--ckpt_path", default=None)
    parser.add_argument("--checkpoint_every", type=int, default=6)
    args = parser.parse_args()

    L.seed_everything(0)
    module, _, cls = args.model.rpartition(".")
    model_cls = getattr(__import__(module, fromlist=[cls]), cls)
    model = model_cls(d_in=32, d_sae=64, lr=3e-3, **json.loads(args.model_kwargs))
    data = ToySuperpositionDataModule(
        n_features=64, d_in=32, batch_size=128, batches_per_epoch=8, val_batches=2
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_steps=args.steps,
        val_check_interval=args.steps,
        check_val_every_n_epoch=None,
        log_every_n_steps=1,
        logger=CSVLogger(args.out, name="csv", version=0),
        callbacks=build_callbacks(args.callbacks, args.out, args.checkpoint_every),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    trainer.fit(model, data, ckpt_path=args.ckpt_path)
    torch.save(model.state_dict(), args.out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()

"""Train a small SAE with every training-dynamics callback under N CPU processes (gloo).

Run by tests/test_callbacks.py as a subprocess: Lightning's DDP launcher re-executes this script
once per extra rank. Features listed in --silence start with a hugely negative encoder bias, so
they are dead from the first step and the resampler has work at its first call. Writes
``rank<R>.pt`` (the SAE state dict) per rank and ``resampled.json`` from rank 0.
"""

import argparse
import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_sae.callbacks.decoder_norm import DecoderNormConstraint
from lightning_sae.callbacks.density import FeatureDensityMonitor
from lightning_sae.callbacks.geometry import FeatureGeometryMonitor
from lightning_sae.callbacks.init import DataInformedInit
from lightning_sae.callbacks.resampling import DeadFeatureResampler
from lightning_sae.data.toy import ToySuperpositionDataModule
from lightning_sae.models.standard import StandardSAE


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--strategy", default="cluster")
    parser.add_argument("--silence", type=int, nargs="*", default=[1, 5, 9, 30, 31, 50])
    args = parser.parse_args()

    L.seed_everything(0)
    model = StandardSAE(d_in=32, d_sae=64, lr=3e-3, dead_window_tokens=256)
    data = ToySuperpositionDataModule(n_features=64, d_in=32, batch_size=128, val_batches=1)
    resampler = DeadFeatureResampler(
        at_steps=[4], strategy=args.strategy, n_batches=2, batch_size=256
    )

    class Silence(L.Callback):
        # After DataInformedInit (callbacks run in list order), on every rank alike.
        @torch.no_grad()
        def on_fit_start(self, trainer: L.Trainer, pl_module: StandardSAE) -> None:
            pl_module.b_enc[args.silence] = -1e3

    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_steps=8,
        limit_val_batches=0,
        log_every_n_steps=1,
        logger=CSVLogger(args.out, name="csv", version=0),
        callbacks=[
            DataInformedInit(method="kmeans", n_samples=512),
            Silence(),
            DecoderNormConstraint(),
            resampler,
            FeatureDensityMonitor(every_n_steps=4, window_tokens=256),
            FeatureGeometryMonitor(every_n_steps=4),
        ],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, data)
    torch.save(model.state_dict(), args.out / f"rank{trainer.global_rank}.pt")
    if trainer.is_global_zero:
        (args.out / "resampled.json").write_text(json.dumps(resampler.total_resampled))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()

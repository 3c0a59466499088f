"""Train small SAEs with N CPU processes (gloo) and save what each rank holds.

Run by tests/test_ddp.py as a subprocess: Lightning's DDP launcher re-executes this script once
per extra rank, so it must be a standalone program. Each entry of ``--runs`` (a JSON list of
``{"model": "<module>.<Class>", "kwargs": {...}}``) is one fit in the same process group, so one
launch covers every variant. Run i writes ``run<i>/rank<R>.pt`` (the state dict) on every rank
and, from rank 0, its CSV metrics under ``run<i>/csv``.

``--data toy`` trains on toy superposition data; ``--data <json>`` on an ActivationDataModule
built from those init args (a cache the test built beforehand), or, when the args name
``hooks``, on a StreamingActivationDataModule. A run's own ``"data"`` replaces ``--data``.
``--silence`` features start with a hugely negative encoder bias, so they are dead from the
first step and the resampler has work at its first call. A run with ``"init": false`` leaves
out the data-informed init.
"""

import argparse
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_sae.callbacks._reporting import saes
from lightning_sae.callbacks.decoder_norm import DecoderNormConstraint
from lightning_sae.callbacks.density import FeatureDensityMonitor
from lightning_sae.callbacks.figures import TrainingFigures
from lightning_sae.callbacks.geometry import FeatureGeometryMonitor
from lightning_sae.callbacks.init import DataInformedInit
from lightning_sae.callbacks.resampling import DeadFeatureResampler
from lightning_sae.data.activations import ActivationDataModule
from lightning_sae.data.lm import LanguageModel
from lightning_sae.data.stream import StreamingActivationDataModule
from lightning_sae.data.tokens import TextOptions
from lightning_sae.data.toy import ToySuperpositionDataModule

STANDARD = {"model": "lightning_sae.models.standard.StandardSAE", "kwargs": {}}


class Silence(L.Callback):
    """Kills chosen features at the start of the fit, on every rank alike (after any init)."""

    def __init__(self, features: list[int]) -> None:
        self.features = features

    @torch.no_grad()
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for sae in saes(pl_module).values():  # every member of an SAEGroup
            sae.b_enc[..., self.features] = -1e3  # a cross-layer transcoder: in every layer


def training_callbacks(silence: list[int], init: bool = True) -> list[L.Callback]:
    """Every training-dynamics callback, each due within a 12-step run (without the
    data-informed init when ``init`` is false: a cross-layer transcoder has none)."""
    return [
        *([DataInformedInit(method="kmeans", n_samples=256)] if init else []),
        Silence(silence),
        DeadFeatureResampler(at_steps=[4], strategy="cluster", n_batches=2, batch_size=128),
        FeatureDensityMonitor(every_n_steps=4, window_tokens=256),
        FeatureGeometryMonitor(every_n_steps=4),
        TrainingFigures(every_n_steps=4),  # syncs the validation firing counts: a collective
    ]


def datamodule(spec: str, d_in: int) -> L.LightningDataModule:
    if spec == "toy":
        return ToySuperpositionDataModule(
            n_features=64, d_in=d_in, batch_size=128, batches_per_epoch=8, val_batches=2
        )
    options = json.loads(spec)
    if "hooks" in options:
        model, text = LanguageModel(**options.pop("model")), TextOptions(**options.pop("text"))
        return StreamingActivationDataModule(model=model, text=text, **options)
    return ActivationDataModule(**options)


def fit(run: dict[str, Any], out: Path, args: argparse.Namespace) -> None:
    L.seed_everything(0)
    module, _, cls = run["model"].rpartition(".")
    model_cls = getattr(__import__(module, fromlist=[cls]), cls)
    data = datamodule(run.get("data", args.data), args.d_in)
    if "members" in run["kwargs"]:  # an SAEGroup: each member spec carries its own arguments
        model = model_cls(**run["kwargs"])
    else:
        model = model_cls(d_in=args.d_in, d_sae=64, lr=3e-3, **run["kwargs"])
    callbacks = [DecoderNormConstraint()]
    if args.all_callbacks:
        callbacks += training_callbacks(args.silence, init=run.get("init", True))
    callbacks.append(
        ModelCheckpoint(
            dirpath=out / "ckpt",
            every_n_train_steps=args.checkpoint_every,
            save_last=True,
            save_top_k=-1,
        )
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_steps=args.steps,
        val_check_interval=args.steps,
        check_val_every_n_epoch=None,
        log_every_n_steps=1,
        logger=CSVLogger(out, name="csv", version=0),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    trainer.fit(model, data, ckpt_path=args.ckpt_path)
    torch.save(model.state_dict(), out / f"rank{trainer.global_rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--runs", type=json.loads, default=[STANDARD])
    parser.add_argument("--data", default="toy")
    parser.add_argument("--d_in", type=int, default=32)
    parser.add_argument("--all_callbacks", action="store_true")
    parser.add_argument("--silence", type=int, nargs="*", default=[1, 5, 9, 30, 31, 50])
    parser.add_argument("--ckpt_path", default=None)
    parser.add_argument("--checkpoint_every", type=int, default=6)
    args = parser.parse_args()
    for i, run in enumerate(args.runs):
        fit(run, args.out / f"run{i}", args)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()

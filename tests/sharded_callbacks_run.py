"""One latent-sharded fit on 2 CPU processes (gloo) with the callbacks that the sharded
training runs of tests/sharded_run.py leave out, for tests/test_sharded_callbacks.py.

Lightning's launcher re-executes this script once per extra rank. The fit trains a TopK SAE
on a cached activation set of a tiny GPT-NeoX (built by the test beforehand) with
DownstreamEval (the SAE spliced into the model: a sharded forward every rank must join), the
run's lifecycle callbacks and the ground-truth MMCS the command line prints, measured on every
rank; then a second fit starts from the first one's sharded checkpoint with InitFrom; a third
trains a TopK cross-layer transcoder (per-layer selection: a sharded top-k in the replacement
model too) on every layer's MLP input and output with ReplacementEval. A gloo
timeout (60 s: the rendezvous on a busy machine needs some) turns a collective
that some ranks skip into a failure, not a hang.
Each rank writes ``rank<R>.pt``: its state dict, latent rank, the evaluation coverage, that MMCS
against ``queries.pt``, the weights and step the second fit started from and the CLT's state
dict; rank 0 logs CSV metrics under ``csv`` (the CLT's under ``csv_clt``).
"""

import argparse
import json
import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_sae.callbacks.downstream import DownstreamEval
from lightning_sae.callbacks.geometry import ground_truth_mmcs
from lightning_sae.callbacks.init_from import InitFrom
from lightning_sae.callbacks.lifecycle import EvaluationCoverage, RunCheckpoint, TokenThroughput
from lightning_sae.callbacks.replacement import ReplacementEval
from lightning_sae.data.activations import ActivationDataModule
from lightning_sae.models.clt import TopKCrossLayerTranscoder
from lightning_sae.models.topk import TopKSAE
from lightning_sae.parallel import LatentParallelStrategy, shard_of

D_SAE, STEPS = 64, 2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=json.loads, required=True)
    parser.add_argument("--downstream", type=json.loads, required=True)
    parser.add_argument("--clt_data", type=json.loads, required=True)
    parser.add_argument("--timeout_s", type=float, default=60)
    args = parser.parse_args()
    L.seed_everything(0)
    data = ActivationDataModule(**args.data)
    model = TopKSAE(d_in=32, d_sae=D_SAE, k=4, lr=3e-3)
    coverage = EvaluationCoverage()
    strategy = LatentParallelStrategy(2, timeout=timedelta(seconds=args.timeout_s))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=STEPS,
        val_check_interval=STEPS,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        log_every_n_steps=1,
        logger=CSVLogger(args.out, name="csv", version=0),
        callbacks=[
            DownstreamEval(**args.downstream),
            coverage,
            TokenThroughput(),
            RunCheckpoint(dirpath=args.out / "ckpt", save_last=True),
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, data)
    queries = torch.load(args.out / "queries.pt", weights_only=True)
    shard = shard_of(model)
    saved = {
        "state": model.state_dict(),
        "latent_rank": 0 if shard is None else shard.latent_rank,
        "coverage": coverage.samples,
        "gt_mmcs": ground_truth_mmcs(queries, model),
    }

    # A new run from that run's sharded checkpoint: each member starts from its slice of it.
    start = FirstStep()
    tuned = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=LatentParallelStrategy(2, timeout=timedelta(seconds=args.timeout_s)),
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        callbacks=[InitFrom(str(args.out / "ckpt" / "last.ckpt")), start],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    tuned.fit(TopKSAE(d_in=32, d_sae=D_SAE, k=4, lr=3e-3), ActivationDataModule(**args.data))
    saved |= {"init_from": start.state, "init_from_step": start.step}

    # Every MLP replaced by a sharded CLT: each rank runs the model, every member joins.
    L.seed_everything(0)
    clt = TopKCrossLayerTranscoder(**clt_options(args.clt_data["hooks"]), lr=3e-3)
    replaced = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=LatentParallelStrategy(2, timeout=timedelta(seconds=args.timeout_s)),
        max_steps=STEPS,
        val_check_interval=STEPS,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        logger=CSVLogger(args.out, name="csv_clt", version=0),
        callbacks=[ReplacementEval(**args.downstream, with_errors=True)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    replaced.fit(clt, ActivationDataModule(**args.clt_data))
    saved["clt"] = clt.state_dict()
    torch.save(saved, args.out / f"rank{trainer.global_rank}.pt")


def clt_options(hooks: list[str]) -> dict:
    """The CLT's options: the first half of ``hooks`` are the MLP inputs, the rest outputs."""
    half = len(hooks) // 2
    return {
        "d_in": 32, "d_sae": D_SAE // 2, "k": 4, "input_hooks": hooks[:half],
        "output_hooks": hooks[half:], "normalize_activations": True,
    }  # fmt: skip


class FirstStep(L.Callback):
    """The weights and the step a fit's training starts from."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.step = trainer.global_step
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())

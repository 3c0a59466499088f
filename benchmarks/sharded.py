"""Latent sharding: per-rank memory and step time at latent-parallel 1, 2 and 4 (CPU, gloo).

    python benchmarks/sharded.py                       # d_in 256, d_sae 16384, batch 1024, k 32
    python benchmarks/sharded.py --d_sae 65536 --steps 20

Each configuration is one Lightning fit of a TopKSAE (``trainer.latent_parallel`` = 1, 2, 4, on
that many CPU processes; 1 is the ordinary one-process run) in a subprocess. A callback records
every rank's parameter + Adam-state bytes after the last step and the wall time of each step
(the median over the steps after ``--warmup``). Printed: bytes per rank and their ratio to
latent-parallel 1 against the ideal 1/size (b_dec and the input scale are replicated, so the
ratio sits a hair above 1/size), and step time against the unsharded run.

On a machine with fewer cores than processes the step times measure contention as much as the
sharding; they are what the CPU gives, not a GPU estimate (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_sae.callbacks.decoder_norm import DecoderNormConstraint
from lightning_sae.data.toy import ToySuperpositionDataModule
from lightning_sae.models.topk import TopKSAE
from lightning_sae.parallel import LatentParallelStrategy


class Measure(L.Callback):
    """Step wall times, and parameter + optimizer-state bytes at the end."""

    def __init__(self, out: Path) -> None:
        self.out, self.times, self.start = out, [], 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self.start)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = sum(p.numel() * p.element_size() for p in pl_module.parameters())
        optimizer = trainer.optimizers[0]
        state = sum(
            t.numel() * t.element_size()
            for s in optimizer.state.values()
            for t in s.values()
            if isinstance(t, torch.Tensor)
        )
        record = {"rank": trainer.global_rank, "param_bytes": params, "optim_bytes": state}
        record["step_times"] = self.times
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def run_one(args: argparse.Namespace) -> None:
    L.seed_everything(0)
    lp = args.latent_parallel
    model = TopKSAE(d_in=args.d_in, d_sae=args.d_sae, k=args.k, lr=1e-3)
    data = ToySuperpositionDataModule(
        n_features=args.d_sae // 2, d_in=args.d_in, batch_size=args.batch,
        batches_per_epoch=args.steps, val_batches=1,
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=lp,
        strategy="auto" if lp == 1 else LatentParallelStrategy(latent_parallel=lp),
        max_steps=args.steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[DecoderNormConstraint(), Measure(args.out)],
    )
    trainer.fit(model, data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d_in", type=int, default=256)
    parser.add_argument("--d_sae", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--accelerator", default="cpu", help="cpu (gloo) or gpu (nccl)")
    parser.add_argument("--latent_parallel", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.latent_parallel is not None:  # one configuration (and Lightning's relaunched ranks)
        run_one(args)
        return

    threads = max(1, (os.cpu_count() or 1) // max(args.sizes))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PL_DISABLE_FORK": "1"}
    print(
        f"TopKSAE d_in={args.d_in} d_sae={args.d_sae} k={args.k} global batch {args.batch}, "
        f"{args.steps} steps (median of the last {args.steps - args.warmup}), {args.accelerator}, "
        f"{os.cpu_count()} cores, {threads} thread(s) per process"
    )
    results = {}
    for lp in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            command = [
                sys.executable, __file__, "--latent_parallel", str(lp), "--out", tmp,
                "--d_in", str(args.d_in), "--d_sae", str(args.d_sae), "--batch", str(args.batch),
                "--k", str(args.k), "--steps", str(args.steps), "--accelerator", args.accelerator,
            ]  # fmt: skip
            subprocess.run(command, env=env, check=True, capture_output=True)
            ranks = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
        per_rank = max(r["param_bytes"] + r["optim_bytes"] for r in ranks)
        step = statistics.median(statistics.median(r["step_times"][args.warmup :]) for r in ranks)
        results[lp] = (per_rank, step, ranks[0])
    base_bytes, base_step, _ = results[args.sizes[0]]
    print(
        f"{'latent_parallel':>15} {'params MB':>10} {'Adam MB':>9} {'per rank MB':>12} "
        f"{'ratio':>7} {'1/size':>7} {'step ms':>9} {'vs 1':>6}"
    )
    for lp, (per_rank, step, rank0) in results.items():
        print(
            f"{lp:>15} {rank0['param_bytes'] / 1e6:>10.2f} {rank0['optim_bytes'] / 1e6:>9.2f} "
            f"{per_rank / 1e6:>12.2f} {per_rank / base_bytes:>7.4f} {1 / lp:>7.4f} "
            f"{step * 1e3:>9.1f} {step / base_step:>6.2f}"
        )


if __name__ == "__main__":
    main()

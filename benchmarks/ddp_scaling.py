"""Training tokens/s from 1 to N DDP processes, each process with the same per-rank batch.

Every process trains on a fixed batch already on its device, so what scales is the SAE step plus
DDP's gradient all-reduce and our per-step metric all-reduce. On CPU each process gets
``cores / N`` threads (gloo); on GPUs one process per GPU (nccl).

    python benchmarks/ddp_scaling.py --device cpu --processes 1 2
    python benchmarks/ddp_scaling.py --device cuda --processes 1 2 4 8 --d_in 768 --d_sae 24576
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from _common import quiet_trainer

from lightning_sae.callbacks.decoder_norm import DecoderNormConstraint
from lightning_sae.models.standard import StandardSAE
from lightning_sae.models.topk import TopKSAE


class Timer(L.Callback):
    """Wall time between the end of the warm-up steps and the end of training, on rank 0."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.elapsed = warmup, 0.0, 0.0

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *_: object
    ) -> None:
        if trainer.global_step == self.warmup:
            self._sync(pl_module)
            self.start = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync(pl_module)
        self.elapsed = time.perf_counter() - self.start


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.n))
    total = args.warmup + args.steps
    x = torch.randn(args.batch, args.d_in, generator=torch.Generator().manual_seed(0))

    class SameBatch:
        def __len__(self) -> int:
            return total

        def __iter__(self) -> Iterator[torch.Tensor]:
            yield from (x for _ in range(total))

    if args.variant == "topk":
        sae = TopKSAE(d_in=args.d_in, d_sae=args.d_sae, k=args.k)
    else:
        sae = StandardSAE(d_in=args.d_in, d_sae=args.d_sae)
    timer = Timer(args.warmup)
    gpu = args.device.startswith("cuda")
    trainer = quiet_trainer(
        accelerator="gpu" if gpu else "cpu",
        devices=args.n,
        strategy="ddp" if args.n > 1 else "auto",
        max_steps=total,
        callbacks=[DecoderNormConstraint(), timer],
    )
    trainer.fit(sae, train_dataloaders=SameBatch())
    if trainer.is_global_zero:
        tokens = args.steps * args.batch * args.n
        args.result.write_text(json.dumps({"tokens_per_s": tokens / timer.elapsed}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--variant", choices=("standard", "topk"), default="standard")
    parser.add_argument("--d_in", type=int, default=512)
    parser.add_argument("--d_sae", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=2048, help="per process")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.n:
        worker(args)
        return

    print(
        f"device={args.device} variant={args.variant} d_in={args.d_in} d_sae={args.d_sae} "
        f"batch/process={args.batch}"
    )
    print(f"{'processes':>10}{'tokens/s':>14}{'speed-up':>10}{'efficiency':>12}")
    base: float | None = None
    for n in args.processes:
        result = Path(f"/tmp/ddp_scaling_{os.getpid()}_{n}.json")
        flags = [
            f"--{k}={v}" for k, v in vars(args).items() if k not in ("processes", "n", "result")
        ]
        subprocess.run(
            [sys.executable, __file__, *flags, f"--n={n}", f"--result={result}"], check=True
        )
        rate = json.loads(result.read_text())["tokens_per_s"]
        if base is None:
            base = rate / n  # one process's rate, estimated from the first run
        print(f"{n:>10}{rate:>14.0f}{rate / base:>10.2f}{rate / base / n:>12.2f}")


if __name__ == "__main__":
    main()

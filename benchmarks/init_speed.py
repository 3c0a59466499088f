"""Steps to ground-truth MMCS 0.95 / 0.98 / 0.99 per initialisation method, on toy data.

After the informed-initialisation experiments of reference 001: 512 ground-truth features in 128
dimensions (preset 128x512), a dictionary of 512, each run stopped when the ground-truth MMCS
reaches 0.99 or at a step cap. Ground-truth MMCS is measured after every step
(FeatureGeometryMonitor with every_n_steps=1). ``none`` is the SAE's own random init.

    python benchmarks/init_speed.py                      # the table and figure in docs/init.md
    python benchmarks/init_speed.py --methods none kmeans --seeds 0 --plot /tmp/curves.png

Defaults: toy decay 0.995, batch 1024, lr 1e-2, L1 0.1, cap 1000 steps (docs/init.md says why).

Prints a markdown row per run, the mean per method (a run that never reaches a threshold counts
as the cap, marked '>'), and writes a PNG of the MMCS curves of the first seed (--plot,
default docs/init_mmcs.png).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer

from lightning_sae.callbacks.decoder_norm import DecoderNormConstraint
from lightning_sae.callbacks.geometry import FeatureGeometryMonitor
from lightning_sae.callbacks.init import METHODS, DataInformedInit
from lightning_sae.data.toy import ToySuperpositionDataModule
from lightning_sae.models.standard import StandardSAE
from lightning_sae.plots import curves

THRESHOLDS = (0.95, 0.98, 0.99)


class StopAtMMCS(Callback):
    """Stop once the geometry monitor has seen the last threshold."""

    def __init__(self, monitor: FeatureGeometryMonitor, key: str) -> None:
        self.monitor, self.key = monitor, key

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.key in self.monitor.first_step_at:
            trainer.should_stop = True


def run(method: str, seed: int, args: argparse.Namespace) -> FeatureGeometryMonitor:
    data = ToySuperpositionDataModule(
        preset="128x512",
        mean_active=args.mean_active,
        decay=args.decay,
        batch_size=args.batch_size,
        batches_per_epoch=10_000,
        seed=args.data_seed,
    )
    model = StandardSAE(
        d_in=128,
        d_sae=512,
        lr=args.lr,
        l1_coefficient=args.l1,
        lr_decay_steps=args.lr_decay_steps,
        lr_end_factor=0.1,
        init_seed=seed,
    )
    monitor = FeatureGeometryMonitor(every_n_steps=1, thresholds=THRESHOLDS, save_png=False)
    callbacks: list[Callback] = [DecoderNormConstraint(), monitor]
    if method != "none":
        callbacks.insert(0, DataInformedInit(method=method, n_samples=args.n_samples, seed=seed))
    callbacks.append(StopAtMMCS(monitor, f"{THRESHOLDS[-1]:g}"))
    trainer = Trainer(
        max_steps=args.max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        deterministic=True,
    )
    torch.manual_seed(seed)  # the trainer's own RNG use; data and init have their own seeds
    trainer.fit(model, data)
    return monitor


CHECKPOINTS = (1, 100, 400)


def cell(steps: int | None, cap: int) -> str:
    return f">{cap}" if steps is None else str(steps)


def mmcs_at(monitor: FeatureGeometryMonitor, step: int) -> float:
    """Ground-truth MMCS at ``step`` (or the last measured before it, if the run stopped)."""
    return [gt for s, _, gt in monitor.history if s <= step][-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["none", *METHODS])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--l1", type=float, default=0.1)
    parser.add_argument(
        "--lr-decay-steps", type=int, default=0, help="decay lr to 0.1x over these last steps"
    )
    parser.add_argument("--n-samples", type=int, default=8192)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--mean-active", type=float, default=5.0)
    parser.add_argument("--decay", type=float, default=0.995)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (small matmuls)")
    parser.add_argument("--plot", type=Path, default=Path("docs/init_mmcs.png"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    keys = [f"{t:g}" for t in THRESHOLDS]
    print(
        f"preset 128x512, mean_active {args.mean_active}, decay {args.decay}, d_sae 512, "
        f"batch {args.batch_size}, lr {args.lr}, l1 {args.l1}, cap {args.max_steps} steps"
    )
    header = [f"steps to {k}" for k in keys] + [f"MMCS@{s}" for s in CHECKPOINTS] + ["final"]
    print("| method | seed | " + " | ".join(header) + " | seconds |")
    print("|---|---|" + "---|" * (len(header) + 1))
    results: dict[str, list[list[float]]] = {}
    series: dict[str, tuple[list[int], list[float]]] = {}
    for method in args.methods:
        for seed in args.seeds:
            start = time.perf_counter()
            monitor = run(method, seed, args)
            reached = [monitor.first_step_at.get(k) for k in keys]
            levels = [mmcs_at(monitor, s) for s in CHECKPOINTS] + [monitor.history[-1][2]]
            results.setdefault(method, []).append(
                [args.max_steps if r is None else r for r in reached] + levels
            )
            cells = [cell(r, args.max_steps) for r in reached] + [f"{v:.3f}" for v in levels]
            print(
                f"| {method} | {seed} | " + " | ".join(cells) + f" | "
                f"{time.perf_counter() - start:.0f} |",
                flush=True,
            )
            if seed == args.seeds[0]:
                steps = [entry[0] for entry in monitor.history]
                series[method] = (steps, [entry[2] for entry in monitor.history])

    print(f"\nmean over seeds {args.seeds} ('>': some run never reached it; counted as the cap)")
    print("| method | " + " | ".join(header) + " |")
    print("|---|" + "---|" * len(header))
    for method, runs in results.items():
        cells = []
        for column in range(len(header)):
            values = [run_values[column] for run_values in runs]
            if column < len(keys):
                missed = any(v >= args.max_steps for v in values)
                cells.append(f"{'>' if missed else ''}{statistics.mean(values):.0f}")
            else:
                cells.append(f"{statistics.mean(values):.3f}")
        print(f"| {method} | " + " | ".join(cells) + " |")
    curves(
        series,
        args.plot,
        xlabel="step",
        ylabel="ground-truth MMCS",
        title=f"128x512 toy, seed {args.seeds[0]}",
        hlines=THRESHOLDS,
    )
    print(f"\ncurves: {args.plot}")


if __name__ == "__main__":
    main()

"""Member-parallel groups: per-rank SAE + Adam bytes and rows exchanged, against replicated
groups (DDP) on the same number of processes (CPU, gloo).

    python benchmarks/member_parallel.py   # 8 TopK members (one per "layer"), 2 and 4 ranks
    python benchmarks/member_parallel.py --members 32 --d_sae 8192 --sizes 2 4 8
    python benchmarks/member_parallel.py --members 3 --sizes 4 --split L0=2  # L0 on 2 ranks

Each configuration is one Lightning fit of an SAEGroup of ``--members`` TopKSAEs, member i
reading hook ``L<i>`` of a toy datamodule that serves one hook per member (a one-SAE-per-layer
run), in a subprocess: ``replicated`` is the group under DDP (every rank holds every member),
``member`` is ``MemberParallelStrategy`` (each member on one rank), and with ``--split`` a
third, ``split``, the same with those members' latents sharded over blocks of ranks
(``member_shards``; every rank's bytes are printed below its row). A callback records every
rank's parameter + Adam-state bytes after the last step, the bytes this rank sent in the step's
row exchange (``MemberParallelGroup.exchanged_bytes``) and the step times. Printed: the largest
rank's bytes, their ratio to the replicated run's against 1/ranks, and the bytes each rank sends
per step, measured and on paper (see docs/distributed.md for the formulas).
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

from lightning_sae.data.toy import ToySuperpositionDataModule
from lightning_sae.models.group import SAEGroup
from lightning_sae.parallel.members import MemberParallelStrategy, place_members


class Layers:
    """A loader's toy batches as one tensor per hook ``L0 ... L<n-1>`` (distinct values)."""

    def __init__(self, inner: Any, hooks: int) -> None:
        self.inner, self.hooks = inner, hooks

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Any:
        for x in self.inner:
            yield {f"L{i}": x * (1.0 + 0.1 * i) for i in range(self.hooks)}


class LayersToy(ToySuperpositionDataModule):
    def __init__(self, hooks: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n_hooks = hooks
        self.d_ins = {f"L{i}": kwargs["d_in"] for i in range(hooks)}

    def train_dataloader(self) -> Layers:
        return Layers(super().train_dataloader(), self.n_hooks)


class Measure(L.Callback):
    """Step wall times, exchanged bytes, and parameter + optimizer-state bytes at the end."""

    def __init__(self, out: Path) -> None:
        self.out, self.times, self.start, self.sent = out, [], 0.0, []

    def on_train_batch_start(self, *args: Any) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        self.times.append(time.perf_counter() - self.start)
        self.sent.append(getattr(pl_module, "exchanged_bytes", 0))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = sum(p.numel() * p.element_size() for p in pl_module.parameters())
        optimizer = trainer.optimizers[0]
        state = sum(
            t.numel() * t.element_size()
            for s in optimizer.state.values()
            for t in s.values()
            if isinstance(t, torch.Tensor)
        )
        record = {"param_bytes": params, "optim_bytes": state, "sent": self.sent}
        record["step_times"], record["members"] = self.times, len(pl_module.members)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def run_one(args: argparse.Namespace) -> None:
    L.seed_everything(0)
    members = [
        {
            "name": f"L{i}",
            "hook": f"L{i}",
            "class_path": "TopKSAE",
            "init_args": {"d_in": args.d_in, "d_sae": args.d_sae, "k": args.k, "lr": 1e-3},
        }
        for i in range(args.members)
    ]
    data = LayersToy(
        args.members, n_features=args.d_in * 2, d_in=args.d_in, batch_size=args.batch,
        batches_per_epoch=args.steps, val_batches=1,
    )  # fmt: skip
    shards = split_counts(args.split) if args.mode == "split" else None
    strategy = "ddp" if args.mode == "replicated" else MemberParallelStrategy(member_shards=shards)
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.ranks,
        strategy=strategy,
        max_steps=args.steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Measure(args.out)],
    )
    trainer.fit(SAEGroup(members), data)


def split_counts(pairs: list[str]) -> dict[str, int]:
    """``["L0=2"]`` -> ``{"L0": 2}``."""
    return {name: int(count) for name, count in (pair.split("=") for pair in pairs)}


def on_paper(args: argparse.Namespace, ranks: int, shards: dict[str, int] | None = None) -> int:
    """The most bytes a rank sends per step: to each other rank q, its B/ranks rows of the hooks
    q's members read (a split member's hook to every rank of its block), placed as the
    strategy places them (equal members, one hook each)."""
    names = [f"L{i}" for i in range(args.members)]
    first = place_members({name: 1 for name in names}, ranks, shards=shards or {})
    hooks = [0] * ranks
    for name in names:
        for rank in range(first[name], first[name] + (shards or {}).get(name, 1)):
            hooks[rank] += 1
    rows = args.batch // ranks * args.d_in * 4
    return max(sum(hooks[q] for q in range(ranks) if q != r) * rows for r in range(ranks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--d_in", type=int, default=64)
    parser.add_argument("--d_sae", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--accelerator", default="cpu", help="cpu (gloo) or gpu (nccl)")
    parser.add_argument(
        "--split", nargs="*", default=[], help="members to split, e.g. L0=2 (adds a split run)"
    )
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ranks", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode is not None:  # one configuration (and Lightning's relaunched ranks)
        run_one(args)
        return

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
    print(
        f"SAEGroup of {args.members} TopKSAEs (d_in={args.d_in} d_sae={args.d_sae} k={args.k}), "
        f"one hook each, global batch {args.batch}, {args.steps} steps, {args.accelerator}, "
        f"{os.cpu_count()} cores, 1 thread per process"
    )
    print(
        f"{'ranks':>5} {'mode':>10} {'members':>7} {'params MB':>10} {'Adam MB':>8} "
        f"{'per rank MB':>11} {'ratio':>7} {'1/ranks':>7} {'sent/step MB':>12} "
        f"{'on paper':>9} {'step ms':>8}"
    )
    for ranks in args.sizes:
        results = {}
        for mode in ("replicated", "member", *(["split"] if args.split else [])):
            with tempfile.TemporaryDirectory() as tmp:
                command = [
                    sys.executable, __file__, "--mode", mode, "--ranks", str(ranks),
                    "--out", tmp, "--members", str(args.members), "--d_in", str(args.d_in),
                    "--d_sae", str(args.d_sae), "--batch", str(args.batch), "--k", str(args.k),
                    "--steps", str(args.steps), "--accelerator", args.accelerator,
                    "--split", *args.split,
                ]  # fmt: skip
                subprocess.run(command, env=env, check=True, capture_output=True)
                found = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
            results[mode] = found
        base = max(r["param_bytes"] + r["optim_bytes"] for r in results["replicated"])
        for mode, found in results.items():
            largest = max(found, key=lambda r: r["param_bytes"] + r["optim_bytes"])
            per_rank = largest["param_bytes"] + largest["optim_bytes"]
            placed = mode != "replicated"
            sent = f"{max(max(r['sent']) for r in found) / 1e6:.4f}" if placed else "-"
            step = statistics.median(statistics.median(r["step_times"][1:]) for r in found)
            # Replicated: DDP's ring all-reduce of every gradient, 2 (ranks - 1) / ranks x bytes.
            params = largest["param_bytes"]
            shards = split_counts(args.split) if mode == "split" else None
            paper = on_paper(args, ranks, shards) if placed else 2 * (ranks - 1) * params / ranks
            print(
                f"{ranks:>5} {mode:>10} {largest['members']:>7} "
                f"{largest['param_bytes'] / 1e6:>10.2f} {largest['optim_bytes'] / 1e6:>8.2f} "
                f"{per_rank / 1e6:>11.2f} {per_rank / base:>7.4f} "
                f"{1 / ranks if placed else 1:>7.4f} {sent:>12} "
                f"{paper / 1e6:>9.4f} {step * 1e3:>8.1f}"
            )
            if mode == "split":
                each = [(r["param_bytes"] + r["optim_bytes"]) / 1e6 for r in found]
                print(f"{'':>17} per rank MB: {', '.join(f'{mb:.2f}' for mb in each)}")


if __name__ == "__main__":
    main()

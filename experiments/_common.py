"""Shared plumbing of the experiment scripts: output folder, tables, quiet trainers."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, Trainer

from lightning_sae.callbacks.decoder_norm import DecoderNormConstraint
from lightning_sae.models.standard import StandardSAE

DOCS = Path(__file__).resolve().parent.parent / "docs" / "experiments"


def parser(description: str, name: str) -> argparse.ArgumentParser:
    """--smoke (tiny sizes, for CI), --out (default docs/experiments/<name>), --threads."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs")
    p.add_argument("--out", type=Path, default=DOCS / name, help="folder for tables and figures")
    p.add_argument("--threads", type=int, default=1, help="torch threads (shared machine)")
    return p


def start(args: argparse.Namespace) -> Path:
    torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "offline")
    args.out.mkdir(parents=True, exist_ok=True)
    return args.out


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write(out: Path, name: str, text: str) -> Path:
    path = out / name
    path.write_text(text)
    print(f"wrote {path}")
    return path


def write_json(out: Path, name: str, payload: Any) -> Path:
    return write(out, name, json.dumps(payload, indent=1, sort_keys=True) + "\n")


def publish(out: Path, text: str, results: Any, results_name: str = "results.json") -> None:
    """Print an experiment's table and write it (``table.md``) with its raw numbers."""
    print(text)
    write(out, "table.md", text)
    write_json(out, results_name, results)


def run_once(path: Path, run: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    """``run()``'s result, kept in ``path`` as JSON; None, without running, when ``path`` already
    holds it, so that a sweep stopped part-way resumes where it stopped."""
    if path.exists():
        return None
    result = run()
    path.write_text(json.dumps(result))
    return result


def fvu_line(name: str, seed: int, row: dict[str, Any]) -> str:
    """A candidate run's one-line summary: L0, FVU, dead latents and seconds."""
    return (
        f"{name} seed {seed}: l0 {row['l0']:.1f} fvu {row['fvu']:.4f} dead {row['dead']} "
        f"({row['seconds']:.0f}s)"
    )


def norm_constraint(sae: torch.nn.Module) -> list[Callback]:
    """``[DecoderNormConstraint()]`` where the configs add it: for every class but the standard
    SAE, whose decoder rows are left free with its L1 weighted by their norms (its default;
    docs/defaults.md, "The standard SAE against SAELens over three seeds")."""
    free = type(sae) is StandardSAE and sae.hparams.weight_by_decoder_norm
    return [] if free else [DecoderNormConstraint()]


def quiet_trainer(max_steps: int, callbacks: list[Callback], **kwargs: Any) -> Trainer:
    """A CPU trainer without logger, checkpoints, progress bar or validation."""
    return Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        **kwargs,
    )


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


class Recorder(Callback):
    """Keeps the logged values of ``keys`` every ``every`` optimizer steps: curves for figures."""

    def __init__(self, keys: Sequence[str], every: int = 10) -> None:
        self.keys, self.every = list(keys), every
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            metrics = trainer.callback_metrics
            row = {"step": float(step)}
            row |= {k: float(metrics[k]) for k in self.keys if k in metrics}
            self.rows.append(row)

    def series(self, key: str) -> tuple[list[float], list[float]]:
        rows = [r for r in self.rows if key in r]
        return [r["step"] for r in rows], [r[key] for r in rows]

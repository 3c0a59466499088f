"""The ``lightning-sae`` command: LightningCLI's fit / validate / test plus tool subcommands.

Trainer subcommands go to :class:`SAECLI`. Tool subcommands that are not trainer methods
(``cache``, ``export``, ``compare``) are registered in ``TOOL_COMMANDS`` and dispatched before
LightningCLI parses anything.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

from lightning import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_sae.models.base import SparseAutoencoder

SPECIAL_CKPT_PATHS = {"last", "best", "hpc", "registry"}

# name -> (one-line help, entry point taking argv). Later modules add cache / export / compare.
TOOL_COMMANDS: dict[str, tuple[str, Callable[[list[str]], None]]] = {}


def final_metrics_table(trainer: Trainer) -> str:
    """A short table of the last validation metrics and where the checkpoint is."""
    metrics = trainer.callback_metrics
    rows = [
        ("FVU", "val/fvu"),
        ("L0", "val/l0"),
        ("dead fraction", "val/dead_fraction"),
        ("ground-truth MMCS", "geometry/gt_mmcs"),
        ("CE loss recovered", "downstream/ce_loss_recovered"),
        ("KL (clean || SAE)", "downstream/kl"),
    ]
    lines = ["", "final metrics", "-" * 34]
    lines += [f"{label:<20}{float(metrics[key]):>14.4f}" for label, key in rows if key in metrics]
    checkpoint = trainer.checkpoint_callback
    if isinstance(checkpoint, ModelCheckpoint):
        path = checkpoint.last_model_path or checkpoint.best_model_path
        if path:
            lines.append(f"{'checkpoint':<20}{path}")
    return "\n".join(lines)


class SAECLI(LightningCLI):
    """LightningCLI with any SAE variant as model and any DataModule as data, by class_path."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--print_metrics",
            type=bool,
            default=True,
            help="Print a table of final validation metrics after fit / validate / test.",
        )

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, {})
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and ckpt_path not in SPECIAL_CKPT_PATHS and not Path(ckpt_path).exists():
            raise SystemExit(
                f"error: --ckpt_path {ckpt_path} does not exist. Pass the path of a .ckpt file "
                "(see the run's checkpoints/ folder) or --ckpt_path last to resume the latest run."
            )

    def after_fit(self) -> None:
        self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        self._print_metrics()

    def after_validate(self) -> None:
        self._print_metrics()

    def after_test(self) -> None:
        self._print_metrics()

    def _print_metrics(self) -> None:
        if self.config[self.subcommand].get("print_metrics", True) and self.trainer.is_global_zero:
            print(final_metrics_table(self.trainer), flush=True)


def _default_environment() -> None:
    # Without an account, wandb would prompt for a login; offline runs sync later with `wandb sync`.
    if not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    _default_environment()
    _register_tools()
    if argv and argv[0] in TOOL_COMMANDS:
        TOOL_COMMANDS[argv[0]][1](argv[1:])
        return
    if not argv or argv[0] in ("-h", "--help"):
        tools = "".join(f"\n  {name:<10}{help_}" for name, (help_, _) in TOOL_COMMANDS.items())
        if tools:
            print(f"tool subcommands (lightning-sae NAME --help):{tools}\n")
    SAECLI(
        SparseAutoencoder,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=argv,
        auto_configure_optimizers=False,
    )


def _lazy(module: str, function: str) -> Callable[[list[str]], None]:
    """Import the command's module only when it runs: some pull in heavy imports."""

    def run(argv: list[str]) -> None:
        getattr(importlib.import_module(module), function)(argv)

    return run


def _register_tools() -> None:
    TOOL_COMMANDS.update(
        {
            "cache": (
                "build an activation cache alone",
                _lazy("lightning_sae.data.activations", "cache_main"),
            ),
            "export": (
                "write sae.safetensors + cfg.json",
                _lazy("lightning_sae.io", "export_main"),
            ),
            "compare": (
                "match the features of two SAEs",
                _lazy("lightning_sae.metrics.similarity", "compare_main"),
            ),
        }
    )


if __name__ == "__main__":
    main()

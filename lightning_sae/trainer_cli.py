"""LightningCLI for the trainer subcommands (fit / validate / test).

Imported only when a trainer subcommand runs: Lightning and torch are heavy, and the tool
subcommands and ``--help`` of :mod:`lightning_sae.cli` must answer without them.
"""

from __future__ import annotations

from pathlib import Path

from lightning import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

SPECIAL_CKPT_PATHS = {"last", "best", "hpc", "registry"}


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
        ("final hidden cosine", "downstream/final_hidden_cosine"),
        ("final hidden rel MSE", "downstream/final_hidden_rel_mse"),
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

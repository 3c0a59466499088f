"""The run itself: a final checkpoint that holds the final weights, tokens/s, a progress bar in
steps, how much data an evaluation covered, and the log version a checkpoint belongs to.

``lightning-sae fit`` adds these by default (see :mod:`lightning_sae.trainer_cli`); each also
works on its own in a plain ``Trainer``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

from lightning_sae.callbacks._reporting import batch_rows, log_scalars


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last`` checkpoint always holds the weights training ended with.

    Lightning writes ``last.ckpt`` at the end of training only when no ``last`` was ever saved:
    with ``every_n_train_steps=100`` and ``max_steps=150`` it keeps step 100, so a run would
    report a checkpoint older than its own final metrics. This saves ``last`` again at the end
    of training whenever the newest save is older than the final step.

    A run folder holds one run, so a file name is never versioned (``last-v1.ckpt``): a resume
    overwrites the checkpoints it writes again, and ``last.ckpt`` is always the run's last.
    """

    def __init__(self, *args: Any, enable_version_counter: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, enable_version_counter=enable_version_counter, **kwargs)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        # _should_skip_saving_checkpoint is also true when the final step was already saved.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class TokenThroughput(Callback):
    """Logs ``train/tokens_per_sec`` and ``train/tokens`` every ``log_every_n_steps`` steps.

    One activation row is one token, so tokens are rows of the global batch (a rank's rows times
    the number of processes). The rate is over the wall time since the previous report, without
    the time spent in validation; it needs no device synchronisation of its own (the training
    step already moves its scalars to the host every step). ``train/tokens`` is kept in the
    checkpoint, so a resumed run keeps counting.
    """

    def __init__(self) -> None:
        self.tokens = 0
        self._window_tokens = 0
        self._window_start: float | None = None
        self._validation_start: float | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._window_start, self._window_tokens = time.perf_counter(), 0

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        rows = batch_rows(batch) * trainer.world_size
        self.tokens += rows
        self._window_tokens += rows
        step = trainer.global_step
        if self._window_start is None or step % max(trainer.log_every_n_steps, 1):
            return
        elapsed = time.perf_counter() - self._window_start
        if trainer.is_global_zero and elapsed > 0:
            log_scalars(
                trainer,
                {
                    "train/tokens_per_sec": self._window_tokens / elapsed,
                    "train/tokens": float(self.tokens),
                },
            )
        self._window_start, self._window_tokens = time.perf_counter(), 0

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._validation_start is not None and self._window_start is not None:
            self._window_start += time.perf_counter() - self._validation_start
        self._validation_start = None

    def state_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens = state_dict["tokens"]


class StepProgressBar(TQDMProgressBar):
    """The training bar counts optimizer steps out of ``max_steps``, across epochs.

    SAE training runs by steps over data that is effectively endless; Lightning's default bar
    counts batches of the current epoch and shows epochs out of ``max_epochs`` (``-1``). With no
    ``max_steps`` the default per-epoch bar is kept.
    """

    def on_train_epoch_start(self, trainer: Trainer, *args: Any) -> None:
        if trainer.max_steps is None or trainer.max_steps < 0:
            super().on_train_epoch_start(trainer, *args)
            return
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps)
        # Start where the run is (a resume or a new epoch); tqdm's rate is (n - initial) per
        # second, so counting from 0 would show the steps already done as done in no time.
        bar.initial = bar.n = trainer.global_step
        bar.set_description(f"Training (epoch {trainer.current_epoch})")
        bar.refresh()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.max_steps is None or trainer.max_steps < 0:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is not None and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._counts_steps(trainer) or trainer.global_step < trainer.max_steps:
            super().on_validation_end(trainer, pl_module)
            return
        # The final validation: its numbers go into the bar that closing it prints once (a
        # refresh here, one at the epoch's end and the close would print the last line 3 times).
        self.val_progress_bar.close()
        self.reset_dataloader_idx_tracker()
        if self._train_progress_bar is not None and trainer.state.fn == "fit":
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._counts_steps(trainer):
            super().on_train_epoch_end(trainer, pl_module)
            return
        self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        if self._leave:
            self.train_progress_bar.close()

    @staticmethod
    def _counts_steps(trainer: Trainer) -> bool:
        return trainer.max_steps is not None and trainer.max_steps >= 0


class EvaluationCoverage(Callback):
    """How many samples, in how many batches, the last validation or test pass covered.

    Summed over DDP ranks. The sanity check is not counted: it is not an evaluation.
    """

    def __init__(self) -> None:
        self.samples = 0
        self.batches = 0
        self.stage: str | None = None
        self.step = -1  # global step of the last completed pass
        self._rows = 0
        self._batches = 0

    def _start(self, trainer: Trainer) -> None:
        self._rows, self._batches = 0, 0

    def _count(self, trainer: Trainer, batch: Any) -> None:
        if not trainer.sanity_checking:
            self._rows += batch_rows(batch)
            self._batches += 1

    def _end(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.sanity_checking:
            return
        rows = torch.tensor(float(self._rows), device=pl_module.device)
        self.samples = int(trainer.strategy.reduce(rows, reduce_op="sum").item())
        self.batches, self.stage, self.step = self._batches, stage, trainer.global_step

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer)

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, *args: Any
    ) -> None:
        self._count(trainer, args[1])

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end(trainer, pl_module, "validation")

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer)

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._count(trainer, args[1])

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end(trainer, pl_module, "test")


class RunRecord(Callback):
    """Writes ``checkpoint["run"] = {"run_dir", "log_version"}`` into every checkpoint.

    A resume reads it to continue the same log version (CSV and TensorBoard) instead of
    starting a new one, and an analysis reads it to find the training run's logs.
    """

    def __init__(self, run_dir: str, log_version: int | str | None) -> None:
        self.run_dir, self.log_version = run_dir, log_version

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["run"] = {"run_dir": self.run_dir, "log_version": self.log_version}

"""LightningCLI for the trainer subcommands (fit / validate / test).

Imported only when a trainer subcommand runs: Lightning and torch are heavy, and the tool
subcommands and ``--help`` of :mod:`lightning_sae.cli` must answer without them.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import inspect
import logging
import os
import pkgutil
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser, Namespace
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

from lightning_sae.callbacks._reporting import decoder_rows, gathered, member_names, saes, scoped
from lightning_sae.callbacks.figures import TrainingFigures
from lightning_sae.callbacks.geometry import FeatureGeometryMonitor, ground_truth_mmcs
from lightning_sae.callbacks.init_from import InitFrom
from lightning_sae.callbacks.lifecycle import (
    EvaluationCoverage,
    RunRecord,
    StepProgressBar,
    TokenThroughput,
)
from lightning_sae.commands import FINAL_METRICS_FILENAME
from lightning_sae.data.identity import DataMismatchError, check_same_data, saved_identity
from lightning_sae.files import load_torch_file
from lightning_sae.hub import HubError, is_hub_path, sae_folder
from lightning_sae.models import class_path_of, variant_class
from lightning_sae.models.group import SAEGroup, names_group
from lightning_sae.options import CLASS_GROUPS, parser_error_line, read_table, write_table

SPECIAL_CKPT_PATHS = {"last", "best", "hpc", "registry"}
RUN_CSV_LOGGER = "lightning_sae.trainer_cli.RunCSVLogger"
RUN_CHECKPOINT = "lightning_sae.callbacks.lifecycle.RunCheckpoint"


# --------------------------------------------------------------------------- logs of a run
class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing ``metrics.csv`` (and would then fail to
    rewrite its header); a resumed run appends to it instead, after dropping the rows at or
    after ``purge_step`` that an abandoned stretch of the run wrote past its checkpoint."""

    def __init__(self, log_dir: str, purge_step: int | None) -> None:
        self.purge_step = purge_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            rows, self.metrics_keys = list(reader), sorted(reader.fieldnames or [])
        if self.purge_step is not None:
            kept = [
                row for row in rows if not row.get("step") or int(row["step"]) < self.purge_step
            ]
            if len(kept) < len(rows):
                with self._fs.open(self.metrics_file_path, "w", newline="") as file:
                    writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
                    writer.writeheader()
                    writer.writerows(kept)


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` that continues an existing version's ``metrics.csv`` (a resumed run).

    Args:
        purge_step: rows at or after this step are dropped from an existing file first (set by
            the CLI on resume to the checkpoint's step + 1, as TensorBoard's ``purge_step``).
    """

    def __init__(
        self,
        save_dir: str,
        name: str | None = "csv",
        version: int | str | None = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 100,
        purge_step: int | None = None,
    ) -> None:
        super().__init__(save_dir, name, version, prefix, flush_logs_every_n_steps)
        self.purge_step = purge_step

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(self.log_dir, self.purge_step)
        return self._experiment


def _class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _inside(path: str | os.PathLike, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


def _outside_error(option: str, path: str, run: Path) -> SystemExit:
    return SystemExit(
        f"error: {option} {path} is outside the run folder {run}. A run lives in one folder, "
        "trainer.default_root_dir: leave this option out (it is derived from the run folder) "
        "or set trainer.default_root_dir instead."
    )


def _checkpoint_record(path: Path) -> dict[str, Any]:
    """The checkpoint's step and ``run`` record (see RunRecord), read without the tensors."""
    if path.is_dir():  # a latent-sharded checkpoint: the record is in its metadata file
        path = path / "meta.pt"
    checkpoint = load_torch_file(path, mmap=True)
    return {"global_step": checkpoint.get("global_step", 0), **checkpoint.get("run", {})}


class RunFinished(Exception):
    """``fit --ckpt_path`` of a run that already reached ``trainer.max_steps``; the message
    says so (the CLI prints it and exits 0: the run asked for exists)."""


def _run_contents(checkpoint_dirs: list[Path], log_folders: list[Path]) -> list[Path]:
    """What a previous run left in the run folder: checkpoints and training log versions."""
    checkpoints = [
        p for folder in checkpoint_dirs if folder.is_dir() for p in folder.glob("*.ckpt")
    ]
    logs = [p for folder in log_folders if folder.is_dir() for p in folder.glob("version_*")]
    return sorted(checkpoints) + sorted(logs)


def _run_last(checkpoint_dirs: list[Path]) -> Path | None:
    """The run's final checkpoint, ``last.ckpt`` of its checkpoint folder (never a newer
    ``last-v1.ckpt`` of another run, as Lightning's newest-``last*`` rule would pick)."""
    return next((d / "last.ckpt" for d in checkpoint_dirs if (d / "last.ckpt").exists()), None)


def resume_checkpoint(
    run: Path,
    ckpt_path: str | None,
    checkpoint_dirs: list[Path],
    log_folders: list[Path],
    max_steps: int | None,
    is_rank_zero: bool = True,
) -> tuple[str | None, dict[str, Any]]:
    """The checkpoint a ``fit`` starts from (``last`` resolved to the run's ``last.ckpt``) and
    its record (see :func:`_checkpoint_record`).

    A run folder holds one run: a fit into a folder that already holds one resumes it or is
    refused, and a resume of a run that reached ``max_steps`` raises :class:`RunFinished`.
    Only rank 0 judges the folder: the other processes start when it may already be writing.
    """
    found = _run_contents(checkpoint_dirs, log_folders)
    ways_out = (
        f"resume it with --ckpt_path last, or start a new run in another folder with "
        f"--trainer.default_root_dir {run}-2"
    )
    if ckpt_path == "last":
        last = _run_last(checkpoint_dirs)
        if last is None and found and is_rank_zero:
            raise SystemExit(
                f"error: --ckpt_path last: the run folder {run} has no checkpoints/last.ckpt to "
                f"resume (it holds {os.path.relpath(found[0], run)}); pass one of its checkpoints "
                f"as --ckpt_path, or start a new run with --trainer.default_root_dir {run}-2."
            )
        if last is None:
            return None, {}  # nothing to resume: the run starts here
        ckpt_path = str(last)
    record = _checkpoint_record(Path(ckpt_path)) if ckpt_path else {}
    written_by = record.get("run_dir")
    continues_this_run = written_by is not None and Path(written_by).resolve() == run.resolve()
    if found and not continues_this_run and is_rank_zero:
        held = os.path.relpath(_run_last(checkpoint_dirs) or found[0], run)
        raise SystemExit(f"error: the run folder {run} already holds a run ({held}); {ways_out}.")
    step = record.get("global_step", 0)
    if ckpt_path and max_steps is not None and 0 < max_steps <= step:
        raise RunFinished(
            f"the run is finished: {ckpt_path} is at step {step} and trainer.max_steps is "
            f"{max_steps}. Raise --trainer.max_steps to train on; `lightning-sae validate` with "
            f"--ckpt_path {ckpt_path} reports its metrics."
        )
    return ckpt_path, record


def _next_version(folders: list[Path], prefix: str) -> int:
    taken = [
        int(p.name[len(prefix) :])
        for folder in folders
        if folder.is_dir()
        for p in folder.iterdir()
        if p.name.startswith(prefix) and p.name[len(prefix) :].isdigit()
    ]
    return max(taken, default=-1) + 1


def place_run(subcommand: str, config: Namespace) -> tuple[Path, int | str | None]:
    """Put everything a run writes under ``trainer.default_root_dir``; returns (run, version).

    Loggers without a ``save_dir`` (or with their class default) and checkpoint callbacks
    without a ``dirpath`` get the run folder; one pointing outside it is an error. With no
    logger configured, a CSV and a TensorBoard logger are used. ``fit`` logs to a new
    ``version_N`` of every logger, the same N for all, or, resuming a checkpoint of this run
    folder, to the version that checkpoint was written by; ``validate`` / ``test`` log to
    ``validate_N`` / ``test_N`` so that they never pass for a training run.
    """
    trainer = config.trainer
    if not trainer.get("default_root_dir"):
        trainer.default_root_dir = os.getcwd()  # Lightning's own default, made explicit
    run = Path(trainer.default_root_dir)

    callbacks = trainer.get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    checkpoint_dirs = []
    for callback in callbacks:
        if not isinstance(callback, Namespace) or "class_path" not in callback:
            continue
        cls = _class(callback.class_path)
        if not issubclass(cls, ModelCheckpoint):
            continue
        if cls is ModelCheckpoint:  # its last.ckpt can be stale; see RunCheckpoint
            callback.class_path = RUN_CHECKPOINT
        if callback.get("init_args") is None:
            callback.init_args = Namespace()
        dirpath = callback.init_args.get("dirpath")
        if dirpath is None:
            callback.init_args.dirpath = dirpath = str(run / "checkpoints")
        elif not _inside(dirpath, run):
            raise _outside_error(f"{callback.class_path} dirpath", dirpath, run)
        checkpoint_dirs.append(Path(dirpath))
    if not checkpoint_dirs and trainer.get("enable_checkpointing") is not False:
        default = Namespace(dirpath=str(run / "checkpoints"), save_last=True)
        callbacks.append(Namespace(class_path=RUN_CHECKPOINT, init_args=default))
        checkpoint_dirs.append(run / "checkpoints")
    trainer.callbacks = callbacks

    loggers = trainer.get("logger")
    if loggers is False:
        loggers = []  # none; the run folder is still judged by its checkpoints
    elif loggers is None or loggers is True:
        loggers = [
            Namespace(class_path=RUN_CSV_LOGGER, init_args=Namespace(name="csv")),
            Namespace(
                class_path="lightning.pytorch.loggers.TensorBoardLogger",
                init_args=Namespace(name="tensorboard"),
            ),
        ]
    versioned = []  # (namespace, folder holding its versions)
    loggers = loggers if isinstance(loggers, list) else [loggers]
    for logger in loggers:
        if not isinstance(logger, Namespace) or "class_path" not in logger:
            continue
        if logger.class_path == "lightning.pytorch.loggers.CSVLogger":
            logger.class_path = RUN_CSV_LOGGER  # Lightning's deletes metrics.csv on resume
        cls = _class(logger.class_path)
        if logger.get("init_args") is None:
            logger.init_args = Namespace()
        args = logger.init_args
        default = inspect.signature(cls).parameters.get("save_dir")
        save_dir = args.get("save_dir")
        if default is not None and save_dir in (None, default.default):
            args.save_dir = str(run)
        elif save_dir is not None and not _inside(save_dir, run):
            raise _outside_error(f"{logger.class_path} save_dir", save_dir, run)
        if issubclass(cls, (CSVLogger, TensorBoardLogger)) and args.get("version") is None:
            name = args.get("name", inspect.signature(cls).parameters["name"].default)
            versioned.append((cls, args, Path(args.save_dir) / (name or "")))

    version: int | str | None = None
    purge_step = None
    folders = [folder for _, _, folder in versioned]
    if subcommand == "fit":
        ckpt_path, record = resume_checkpoint(
            run,
            config.get("ckpt_path"),
            checkpoint_dirs,
            folders,
            trainer.get("max_steps"),
            is_rank_zero=rank_zero_only.rank == 0,
        )
        config.ckpt_path = ckpt_path
        written_by = record.get("run_dir")
        if written_by is not None and Path(written_by).resolve() == run.resolve():
            version, purge_step = record.get("log_version"), record["global_step"] + 1
        if version is None:
            version = _next_version(folders, "version_")
    else:
        version = f"{subcommand}_{_next_version(folders, f'{subcommand}_')}"
    for cls, args, _ in versioned:
        args.version = version
        if purge_step is not None and issubclass(cls, (RunCSVLogger, TensorBoardLogger)):
            args.purge_step = purge_step  # TensorBoardLogger hands it to its SummaryWriter
    if not loggers:
        return run, None
    trainer.logger = loggers
    return run, version


# --------------------------------------------------------------------------- final table
def final_metrics_table(
    trainer: Trainer,
    coverage: EvaluationCoverage | None = None,
    gt_mmcs: float | dict[str, float] | None = None,
    checkpoint: str | None = None,
    step: int | None = None,
    members: list[str] | None = None,
) -> str:
    """The last evaluation's metrics, the data they cover, and the checkpoint (and its step)
    they belong to. Without ``checkpoint``, the trainer's ``ModelCheckpoint``'s last save.

    With ``members`` (an ``SAEGroup``'s names) there is one column per member, read from
    ``<member>/val/...``, and ``gt_mmcs`` is by member."""
    metrics = trainer.callback_metrics
    prefix = "test" if coverage is not None and coverage.stage == "test" else "val"
    rows = [
        ("FVU", f"{prefix}/fvu"),
        ("L0", f"{prefix}/l0"),
        ("dead fraction", f"{prefix}/dead_fraction"),
        ("CE loss recovered", "downstream/ce_loss_recovered"),
        ("KL (clean || SAE)", "downstream/kl"),
        ("final hidden cosine", "downstream/final_hidden_cosine"),
        ("final hidden rel MSE", "downstream/final_hidden_rel_mse"),
    ]
    columns = members or [""]
    values = []
    for label, key in rows:
        cells = [metrics.get(scoped(name, key)) for name in columns]
        if any(cell is not None for cell in cells):
            values.append((label, [None if cell is None else float(cell) for cell in cells]))
    # Two different MMCS, named apart: recovery of the toy data's true features, and how close
    # the decoder's own rows sit to each other.
    mmcs_rows = []
    if gt_mmcs is not None:
        by_member = gt_mmcs if isinstance(gt_mmcs, dict) else {"": gt_mmcs}
        mmcs_rows.append(("ground-truth MMCS", [by_member.get(name) for name in columns]))
    self_mmcs = _decoder_self_mmcs(trainer)
    if any(name in self_mmcs for name in columns):
        mmcs_rows.append(("decoder self-MMCS", [self_mmcs.get(name) for name in columns]))
    values[3:3] = mmcs_rows
    covered = coverage is not None and coverage.stage is not None
    heading = "final metrics"
    if covered:
        split, samples, batches = coverage.stage, coverage.samples, coverage.batches
        heading += f": {split} split, {samples:,} samples in {batches:,} batches"
    widths = [max(14, len(name) + 2) for name in columns]
    lines = ["", heading, "-" * max(20 + sum(widths), len(heading))]
    if members:
        lines.append(" " * 20 + "".join(f"{n:>{w}}" for n, w in zip(columns, widths, strict=True)))
    samples = f"those {coverage.samples:,} {coverage.stage}" if covered else f"the {prefix}"
    notes = {
        "dead fraction": f"features that never fired on {samples} samples",
        "ground-truth MMCS": "each true feature's best cosine to a decoder row, averaged",
        "decoder self-MMCS": "each decoder row's max cosine to another row, averaged",
    }
    for label, cells in values:
        line = f"{label:<20}" + "".join(
            f"{'-':>{w}}" if cell is None else f"{cell:>{w}.4f}"
            for cell, w in zip(cells, widths, strict=True)
        )
        if label in notes:
            line += f"   ({notes[label]})"
        lines.append(line)
    if checkpoint is None:
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint):
            checkpoint = callback.last_model_path or callback.best_model_path or None
    if checkpoint:
        at = f" (step {step})" if step is not None else ""
        lines.append(f"{'checkpoint':<20}{checkpoint}{at}")
    return "\n".join(lines)


def _decoder_self_mmcs(trainer: Trainer) -> dict[str, float]:
    """Decoder self-MMCS by SAE name, where the geometry monitor measured it at the final step
    (it measures the final weights at the end of training)."""
    for callback in trainer.callbacks:
        if isinstance(callback, FeatureGeometryMonitor):
            return {
                name: record.history[-1][1]
                for name, record in callback.records.items()
                if record.history and record.history[-1][0] == trainer.global_step
            }
    return {}


def _is_sharded_checkpoint(path: str) -> bool:
    from lightning_sae.parallel.checkpoint import is_sharded_checkpoint

    return is_sharded_checkpoint(path)


def _check_sharded_resume(ckpt_path: str, trainer_config: Any) -> None:
    """A latent-sharded checkpoint loads into any mesh, but only under the sharded strategy."""
    strategy = str(trainer_config.get("strategy", "auto"))
    if trainer_config.get("member_parallel") or "MemberParallelStrategy" in strategy:
        return  # its own folders; MemberParallelStrategy.load_checkpoint checks which it is
    meta = load_torch_file(Path(ckpt_path) / "meta.pt", mmap=True)
    if "member_param_groups" in meta:
        raise SystemExit(
            f"error: --ckpt_path {ckpt_path} is a member-parallel checkpoint (each member's "
            "weights written by its device): resume it with trainer.member_parallel: true (any "
            "device count); `lightning-sae export --ckpt_path <folder>` writes its SAEs."
        )
    if trainer_config.get("latent_parallel", 1) == 1 and "LatentParallelStrategy" not in strategy:
        raise SystemExit(
            f"error: --ckpt_path {ckpt_path} is a latent-sharded checkpoint (a folder of shards). "
            "Load it with trainer.latent_parallel set (any mesh shape: it is resharded on load), "
            'or convert it for a one-process run with python -c "from lightning_sae.parallel '
            f"import consolidate_checkpoint; consolidate_checkpoint('{ckpt_path}', "
            "'full.ckpt')\" and pass --ckpt_path full.ckpt (`lightning-sae export --ckpt_path "
            "<folder>` writes the SAELens export)."
        )


def _latent_parallel_strategy(
    trainer_config: Any, latent_parallel: int, model: LightningModule | None = None
) -> Any:
    """``trainer.latent_parallel: N`` as its strategy; a strategy set beside it, or a model the
    mesh cannot split, is refused here, once, before any process is launched."""
    from lightning_sae.parallel.layers import check_shardable
    from lightning_sae.parallel.strategy import LatentParallelStrategy

    if trainer_config.get("strategy", "auto") != "auto":
        raise SystemExit(
            "error: trainer.latent_parallel sets the strategy (LatentParallelStrategy); remove "
            f"trainer.strategy ({trainer_config.get('strategy')}) or set "
            "trainer.latent_parallel: 1."
        )
    trainer_config.pop("strategy", None)
    try:
        strategy = LatentParallelStrategy(latent_parallel=latent_parallel)
        if model is not None:
            check_shardable(model, latent_parallel)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    return strategy


def _member_parallel_strategy(
    trainer_config: Any, latent_parallel: int, model: LightningModule | None = None
) -> Any:
    """``trainer.member_parallel: true`` as its strategy; a strategy set beside it, a model that
    is not a group, or a group that cannot be placed, is refused here, once, before any process
    is launched."""
    from lightning_sae.parallel.members import MemberParallelStrategy, check_placeable

    if latent_parallel != 1:
        raise SystemExit(
            "error: trainer.latent_parallel does not apply to member_parallel: split a member "
            "over several devices with trainer.member_shards (e.g. {l3: 4}), or set "
            "trainer.member_parallel: false."
        )
    if trainer_config.get("strategy", "auto") != "auto":
        raise SystemExit(
            "error: trainer.member_parallel sets the strategy (MemberParallelStrategy); remove "
            f"trainer.strategy ({trainer_config.get('strategy')}) or set "
            "trainer.member_parallel: false."
        )
    trainer_config.pop("strategy", None)
    gib = trainer_config.get("member_memory_gib")
    shards = trainer_config.get("member_shards")
    try:
        strategy = MemberParallelStrategy(member_memory_gib=gib, member_shards=shards)
        devices, nodes = trainer_config.get("devices"), trainer_config.get("num_nodes", 1)
        if model is not None:
            world = devices * nodes if isinstance(devices, int) and isinstance(nodes, int) else None
            budget = None if gib is None else int(gib * 2**30)
            check_placeable(model, world, budget, strategy.member_shards)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    return strategy


def _is_variant(class_path: str | None, cls: type) -> bool:
    """Whether ``class_path`` (any spelling of a project class) names ``cls``."""
    try:
        return class_path is not None and variant_class(class_path) is cls
    except ValueError:
        return False


def project_classes(group: str) -> dict[str, type]:
    """The project's model (or data) classes by full path, those a bare name may name."""
    from lightning import LightningDataModule, LightningModule

    package = importlib.import_module(
        "lightning_sae.models" if group == "model" else "lightning_sae.data"
    )
    for module in pkgutil.iter_modules(package.__path__):
        with contextlib.suppress(ImportError):  # a module needing an optional extra
            importlib.import_module(f"{package.__name__}.{module.name}")
    stack, found = [LightningModule if group == "model" else LightningDataModule], {}
    while stack:
        for sub in stack.pop().__subclasses__():
            stack.append(sub)
            if sub.__module__.startswith("lightning_sae.") and not sub.__name__.startswith("_"):
                found[f"{sub.__module__}.{sub.__qualname__}"] = sub
    return found


def init_arg_names(cls: type) -> list[str]:
    """The init arguments LightningCLI takes for ``cls`` (``**kwargs`` followed as it does)."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "x", sub_configs=True)
    return sorted({action.dest[2:].split(".")[0] for action in parser._actions
                   if action.dest.startswith("x.")})  # fmt: skip


def _long_options(parser: ArgumentParser) -> list[str]:
    return sorted({o for action in parser._actions for o in action.option_strings if o[:2] == "--"})


class SAEArgumentParser(LightningArgumentParser):
    """No abbreviated options (``--trainer.max_step`` is not ``max_steps``), and a parse error
    is one line naming the closest valid option or the classes there are, not the usage and
    every union alternative. ``LIGHTNING_SAE_DEBUG=1`` shows jsonargparse's own message."""

    command = "fit"  # the subcommand whose options an error is judged against
    commands: dict[str, ArgumentParser] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> Any:
        if not self.exit_on_error or os.environ.get("LIGHTNING_SAE_DEBUG"):
            return super().error(message, ex)
        parser = self.commands.get(self.command, self)
        classes = {group: project_classes(group) for group in CLASS_GROUPS}
        path = re.search(r"class_path '([^']+)'", message)
        cls = None
        if path:
            cls = next((c for g in classes.values() for p, c in g.items() if p == path[1]), None)
        init_args = {path[1]: init_arg_names(cls)} if cls is not None else {}
        line = parser_error_line(message, self.command, _long_options(parser), classes, init_args)
        raise SystemExit(f"error: {line}")


class _LightningNoise(logging.Filter):
    """Drops Lightning's advertisements (litlogger, litmodels) from its info log, and its note
    that ``max_steps`` was reached: the step bar shows it, and in a terminal the note lands on
    the bar's line just before the bar prints its last state again."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not message.startswith(("💡 Tip", "`Trainer.fit` stopped: `max_steps="))


def quiet_lightning(subcommand: str) -> None:
    """Silence what Lightning prints that says nothing about this run."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)  # where Lightning's rank_zero_info writes
        if not any(isinstance(f, _LightningNoise) for f in logger.filters):
            logger.addFilter(_LightningNoise())
    # Raised inside Lightning's own _pytree module by the torch it runs on; nothing to act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    if subcommand != "fit":
        # Evaluating a checkpoint needs none of the training callbacks whose state it holds.
        warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`")


class SAECLI(LightningCLI):
    """LightningCLI with any SAE variant as model and any DataModule as data, by class_path."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parser_class", SAEArgumentParser)
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test (an SAE has nothing to ``predict``)."""
        return {
            name: skip
            for name, skip in LightningCLI.subcommands().items()
            if name in ("fit", "validate", "test")
        }

    def setup_parser(self, add_subcommands: bool, *args: Any) -> None:
        super().setup_parser(add_subcommands, *args)
        if add_subcommands:
            SAEArgumentParser.commands = self._subcommand_parsers
            if read_table() is None:
                write_table(self._option_table)

    def _option_table(self) -> dict[str, Any]:
        """What :mod:`lightning_sae.options` checks a command line against before the imports."""
        table: dict[str, Any] = {
            "commands": {name: _long_options(p) for name, p in self._subcommand_parsers.items()}
        }
        for group in CLASS_GROUPS:
            table[group] = {
                path: init_arg_names(cls) for path, cls in project_classes(group).items()
            }
        return table

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> Any:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if "verbose" in parser.get_defaults():
            # Lightning's table of every logged value, printed before ours: ours is enough.
            parser.set_defaults(verbose=False)
        return parser

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        given = sys.argv[1:] if args is None else args
        if isinstance(given, list):
            SAEArgumentParser.command = next((a for a in given if a in self.subcommands()), "fit")
        quiet_lightning(SAEArgumentParser.command)
        super().parse_arguments(parser, args)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--trainer.latent_parallel",
            type=int,
            default=1,
            help=(
                "Devices that share one dictionary, each holding a slice of the latents "
                "(lightning_sae.parallel.LatentParallelStrategy on a data x latent mesh of "
                "trainer.devices x trainer.num_nodes devices). 1: not sharded."
            ),
        )
        parser.add_argument(
            "--trainer.member_parallel",
            type=bool,
            default=False,
            help=(
                "Place an SAEGroup's members on the devices (each on one, balanced by size) "
                "and train each on the whole global batch: SAE and Adam memory per device "
                "divides by the device count (lightning_sae.parallel.MemberParallelStrategy)."
            ),
        )
        parser.add_argument(
            "--trainer.member_memory_gib",
            type=float | None,
            default=None,
            help=(
                "With trainer.member_parallel: the most GiB of members' weights, gradients and "
                "Adam state one device may hold (default: a GPU's memory; no limit on CPU); "
                "a larger member is split over the fewest devices that fit it."
            ),
        )
        parser.add_argument(
            "--trainer.member_shards",
            type=dict[str, int] | None,
            default=None,
            help=(
                "With trainer.member_parallel: members to split, by name, and over how many "
                "consecutive devices each ({l3: 4}: member l3's latents sharded over four "
                "devices of its own, as under trainer.latent_parallel); the other members are "
                "held whole. A member larger than trainer.member_memory_gib is split "
                "automatically over the fewest devices that fit it."
            ),
        )
        parser.add_argument(
            "--init_from",
            type=str | None,
            default=None,
            help=(
                "fit: start a new run from the weights of this checkpoint (.ckpt or sharded "
                "folder), on any data: weights only, a fresh optimizer from step 0 "
                "(lightning_sae.callbacks.init_from.InitFrom). --ckpt_path instead resumes a run "
                "exactly, on the data it was trained on."
            ),
        )
        parser.add_argument(
            "--print_metrics",
            type=bool,
            default=True,
            help="Print a table of final validation metrics after fit / validate / test.",
        )
        parser.add_argument(
            "--default_callbacks",
            type=bool,
            default=True,
            help=(
                "fit: add LearningRateMonitor, TokenThroughput (train/tokens_per_sec), "
                "StepProgressBar and FeatureGeometryMonitor, each unless the config has one."
            ),
        )

    def _parse_ckpt_path(self) -> None:
        """Check what a --ckpt_path checkpoint says its class is before Lightning uses it.

        LightningCLI parses the checkpoint's ``_class_path`` as the model's class_path, which
        imports it, and silently replaces the config's model with it. A checkpoint may name only
        one of the project's classes or the config's own class, and a different variant from the
        config's is refused (validating another variant than the one asked for misleads).
        An export folder instead of a checkpoint is loaded in :meth:`after_instantiate_classes`.
        """
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand, {}) if subcommand else {}
        ckpt_path = config.get("ckpt_path")
        self._export_folder: Path | None = None
        if ckpt_path and _is_sharded_checkpoint(ckpt_path):
            _check_sharded_resume(ckpt_path, config.get("trainer", {}))
        if ckpt_path and is_hub_path(ckpt_path):  # hf://org/repo[/subfolder][@revision]
            if subcommand == "fit":
                raise SystemExit(
                    f"error: --ckpt_path {ckpt_path} is an SAE on the Hub; fit resumes from a "
                    "Lightning checkpoint (.ckpt). Use it with validate or test, or "
                    "lightning_sae.load in Python."
                )
            try:
                self._export_folder = sae_folder(ckpt_path)
                self._export_label = ckpt_path  # the table names the hf:// path, not the cache
            except HubError as error:
                raise SystemExit(f"error: {error}") from None
            config["ckpt_path"] = None
            return
        if ckpt_path and Path(ckpt_path).is_dir() and not _is_sharded_checkpoint(ckpt_path):
            self._export_folder = self._export_folder_for(subcommand, Path(ckpt_path))
            config["ckpt_path"] = None
            return
        # Any file, not only a regular one: what is not a checkpoint is refused when read.
        if ckpt_path and Path(ckpt_path).exists() and not Path(ckpt_path).is_dir():
            configured = config.get("model", {}).get("class_path")
            try:
                hparams = load_torch_file(ckpt_path, mmap=True).get("hyper_parameters", {})
            except ValueError as error:
                raise SystemExit(f"error: {error}") from None
            saved = hparams.get("_class_path")
            # The group is the one module besides the variants that a checkpoint may name; its
            # members' classes come from the project's table.
            if saved is not None and saved != configured and names_group(saved):
                if configured is None or not names_group(configured):
                    raise SystemExit(
                        f"error: the checkpoint {ckpt_path} holds an SAEGroup, but the config's "
                        f"model is {configured}. Pass the config the group was trained with "
                        f"(model.class_path: {class_path_of(SAEGroup)})."
                    )
            elif saved is not None and saved != configured:
                source = f"the checkpoint {ckpt_path} (_class_path)"
                try:
                    saved_class = variant_class(saved, source)
                except ValueError as error:
                    raise SystemExit(f"error: {error}") from None
                if not _is_variant(configured, saved_class):
                    raise SystemExit(
                        f"error: the checkpoint {ckpt_path} holds a {saved_class.__name__}, but "
                        f"the config's model is {configured}. Pass --model.class_path "
                        f"{class_path_of(saved_class)} (or the config the checkpoint was trained "
                        "with) to use it."
                    )
        super()._parse_ckpt_path()

    def _export_folder_for(self, subcommand: str, folder: Path) -> Path:
        if subcommand == "fit":
            raise SystemExit(
                f"error: --ckpt_path {folder} is a folder; fit resumes from a Lightning "
                "checkpoint (.ckpt, e.g. the run's checkpoints/last.ckpt). An export folder holds "
                "only the weights: use it with validate or test, or lightning_sae.load in Python."
            )
        if not (folder / "cfg.json").is_file():
            raise SystemExit(
                f"error: --ckpt_path {folder} is a folder without cfg.json; pass a .ckpt file or "
                "a folder written by `lightning-sae export`."
            )
        return folder

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        if self._export_folder is None:
            return
        from lightning_sae.io import load

        try:
            exported = load(self._export_folder)
        except (FileNotFoundError, ValueError) as error:
            raise SystemExit(f"error: {error}") from None
        if type(exported) is not type(self.model):
            raise SystemExit(
                f"error: {self._export_folder} holds a {type(exported).__name__}, but the config's "
                f"model is {type(self.model).__name__}. Pass --model.class_path "
                f"{class_path_of(type(exported))} to use it."
            )
        if exported.d_in != self.model.d_in:
            raise SystemExit(
                f"error: {self._export_folder} has d_in {exported.d_in}, the config's data "
                f"{self.model.d_in}; pass a config for the hook the SAE was trained on."
            )
        self.model = exported

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, {})
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and ckpt_path not in SPECIAL_CKPT_PATHS and not Path(ckpt_path).exists():
            raise SystemExit(
                f"error: --ckpt_path {ckpt_path} does not exist. Pass the path of a .ckpt file "
                "(see the run's checkpoints/ folder) or --ckpt_path last to resume the latest run."
            )
        try:
            self.run_dir, self.log_version = place_run(self.subcommand, config)
        except RunFinished as finished:
            print(finished, flush=True)
            raise SystemExit(0) from None

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The configured trainer plus the run's lifecycle callbacks and default monitoring."""
        config = self.config.get(self.subcommand, {})
        trainer_config = self._get(self.config_init, "trainer", default={})
        latent_parallel = trainer_config.pop("latent_parallel", 1)
        member_parallel = trainer_config.pop("member_parallel", False)
        if member_parallel:
            kwargs["strategy"] = _member_parallel_strategy(
                trainer_config, latent_parallel, self.model
            )
        trainer_config.pop("member_memory_gib", None)
        if trainer_config.pop("member_shards", None) and not member_parallel:
            raise SystemExit(
                "error: trainer.member_shards splits members of a member-parallel group: set "
                "trainer.member_parallel: true, or remove trainer.member_shards."
            )
        if latent_parallel != 1 and not member_parallel:
            kwargs["strategy"] = _latent_parallel_strategy(
                trainer_config, latent_parallel, self.model
            )
        callbacks = trainer_config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        self.coverage = EvaluationCoverage()
        extra: list[Callback] = [self.coverage]
        if self.subcommand == "fit":
            extra.append(RunRecord(str(self.run_dir), self.log_version))
        init_from = config.get("init_from")
        if init_from and self.subcommand != "fit":
            raise SystemExit(
                f"error: --init_from starts a fit from trained weights; {self.subcommand} "
                "evaluates a checkpoint: pass it as --ckpt_path instead."
            )
        if init_from and not Path(init_from).exists():
            raise SystemExit(
                f"error: --init_from {init_from} does not exist. Pass the .ckpt of a trained run "
                "(e.g. runs/<run>/checkpoints/last.ckpt)."
            )
        if init_from and not config.get("ckpt_path"):  # a resume restores its own weights
            extra.append(InitFrom(init_from))
        if self.subcommand == "fit" and config.get("default_callbacks", True):
            extra += _default_monitoring(trainer_config, callbacks)
        return super().instantiate_trainer(callbacks=callbacks + extra, **kwargs)

    def before_fit(self) -> None:
        """A resume must continue on the data its checkpoint was trained on (checked here,
        before any cache is built for other data; the datamodule checks again on restore)."""
        ckpt_path = self.config[self.subcommand].get("ckpt_path")  # "last" resolved by place_run
        identify = getattr(self.datamodule, "data_identity", None)
        if not ckpt_path or ckpt_path in SPECIAL_CKPT_PATHS or not callable(identify):
            return
        path = Path(ckpt_path)
        checkpoint = load_torch_file(path / "meta.pt" if path.is_dir() else path, mmap=True)
        here = {"data": type(self.datamodule).__name__, **identify()}
        try:
            check_same_data(saved_identity(checkpoint), here, f"--ckpt_path {ckpt_path}")
        except DataMismatchError as error:
            raise SystemExit(
                f"error: {str(error).replace('<checkpoint>', str(ckpt_path))}"
            ) from None

    def after_fit(self) -> None:
        # Validation already ran at the final step (val_check_interval divides max_steps): its
        # metrics are the final ones; running it again would only log them twice.
        coverage = self.coverage
        if not (coverage.stage == "validation" and coverage.step == self.trainer.global_step):
            self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        self._print_metrics()

    def after_validate(self) -> None:
        self._print_metrics()

    def after_test(self) -> None:
        self._print_metrics()

    def _print_metrics(self) -> None:
        if not (self.config[self.subcommand].get("print_metrics", True)):
            return
        gt_mmcs = self._gt_mmcs()  # every rank: a latent-sharded dictionary is measured together
        if not self.trainer.is_global_zero:
            return
        checkpoint, step = None, self.trainer.global_step
        if self.subcommand != "fit":
            export = getattr(self, "_export_folder", None)
            label = getattr(self, "_export_label", None) or (str(export) if export else None)
            checkpoint = label or self.config[self.subcommand].get("ckpt_path")
            is_file = checkpoint is not None and Path(checkpoint).is_file()
            step = _checkpoint_record(Path(checkpoint))["global_step"] if is_file else None
        members = member_names(self.model) if isinstance(self.model, SAEGroup) else None
        table = final_metrics_table(self.trainer, self.coverage, gt_mmcs, checkpoint, step, members)
        print(table, flush=True)
        if self.subcommand == "fit":  # kept with the run: `lightning-sae push` puts it in the card
            (Path(self.run_dir) / FINAL_METRICS_FILENAME).write_text(table.lstrip("\n") + "\n")

    def _gt_mmcs(self) -> float | dict[str, float] | None:
        """Ground-truth MMCS of the weights the table reports (toy data only; by member in a
        group), measured now rather than read from a log that may predate them. Every rank
        calls this: a latent-sharded member holds a slice of the dictionary."""
        ground_truth = getattr(self.datamodule, "ground_truth_features", None)
        if ground_truth is None:
            return None
        values = {
            name: ground_truth_mmcs(ground_truth, sae)
            for name, sae in saes(self.model).items()
            if decoder_rows(sae).shape[1] == ground_truth.shape[1]
        }
        values = gathered(self.model, values)  # a placed member is measured on its own rank
        return values if isinstance(self.model, SAEGroup) else values.get("")


def _default_monitoring(trainer_config: Any, callbacks: list[Callback]) -> list[Callback]:
    """What every ``fit`` gets unless its config already has a callback of that kind."""

    def has(kind: type) -> bool:
        return any(isinstance(callback, kind) for callback in callbacks)

    extra: list[Callback] = []
    if trainer_config.get("logger") is not False and not has(LearningRateMonitor):
        extra.append(LearningRateMonitor(logging_interval="step"))
    if not has(TokenThroughput):
        extra.append(TokenThroughput())
    if trainer_config.get("enable_progress_bar") is not False and not has(ProgressBar):
        extra.append(StepProgressBar())
    if not has(FeatureGeometryMonitor):
        # Measured where validation runs (and at the end), so the curve lines up with val/*.
        interval = trainer_config.get("val_check_interval")
        by_steps = (
            isinstance(interval, int) and trainer_config.get("check_val_every_n_epoch") is None
        )
        extra.append(FeatureGeometryMonitor(every_n_steps=interval if by_steps else 1000))
    if not has(TrainingFigures):
        extra.append(TrainingFigures())
    return extra

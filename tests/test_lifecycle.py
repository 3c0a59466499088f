"""A run's lifecycle through ``lightning-sae fit`` / ``validate``: the reported checkpoint holds
the final weights, final metrics cover the whole validation set, one run lives in one folder,
a resume continues the same logs, and the default monitoring (learning rate, tokens/s, a step
progress bar, figures) is there for every config.

Each run is the toy standard config, shrunk (d_in 256 -> batches of 64, a few steps), in-process.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning import LightningDataModule
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_sae.models.base import SparseAutoencoder
from lightning_sae.trainer_cli import SAECLI

CONFIGS = Path(__file__).parents[1] / "configs" / "toy"
SMALL = [
    *("--data.init_args.batch_size", "64", "--data.init_args.val_batches", "4"),
    *("--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false"),
]


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    # Small shapes: a second thread only adds synchronisation on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli(*args: str, config: str = "standard") -> SAECLI:
    """What ``lightning-sae`` runs (see lightning_sae.cli), returning the LightningCLI."""
    return SAECLI(
        SparseAutoencoder,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=[args[0], "--config", str(CONFIGS / f"{config}.yaml"), *args[1:]],
        auto_configure_optimizers=False,
    )


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def column(rows: list[dict[str, str]], name: str) -> list[tuple[int, float]]:
    return [(int(row["step"]), float(row[name])) for row in rows if row.get(name)]


# ------------------------------------------------------------------ item 1: the final checkpoint
def test_reported_checkpoint_holds_the_final_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Checkpoints every 10 steps, 15 steps: Lightning alone leaves last.ckpt at step 10."""
    monkeypatch.chdir(tmp_path)
    run = cli(
        "fit", *SMALL, "--trainer.max_steps", "15", "--trainer.val_check_interval", "10",
        "--trainer.callbacks.init_args.every_n_train_steps", "10",
    )  # fmt: skip
    reported = run.trainer.checkpoint_callback.last_model_path
    assert Path(reported).name == "last.ckpt"
    assert reported in capsys.readouterr().out
    checkpoint = torch.load(reported, weights_only=True, map_location="cpu")
    assert checkpoint["global_step"] == run.trainer.global_step == 15
    for name, value in run.model.state_dict().items():
        assert torch.equal(checkpoint["state_dict"][name], value), name


# ---------------------------------------------------------- item 2: final metrics, whole val set
def test_fresh_fit_final_metrics_equal_validate_on_its_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The sanity check reads 2 of the 4 validation batches; the final metrics must not start
    where it stopped."""
    monkeypatch.chdir(tmp_path)
    fitted = cli("fit", *SMALL, "--trainer.max_steps", "6", "--trainer.val_check_interval", "500")
    table = capsys.readouterr().out
    assert "validation split" in table and "256 samples" in table, table
    # What each number measures, the two MMCS named apart.
    assert "features that never fired on those 256 validation samples" in table, table
    assert "ground-truth MMCS" in table and "true feature's best cosine to a decoder row" in table
    assert "decoder self-MMCS" in table and "max cosine to another row" in table
    checkpoint = fitted.trainer.checkpoint_callback.last_model_path
    validated = cli("validate", *SMALL, "--ckpt_path", checkpoint)
    assert "256 samples" in capsys.readouterr().out
    for key in ("val/fvu", "val/l0", "val/mse", "val/dead_fraction", "val/loss"):
        fresh = fitted.trainer.callback_metrics[key]
        assert torch.equal(fresh, validated.trainer.callback_metrics[key]), key


# ------------------------------------------------------------------ item 3: one run, one folder
def test_overriding_the_run_folder_moves_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cli(
        "fit", *SMALL, "--trainer.max_steps", "4", "--trainer.val_check_interval", "4",
        "--trainer.default_root_dir", "elsewhere/run-a", config="geometry",
    )  # fmt: skip
    run = tmp_path / "elsewhere" / "run-a"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "csv" / "version_0" / "metrics.csv").is_file()
    assert (run / "csv" / "version_0" / "config.yaml").is_file()
    assert list((run / "tensorboard" / "version_0").glob("events.out.tfevents.*"))
    assert list((run / "figures" / "geometry").glob("*.png"))
    assert not (tmp_path / "runs").exists()  # nothing in the config's default folder
    written = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*") if p.is_file()}
    assert written == {"elsewhere"}


def test_a_path_outside_the_run_folder_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="outside the run folder"):
        cli("fit", *SMALL, "--trainer.callbacks.init_args.dirpath", "other-run/checkpoints")
    assert not list(tmp_path.iterdir())


def test_one_run_per_folder_resume_appends_to_its_log_version_and_validate_logs_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    common = [*SMALL, "--trainer.val_check_interval", "5"]
    cli("fit", *common, "--trainer.max_steps", "5")
    run = tmp_path / "runs" / "toy-standard"
    before = sorted(p.relative_to(run) for p in run.rglob("*"))

    # A second fit into the folder is refused, naming both ways out, and writes nothing.
    with pytest.raises(SystemExit, match="already holds a run") as refused:
        cli("fit", *common, "--trainer.max_steps", "5")
    assert "--ckpt_path last" in str(refused.value.code)
    assert "--trainer.default_root_dir" in str(refused.value.code)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    # Resuming the finished run says so and exits 0, without training or validating again.
    capsys.readouterr()
    with pytest.raises(SystemExit) as finished:
        cli("fit", *common, "--trainer.max_steps", "5", "--ckpt_path", "last")
    assert finished.value.code == 0
    assert "is finished" in capsys.readouterr().out
    # `last` is the run's last.ckpt, even beside a newer last-v1.ckpt (what a second run wrote
    # before runs were refused; Lightning's own `last` takes the newest last*.ckpt).
    stale = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    stale["global_step"] = 2
    torch.save(stale, run / "checkpoints" / "last-v1.ckpt")

    resumed = cli("fit", *common, "--trainer.max_steps", "10", "--ckpt_path", "last")
    assert Path(resumed.trainer.ckpt_path).resolve() == (run / "checkpoints/last.ckpt").resolve()
    assert sorted(p.name for p in (run / "csv").iterdir()) == ["version_0"]
    assert sorted(p.name for p in (run / "tensorboard").iterdir()) == ["version_0"]
    rows = csv_rows(run / "csv" / "version_0" / "metrics.csv")
    steps = [step for step, _ in column(rows, "train/loss")]
    assert steps == sorted(steps) and steps[0] <= 1 and steps[-1] >= 9, steps
    assert len(steps) == len(set(steps))  # the first run's rows kept, none written twice
    events = EventAccumulator(str(run / "tensorboard" / "version_0"))
    events.Reload()
    assert max(event.step for event in events.Scalars("train/loss")) >= 9

    cli("validate", *SMALL, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))
    # validate writes its logs apart: the training run stays the only version_N
    assert [p.name for p in (run / "csv").glob("version_*")] == ["version_0"]
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert saved["run"]["log_version"] == 0


def test_a_run_folder_with_logs_but_no_checkpoint_is_not_a_fresh_folder(tmp_path: Path) -> None:
    """A run that died before its first checkpoint still owns its folder (its logs)."""
    from lightning_sae.trainer_cli import resume_checkpoint

    run, checkpoints, logs = (
        tmp_path / "run",
        [tmp_path / "run/checkpoints"],
        [tmp_path / "run/csv"],
    )
    assert resume_checkpoint(run, None, checkpoints, logs, 10) == (None, {})
    assert resume_checkpoint(run, "last", checkpoints, logs, 10) == (None, {})  # starts here
    (run / "csv" / "version_0").mkdir(parents=True)
    for ckpt_path in (None, "last"):
        with pytest.raises(SystemExit, match="--trainer.default_root_dir") as refused:
            resume_checkpoint(run, ckpt_path, checkpoints, logs, 10)
        assert "csv/version_0" in str(refused.value.code)
    # Processes other than rank 0 start when rank 0 may already be writing: they do not judge.
    assert resume_checkpoint(run, None, checkpoints, logs, 10, is_rank_zero=False) == (None, {})


# ------------------------------------------------------------ item 8: default monitoring
def test_fit_logs_lr_tokens_per_second_and_counts_steps_in_the_progress_bar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    run = cli(
        "fit", *SMALL, "--trainer.max_steps", "7", "--trainer.val_check_interval", "3",
        "--data.init_args.batches_per_epoch", "3", "--trainer.enable_progress_bar", "true",
    )  # fmt: skip
    rows = csv_rows(tmp_path / "runs/toy-standard/csv/version_0/metrics.csv")
    lr = [key for key in rows[0] if key.startswith("lr-")]
    assert lr and len(column(rows, lr[0])) >= 6
    tokens_per_sec = column(rows, "train/tokens_per_sec")
    assert len(tokens_per_sec) >= 5 and all(value > 0 for _, value in tokens_per_sec)
    assert column(rows, "train/tokens")[-1] == (7, 7 * 64)
    bar = run.trainer.progress_bar_callback.train_progress_bar
    assert (bar.n, bar.total) == (7, 7)  # steps of max_steps, not batches of this epoch


def test_gt_mmcs_is_logged_once_per_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = yaml.safe_load((CONFIGS / "geometry.yaml").read_text())
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("FeatureGeometryMonitor"):
            callback["init_args"]["every_n_steps"] = 5
    (tmp_path / "geometry5.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    SAECLI(
        SparseAutoencoder,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=[
            "fit", "--config", str(tmp_path / "geometry5.yaml"), *SMALL,
            "--trainer.max_steps", "10", "--trainer.val_check_interval", "5",
        ],
        auto_configure_optimizers=False,
    )  # fmt: skip
    rows = csv_rows(tmp_path / "runs/toy-geometry/csv/version_0/metrics.csv")
    per_step = Counter(step for step, _ in column(rows, "geometry/gt_mmcs"))
    assert per_step == {5: 1, 10: 1}


def test_figures_go_to_tensorboard_and_the_run_figures_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cli(
        "fit", *SMALL, "--trainer.max_steps", "4", "--trainer.val_check_interval", "4",
        "--trainer.callbacks+=lightning_sae.callbacks.density.FeatureDensityMonitor",
        "--trainer.callbacks.init_args.every_n_steps", "4", config="geometry",
    )  # fmt: skip
    run = tmp_path / "runs" / "toy-geometry"
    assert (run / "figures" / "geometry" / "step0000004.png").stat().st_size > 0
    assert (run / "figures" / "density" / "step0000004.png").stat().st_size > 0
    # What every fit ends with: the curves and the density on the validation samples.
    assert (run / "figures" / "training_curves.png").stat().st_size > 0
    assert (run / "figures" / "feature_density.png").stat().st_size > 0
    events = EventAccumulator(str(run / "tensorboard" / "version_0"))
    events.Reload()
    assert {
        "geometry/max_cos_figure",
        "density/log10_density_figure",
        "curves/training_figure",
        "val/log10_density_figure",
    } <= set(events.Tags()["images"])


def test_density_histogram_axis_fits_the_data() -> None:
    from lightning_sae.plots import density_figure

    values = torch.cat([torch.linspace(-3.2, -1.1, 60), torch.full((4,), -10.0)])
    axes = density_figure(values, dead_value=-10.0).axes[0]
    low, high = axes.get_xlim()
    assert -4.5 < low < -3.2 and -1.1 < high <= 0.0  # live features fill the axis
    assert "4/64 dead" in axes.get_title()


def test_figures_have_labelled_axes_that_fit_their_data() -> None:
    from lightning_sae.plots import (
        density_figure,
        frontier_figure,
        max_cosine_figure,
        training_curves_figure,
    )

    density = density_figure(torch.cat([torch.linspace(-3, -1, 50), torch.full((3,), -10.0)]))
    axes = density.axes[0]
    ticks = [label.get_text() for label in axes.get_xticklabels()]
    assert ticks[0] == "never" and "-2" in ticks and axes.get_ylabel() == "features"
    assert "log10 firing frequency" in axes.get_xlabel()

    axes = max_cosine_figure(torch.rand(200) * 0.3 + 0.1, random_baseline=0.2).axes[0]
    low, high = axes.get_xlim()
    assert -0.05 <= low < 0.1 and 0.4 < high <= 0.5  # no empty half up to 1
    assert {"MMCS, decoder self", "random directions"} <= {
        text.get_text().split(" =")[0] for text in axes.get_legend().get_texts()
    }

    steps = {"step": [1, 10, 20], "loss": [2.0, 1.0, 0.5], "l0": [90, 40, 30], "fvu": [1, 0.3, 0.1]}
    curves = training_curves_figure({"k8": steps, "k16": steps}, {"k8": steps})
    assert [a.get_ylabel().split(" (")[0] for a in curves.axes] == ["loss", "L0", "FVU"]
    assert all(a.get_xlabel() == "optimizer step" for a in curves.axes)
    legend = [t.get_text() for t in curves.axes[0].get_legend().get_texts()]
    assert legend == ["k8", "k16", "train", "validation"]
    assert len(curves.axes[1].get_lines()) == 3  # k8 and k16 trained, k8 validated
    curves.canvas.draw()
    assert any(label.get_text() for label in curves.axes[2].get_yticklabels())

    frontier = frontier_figure({"k8": (8.0, 0.3), "k16": (16.0, 0.2), "l1": (20.0, 0.4)})
    axes = frontier.axes[0]
    assert axes.get_xlabel().startswith("L0") and axes.get_ylabel().startswith("FVU")
    assert sorted(text.get_text() for text in axes.texts) == ["k16", "k8", "l1"]
    (line,) = axes.get_lines()  # the frontier: k8 and k16, not l1 (worse on both)
    assert list(line.get_xdata()) == [8.0, 16.0]

"""The command line as a user runs it: fit, resume with --ckpt_path last, validate, bad input."""

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

CONFIG = Path(__file__).parents[1] / "configs" / "toy" / "standard.yaml"


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, "-m", "lightning_sae.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_fit_resume_and_validate_end_to_end(tmp_path: Path) -> None:
    common = ["--config", str(CONFIG), "--trainer.val_check_interval", "20"]
    first = run_cli(tmp_path, "fit", *common, "--trainer.max_steps", "20")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "final metrics" in first.stdout
    for label in ("FVU", "L0", "dead fraction", "ground-truth MMCS", "checkpoint"):
        assert label in first.stdout, first.stdout
    last = tmp_path / "runs" / "toy-standard" / "checkpoints" / "last.ckpt"
    assert last.exists()
    assert_quiet(first)
    # The bar's final state is drawn once when the last step ends and once when it closes
    # (not again after the final validation and at the epoch's end).
    assert first.stdout.count("20/20 [") == 2, first.stdout[-3000:]

    resumed = run_cli(tmp_path, "fit", *common, "--trainer.max_steps", "40", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states from the checkpoint" in resumed.stderr + resumed.stdout
    # The resume appends to the first run's log version: its rows (up to step 20) are kept and
    # the resumed rows (up to step 40) follow them.
    assert [p.name for p in (tmp_path / "runs/toy-standard/csv").iterdir()] == ["version_0"]
    with open(tmp_path / "runs/toy-standard/csv/version_0/metrics.csv") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle)]
    assert min(steps) < 20 and max(steps) >= 39

    validated = run_cli(tmp_path, "validate", "--config", str(CONFIG), "--ckpt_path", str(last))
    assert validated.returncode == 0, validated.stderr[-3000:]
    assert "ground-truth MMCS" in validated.stdout
    assert_quiet(validated)
    assert "Please add the following callbacks" not in validated.stderr  # not needed to validate
    assert "val/loss" not in validated.stdout  # Lightning's table of every value: ours only


def assert_quiet(result: subprocess.CompletedProcess) -> None:
    """None of Lightning's output that says nothing about the run."""
    output = result.stdout + result.stderr
    for noise in ("💡 Tip", "litlogger", "litmodels", "LeafSpec", "`Trainer.fit` stopped"):
        assert noise not in output, output[-3000:]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.class_path", "lightning_sae.models.nope.NopeSAE"], "model.class_path"),
        (["--data.class_path", "lightning_sae.data.toy.Nope"], "data.class_path"),
        (["--model.init_args.l1_coefficient", "-1"], "model.init_args.l1_coefficient"),
        (["--model.init_args.d_sae", "0"], "model.init_args.d_sae"),
        (["--model.init_args.d_in", "128"], "Set model.init_args.d_in: 256"),
        (["--ckpt_path", "missing/last.ckpt"], "--ckpt_path missing/last.ckpt does not exist"),
    ],
)
def test_bad_input_names_the_option_and_the_fix(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = run_cli(tmp_path, "fit", "--config", str(CONFIG), "--trainer.max_steps", "1", *args)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_the_readme_notebook_command_is_installed_by_the_dev_extra() -> None:
    """`pip install -e ".[dev]"` brings what the README's `jupyter nbconvert` command runs."""
    root = Path(__file__).parents[1]
    readme = (root / "README.md").read_text()
    assert "jupyter nbconvert --to html --execute notebooks/analysis.ipynb" in readme
    dev = (root / "pyproject.toml").read_text().split("dev = [", 1)[1].split("]", 1)[0]
    assert '"nbconvert>=' in dev
    assert importlib.util.find_spec("nbconvert") is not None  # the environment has the extra

"""Two-process CPU DDP (gloo) against a single process on the same global batch."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_run.py")


def train(out: Path, devices: int, *args: str) -> dict[int, dict[str, torch.Tensor]]:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--devices", str(devices), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return {rank: torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(devices)}


def logged(out: Path) -> dict[tuple[str, int], float]:
    values = {}
    with open(out / "csv" / "version_0" / "metrics.csv") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key not in ("epoch", "step") and value:
                    values[key, int(row["step"])] = float(value)
    return values


def assert_ranks_identical(states: dict[int, dict[str, torch.Tensor]]) -> None:
    for name, value in states[0].items():
        for rank in states:
            assert torch.equal(value, states[rank][name]), f"{name} differs on rank {rank}"


@pytest.mark.parametrize(
    "model_args",
    [
        [],
        ["--model", "lightning_sae.models.topk.TopKSAE", "--model_kwargs", '{"k": 4}'],
    ],
    ids=["standard", "topk"],
)
def test_ddp_matches_single_process(tmp_path: Path, model_args: list[str]) -> None:
    if (
        model_args
        and not Path(__file__).parents[1].joinpath("lightning_sae/models/topk.py").exists()
    ):
        pytest.skip("TopKSAE not present")
    ddp = train(tmp_path / "ddp", 2, *model_args)
    single = train(tmp_path / "single", 1, *model_args)
    assert_ranks_identical(ddp)
    for name, value in single[0].items():
        assert torch.allclose(value.float(), ddp[0][name].float(), atol=1e-5), name
    ddp_logs, single_logs = logged(tmp_path / "ddp"), logged(tmp_path / "single")
    assert set(ddp_logs) == set(single_logs)
    for key, value in single_logs.items():
        assert ddp_logs[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_ddp_checkpoint_resumes_into_ddp(tmp_path: Path) -> None:
    straight = train(tmp_path / "straight", 2, "--steps", "12", "--checkpoint_every", "6")
    midway = tmp_path / "straight" / "ckpt" / "epoch=0-step=6.ckpt"
    assert midway.exists()
    resumed = train(tmp_path / "resumed", 2, "--steps", "12", "--ckpt_path", str(midway))
    assert_ranks_identical(resumed)
    for name, value in straight[0].items():
        assert torch.allclose(value.float(), resumed[0][name].float(), atol=1e-6), name

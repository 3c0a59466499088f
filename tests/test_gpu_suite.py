"""benchmarks/gpu_suite.sh --dry-run: the GPU suite's commands run on CPU at tiny shapes.

A lent GPU machine has no time for a suite that stops at a wrong flag. CI runs one of the
suite's step benchmarks (bf16 autocast, the Matryoshka variant: BatchTopK selection, sparse
encoder backward, prefix decode) for one step through the suite's own command line; the peers
(sparsify, SAELens) run only where their interpreters are given.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_gpu_suite_dry_run_runs_a_step_benchmark_on_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    env["ONLY"], env["DRY_ONLY"] = "^train_step_bf16$", "matryoshka"  # seconds, not minutes
    env.pop("SPARSIFY_PYTHON", None)
    env.pop("SAELENS_PYTHON", None)
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--dry-run"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "machine.txt", "train_step_bf16.txt",
    ]  # fmt: skip
    text = (tmp_path / "train_step_bf16.txt").read_text()
    assert text.rstrip().endswith("exit 0"), text
    assert "bf16 autocast" in text and "x GEMM" in text and "\nmatryoshka (auto)" in text, text

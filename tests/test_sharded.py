"""Latent sharding end to end: 2 and 4 CPU processes (gloo) against one process.

One launch per world size (tests/sharded_run.py) trains every variant (SAEs, transcoders,
skip transcoders and crosscoders, on toy rows served as their hooks) on every mesh of that
size (1x2 and 2x1 on two processes, 2x2 on four), with every training-dynamics callback, and
resumes from a mid-run sharded checkpoint on the same mesh and on another; the one-process
reference runs in this process. Sharded weights (reassembled from the members' slices) and
every logged metric equal the reference's within float tolerance, resumed runs equal straight
ones, the export of a sharded checkpoint equals the one-process export, and on every member the
TopK family's sparse encoder backward equals dense autograd at the last step.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from lightning import LightningDataModule
from safetensors.torch import load_file

from lightning_sae.callbacks.init import METHODS, DataInformedInit
from lightning_sae.io import WEIGHTS_FILENAME, export_checkpoint
from lightning_sae.models.base import SparseAutoencoder
from lightning_sae.models.clt import BatchTopKCrossLayerTranscoder
from lightning_sae.models.topk import TopKSAE
from lightning_sae.models.transcoder import BatchTopKCrossCoder, TopKSkipTranscoder
from lightning_sae.parallel import LatentParallelStrategy, consolidate_checkpoint
from lightning_sae.parallel.layers import check_shardable, sharded_class
from lightning_sae.parallel.sharded import LatentShard, ShardSpec
from lightning_sae.trainer_cli import SAECLI, _latent_parallel_strategy

sys.path.insert(0, str(Path(__file__).parent))
import sharded_run  # noqa: E402

SCRIPT = Path(__file__).with_name("sharded_run.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
STEPS, EVERY = sharded_run.STEPS, sharded_run.EVERY

M = "lightning_sae.models."
# callbacks: every training-dynamics callback (else the decoder-norm constraint alone);
# checkpoint: sharded checkpoints, for the resumes and exports below.
RUNS = {
    # A clip far below the gradient's norm engages at every step: the members must clip by the
    # whole dictionary's norm, not their slices'.
    "standard": {"model": M + "standard.StandardSAE", "kwargs": {"gradient_clip_norm": 0.01}},
    "tanh": {"model": M + "standard.StandardSAE", "kwargs": {"sparsity_penalty": "tanh"}},
    "topk": {
        "model": M + "topk.TopKSAE",
        "sparse_check": True,
        "kwargs": {"k": 4, "aux_coefficient": 1.0},
        "callbacks": True,
        "figures": True,
        "checkpoint": True,
        "init_check": True,
    },
    # k above a member's 64 / 2 = 32 latents on the 1x2 mesh: each member offers all it has.
    "topk_wide": {
        "model": M + "topk.TopKSAE",
        "sparse_check": True,
        "kwargs": {"k": 40, "auxk_normalization": "residual_variance", "gradient_clip_norm": 0.01},
    },
    "batchtopk": {
        "model": M + "topk.BatchTopKSAE",
        "sparse_check": True,
        "kwargs": {"k": 4},
        "callbacks": True,
        "init": "orthogonal",  # computed member by member (the others: kmeans, svd)
        "checkpoint": True,
    },
    # Groups that straddle the members' slices.
    "matryoshka": {
        "model": M + "matryoshka.MatryoshkaSAE",
        "sparse_check": True,
        "kwargs": {"k": 4, "group_sizes": [8, 12, 20, 24]},
    },
    # The L0-target form is a function of the global batch's L0 over every latent.
    "jumprelu": {
        "model": M + "jumprelu.JumpReLUSAE",
        "kwargs": {"l0_target": 8.0, "preact_coefficient": 1.0},
        "checkpoint": True,
    },
    "gated": {"model": M + "gated.GatedSAE", "kwargs": {}},
    "approx_l0": {
        "model": M + "approx_l0.ApproxL0SAE",
        "kwargs": {
            "min_frequency": 0.05,
            "frequency_window": 4,
            "frequency_floor_coefficient": 1e-3,
            "orthogonality_coefficient": 1.0,
        },
    },
}
TC = M + "transcoder."
PAIRS = {"sites": "pairs", "checkpoint": True}
PAIR_KWARGS = {"d_out": sharded_run.D_OUT, "input_hook": sharded_run.IN,
               "output_hook": sharded_run.OUT, "normalize_activations": True}  # fmt: skip
RUNS |= {
    # W_skip and both sites' scales replicated, AuxK scored on the output site, every callback.
    "topk_skip_transcoder": {
        "model": TC + "TopKSkipTranscoder",
        "kwargs": {"k": 4, "aux_coefficient": 1.0, **PAIR_KWARGS},
        "sparse_check": True,
        "callbacks": True,
        "init": "svd",
        "init_check": True,
        **PAIRS,
    },
    # BatchTopK's cut over the whole mesh, scored on the output site, with W_skip.
    "batchtopk_skip_transcoder": {
        "model": TC + "BatchTopKSkipTranscoder",
        "kwargs": {"k": 4, "aux_coefficient": 1.0, **PAIR_KWARGS},
        "sparse_check": True,
        "sites": "pairs",
    },
    "jumprelu_transcoder": {
        "model": TC + "JumpReLUTranscoder",
        "kwargs": {"l0_target": 8.0, **PAIR_KWARGS},
        **PAIRS,
    },
    # Per-layer scales and the L1 weighted by the sum of per-layer decoder norms.
    "crosscoder": {
        "model": TC + "CrossCoder",
        "kwargs": {"hooks": sharded_run.LAYERS, "normalize_activations": True},
        "sites": "layers",
    },
    "batchtopk_crosscoder": {
        "model": TC + "BatchTopKCrossCoder",
        "kwargs": {"k": 4, "hooks": sharded_run.LAYERS, "normalize_activations": True},
        "sparse_check": True,
        "sites": "layers",
        "checkpoint": True,
    },
}
CLT = M + "clt."
CLT_KWARGS = {"d_out": sharded_run.D_OUT, "input_hooks": sharded_run.CLT_IN,
              "output_hooks": sharded_run.CLT_OUT, "normalize_activations": True}  # fmt: skip
# Every callback, which address a CLT's features by global index layer * d_sae + f while a
# member holds a slice of each layer; the data-informed init per run. Silenced: features of both
# layers on both members (d_sae 64 per layer, 2 layers).
CLT_CALLBACKS = {"callbacks": True, "init": None, "silence": [1, 40, 69, 127]}
RUNS |= {
    # The tanh sparsity and the pre-activation loss: each member's share of the features.
    "jumprelu_clt": {
        "model": CLT + "JumpReLUCrossLayerTranscoder",
        "kwargs": {"sparsity_coefficient": 1e-2, "preact_coefficient": 1e-2, **CLT_KWARGS},
        "sites": "clt",
        "checkpoint": True,
        **CLT_CALLBACKS,
        "init": "kmeans",  # each member its features of every layer (callbacks/init.py)
        "figures": True,
    },
    # Per (row, layer) selection; over all layers, k above a member's 32 features per layer.
    "topk_clt": {
        "model": CLT + "TopKCrossLayerTranscoder",
        "kwargs": {"k": 4, "gradient_clip_norm": 1e-2, **CLT_KWARGS},  # norm over all slices
        "sites": "clt",
        "checkpoint": True,
        **CLT_CALLBACKS,
    },
    "topk_all_clt": {
        "model": CLT + "TopKCrossLayerTranscoder",
        "kwargs": {"k": 40, "topk_scope": "all", **CLT_KWARGS},
        "sites": "clt",
        "figures": True,
        **CLT_CALLBACKS,
        "init": "outliers",
    },
    # The global batch's cut-off per layer over the whole mesh; its inference threshold
    # resumed and exported.
    "batchtopk_clt": {
        "model": CLT + "BatchTopKCrossLayerTranscoder",
        "kwargs": {"k": 4, **CLT_KWARGS},
        "sites": "clt",
        "checkpoint": True,
        **CLT_CALLBACKS,
    },
    "batchtopk_all_clt": {
        "model": CLT + "BatchTopKCrossLayerTranscoder",
        "kwargs": {"k": 6, "topk_scope": "all", **CLT_KWARGS},
        "sites": "clt",
    },
}
# On four processes (slow on a 2-core CI machine) the variants whose collectives span both mesh
# dimensions: global selection over the whole mesh, per-row selection and AuxK with callbacks,
# a target on the global L0, the frequency window and the orthogonality term, straddled groups.
FOUR = ["topk", "batchtopk", "jumprelu", "approx_l0", "matryoshka"]
WALL_CLOCK = {"train/tokens_per_sec"}


def launch(out: Path, devices: int, meshes: list[int], names: list[str], resumes: list) -> None:
    command = [
        sys.executable, str(SCRIPT), "--out", str(out), "--devices", str(devices),
        "--latent_parallel", *map(str, meshes),
        "--runs", json.dumps({name: RUNS[name] for name in names}),
        "--resumes", json.dumps(resumes),
    ]  # fmt: skip
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-6000:]


def sharded_dims(run: dict) -> dict[str, ShardSpec]:
    """The run's per-latent tensors, as its sharded layer slices them."""
    module, _, cls = run["model"].rpartition(".")
    model_cls = getattr(__import__(module, fromlist=[cls]), cls)
    model = model_cls(d_in=sharded_run.D_IN, d_sae=sharded_run.D_SAE, **run["kwargs"])
    return sharded_class(model_cls).sharded_dims(model)


def joined(parts: list[torch.Tensor], spec: ShardSpec) -> torch.Tensor:
    dim, view = spec
    if view is None:
        return torch.cat(parts, dim=dim)
    return torch.cat([part.view(view) for part in parts], dim=dim).reshape(-1)


def reassembled(folder: Path, devices: int, run: dict) -> dict[str, torch.Tensor]:
    """The whole dictionary from the members' slices; every data-parallel replica of a slice
    must be identical."""
    dims = sharded_dims(run)
    saved = [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(devices)]
    by_member: dict[int, dict[str, torch.Tensor]] = {}
    for rank in saved:
        first = by_member.setdefault(rank["latent_rank"], rank["state"])
        for name, value in rank["state"].items():
            assert torch.equal(value, first[name]), f"{folder}: {name} differs between replicas"
    members = [by_member[t] for t in sorted(by_member)]
    return {
        name: joined([m[name] for m in members], dims[name]) if name in dims else value
        for name, value in members[0].items()
    }


def logged(folder: Path) -> dict[tuple[str, int], float]:
    values = {}
    with open(folder / "csv" / "version_0" / "metrics.csv") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key not in ("epoch", "step") and value:
                    values[key, int(row["step"])] = float(value)
    return values


def assert_same_run(sharded: Path, single: Path, devices: int, run: dict, label: str) -> None:
    reference = torch.load(single / "rank0.pt", weights_only=True)["state"]
    state = reassembled(sharded, devices, run)
    assert set(state) == set(reference), label
    for name, value in reference.items():
        torch.testing.assert_close(state[name], value, atol=1e-5, rtol=1e-4, msg=f"{label} {name}")
    ours, theirs = logged(sharded), logged(single)
    assert set(ours) == set(theirs), f"{label}: {set(ours) ^ set(theirs)}"
    for key, value in theirs.items():
        if key[0] not in WALL_CLOCK:
            assert ours[key] == pytest.approx(value, rel=1e-4, abs=1e-5), f"{label} {key}"


def assert_init_slices_are_the_whole(folder: Path, devices: int, run: dict, label: str) -> None:
    """Every data-informed init method's weights, computed member by member on its latents
    only (tests/sharded_run.py, InitSlices), joined: the one-process weights from the same
    sample."""
    ranks = [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(devices)]
    first = ranks[0]["init_slices"]
    members = {rank["latent_rank"]: rank["init_slices"] for rank in ranks}
    members = [members[t] for t in sorted(members)]
    module, _, cls = run["model"].rpartition(".")
    model = getattr(__import__(module, fromlist=[cls]), cls)(
        d_in=sharded_run.D_IN, d_sae=sharded_run.D_SAE, **run["kwargs"]
    )
    for method in METHODS:
        init = DataInformedInit(method=method, n_samples=2 * sharded_run.D_SAE, rare_fraction=0.1)
        whole = init.initial_weights(first["x_n"], model, first["y_n"])
        for rank in ranks:  # every rank drew the same sample and took rank 0's b_dec
            torch.testing.assert_close(rank["init_slices"]["x_n"], first["x_n"], rtol=0, atol=0)
            torch.testing.assert_close(rank["init_slices"][method]["b_dec"], whole["b_dec"])
        for key, dim in (("W_dec", 0), ("W_enc", 1)):
            joined = torch.cat([m[method][key] for m in members], dim=dim)
            torch.testing.assert_close(
                joined, whole[key], atol=1e-5, rtol=1e-4, msg=f"{label} {method} {key}"
            )


def assert_sparse_backward_exact(folder: Path, devices: int, label: str) -> None:
    """Each rank's last-step comparison (tests/sharded_run.py, SparseBackwardCheck): the same
    reconstruction bit for bit, every gradient within float tolerance of dense autograd."""
    for rank in range(devices):
        report = torch.load(folder / f"rank{rank}.pt", weights_only=True)["sparse_check"]
        assert report and report.pop("equal_x_hat"), f"{label} rank {rank}: {report}"
        dead = report.pop("dead")
        assert {"W_enc", "b_enc", "W_dec", "b_dec"} <= set(report), f"{label}: {report}"
        assert max(report.values()) < 1e-5, f"{label} rank {rank} ({dead} dead): {report}"


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-process reference of every run, trained in this process."""
    out = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for name, run in RUNS.items():
        sharded_run.fit(run, out / name, 1, None, STEPS, EVERY)
    torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize(
    ("devices", "meshes", "names", "resumes"),
    # resumes: [source latent_parallel, target latent_parallel, run]; 2 -> 1 and 2 -> 4 resume
    # into another mesh shape.
    [
        (
            2,
            [2, 1],
            list(RUNS),
            [
                [2, 2, "topk"],
                [2, 1, "batchtopk"],
                [2, 1, "topk_skip_transcoder"],
                [2, 1, "jumprelu_clt"],
                [2, 2, "topk_clt"],
                [2, 1, "batchtopk_clt"],
            ],
        ),
        (4, [2], FOUR, [[2, 4, "topk"]]),
    ],
    ids=["1x2+2x1", "2x2"],
)
def test_sharded_fits_resumes_and_exports_equal_one_process(
    tmp_path: Path, single: Path, devices: int, meshes: list[int], names: list[str], resumes: list
) -> None:
    launch(tmp_path, devices, meshes, names, resumes)
    for lp in meshes:
        for name in names:
            label = f"{devices // lp}x{lp} {name}"
            folder = tmp_path / f"lp{lp}" / name
            assert_same_run(folder, single / name, devices, RUNS[name], label)
    for lp in meshes:  # the sparse encoder backward equals dense autograd on every member
        for name in (name for name in names if RUNS[name].get("sparse_check")):
            assert_sparse_backward_exact(tmp_path / f"lp{lp}" / name, devices, f"{lp} {name}")
    for lp in meshes:  # data-informed init computed by slices equals the whole, sliced
        for name in (name for name in names if RUNS[name].get("init_check")):
            folder = tmp_path / f"lp{lp}" / name
            assert_init_slices_are_the_whole(folder, devices, RUNS[name], f"{lp} {name}")
    acted = ("topk", "batchtopk", "jumprelu_clt", "topk_clt", "topk_all_clt", "batchtopk_clt")
    for name in (name for name in acted if name in names):  # every callback acted
        logs = logged(tmp_path / f"lp{meshes[0]}" / name)
        assert logs["resampling/n_resampled", STEPS // 2] >= 4  # the silenced features at least
        assert ("geometry/mmcs", STEPS) in logs and ("density/dead_fraction", STEPS) in logs
    for lp in meshes:  # each feature's density, by global index, is the one-process one
        clts = [name for name in names if RUNS[name].get("sites") == "clt"]
        for name in (name for name in clts if RUNS[name].get("callbacks")):
            density = torch.load(single / name / "rank0.pt", weights_only=True)["density"]
            for rank in range(devices):
                saved = tmp_path / f"lp{lp}" / name / f"rank{rank}.pt"
                saved = torch.load(saved, weights_only=True)["density"]
                torch.testing.assert_close(saved, density, msg=f"{lp} {name} rank {rank}")
    for lp in meshes:  # the density figure's validation counts are the one-process ones
        for name in (name for name in names if RUNS[name].get("figures")):
            counts = torch.load(single / name / "rank0.pt", weights_only=True)["val_counts"]
            saved = tmp_path / f"lp{lp}" / name / "rank0.pt"
            saved = torch.load(saved, weights_only=True)["val_counts"]
            assert set(saved) == set(counts) == {""}, f"{lp} {name}: {set(saved)}"
            assert torch.equal(saved[""][0], counts[""][0]), f"{lp} {name}"
            assert saved[""][1] == counts[""][1], f"{lp} {name}"

    for source, target, name in resumes:
        resumed = tmp_path / f"lp{target}" / f"{name}-resumed-from-lp{source}"
        resumed = reassembled(resumed, devices, RUNS[name])
        straight = reassembled(tmp_path / f"lp{source}" / name, devices, RUNS[name])
        for key, value in straight.items():
            torch.testing.assert_close(resumed[key], value, atol=1e-6, rtol=1e-5, msg=key)

    # The consolidated export of the last sharded checkpoint is the one-process export.
    exported = ("topk", "jumprelu", "topk_skip_transcoder", "jumprelu_transcoder",
                "batchtopk_crosscoder", "jumprelu_clt", "topk_clt", "batchtopk_clt")  # fmt: skip
    for name in (name for name in exported if name in names):
        cls = RUNS[name]["model"]
        ckpt = tmp_path / f"lp{meshes[0]}" / name / "ckpt" / "last.ckpt"
        ours = export_checkpoint(ckpt, tmp_path / f"export-{name}", class_path=cls)
        theirs = single / name / "ckpt" / "last.ckpt"
        theirs = export_checkpoint(theirs, tmp_path / f"reference-{name}", class_path=cls)
        ours, theirs = (load_file(folder / WEIGHTS_FILENAME) for folder in (ours, theirs))
        assert set(ours) == set(theirs)
        for key, value in theirs.items():
            torch.testing.assert_close(ours[key], value, atol=1e-5, rtol=1e-4, msg=key)
    # A CLT's layer-major dead clock, saved through a [n_layers, d_sae] view, comes back flat
    # in the one-process order.
    clts = ("jumprelu_clt", "topk_clt", "batchtopk_clt")
    for name in (name for name in clts if name in names):
        ours = consolidate_checkpoint(tmp_path / f"lp{meshes[0]}" / name / "ckpt" / "last.ckpt")
        theirs = torch.load(single / name / "ckpt" / "last.ckpt", weights_only=True)
        clocks = (c["state_dict"]["tokens_since_fired"] for c in (ours, theirs))
        assert torch.equal(*clocks), name
    # ... and the whole Adam state comes back, by parameter index as torch lays it out.
    full = consolidate_checkpoint(tmp_path / f"lp{meshes[0]}" / "topk" / "ckpt" / "last.ckpt")
    order = [name for name, _ in TopKSAE(d_in=16, d_sae=64).named_parameters()]
    for index, name in enumerate(order):
        moments = full["optimizer_states"][0]["state"][index]
        assert moments["exp_avg_sq"].shape == full["state_dict"][name].shape, name


def test_bad_meshes_and_sizes_name_the_option() -> None:
    sae = TopKSAE(d_in=16, d_sae=60, k=4)
    with pytest.raises(ValueError, match=r"d_sae=60 is not divisible by latent_parallel=8.*"
                       r"model.init_args.d_sae"):  # fmt: skip
        check_shardable(sae, 8)
    # Transcoders and crosscoders alike; more latent shards than latents is the same refusal.
    transcoder = TopKSkipTranscoder(d_in=16, d_out=12, d_sae=60, k=4)
    with pytest.raises(ValueError, match=r"d_sae=60 is not divisible by latent_parallel=8"):
        check_shardable(transcoder, 8)
    crosscoder = BatchTopKCrossCoder(d_in=16, d_sae=4, k=2, hooks=sharded_run.LAYERS)
    with pytest.raises(ValueError, match=r"d_sae=4 is not divisible by latent_parallel=8.*"
                       r"model.init_args.d_sae to a multiple of 8") as refused:  # fmt: skip
        check_shardable(crosscoder, 8)
    assert "\n" not in str(refused.value)
    # A cross-layer transcoder's d_sae (features per layer) likewise.
    batchtopk_clt = BatchTopKCrossLayerTranscoder(d_in=16, d_sae=6, n_layers=2, k=2)
    with pytest.raises(ValueError, match=r"^d_sae=6 is not divisible by latent_parallel=4"):
        check_shardable(batchtopk_clt, 4)
    # The command line refuses it once, before any process is launched.
    with pytest.raises(SystemExit, match=r"^error: d_sae=4 is not divisible"):
        _latent_parallel_strategy({}, 8, crosscoder)
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match="trainer.latent_parallel"):
            LatentParallelStrategy(latent_parallel=bad)
    # Clipping by norm would clip each member by its own slice's norm.
    clipping = SimpleNamespace(gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    with pytest.raises(ValueError, match="trainer.gradient_clip_algorithm: value"):
        LatentParallelStrategy(latent_parallel=2).setup(clipping)
    # Three devices cannot form a mesh with a latent group of two: refused before any launch.
    with pytest.raises(ValueError, match=r"latent_parallel=2 does not divide the 3 devices"):
        L.Trainer(accelerator="cpu", devices=3, strategy=LatentParallelStrategy(latent_parallel=2))


def test_yaml_latent_parallel_option_parses(capsys: pytest.CaptureFixture[str]) -> None:
    """``trainer.latent_parallel`` beside ``trainer.devices`` in YAML (the example config)."""
    config = Path(__file__).parents[1] / "configs" / "toy" / "topk-sharded.yaml"
    with pytest.raises(SystemExit) as stopped:  # --print_config prints, then exits
        SAECLI(
            SparseAutoencoder, LightningDataModule, subclass_mode_model=True,
            subclass_mode_data=True, args=["fit", "--config", str(config), "--print_config"],
        )  # fmt: skip
    assert stopped.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert (printed["devices"], printed["latent_parallel"]) == (4, 2)


def test_a_clt_members_features_map_to_their_global_indices() -> None:
    """Member t of 2 holds latents [32t, 32t + 32) of each of 3 layers, layer-major: its local
    index l * 32 + j is global index l * 64 + 32t + j. The maps agree with each other, and
    every member's slice joined in member order comes back in global order."""
    shards = [LatentShard(64, t, 2, 1, None, None, None, layers=3) for t in range(2)]
    everything = torch.arange(3 * 64)
    for shard in shards:
        mine = shard.global_indices()
        assert mine[:3].tolist() == [32 * shard.latent_rank + j for j in range(3)]
        assert mine[32] == 64 + 32 * shard.latent_rank  # layer 1's first
        assert torch.equal(everything[shard.holds(everything)], mine)
        assert torch.equal(shard.local_indices(mine), torch.arange(3 * 32))
        assert torch.equal(shard.local_indices(mine.flip(0)), torch.arange(3 * 32).flip(0))
    by_member = torch.cat([shard.global_indices() for shard in shards])
    assert torch.equal(shards[0].in_global_order(by_member), everything)
    assert torch.equal(shards[0].in_global_order(by_member[:, None]), everything[:, None])

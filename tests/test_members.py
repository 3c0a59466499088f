"""Member-parallel groups: each member on its ranks, trained on the whole global batch.

Two launches (tests/members_run.py: 4, then 2 gloo processes) fit a group of three SAEs of
different widths on two hooks and a cross-layer transcoder with every training-dynamics callback
and save checkpoints. On four, member l1 is split over ranks 0-1 and the transcoder over ranks
2-3 (latent sharding over a block) and the others are held whole; the four resume from their own
middle checkpoint, the two from the four's. The one-process reference runs in this process.
Each member's weights (its slices joined) and every logged metric equal the one-process
group's, each resumed run equals its straight one, and the export of the member-parallel
checkpoint equals the one-process export, folder by folder.
"""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning import LightningDataModule, LightningModule
from safetensors.torch import load_file

from lightning_sae.io import WEIGHTS_FILENAME, export_checkpoint
from lightning_sae.models.group import SAEGroup
from lightning_sae.models.topk import TopKSAE
from lightning_sae.parallel.layers import LAYERS
from lightning_sae.parallel.members import (
    MemberParallelStrategy,
    merge_by_owner,
    place_members,
    shard_counts,
)
from lightning_sae.trainer_cli import SAECLI, _check_sharded_resume, _member_parallel_strategy

sys.path.insert(0, str(Path(__file__).parent))
import members_run  # noqa: E402

SCRIPT = Path(__file__).with_name("members_run.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
NAMES = [member["name"] for member in members_run.MEMBERS]
WALL_CLOCK = {"train/tokens_per_sec"}
# member -> its per-latent tensors and the dim (and view) its slices join along.
SPLIT_DIMS = {
    name: LAYERS[type(sae)].sharded_dims(sae)
    for name, sae in SAEGroup(members_run.MEMBERS).members.items()
}


def logged(folder: Path) -> dict[tuple[str, int], float]:
    values = {}
    with open(folder / "csv" / "version_0" / "metrics.csv") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key not in ("epoch", "step") and value:
                    values[key, int(row["step"])] = float(value)
    return values


def members_of(folder: Path, devices: int) -> dict[str, dict[str, torch.Tensor]]:
    """Every member's state from the ranks that hold it: one rank, or the consecutive ranks of a
    split member, whose per-latent slices are joined in rank order (the replicated tensors
    equal on all of them)."""
    held: dict[str, list[dict[str, torch.Tensor]]] = {}
    for rank in range(devices):
        for name, state in torch.load(folder / f"rank{rank}.pt", weights_only=True).items():
            held.setdefault(name, []).append(state)
    assert sorted(held) == sorted(NAMES), f"{folder}: {sorted(held)}"
    found = {}
    for name, slices in held.items():
        found[name] = {}
        for key, value in slices[0].items():
            if len(slices) > 1 and key in SPLIT_DIMS[name]:
                dim, view = SPLIT_DIMS[name][key]  # a view: a CLT's flat layer-major clock
                parts = [s[key] if view is None else s[key].view(view) for s in slices]
                value = torch.cat(parts, dim=dim)
                value = value if view is None else value.reshape(-1)
            else:
                for other in slices[1:]:
                    assert torch.equal(other[key], value), f"{folder}: {name}.{key} differs"
            found[name][key] = value
    return found


def assert_same_run(ours: Path, reference: Path, devices: int, label: str) -> None:
    theirs = members_of(reference, 1)
    for name, state in members_of(ours, devices).items():
        for key, value in theirs[name].items():
            torch.testing.assert_close(
                state[key], value, atol=1e-5, rtol=1e-4, msg=f"{label} {name}.{key}"
            )
    ours_logged, theirs_logged = logged(ours), logged(reference)
    assert set(ours_logged) == set(theirs_logged), set(ours_logged) ^ set(theirs_logged)
    for key, value in theirs_logged.items():
        if key[0] not in WALL_CLOCK:
            assert ours_logged[key] == pytest.approx(value, rel=1e-4, abs=1e-5), f"{label} {key}"


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-process group, trained in this process."""
    out = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    members_run.fit(out, None)
    torch.set_num_threads(threads)
    return out


def launch(out: Path, devices: int, *extra: str) -> None:
    command = [sys.executable, str(SCRIPT), "--out", str(out), "--devices", str(devices), *extra]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]


def holders(folder: Path, devices: int) -> dict[str, list[int]]:
    """member -> the ranks that held it at the end of the fit."""
    found: dict[str, list[int]] = {}
    for rank in range(devices):
        for name in torch.load(folder / f"rank{rank}.pt", weights_only=True):
            found.setdefault(name, []).append(rank)
    return found


def test_member_parallel_equals_one_process_resumes_on_other_ranks_and_exports(
    tmp_path: Path, single: Path
) -> None:
    # Four ranks: l1 split over ranks 0-1 and the cross-layer transcoder clt over ranks 2-3
    # (latent sharding over a block), k4 and btk whole on ranks 2 and 3; it also resumes from
    # its own middle checkpoint. Then two ranks (more members than ranks, all whole), which
    # resume from the four ranks' middle checkpoint: every member on another rank, the split
    # members' slices joined.
    four, two = tmp_path / "4", tmp_path / "2"
    middle = four / "straight" / "ckpt" / f"step={members_run.EVERY}.ckpt"
    launch(four, 4, "--shard", "l1=2", "--shard", "clt=2", "--resume_from", str(middle))
    launch(two, 2, "--resume_from", str(middle))
    assert holders(four / "straight", 4) == {"l1": [0, 1], "clt": [2, 3], "k4": [2], "btk": [3]}
    for folder, devices in ((four, 4), (two, 2)):
        assert_same_run(folder / "straight", single, devices, f"{devices} ranks")
        logs = logged(folder / "straight")
        for name in NAMES:  # every callback acted on every member
            assert logs[f"{name}/resampling/n_resampled", members_run.STEPS // 2] >= 3
            assert (f"{name}/geometry/mmcs", members_run.STEPS) in logs
            assert (f"{name}/density/dead_fraction", members_run.STEPS) in logs
        straight = members_of(folder / "straight", devices)
        for name, state in members_of(folder / "resumed", devices).items():
            for key, value in straight[name].items():
                torch.testing.assert_close(value, state[key], atol=1e-6, rtol=1e-5, msg=key)

    # A run without member placement is told how to resume the folder.
    with pytest.raises(SystemExit, match=r"member-parallel checkpoint.*member_parallel: true"):
        _check_sharded_resume(str(four / "straight" / "ckpt" / "last.ckpt"), {})

    # The export of the member-parallel checkpoint (l1 saved as two slices): one folder per
    # member, as one process's.
    ours = export_checkpoint(four / "straight" / "ckpt" / "last.ckpt", tmp_path / "export")
    theirs = export_checkpoint(single / "ckpt" / "last.ckpt", tmp_path / "reference")
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
    for folder in theirs.iterdir():
        expected = load_file(folder / WEIGHTS_FILENAME)
        got = load_file(ours / folder.name / WEIGHTS_FILENAME)
        assert set(got) == set(expected), folder.name
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, atol=1e-5, rtol=1e-4, msg=key)


def test_placement_balances_any_widths_and_counts() -> None:
    # More members than ranks, unequal: the largest first, each on the least-loaded rank.
    costs = {"a": 8, "b": 5, "c": 4, "d": 3, "e": 1}
    assert place_members(costs, 2) == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 1}
    assert place_members({"a": 1}, 3) == {"a": 0}  # fewer members than ranks
    with pytest.raises(ValueError, match=r"member 'a' needs .*member_memory_gib"):
        place_members(costs, 2, budget_bytes=7)
    with pytest.raises(ValueError, match=r"does not fit: rank 0 .* add devices"):
        place_members(costs, 2, budget_bytes=10)


def test_split_members_take_blocks_of_their_own_and_the_rest_balance() -> None:
    costs = {"big": 100, "a": 40, "b": 30, "c": 10}
    # big split over ranks 0-1 (50 each); the whole members on the least-loaded ranks after.
    assert place_members(costs, 4, shards={"big": 2}) == {"big": 0, "a": 2, "b": 3, "c": 3}
    # Two split members: the larger first, from rank 0; a whole member may join a block's rank.
    placed = place_members({**costs, "mid": 60}, 5, shards={"big": 2, "mid": 3})
    assert placed == {"big": 0, "mid": 2, "a": 2, "b": 3, "c": 4}
    with pytest.raises(ValueError, match=r"split members \(big: 2, mid: 3\) need 5 devices"):
        place_members({**costs, "mid": 60}, 4, shards={"big": 2, "mid": 3})


def test_a_member_over_the_budget_is_split_over_the_fewest_ranks_that_fit_it() -> None:
    # l1: 149,760 bytes (d_sae 96), clt 83,712, k4 67,072, btk 33,792
    members = dict(SAEGroup(members_run.MEMBERS).members.items())
    assert shard_counts(members, 4, 100_000) == {"k4": 1, "l1": 2, "btk": 1, "clt": 1}
    # clt over 40,000: two slices are 41,856, three do not divide d_sae 64: four.
    assert shard_counts(members, 4, 40_000) == {"k4": 2, "l1": 4, "btk": 1, "clt": 4}
    assert shard_counts(members, 4, None, {"l1": 3}) == {"k4": 1, "l1": 3, "btk": 1, "clt": 1}


def test_what_cannot_be_split_is_refused_in_one_line_before_launch() -> None:
    group = SAEGroup(members_run.MEMBERS)
    for config, message in (
        ({"devices": 8, "member_shards": {"l1": 5}}, r"member 'l1' cannot be split over 5 "
         r"devices \(trainer.member_shards\): d_sae=96 does not divide into 5"),
        ({"devices": 2, "member_shards": {"l1": 4}}, r"trainer.member_shards\['l1'\] is 4: it "
         r"must be a whole number of devices from 1 to the 2"),
        ({"devices": 4, "member_shards": {"l2": 2}}, r"trainer.member_shards names \['l2'\], "
         r"not members"),
        # 149,760 bytes split over both devices is 74,880 per device, over a 50,000 budget.
        ({"devices": 2, "member_memory_gib": 50_000 / 2**30}, r"member 'l1' needs .* even "
         r"split over the 2 devices .*: add devices, raise trainer.member_memory_gib"),
        ({"devices": 4, "member_shards": {"l1": 2, "k4": 2, "btk": 2}}, r"the split members "
         r"\(l1: 2, k4: 2, btk: 2\) need 6 devices of their own, more than the 4"),
    ):  # fmt: skip
        with pytest.raises(SystemExit, match="^error: " + message) as refused:
            _member_parallel_strategy(config, 1, group)
        assert "\n" not in str(refused.value)


def test_checkpoint_entries_merge_each_member_from_its_rank() -> None:
    owner = {"a": 0, "b": 1}
    # hyper_parameters' members (a list of specs) are the same on every rank; a rank without
    # members has no LR schedule.
    hparams = {"members": [{"name": "a"}, {"name": "b"}]}
    ranks = [
        {"loops": 3, "cb": {"members": {"a": 1, "b": "stale"}}, "lr": [{"members": {"a": 1}}]},
        {"loops": 3, "cb": {"members": {"b": 2}}, "lr": [{"members": {"b": 2}}]},
        {"loops": 3, "cb": {"members": {}}, "lr": []},
    ]
    for rank in ranks:
        rank["hyper_parameters"] = hparams
    merged = merge_by_owner(ranks, owner)
    assert merged == {
        "hyper_parameters": hparams,
        "loops": 3,
        "cb": {"members": {"a": 1, "b": 2}},
        "lr": [{"members": {"a": 1, "b": 2}}],
    }


def test_what_cannot_be_placed_is_refused_in_one_line_before_launch() -> None:
    group = SAEGroup(members_run.MEMBERS)
    # The members hold 149,760 (l1), 83,712 (clt), 67,072 and 33,792 bytes of weights,
    # gradients and Adam state: a budget below the largest on one device (nothing to split it
    # over), then one that fits it but not the group on one rank.
    for devices, gib, message in (
        (1, 1e-4, r"^error: member 'l1' needs .*trainer.member_memory_gib\) even split"),
        (1, 2e-4, r"^error: the group does not fit: rank 0 .* add devices"),
    ):
        config = {"devices": devices, "member_memory_gib": gib}
        with pytest.raises(SystemExit, match=message) as refused:
            _member_parallel_strategy(config, 1, group)
        assert "\n" not in str(refused.value)
    with pytest.raises(SystemExit, match=r"^error: member_parallel places the members of an "
                       r"SAEGroup.*the model is a TopKSAE"):  # fmt: skip
        _member_parallel_strategy({"devices": 2}, 1, TopKSAE(d_in=16, d_sae=32, k=4))
    with pytest.raises(SystemExit, match=r"^error: trainer.latent_parallel does not apply to "
                       r"member_parallel: split a member .* trainer.member_shards"):  # fmt: skip
        _member_parallel_strategy({"devices": 4}, 2, group)
    with pytest.raises(SystemExit, match=r"remove trainer.strategy \(ddp\)"):
        _member_parallel_strategy({"strategy": "ddp"}, 1, group)
    with pytest.raises(ValueError, match="trainer.member_memory_gib"):
        MemberParallelStrategy(member_memory_gib=0)


def test_example_config_turns_member_placement_on(capsys: pytest.CaptureFixture[str]) -> None:
    config = Path(__file__).parents[1] / "configs" / "minilm" / "all-layers-member-parallel.yaml"
    with pytest.raises(SystemExit) as stopped:  # --print_config prints, then exits
        SAECLI(
            LightningModule, LightningDataModule, subclass_mode_model=True,
            subclass_mode_data=True, args=["fit", "--config", str(config),
            "--trainer.member_shards", "{L5: 2}", "--print_config"],
        )  # fmt: skip
    assert stopped.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["trainer"]["devices"], printed["trainer"]["member_parallel"]) == (2, True)
    assert printed["trainer"]["member_shards"] == {"L5": 2}
    members = printed["model"]["init_args"]["members"]
    assert [m["hook"] for m in members] == printed["data"]["init_args"]["hooks"]

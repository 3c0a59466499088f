"""Training-dynamics callbacks: density, resampling, data-informed init, geometry; resume.

Under DDP they are checked with every other callback in tests/test_ddp.py."""

import csv
import itertools
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from _trainer import quiet_trainer
from lightning import Callback, LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_sae.callbacks._reporting import log_histogram
from lightning_sae.callbacks.decoder_norm import DecoderNormConstraint
from lightning_sae.callbacks.density import FeatureDensityMonitor
from lightning_sae.callbacks.figures import TrainingFigures
from lightning_sae.callbacks.geometry import FeatureGeometryMonitor
from lightning_sae.callbacks.init import (
    METHODS,
    DataInformedInit,
    geometric_median,
    outlier_directions,
    sample_directions,
)
from lightning_sae.callbacks.resampling import (
    DeadFeatureResampler,
    pick_clustered,
    pick_worst,
)
from lightning_sae.data.toy import ToySuperpositionDataModule
from lightning_sae.metrics.similarity import (
    mean_max_cosine_similarity,
    random_directions_mmcs,
    self_max_cosine_similarity,
)
from lightning_sae.models import approx_l0, base, topk
from lightning_sae.models.approx_l0 import ApproxL0SAE
from lightning_sae.models.gated import GatedSAE
from lightning_sae.models.jumprelu import JumpReLUSAE
from lightning_sae.models.matryoshka import MatryoshkaSAE
from lightning_sae.models.standard import StandardSAE
from lightning_sae.models.topk import BatchTopKSAE, TopKSAE


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    # Every shape here is small: a second thread only adds synchronisation, and on a busy
    # machine two threads per process slow these runs down several times over.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def toy(**kwargs: Any) -> ToySuperpositionDataModule:
    defaults = {"n_features": 64, "d_in": 32, "batch_size": 128, "batches_per_epoch": 1000}
    return ToySuperpositionDataModule(**{**defaults, **kwargs})


def fit(
    model: StandardSAE,
    data: LightningDataModule,
    callbacks: list[Callback],
    steps: int,
    root: Path | None = None,
    loggers: Any = False,
    ckpt_path: str | None = None,
    **trainer_options: Any,
) -> Trainer:
    trainer = quiet_trainer(
        steps, callbacks, logger=loggers, default_root_dir=root, **trainer_options
    )
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer


def csv_values(log_dir: Path) -> dict[tuple[str, int], float]:
    values = {}
    with open(log_dir / "metrics.csv") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key not in ("epoch", "step") and value:
                    values[key, int(row["step"])] = float(value)
    return values


# ----------------------------------------------------------------------------- density
def test_density_counts_the_window_before_each_report(tmp_path: Path) -> None:
    data = toy()
    # A vanishing learning rate freezes the weights, so the counts can be recomputed afterwards.
    model = StandardSAE(d_in=32, d_sae=64, lr=1e-12)
    monitor = FeatureDensityMonitor(every_n_steps=5, window_tokens=3 * 128)
    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    fit(model, data, [monitor], steps=5, root=tmp_path, loggers=loggers)

    batches = torch.cat([data.train_batches.batch(0, i) for i in (2, 3, 4)])  # steps 3, 4, 5
    with torch.no_grad():
        expected = (model.encode(batches) != 0).float().mean(0)
    assert torch.allclose(monitor.last_density, expected)
    assert monitor.last_report_step == 5

    logged_values = csv_values(Path(loggers[0].log_dir))
    dead_fraction = (expected == 0).float().mean().item()
    assert logged_values["density/dead_fraction", 5] == pytest.approx(dead_fraction)
    assert logged_values["density/window_tokens", 5] == 3 * 128
    assert (tmp_path / "figures" / "density" / "step0000005.png").stat().st_size > 0
    events = EventAccumulator(loggers[1].log_dir)
    events.Reload()
    assert "density/log10_density" in events.Tags()["histograms"]


def test_train_dead_fraction_is_logged_only_once_a_dead_window_has_passed(tmp_path: Path) -> None:
    """Before ``dead_window_tokens`` tokens no feature can have gone a window without firing:
    a 0 logged then would be true by construction, not a measurement."""
    model = StandardSAE(d_in=32, d_sae=64, dead_window_tokens=3 * 128)
    logger = CSVLogger(tmp_path, name="csv")
    fit(model, toy(), [], 5, tmp_path, [logger], log_every_n_steps=1)
    values = csv_values(Path(logger.log_dir))
    # Tokens seen after the batch of step s: (s + 1) * 128; the window is full from step 2.
    assert [s for s in range(5) if ("train/dead_fraction", s) in values] == [2, 3, 4]
    assert all(("train/l0", s) in values for s in range(5))


def test_histograms_go_to_wandb_as_wandb_histograms() -> None:
    import wandb

    logger = WandbLogger(offline=True)
    sent = []
    logger.log_metrics = lambda metrics, step=None: sent.append((metrics, step))
    log_histogram(
        SimpleNamespace(loggers=[logger], global_step=7), "geometry/max_cos", torch.rand(9)
    )
    ((metrics, step),) = sent
    assert step == 7 and isinstance(metrics["geometry/max_cos"], wandb.Histogram)


def test_density_resumes_mid_window_exactly(tmp_path: Path) -> None:
    def run(steps: int, ckpt: str | None = None) -> FeatureDensityMonitor:
        monitor = FeatureDensityMonitor(every_n_steps=10, window_tokens=8 * 128, save_png=False)
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)
        fit(
            StandardSAE(d_in=32, d_sae=64, lr=1e-2),
            toy(),
            [monitor, saver],
            steps,
            tmp_path,
            ckpt_path=ckpt,
        )
        return monitor

    straight = run(10)
    resumed = run(10, str(tmp_path / "ckpt" / "epoch=0-step=6.ckpt"))
    assert resumed.last_report_step == 10
    assert torch.equal(straight.last_density, resumed.last_density)


# ----------------------------------------------------------------------------- decoder norms
def test_under_the_norm_constraint_the_weighted_penalty_trains_as_the_plain_one() -> None:
    """Unit rows make the weights 1, and the gradient the weighting adds to W_dec is parallel
    to each row, which the callback projects out: the default (weighted) and the plain L1 give
    the same run to float noise (configs that keep the constraint are unchanged)."""
    runs = []
    for weighted in (True, False):
        model = StandardSAE(d_in=32, d_sae=64, lr=3e-3, weight_by_decoder_norm=weighted)
        fit(model, toy(), [DecoderNormConstraint()], steps=40)
        runs.append(model)
    for name, param in runs[0].named_parameters():
        torch.testing.assert_close(param, dict(runs[1].named_parameters())[name], msg=name)


# ----------------------------------------------------------------------------- resampling
def _dead_prone_run(strategy: str | None, seed: int = 0) -> tuple[float, float]:
    """A toy run set up to kill features: high L1 and learning rate, a short dead window.

    Returns (fraction of features that never fire on fresh data, ground-truth MMCS).
    """
    data = toy(n_features=256, d_in=128, batch_size=256, seed=seed)
    model = StandardSAE(
        d_in=128, d_sae=256, lr=1e-2, l1_coefficient=0.5, dead_window_tokens=2560, init_seed=seed
    )
    callbacks: list[Callback] = []  # decoder rows free, as configs/toy/resampling.yaml trains
    if strategy is not None:
        callbacks.append(
            DeadFeatureResampler(
                every_n_steps=100, last_step=300, strategy=strategy, n_batches=4, batch_size=1024
            )
        )
    fit(model, data, callbacks, steps=400)
    with torch.no_grad():
        fired = (model.encode(data.sample(8192, seed=123)) != 0).sum(0)
    gt_mmcs = mean_max_cosine_similarity(data.ground_truth_features, model.W_dec.detach())
    return (fired == 0).float().mean().item(), gt_mmcs.item()


@pytest.fixture(scope="module")
def without_resampling() -> tuple[float, float]:
    return _dead_prone_run(None)


@pytest.mark.parametrize("strategy", ["worst", "loss_weighted", "cluster"])
def test_resampling_recovers_more_ground_truth(
    strategy: str, without_resampling: tuple[float, float]
) -> None:
    """Every strategy recovers more ground truth. With free decoder rows at seed 0: 0.62 without,
    0.93 with ``cluster``, 0.85 with ``worst`` (0.58, 0.92 and 0.82 with unit rows,
    ``DecoderNormConstraint``). The fraction of features dead at the end stays about where it
    was without resampling, or falls (27% without; 9% and 16%)."""
    dead_before, gt_before = without_resampling
    assert dead_before > 0.05  # the setup really does produce dead features
    dead_after, gt_after = _dead_prone_run(strategy)
    assert gt_after > gt_before + (0.12 if strategy == "cluster" else 0.06)
    assert dead_after < dead_before + 0.06


class _MarkDead(Callback):
    """Make the module report some (firing, hence Adam-active) features as dead."""

    def __init__(self, features: list[int]) -> None:
        self.features = features

    def on_train_batch_end(self, trainer: Trainer, pl_module: StandardSAE, *args: Any) -> None:
        pl_module.tokens_since_fired[self.features] = 10**12


class _Snapshot(Callback):
    """Record the encoder and Adam state just before the resampler runs at the same step."""

    def on_train_batch_end(self, trainer: Trainer, pl_module: StandardSAE, *args: Any) -> None:
        self.W_enc = pl_module.W_enc.detach().clone()
        self.W_dec = pl_module.W_dec.detach().clone()
        state = trainer.optimizers[0].state
        self.moments = {
            (name, key): state[getattr(pl_module, name)][key].clone()
            for name in ("W_dec", "W_enc", "b_enc")
            for key in ("exp_avg", "exp_avg_sq")
        }


def test_resampling_rewrites_rows_restarts_adam_and_the_dead_clock(tmp_path: Path) -> None:
    dead = [3, 10, 40]
    model = StandardSAE(d_in=32, d_sae=64, lr=1e-3)
    with torch.no_grad():  # free rows (the standard SAE's default) that grew to about 2
        model.W_dec.mul_(2.0)
    snapshot = _Snapshot()
    resampler = DeadFeatureResampler(at_steps=[2], strategy="worst", n_batches=2, batch_size=256)
    loggers = CSVLogger(tmp_path, name="csv")
    fit(model, toy(), [_MarkDead(dead), snapshot, resampler], 2, tmp_path, loggers)

    alive = torch.ones(64, dtype=torch.bool)
    alive[dead] = False
    # A restarted latent writes 0.2 of what a live one writes (encoder norm x decoder norm): with
    # its decoder row at unit norm, its encoder takes the live rows' size too.
    written = snapshot.W_enc.norm(dim=0) * snapshot.W_dec.norm(dim=1)
    expected_norm = 0.2 * written[alive].mean()
    assert resampler.total_resampled == 3
    assert torch.allclose(model.W_dec[dead].norm(dim=1), torch.ones(3))
    assert torch.allclose(model.W_enc[:, dead].norm(dim=0), expected_norm.expand(3))
    assert torch.allclose(unit(model.W_enc[:, dead].T), model.W_dec[dead], atol=1e-6)
    assert (model.b_enc[dead] == 0).all()
    assert (model.tokens_since_fired[dead] == 0).all()

    adam = model.trainer.optimizers[0].state
    before = snapshot.moments
    assert (before["W_dec", "exp_avg"][dead] != 0).any()
    assert (before["b_enc", "exp_avg"][dead] != 0).any()
    for name, dim in (("W_dec", 0), ("W_enc", 1), ("b_enc", 0)):
        # first moment zero, second moment the live features' mean, the rest untouched
        first = adam[getattr(model, name)]["exp_avg"].movedim(dim, 0)
        second = adam[getattr(model, name)]["exp_avg_sq"].movedim(dim, 0)
        second_before = before[name, "exp_avg_sq"].movedim(dim, 0)
        assert (first[dead] == 0).all(), name
        live_mean = second_before[alive].mean(0)
        torch.testing.assert_close(second[dead], live_mean.expand_as(second[dead]), msg=name)
        assert torch.equal(first[alive], before[name, "exp_avg"].movedim(dim, 0)[alive])
        assert torch.equal(second[alive], second_before[alive])
    assert csv_values(Path(loggers.log_dir))["resampling/n_resampled", 2] == 3


def test_strategies_pick_as_documented() -> None:
    # 90 inputs miss direction A, 10 miss direction B (and B's are the worst of all).
    A, B = torch.eye(8)[0], torch.eye(8)[1]
    residuals = torch.cat([A.expand(90, 8) * 2.0, B.expand(10, 8) * 2.5])
    residuals = residuals + 0.01 * torch.randn(100, 8)
    losses = residuals.pow(2).sum(1)
    worst = pick_worst(residuals, losses, 2)
    assert (worst @ B > 0.99).all()  # both picks land on the same missing direction
    spread = pick_clustered(residuals, losses, 2, candidate_fraction=1.0, n_clusters=2, seed=0)
    assert sorted((spread @ torch.stack([A, B]).T).argmax(1).tolist()) == [0, 1]


def test_resampling_schedule_and_bad_arguments() -> None:
    periodic = DeadFeatureResampler(every_n_steps=100, last_step=250)
    assert [s for s in range(1, 400) if periodic.is_due(s)] == [100, 200]
    listed = DeadFeatureResampler(at_steps=[5, 50])
    assert [s for s in range(1, 100) if listed.is_due(s)] == [5, 50]
    with pytest.raises(ValueError, match="exactly one of"):
        DeadFeatureResampler()
    with pytest.raises(ValueError, match="strategy must be one of"):
        DeadFeatureResampler(every_n_steps=1, strategy="random")


def test_resampling_resumes_exactly(tmp_path: Path) -> None:
    def run(ckpt: str | None) -> StandardSAE:
        model = StandardSAE(d_in=32, d_sae=64, lr=1e-2, l1_coefficient=2.0, dead_window_tokens=1)
        resampler = DeadFeatureResampler(
            every_n_steps=3, strategy="loss_weighted", n_batches=1, batch_size=256
        )
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)
        fit(model, toy(), [resampler, saver], 12, tmp_path, ckpt_path=ckpt)
        assert resampler.total_resampled > 0
        return model

    straight = run(None)
    resumed = run(str(tmp_path / "ckpt" / "epoch=0-step=6.ckpt"))
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


# ----------------------------------------------------------------------------- init
class ClusteredData(LightningDataModule):
    """Inputs near a few directions (plus, optionally, one rare direction added to 2% of them)."""

    def __init__(self, centres: torch.Tensor, rare: torch.Tensor | None = None) -> None:
        super().__init__()
        self.centres, self.rare, self.d_in = centres, rare, centres.shape[1]

    def sample(self, n: int, seed: int | None = None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed or 0)
        which = torch.randint(len(self.centres), (n,), generator=generator)
        scale = 1 + torch.rand(n, 1, generator=generator)
        x = self.centres[which] * scale + 0.02 * torch.randn(n, self.d_in, generator=generator)
        if self.rare is not None:
            x[: n // 50] += 2 * self.rare
        return x

    def train_dataloader(self) -> list[torch.Tensor]:
        return [self.sample(64, seed=i) for i in range(4)]


def _init_only(
    method: str,
    data: LightningDataModule,
    d_sae: int,
    b_dec: str = "geometric_median",
    **model_kwargs: Any,
) -> StandardSAE:
    model = StandardSAE(d_in=data.d_in, d_sae=d_sae, **model_kwargs)
    init = DataInformedInit(method=method, n_samples=2048, b_dec=b_dec, seed=0)
    fit(model, data, [init], steps=0)
    assert init.has_run
    return model


@pytest.mark.parametrize("method", METHODS)
def test_each_init_method_sets_unit_decoder_and_tied_encoder(method: str) -> None:
    data = toy()
    before = StandardSAE(d_in=32, d_sae=64).W_dec.detach()
    model = _init_only(method, data, 64)
    W_dec = model.W_dec.detach()
    assert torch.allclose(W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
    assert torch.equal(model.W_enc.detach(), W_dec.T)
    assert not torch.allclose(W_dec, before)
    # b_dec is the geometric median of the very sample the callback drew.
    x = data.sample(2048, seed=0 + 0x1A17_5A3D)
    assert torch.allclose(model.b_dec.detach(), geometric_median(x), atol=1e-5)
    centred = unit(x - model.b_dec.detach())
    if method == "data":  # every row is one of the samples
        assert torch.allclose((W_dec @ centred.T).max(1).values, torch.ones(64), atol=1e-5)
    if method == "svd":
        top = torch.linalg.svd(x - model.b_dec.detach(), full_matrices=False).Vh
        assert torch.allclose((W_dec[:32] * top).sum(1).abs(), torch.ones(32), atol=1e-4)
        assert ((x - model.b_dec.detach()) @ W_dec[:32].T).sum(0).min() > 0


def test_orthogonal_init_has_orthonormal_rows_when_not_overcomplete() -> None:
    W_dec = _init_only("orthogonal", toy(), 16).W_dec.detach()
    assert torch.allclose(W_dec @ W_dec.T, torch.eye(16), atol=1e-5)


def test_kmeans_init_finds_the_cluster_directions() -> None:
    centres = unit(torch.randn(8, 16))
    model = _init_only("kmeans", ClusteredData(centres), 16, b_dec="keep")
    assert (unit(model.W_dec.detach()) @ centres.T).max(0).values.min() > 0.95


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_outliers_init_collects_the_rare_direction(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    centres = unit(torch.randn(4, 32, generator=generator))
    rare = unit(torch.randn(32, generator=generator))
    x = ClusteredData(centres, rare).sample(4096, seed=1)  # rare on 2% of inputs
    # 20 rows, 4 of them (20%) from the inputs their nearest of 4 centroids explains least.
    rows = outlier_directions(x, 20, 0.2, torch.Generator().manual_seed(0), seed=0)
    assert (rows[:4] @ rare).min() > 0.9
    # Random samples (the ``data`` init) do not isolate it.
    samples = sample_directions(x, 20, torch.Generator().manual_seed(0))
    assert (samples @ rare).max() < 0.9


def test_geometric_median_is_robust_and_minimises_distances() -> None:
    x = torch.randn(500, 4, dtype=torch.float64) * 0.1
    x[:40] += 100.0  # 8% far outliers drag the mean, not the median
    median = geometric_median(x)
    assert median.norm() < 0.5 < x.mean(0).norm()

    def total(point: torch.Tensor) -> float:
        return (x - point).norm(dim=1).sum().item()

    for _ in range(20):
        assert total(median) <= total(median + 0.01 * torch.randn(4, dtype=torch.float64)) + 1e-9


def test_init_fits_the_input_scale_first_and_works_in_normalised_space() -> None:
    data = toy()
    model = _init_only("data", data, 64, normalize_activations=True)
    x = data.sample(2048, seed=0x1A17_5A3D)
    assert bool(model.input_scale_fitted)
    assert model.input_scale.item() == pytest.approx(
        32**0.5 / x.norm(dim=1).mean().item(), rel=1e-5
    )
    assert torch.allclose(model.b_dec.detach(), geometric_median(x * model.input_scale), atol=1e-4)


def test_init_does_not_run_again_on_resume(tmp_path: Path) -> None:
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    first = StandardSAE(d_in=32, d_sae=64, lr=1e-2)
    fit(first, toy(), [DataInformedInit(n_samples=512), saver], 3, tmp_path)
    ckpt = tmp_path / "epoch=0-step=3.ckpt"
    saved = torch.load(ckpt, weights_only=True)["state_dict"]

    init = DataInformedInit(n_samples=512)
    resumed = StandardSAE(d_in=32, d_sae=64, lr=1e-2)
    fit(resumed, toy(), [init], 3, tmp_path, ckpt_path=str(ckpt))  # no further steps
    assert init.has_run
    assert torch.equal(resumed.W_dec.detach(), saved["W_dec"])


def test_init_explains_missing_sample_and_small_samples() -> None:
    with pytest.raises(ValueError, match="method must be one of"):
        DataInformedInit(method="pca")
    with pytest.raises(ValueError, match="raise n_samples"):
        fit(StandardSAE(d_in=32, d_sae=64), toy(), [DataInformedInit("data", n_samples=10)], 0)


# ----------------------------------------------------------------------------- geometry
def test_geometry_logs_mmcs_baseline_histogram_and_png(tmp_path: Path) -> None:
    model = StandardSAE(d_in=32, d_sae=64, lr=1e-2)
    monitor = FeatureGeometryMonitor(every_n_steps=3)
    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    fit(model, toy(), [monitor], 6, tmp_path, loggers)

    assert [entry[0] for entry in monitor.history] == [3, 6]
    values = csv_values(Path(loggers[0].log_dir))
    mmcs = self_max_cosine_similarity(model.W_dec.detach()).mean().item()
    assert values["geometry/mmcs", 6] == pytest.approx(mmcs, abs=1e-6)
    baseline = random_directions_mmcs(64, 32, seed=0)
    assert values["geometry/mmcs_random_baseline", 3] == pytest.approx(baseline)
    assert ("geometry/gt_mmcs", 6) in values
    assert (tmp_path / "figures" / "geometry" / "step0000006.png").stat().st_size > 0
    events = EventAccumulator(loggers[1].log_dir)
    events.Reload()
    assert "geometry/max_cos" in events.Tags()["histograms"]


def test_geometry_keeps_the_first_step_at_each_threshold_across_resume(tmp_path: Path) -> None:
    data = toy()

    class StartAtGroundTruth(Callback):
        @torch.no_grad()
        def on_fit_start(self, trainer: Trainer, pl_module: StandardSAE) -> None:
            if trainer.ckpt_path is None:
                pl_module.W_dec.copy_(data.ground_truth_features)

    def run(steps: int, ckpt: str | None = None) -> tuple[FeatureGeometryMonitor, TrainingFigures]:
        monitor = FeatureGeometryMonitor(every_n_steps=2, save_png=False)
        figures = TrainingFigures(every_n_steps=2, save_png=False)
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
        model = StandardSAE(d_in=32, d_sae=64, lr=1e-6)
        callbacks = [StartAtGroundTruth(), monitor, figures, saver]
        fit(model, data, callbacks, steps, tmp_path, ckpt_path=ckpt)
        return monitor, figures

    straight, _ = run(4)
    assert straight.first_step_at == {"0.95": 2, "0.98": 2, "0.99": 2}
    resumed, figures = run(8, str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    assert resumed.first_step_at == {"0.95": 2, "0.98": 2, "0.99": 2}
    assert [entry[0] for entry in resumed.history] == [2, 4, 6, 8]
    # The training curves of a resumed run start where the run started.
    assert figures.train[""]["step"] == [1, 2, 4, 6, 8]
    assert len(figures.train[""]["l0"]) == 5


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["density", "resampling", "init", "geometry"])
def test_toy_config_runs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_sae.cli import main

    config = Path(__file__).parents[1] / "configs" / "toy" / f"{name}.yaml"
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.max_steps",
            "4",
            "--trainer.val_check_interval",
            "4",
            "--data.init_args.batch_size",
            "64",
            "--data.init_args.val_batches",
            "1",
            "--print_metrics",
            "false",
        ]
    )
    assert list(tmp_path.glob(f"runs/toy-{name}/csv/version_0/metrics.csv"))


# ----------------------------------------------------------------------------- measurement
VARIANTS = {
    "standard": lambda: StandardSAE(d_in=32, d_sae=64),
    "topk": lambda: TopKSAE(d_in=32, d_sae=64, k=4),
    "batchtopk": lambda: BatchTopKSAE(d_in=32, d_sae=64, k=4),
    "matryoshka": lambda: MatryoshkaSAE(d_in=32, d_sae=64, k=4, group_sizes=[8, 8, 16, 32]),
    "jumprelu": lambda: JumpReLUSAE(d_in=32, d_sae=64),
    "gated": lambda: GatedSAE(d_in=32, d_sae=64),
    "approx_l0": lambda: ApproxL0SAE(d_in=32, d_sae=64, frequency_window=4),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_measurement_forwards_change_no_state_and_join_no_collective(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The density monitor (every rank) and the resampler (rank 0 alone) encode in the middle of
    training: that must neither move state such as BatchTopK's threshold a second time per step
    nor enter a collective that the other ranks never join (a deadlock under DDP)."""
    model = VARIANTS[name]()
    model.train()
    data = toy()
    trainer = SimpleNamespace(
        global_step=1,
        world_size=2,
        datamodule=data,
        strategy=SimpleNamespace(reduce=lambda tensor, reduce_op: tensor),
    )
    before = {key: value.clone() for key, value in model.state_dict().items()}

    def collective(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a measurement forward entered a collective")

    for module in (topk, approx_l0, base):  # as if under DDP, with collectives that never return
        monkeypatch.setattr(module, "_is_distributed", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "all_gather", collective)
    monkeypatch.setattr(torch.distributed, "all_reduce", collective)

    monitor = FeatureDensityMonitor(every_n_steps=1000, window_tokens=None)
    monitor.on_train_batch_end(trainer, model, None, data.sample(128, seed=1), 0)
    DeadFeatureResampler(every_n_steps=1, n_batches=1, batch_size=128)._residuals(trainer, model)

    assert model.training  # the mode the step was in comes back
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# ----------------------------------------------------------------------------- resampling 2
class _Kill(Callback):
    """Silence features at the start of the fit the way a Gated SAE loses them: the gate stays
    open, the magnitude path is shut."""

    def __init__(self, features: list[int]) -> None:
        self.features = features

    @torch.no_grad()
    def on_fit_start(self, trainer: Trainer, pl_module: GatedSAE) -> None:
        pl_module.b_mag[self.features] = -100.0


def test_a_resampled_dead_gated_feature_fires_again() -> None:
    dead = list(range(0, 60, 6))
    model = GatedSAE(d_in=32, d_sae=64, lr=1e-3, dead_window_tokens=256)
    resampler = DeadFeatureResampler(at_steps=[3], strategy="worst", n_batches=2, batch_size=256)
    fit(model, toy(), [_Kill(dead), resampler], steps=3)
    assert resampler.total_resampled >= len(dead)
    with torch.no_grad():
        fired = (model.encode(toy().sample(4096, seed=7)) != 0).sum(0)
    assert (fired[dead] > 0).all(), fired[dead]


class _Trajectory(Callback):
    """W_dec after every step from ``start`` on (after the resampler, which runs before it)."""

    def __init__(self, start: int) -> None:
        self.start, self.W_dec = start, []

    def on_train_batch_end(self, trainer: Trainer, pl_module: StandardSAE, *args: Any) -> None:
        if trainer.global_step >= self.start:
            self.W_dec.append(pl_module.W_dec.detach().clone())


def test_resampled_rows_take_steps_the_size_of_live_rows() -> None:
    """Zeroed Adam moments under the tensor's old step count (bias corrections near 1) make a
    resampled row's updates (1 - beta1^s) / sqrt(1 - beta2^s) learning rates s steps on,
    whatever its gradient: up to 6.5 at the default betas, 2.1 at beta2 = 0.99, which reaches
    that regime within this short run. Their second moment starts at the live rows' mean
    instead, so their steps are the size of everyone else's."""
    resampled = [3, 10, 40, 41, 50]
    model = StandardSAE(d_in=32, d_sae=64, lr=1e-3, l1_coefficient=0.5, betas=(0.9, 0.99))
    resampler = DeadFeatureResampler(at_steps=[300], strategy="worst", n_batches=1, batch_size=256)
    trajectory = _Trajectory(start=300)
    fit(model, toy(), [_MarkDead(resampled), resampler, trajectory], steps=330)

    live = torch.ones(64, dtype=torch.bool)
    live[resampled] = False
    ratios = []
    for before, after in itertools.pairwise(trajectory.W_dec):
        step = (after - before).norm(dim=1)
        ratios.append((step[resampled].mean() / step[live].mean()).item())
    assert max(ratios) < 1.5, ratios


def test_monitors_draw_no_figure_that_nothing_would_show(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``save_png: false`` and no image-taking logger a figure has nowhere to go: drawing it
    anyway cost more than the training steps when measuring often."""
    from lightning_sae.callbacks import density, figures, geometry

    drawn: list[str] = []
    for module, name in (
        (geometry, "max_cosine_figure"),
        (density, "density_figure"),
        (figures, "training_curves_figure"),
        (figures, "density_figure"),
    ):
        draw = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _d=draw, _n=name: drawn.append(_n) or _d(*a))
    sae = StandardSAE(d_in=16, d_sae=32)
    data = ToySuperpositionDataModule(n_features=32, d_in=16, batch_size=64)
    monitors = [
        FeatureGeometryMonitor(every_n_steps=1, save_png=False),
        FeatureDensityMonitor(every_n_steps=1, window_tokens=64, save_png=False),
        TrainingFigures(every_n_steps=1, save_png=False),
    ]
    quiet_trainer(3, monitors, limit_val_batches=1, val_check_interval=3).fit(sae, data)
    assert monitors[0].history and monitors[2].train and monitors[2].val_counts and not drawn

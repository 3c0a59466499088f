"""The reference-setup options (issue 16, point 1) and smoke runs of the experiment scripts.

The option tests check semantics: the reference's empty-sample rule, per-batch correlated
firing, a fixed training set that repeats exactly, a StandardSAE without b_dec (absent from the
parameters, zero after training, exported and reloaded) and with an independent encoder.
The smoke runs call each script's ``main`` in-process at tiny sizes; the MiniLM ones share one
small activation cache.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_sae.data.toy import ToySuperposition, ToySuperpositionDataModule
from lightning_sae.io import export_sae, load
from lightning_sae.models.standard import StandardSAE
from tests._trainer import quiet_trainer

ROOT = Path(__file__).parents[1]


def toy(**kwargs) -> ToySuperposition:
    options = dict(
        n_features=64, d_in=16, mean_active=1.0, decay=0.97, correlation=0.0,
        correlation_block=8, seed=0,
    )  # fmt: skip
    return ToySuperposition(**(options | kwargs))


def test_empty_sample_rules() -> None:
    generator = torch.Generator().manual_seed(1)
    # With mean_active 0.5 about 60% of samples have no feature before any rule applies.
    allow = toy(mean_active=0.5, empty_sample_rule="allow").sample_codes(4000, generator)
    assert 0.4 < ((allow != 0).sum(1) == 0).float().mean() < 0.8
    unit = toy(mean_active=0.5, empty_sample_rule="uniform_unit").sample_codes(4000, generator)
    counts = (unit != 0).sum(1)
    assert (counts >= 1).all()
    single = unit[counts == 1]
    # A forced feature has magnitude exactly 1; drawn magnitudes are uniform in [0, 1).
    forced = single[single == 1.0]
    assert len(forced) > 0.4 * 4000
    # ... and it is chosen uniformly: rare (high-index) features are forced as often as common.
    forced_index = (unit == 1.0).nonzero()[:, 1]
    assert (forced_index >= 32).float().mean() > 0.35
    frequency = toy(mean_active=0.5).sample_codes(4000, generator)
    assert ((frequency != 0).sum(1) >= 1).all() and (frequency < 1).all()


def test_per_batch_correlation_redraws_probabilities_each_batch() -> None:
    model = toy(correlation_mode="per_batch", mean_active=4.0, empty_sample_rule="allow")
    first = model.batch_probability(torch.Generator().manual_seed(0))
    second = model.batch_probability(torch.Generator().manual_seed(1))
    assert math.isclose(float(first.mean()), 4.0 / 64, rel_tol=1e-5)
    assert not torch.allclose(first, second)
    # Within a batch features fire independently with that batch's probabilities.
    generator = torch.Generator().manual_seed(0)
    codes = model.sample_codes(20000, generator)
    p = model.batch_probability(torch.Generator().manual_seed(0)).clamp(max=1)
    assert torch.allclose((codes != 0).float().mean(0), p, atol=0.02)


def test_fixed_train_set_repeats_exactly_across_epochs() -> None:
    def two_epochs(fixed: bool) -> list[torch.Tensor]:
        loader = ToySuperpositionDataModule(
            n_features=32, d_in=8, batch_size=4, batches_per_epoch=3, fixed_train_set=fixed
        ).train_dataloader()
        return [b for _ in range(2) for b in loader]

    fixed, fresh = two_epochs(True), two_epochs(False)
    assert all(torch.equal(a, b) for a, b in zip(fixed[:3], fixed[3:], strict=True))
    assert not torch.equal(fixed[0], fixed[1])
    assert torch.equal(fixed[0], fresh[0]) and not torch.equal(fresh[0], fresh[3])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mean_active": float("nan")}, "mean_active must be a finite number"),
        ({"decay": float("inf")}, "decay must be a finite number"),
        ({"decay": -0.5}, "decay must be in"),
        ({"correlation_mode": "rows"}, "correlation_mode must be"),
        ({"correlation_mode": "per_batch", "correlation": 0.5}, "set data.correlation: 0"),
        ({"empty_sample_rule": "drop"}, "empty_sample_rule must be"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"batches_per_epoch": -1}, "batches_per_epoch must be >= 1"),
    ],
)
def test_bad_toy_options_are_named(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ToySuperpositionDataModule(n_features=32, d_in=8, **options)


def test_standard_sae_without_b_dec_trains_exports_and_loads(tmp_path: Path) -> None:
    sae = StandardSAE(d_in=16, d_sae=64, lr=1e-2, l1_coefficient=0.01, use_b_dec=False)
    assert "b_dec" not in dict(sae.named_parameters())
    data = ToySuperpositionDataModule(n_features=64, d_in=16, batch_size=32, batches_per_epoch=5)
    before = sae.W_dec.detach().clone()
    quiet_trainer(5).fit(sae, data)
    assert not torch.equal(before, sae.W_dec)  # it trained
    assert torch.equal(sae.b_dec, torch.zeros(16))
    export_sae(sae, tmp_path)
    loaded = load(tmp_path)
    x = data.sample(8)
    assert torch.allclose(loaded(x).x_hat, sae(x).x_hat, atol=1e-5)
    assert torch.equal(loaded.b_dec, torch.zeros(16))


def test_independent_encoder_init() -> None:
    tied = StandardSAE(d_in=16, d_sae=64, init_seed=3)
    one = StandardSAE(d_in=16, d_sae=64, init_seed=3, encoder_init="independent")
    two = StandardSAE(d_in=16, d_sae=64, init_seed=3, encoder_init="independent")
    assert torch.equal(tied.W_enc, tied.W_dec.T * (16 / 64))  # the default encoder_init_scale
    assert torch.equal(one.W_dec, tied.W_dec)  # the decoder init is unchanged
    assert not torch.allclose(one.W_enc, one.W_dec.T)
    assert torch.equal(one.W_enc, two.W_enc) and torch.equal(one.b_enc, two.b_enc)
    bound = 1 / 4  # 1 / sqrt(d_in), as nn.Linear
    assert one.W_enc.abs().max() <= bound and one.b_enc.abs().max() <= bound
    assert one.W_enc.std() > 0.8 * bound / math.sqrt(3)  # uniform, not a degenerate draw
    with pytest.raises(ValueError, match="encoder_init must be"):
        StandardSAE(d_in=16, d_sae=64, encoder_init="tied")


def test_reference_config_builds_the_reference_setup() -> None:
    config = yaml.safe_load((ROOT / "configs" / "toy" / "reference-001.yaml").read_text())
    sae = StandardSAE(**config["model"]["init_args"])
    data = ToySuperpositionDataModule(**config["data"]["init_args"])
    assert "b_dec" not in dict(sae.named_parameters())
    assert data.toy.correlation_mode == "per_batch" and data.train_batches.fixed
    # The credited script steps plain Adam: no gradient clipping, betas (0.9, 0.999).
    assert config["trainer"].get("gradient_clip_val") is None
    assert sae.gradient_clip_max_norm() == 0.0 and sae.adam_betas() == (0.9, 0.999)


# ---------------------------------------------------------------- smoke runs of the scripts
def run_main(module, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [module.__name__, "--smoke", *argv])
    threads = torch.get_num_threads()
    try:
        module.main()
    finally:
        torch.set_num_threads(threads)


def test_smoke_init_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from experiments import init_table

    run_main(init_table, ["--out", str(tmp_path)], monkeypatch)
    runs = json.loads((tmp_path / "runs_reference_ours.json").read_text())
    assert {(r["setup"], r["method"]) for r in runs} >= {("reference", "data"), ("ours", "none")}
    assert (tmp_path / "mmcs_reference.png").stat().st_size > 0


def test_init_table_rebuilds_the_sweep_setups_an_earlier_part_ran() -> None:
    """A runs file filled in parts holds exponents the current command did not name; its table
    needs their setups (it failed with a KeyError on the name, losing the new runs' table)."""
    from experiments.init_table import SETUPS, l1_sweep_setup, sweep_setup_named

    for exponent, decay in ((-4, None), (0, 1.0), (-8, 0.99)):
        expected = l1_sweep_setup(SETUPS["reference_256"], exponent, decay)
        assert sweep_setup_named(expected.name) == expected
    assert sweep_setup_named("reference") is None and sweep_setup_named("nope_e1") is None


def test_init_table_l1_sweep_plan_runs_informed_inits_beside_random() -> None:
    """The L1 sweep ran only random init; the init table's question is informed init against
    it at the same L1 weight: random with plain Adam (the reference's), informed with the
    chosen optimizer."""
    from experiments.init_table import SETUPS, l1_sweep_plan, l1_sweep_setup, sweep_series

    swept = [l1_sweep_setup(SETUPS["reference_256"], e, 1.0) for e in (-4, -5)]
    plan = l1_sweep_plan(swept, ["none", "data"], "adam", [0])
    assert plan == [
        ("reference_256_e-4_decay1", "none", "adam", 0),
        ("reference_256_e-4_decay1", "data", "adam", 0),
        ("reference_256_e-5_decay1", "none", "adam", 0),
        ("reference_256_e-5_decay1", "data", "adam", 0),
    ]
    runs = [
        {"setup": name, "method": method, "optimizer": opt, "seed": seed, "curve": [[0, 0.2]]}
        for name, method, opt, seed in plan
    ]
    assert list(sweep_series(runs)) == [
        "e=-5 none/adam",
        "e=-5 data/adam",
        "e=-4 none/adam",
        "e=-4 data/adam",
    ]
    assert l1_sweep_plan(swept[:1], ["none", "svd"], "clip1", [1])[1] == (
        "reference_256_e-4_decay1",
        "svd",
        "clip1",
        1,
    )


def test_approx_l0_standard_settings_are_standard_sae_defaults() -> None:
    """--approx-l0-settings standard gives ApproxL0SAE what StandardSAE resolves by default
    (its class defaults differ: docs/defaults.md), so the comparison isolates the objective."""
    from experiments.approx_l0 import standard_settings
    from lightning_sae.models.approx_l0 import ApproxL0SAE

    settings = standard_settings(16, 64)
    assert settings == {"encoder_init_scale": 0.25, "betas": (0.9, 0.99), "gradient_clip_norm": 1.0}
    plain = ApproxL0SAE(d_in=16, d_sae=64)
    assert (plain.encoder_init_factor(), plain.adam_betas()) != (0.25, (0.9, 0.99))
    aligned = ApproxL0SAE(d_in=16, d_sae=64, **settings)
    assert aligned.gradient_clip_max_norm() == 1.0 and aligned.adam_betas() == (0.9, 0.99)


@pytest.fixture(scope="module")
def minilm_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny MiniLM activation cache that every MiniLM smoke run reuses."""
    return tmp_path_factory.mktemp("minilm-cache")


def minilm_config_with(tmp_path: Path, **model_options: object) -> Path:
    """configs/minilm/resid-l3-standard.yaml (the same data, so the same cache) with its model's
    ``init_args`` changed."""
    config = yaml.safe_load((ROOT / "configs/minilm/resid-l3-standard.yaml").read_text())
    config["model"]["init_args"] |= model_options
    path = tmp_path / "data-config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("name", ["orthogonality", "auxk", "approx_l0", "matching"])
def test_smoke_minilm_experiments(
    name: str, minilm_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each script runs, and every SAE it trains takes the data config's learning rate and
    warm-up (issue 23: no experiment runs a setting the config's user does not get)."""
    import importlib

    from experiments import _minilm

    module = importlib.import_module(f"experiments.{name}")
    config = minilm_config_with(tmp_path, lr=0.003, lr_warmup_steps=3)
    argv = ["--out", str(tmp_path), "--cache-dir", str(minilm_cache), "--data-config", str(config)]
    if name == "matching":
        argv += ["--saes", str(tmp_path / "saes")]
    trained, original_train = [], _minilm.train

    def train(sae, *args, **kwargs):
        trained.append(dict(sae.hparams))
        return original_train(sae, *args, **kwargs)

    monkeypatch.setattr(_minilm, "train", train)
    run_main(module, argv, monkeypatch)
    assert trained and all(
        (h["lr"], h["lr_warmup_steps"], h["normalize_activations"]) == (0.003, 3, True)
        for h in trained
    )
    table = (tmp_path / "table.md").read_text()
    assert "MiniLM" in table and "| --- |" not in table and "lr 0.003, 3 warm-up steps" in table
    results = json.loads((tmp_path / "results.json").read_text())
    assert results


def test_experiments_hold_decoder_rows_at_unit_norm_as_the_configs_do() -> None:
    """The scripts run the configs' recipe: a standard SAE's rows free (its L1 weighted by
    their norms), every other class's (and a standard SAE with the plain L1) at unit norm."""
    from experiments._common import norm_constraint
    from lightning_sae.callbacks.decoder_norm import DecoderNormConstraint
    from lightning_sae.models.topk import TopKSAE
    from lightning_sae.models.transcoder import Transcoder

    sizes = {"d_in": 8, "d_sae": 16}
    assert norm_constraint(StandardSAE(**sizes)) == []
    for held in (
        StandardSAE(**sizes, weight_by_decoder_norm=False),
        TopKSAE(**sizes, k=2),
        Transcoder(**sizes),
    ):
        (callback,) = norm_constraint(held)
        assert isinstance(callback, DecoderNormConstraint)


def test_minilm_experiments_take_per_class_options_for_the_configs_class_only(
    tmp_path: Path,
) -> None:
    """Betas, clipping and the encoder start have measured defaults per class: a config's values
    are its own class's (here StandardSAE's), and every other class keeps its own."""
    import argparse

    from experiments import _minilm
    from lightning_sae.models.topk import TopKSAE

    schedule = {"lr": 0.002, "lr_warmup_steps": 7, "normalize_activations": True}
    per_class = {"betas": [0.8, 0.9], "gradient_clip_norm": 2.0}
    args = argparse.Namespace(data_config=minilm_config_with(tmp_path, **schedule, **per_class))
    standard = _minilm.model_options(args, StandardSAE)
    assert standard == schedule | per_class
    assert _minilm.model_options(args, TopKSAE) == schedule


def test_smoke_vs_saelens_ours_side(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The SAELens side needs its own virtualenv (tests/test_io.py builds and checks it); here
    # only our side and the shared data and metrics run.
    from experiments import vs_saelens

    monkeypatch.setattr(vs_saelens, "SAELENS_VENV", tmp_path / "no-venv")
    run_main(
        vs_saelens, ["--out", str(tmp_path / "out"), "--work", str(tmp_path / "w")], monkeypatch
    )
    curves = json.loads((tmp_path / "out" / "curves.json").read_text())
    for variant in ("standard", "topk"):
        steps = [row["step"] for row in curves[variant]["lightning-sae"]]
        assert steps == [0, 3, 6]
        assert curves[variant]["lightning-sae"][-1]["l0"] > 0


def test_smoke_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from experiments import defaults

    argv = ["--out", str(tmp_path / "out"), "--work", str(tmp_path / "w")]
    run_main(defaults, argv, monkeypatch)
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| std_s1 | 0 |" in table and "| std_s0.25_b2 | 0 |" in table
    runs = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [row["step"] for row in runs["std_s1"][0]["curve"]] == [0, 3, 6]
    # the free-rows path (no constraint; the class's defaults resolved from None) runs too
    assert "| std_default_free | 0 |" in table


def test_smoke_frontier_ours_side(
    minilm_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The peers need their own virtualenvs; absent ones are skipped with a message. Here only
    # our side, the shared data files, the measurements (splice included) and the report run.
    from experiments import frontier

    absent = {peer: tmp_path / "no-venv" for peer in frontier.VENVS}
    monkeypatch.setattr(frontier, "VENVS", absent)
    argv = ["--out", str(tmp_path / "out"), "--work", str(tmp_path / "w")]
    run_main(frontier, [*argv, "--cache-dir", str(minilm_cache)], monkeypatch)
    printed = capsys.readouterr().out
    assert "SAELens venv not found" in printed and "sparsify venv not found" in printed
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert {r["variant"] for r in runs} == {"topk", "batchtopk", "jumprelu", "standard"}
    assert {r["library"] for r in runs} == {"lightning-sae"}
    for run in runs:
        assert 0 < run["l0"] <= 64 and math.isfinite(run["fvu"])
        assert run["final_hidden_rel_mse"] > 0 and -1 <= run["final_hidden_cosine"] <= 1
    topk = next(r for r in runs if r["variant"] == "topk")
    assert topk["l0"] == 4  # k is exact per row
    assert (tmp_path / "out" / "frontier.png").stat().st_size > 0
    assert "| lightning-sae | topk | k 4 |" in (tmp_path / "out" / "table.md").read_text()


def test_frontier_batch_order_is_epochs_of_permutations() -> None:
    from experiments.frontier_data import batch_order

    order = batch_order(n_train=10, steps=5, batch_size=4, seed=0)  # two epochs
    assert order.shape == (5, 4)
    first, second = order.flatten()[:10], order.flatten()[10:]
    assert sorted(first.tolist()) == list(range(10))  # every row once per epoch
    assert len(set(second.tolist())) == 10  # the second epoch is cut at the last step
    assert torch.equal(order, batch_order(10, 5, 4, seed=0))
    assert not torch.equal(order, batch_order(10, 5, 4, seed=1))


def test_frontier_compares_against_the_best_peer_at_the_same_l0() -> None:
    from experiments.frontier import OURS, frontier_against_frontier, peer_fvu_at, verdicts

    def point(library: str, l0: float, fvu: float, spread: float = 0.01, variant="topk") -> dict:
        return {"library": library, "variant": variant, "setting": f"k {l0:g}", "l0": l0,
                "fvu": fvu, "fvu_range": spread}  # fmt: skip

    peers = [point("A", 16, 0.4), point("A", 64, 0.2), point("B", 32, 0.25, variant="standard")]
    fvu, spread = peer_fvu_at(peers, "A", 32)  # halfway in log L0 between 16 and 64
    assert math.isclose(fvu, 0.3) and spread == 0.01
    assert math.isnan(peer_fvu_at(peers, "A", 100)[0])  # outside A's range: no claim
    ours = [point(OURS, 32, 0.24), point(OURS, 16, 0.45, spread=0.02), point(OURS, 64, 0.1)]
    rows = verdicts(peers + ours, ["A", "B"])
    assert [row[6] for row in rows] == ["above: A wins", "at or below", "at or below"]
    assert rows[1][4] == "B 0.2500"  # at L0 32, B's point beats A's interpolated 0.3
    # Against the same kind of SAE only, B's standard SAE does not count: A's TopK frontier does.
    assert rows[1][7:] == ["A 0.3000", "-0.0600 (spread 0.0100)", "at or below"]
    # Library against library: at each L0 where both reach, our best (any SAE) against theirs.
    table = {row[0]: row[1:] for row in frontier_against_frontier(peers + ours, ["A", "B"])}
    assert set(table) == {"16.0", "32.0", "64.0"}  # 100 and below 16: no one else there
    assert table["16.0"] == ["0.4500", "A 0.4000", "+0.0500 (spread 0.0200)", "above: A wins"]
    assert table["32.0"][:2] == ["0.2400", "B 0.2500"] and table["32.0"][3] == "at or below"
    # A point whose SAE never fires (L0 0, e.g. every threshold above every pre-activation)
    # has no place on a log L0 axis: no chord from it, and the report does not divide by 0.
    dead = [point("A", 0, 1.1), *peers]
    assert math.isclose(peer_fvu_at(dead, "A", 32)[0], 0.3)  # not from the L0-0 point
    assert [row[6] for row in verdicts(dead + ours, ["A", "B"])] == [row[6] for row in rows]
    assert len(frontier_against_frontier(dead + ours, ["A", "B"])) == 3


def test_frontier_reruns_one_kind_of_sae_with_a_given_threshold_start(tmp_path: Path) -> None:
    # --variants jumprelu --jumprelu-threshold-init 0.75 --keep-from: only JumpReLU trains, on
    # both sides from the same threshold start; the stored runs of every other SAE are kept.
    from argparse import Namespace

    from experiments.frontier import OURS, SAELENS, build_ours, keep_runs_not_rerun, settings

    scale = {"d_sae": 8, "steps": 3, "batch_size": 4, "lr": 1e-3, "seeds": [0]}
    args = Namespace(k=[4], batch_k=4, target_l0=2.0, l1=[1.0], saelens_l1=[2.0],
                     variants=["jumprelu"], jumprelu_threshold_init=None, **scale)  # fmt: skip
    assert [s.options for s in settings(args)] == [{"target_l0": 2.0}] * 2  # class defaults
    assert build_ours(settings(args)[0], 4, args, seed=0).hparams.threshold_init == 0.001
    args.jumprelu_threshold_init = [0.75]
    jumprelu = settings(args)
    assert [s.library for s in jumprelu] == [OURS, SAELENS]
    assert all(s.options == {"target_l0": 2.0, "threshold_init": 0.75} for s in jumprelu)
    sae = build_ours(jumprelu[0], 4, args, seed=0)
    assert torch.equal(sae.threshold.detach(), torch.full((8,), 0.75))

    def run(library: str, variant: str) -> dict:
        return {"library": library, "variant": variant, "run": f"{library}_{variant}"}

    stored = [run(OURS, "jumprelu"), run(SAELENS, "jumprelu"), run(OURS, "topk"),
              run("sparsify", "topk")]  # fmt: skip
    args.keep_from = tmp_path / "results.json"
    args.keep_from.write_text(json.dumps({"meta": {**scale, "n_train": 10}, "runs": stored}))
    kept = keep_runs_not_rerun(args, 10, [(jumprelu[0], 0), (jumprelu[1], 0)])
    assert kept == stored[2:]
    with pytest.raises(SystemExit, match="other settings"):
        keep_runs_not_rerun(args, 11, [(jumprelu[0], 0)])


def test_smoke_defaults_transcoders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from experiments import defaults_transcoders

    # Its own cache: its sites and token counts are not the other MiniLM smoke runs' (sharing
    # the folder made the next of them refuse it as built for another configuration).
    argv = ["--work", str(tmp_path / "w"), "--cache-dir", str(tmp_path / "cache")]
    run_main(
        defaults_transcoders, [*argv, "tc_topk32_old_clip", "cc_l12", "stc_btopk32"], monkeypatch
    )
    run_main(defaults_transcoders, [*argv, "--table", "--out", str(tmp_path / "out")], monkeypatch)
    table = (tmp_path / "out" / "table_transcoders.md").read_text()
    assert "| tc_topk32_old_clip | 0 |" in table and "| cc_l12 | 0 |" in table
    assert "| stc_btopk32 | 0 |" in table
    with pytest.raises(SystemExit, match="unknown setting"):
        run_main(defaults_transcoders, [*argv, "tc_topk32_nope"], monkeypatch)


def test_defaults_transcoders_free_rows_at_matched_l0() -> None:
    from experiments.defaults_transcoders import callbacks, free_against_held, parse
    from lightning_sae.callbacks.decoder_norm import DecoderNormConstraint
    from lightning_sae.models.transcoder import SkipTranscoder, Transcoder

    # A fractional L1 coefficient is a float (each form's value was parsed by every form's rule,
    # so int("1.5") failed), and ``free`` drops the constraint and weights the L1 by the rows.
    assert parse("tc_l11.5_free") == (
        Transcoder,
        {"l1_coefficient": 1.5, "weight_by_decoder_norm": True},
    )
    assert parse("stc_l10.5") == (SkipTranscoder, {"l1_coefficient": 0.5})
    assert callbacks("tc_l11.5_free") == []
    assert [type(c) for c in callbacks("tc_l11.5")] == [DecoderNormConstraint]

    def runs(*points: tuple[float, float]) -> list[dict]:
        return [{"seed": 0, "l0": l0, "fvu": fvu} for l0, fvu in points]

    rows = free_against_held({
        "tc_l11": runs((30.0, 0.20)),
        "tc_l12": runs((10.0, 0.30)),
        "tc_l12_free": runs((20.0, 0.24)),  # the held curve at L0 20: 0.25
        "tc_l13_free": runs((5.0, 0.35)),  # below the held range: no extrapolation
        "tc_topk32": runs((20.0, 0.10)),  # no free arm of its own: not compared
    })  # fmt: skip
    # Both directions, each inside the other arm's range: the held run at L0 10 against the
    # free curve there (0.35 + (0.24 - 0.35) / 3), the free run at 20 against the held curve.
    assert rows == [
        ["tc_l12", 0, "10.0", "0.3000", "0.3133", "+0.0133"],
        ["tc_l12_free", 0, "20.0", "0.2400", "0.2500", "-0.0100"],
    ]


def test_smoke_defaults_frontier(
    minilm_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from experiments import defaults_frontier

    argv = ["--work", str(tmp_path / "w"), "--cache-dir", str(minilm_cache)]
    run_main(defaults_frontier, [*argv, "topk16", "topk16_old", "--trace"], monkeypatch)
    run_main(defaults_frontier, [*argv, "--table", "--out", str(tmp_path / "out")], monkeypatch)
    table = (tmp_path / "out" / "table_frontier.md").read_text()
    assert "| topk16_old | 0 |" in table and "| topk16 | 0 |" in table
    # --trace: each loss term's gradient norm at step 0 (no latent dead yet: AuxK is 0)
    (first, *_) = json.loads((tmp_path / "w" / "topk16_s0.json").read_text())["trace"]
    assert first["step"] == 0 and first["grad_auxk"] == 0 and first["grad_mse"] > 0
    assert first["grad_total"] == pytest.approx(first["grad_mse"])


def test_smoke_defaults_clt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from experiments import defaults_clt

    argv = ["--work", str(tmp_path / "w")]
    run_main(defaults_clt, [*argv, "topk_old", "jump_new"], monkeypatch)
    run_main(defaults_clt, [*argv, "--table", "--out", str(tmp_path / "out")], monkeypatch)
    table = (tmp_path / "out" / "table_clt.md").read_text()
    assert "| topk_old | 0 |" in table and "| jump_new | 0 |" in table
    runs = json.loads((tmp_path / "out" / "results_clt.json").read_text())["toy"]
    old = runs["topk_old"][0]["settings"]
    assert old == {"encoder_init_scale": 1.0, "betas": [0.9, 0.999], "gradient_clip_norm": 0.0,
                   "lr_warmup_steps": 0}  # fmt: skip
    jump = runs["jump_new"][0]
    assert 0 < jump["gt_mmcs"] <= 1 and len(jump["fvu_layers"]) == 3


def test_toy_cross_layer_truth_reconstructs_its_outputs_and_scores_one() -> None:
    """The toy CLT's ground truth is exact: a CLT holding the true decoder slabs decodes the
    true codes into the outputs, and its ground-truth MMCS is 1 (a random one's is far below)."""
    from experiments.defaults_clt import ToyCrossLayer
    from lightning_sae.models.clt import CrossLayerTranscoder

    toy = ToyCrossLayer(n_layers=3, d=16, n_features=32, mean_active=3.0)
    codes = toy.codes(64, torch.Generator().manual_seed(0))
    x, y = toy.observe(codes)
    assert (codes[:, 0] != 0).sum(1).float().mean() > 1 and x.shape == y.shape == (64, 3, 16)
    clt = CrossLayerTranscoder(d_in=16, d_sae=32, n_layers=3)
    assert max(toy.ground_truth_mmcs(clt)) < 0.7
    with torch.no_grad():
        for source, slab in enumerate(toy.slabs):
            clt.W_dec[source].copy_(slab)
    torch.testing.assert_close(clt.decode(codes), y)
    assert toy.ground_truth_mmcs(clt) == pytest.approx([1.0, 1.0, 1.0])


def test_toy_configs_reads_the_numbers_the_fit_command_prints() -> None:
    """experiments/toy_configs.py takes its table from the final-metrics table of
    ``lightning-sae fit``; a change of that table's labels must not leave its columns empty."""
    from types import SimpleNamespace

    from experiments.toy_configs import final_metrics
    from lightning_sae.trainer_cli import final_metrics_table

    metrics = {"val/fvu": 0.0312, "val/l0": 6.75, "val/dead_fraction": 0.5293}
    trainer = SimpleNamespace(callback_metrics=metrics, callbacks=[], checkpoint_callback=None)
    text = final_metrics_table(trainer, gt_mmcs=0.9141)
    assert final_metrics(text) == {"fvu": 0.0312, "l0": 6.75, "dead": 0.5293, "gt_mmcs": 0.9141}

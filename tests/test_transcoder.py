"""Transcoders, skip transcoders and crosscoders: paired data, losses, callbacks, resume,
splicing at the output hook, export/load (SAELens loads the transcoder types it has)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from _trainer import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

import lightning_sae
from lightning_sae.callbacks.decoder_norm import DecoderNormConstraint
from lightning_sae.callbacks.density import FeatureDensityMonitor
from lightning_sae.callbacks.geometry import FeatureGeometryMonitor
from lightning_sae.callbacks.init import DataInformedInit
from lightning_sae.callbacks.resampling import DeadFeatureResampler
from lightning_sae.cli import main as cli_main
from lightning_sae.data.activations import ActivationDataModule
from lightning_sae.io import export_sae, load
from lightning_sae.metrics.downstream import downstream_metrics
from lightning_sae.models import VARIANTS, TopKSAE, variant_class
from lightning_sae.models.transcoder import (
    CROSSCODERS,
    TRANSCODERS,
    BatchTopKCrossCoder,
    BatchTopKSkipTranscoder,
    CrossCoder,
    JumpReLUSkipTranscoder,
    SkipTranscoder,
    TopKCrossCoder,
    TopKSkipTranscoder,
    TopKTranscoder,
    Transcoder,
)

CONFIGS = Path(__file__).parents[1] / "configs"
D_IN, D_OUT = 12, 10  # different widths, so a site mix-up fails on shapes
IN, OUT = "blocks.0.mlp.hook_in", "blocks.0.hook_mlp_out"


def toy_map(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """y = A x + a sparse nonlinear part: what a skip transcoder's W_skip can take over."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g)
    gen = torch.Generator().manual_seed(1234)  # the map itself is fixed
    linear = torch.randn(D_IN, D_OUT, generator=gen) / D_IN**0.5
    detectors, writes = torch.randn(D_IN, 24, generator=gen), torch.randn(24, D_OUT, generator=gen)
    return x, x @ linear + torch.relu(x @ detectors / D_IN**0.5 - 1.5) @ writes


def pairs_dir(root: Path, rows: list[int], seed: int = 0) -> Path:
    """Bring-your-own paired files: <root>/<hook>/part<i>.npy, the same rows file by file."""
    x, y = toy_map(sum(rows), seed)
    for hook, values in ((IN, x), (OUT, y)):
        (root / hook).mkdir(parents=True)
        for i, part in enumerate(values.split(rows)):
            np.save(root / hook / f"part{i}.npy", part.numpy())
    return root


def paired_data(root: Path, **kwargs) -> ActivationDataModule:
    options = dict(batch_size=128, val_tokens=256, shuffle_buffer_tokens=512)
    options.update(shuffle_chunk_tokens=64, prefetch_batches=0, loader_threads=1, **kwargs)
    return ActivationDataModule(activations_dir=str(root), hooks=[IN, OUT], **options)


def test_transcoders_are_variants_users_import_and_files_resolve() -> None:
    for name in ("Transcoder", "SkipTranscoder", "TopKTranscoder", "TopKSkipTranscoder",
                 "BatchTopKTranscoder", "JumpReLUSkipTranscoder", "CrossCoder"):  # fmt: skip
        cls = getattr(lightning_sae, name)
        assert cls in VARIANTS.values() and variant_class(name) is cls
    # The activation and the losses are the variant's own, not copies.
    assert TopKTranscoder.sparse_code is TopKSAE.sparse_code
    assert TopKTranscoder.auxk_loss is TopKSAE.auxk_loss


def test_shapes_losses_and_clear_errors() -> None:
    tc = TopKSkipTranscoder(d_in=D_IN, d_out=D_OUT, d_sae=32, k=4, input_hook=IN, output_hook=OUT)
    assert tc.W_enc.shape == (D_IN, 32) and tc.W_dec.shape == (32, D_OUT)
    assert tc.b_dec.shape == (D_OUT,) and tc.W_skip.shape == (D_OUT, D_IN)
    assert not tc.W_skip.any()  # initialised at zero
    x, y = toy_map(64)
    # The MSE (and AuxK) are scored against the output site.
    with torch.no_grad():
        terms = tc.loss_terms(y, tc.forward_normalized(x))
        assert float(terms["mse"]) == pytest.approx(float((tc(x).x_hat - y).pow(2).sum(-1).mean()))
    with torch.no_grad():
        tc.W_skip.fill_(0.1)
    expected = tc.decode(tc.encode(x)) + x @ tc.W_skip.T
    torch.testing.assert_close(tc(x).x_hat, expected)

    # From Python with (x, y) pairs, e.g. a TensorDataset.
    quiet_trainer(2).fit(tc, DataLoader(TensorDataset(x, y), batch_size=32))
    assert tc.global_step == 2

    with pytest.raises(ValueError, match="apply_b_dec_to_input"):
        Transcoder(d_in=D_IN, d_sae=8, apply_b_dec_to_input=True)
    with pytest.raises(ValueError, match="output_hook"):
        tc.input_and_target({IN: x, "blocks.0.hook_resid_post": y})
    with pytest.raises(ValueError, match="d_out: 7"):
        tc.input_and_target({IN: x, OUT: y[:, :7]})
    with pytest.raises(ValueError, match="aligned"):
        tc.input_and_target((x, y[:10]))
    with pytest.raises(ValueError, match="paired batches"):
        tc.input_and_target(x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_input_site_stops_training_as_bad_data(bad: float) -> None:
    """The step's free finiteness check covers the site the encoder reads, not only the target
    (which alone would report bad input data as a diverging run)."""
    tc = TopKTranscoder(d_in=D_IN, d_out=D_OUT, d_sae=32, k=4)
    x, y = toy_map(64)
    x[3, 1] = bad
    with pytest.raises(ValueError, match="non-finite training batch"):
        tc.training_step((x, y), 0)


def test_crosscoder_reads_and_writes_every_layer_with_per_layer_norm_penalty() -> None:
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    cc = CrossCoder(d_in=3 * 4, d_sae=16, hooks=hooks, l1_coefficient=0.5)
    per_layer = cc.W_dec.reshape(16, 3, 4).norm(dim=-1)
    torch.testing.assert_close(cc.decoder_norms(), per_layer.sum(-1))
    layers = {h: torch.randn(8, 4) for h in hooks}
    x, target = cc.input_and_target(layers)
    torch.testing.assert_close(x, torch.cat([layers[h] for h in hooks], -1))
    with torch.no_grad():
        out = cc.forward_normalized(x)
        terms = cc.loss_terms(x, out)
    expected = 0.5 * (out.acts * per_layer.sum(-1)).sum(-1).mean()
    assert float(terms["l1"]) == pytest.approx(float(expected), rel=1e-5)
    # Trains from Python on dict batches (a DataLoader collates a list of {hook: row}).
    rows = [{h: torch.randn(4) for h in hooks} for _ in range(64)]
    quiet_trainer(2).fit(cc, DataLoader(rows, batch_size=16))
    assert cc.global_step == 2
    with pytest.raises(ValueError, match="each have width 4"):
        cc.input_and_target({**layers, hooks[1]: torch.randn(8, 5)})
    # The BatchTopK crosscoder selects k per row on average over the batch, every layer at once.
    batch_cc = BatchTopKCrossCoder(d_in=3 * 4, d_sae=16, hooks=hooks, k=2)
    quiet_trainer(2).fit(batch_cc, DataLoader(rows, batch_size=16))
    with torch.no_grad():
        acts = batch_cc.forward_normalized(batch_cc.input_and_target(layers)[0]).acts
    assert batch_cc.threshold_updates > 0 and (acts != 0).sum() > 0
    with pytest.raises(ValueError, match="two or more distinct layers"):
        TopKCrossCoder(d_in=8, d_sae=16, k=4, hooks=hooks[:1])
    with pytest.raises(ValueError, match="multiple of 3"):
        TopKCrossCoder(d_in=8, d_sae=16, k=4, hooks=hooks)


def test_null_options_resolve_to_the_transcoders_and_crosscoders_measured_defaults() -> None:
    """docs/defaults.md ("Transcoders and crosscoders"): a transcoder's encoder, drawn apart from
    its decoder, starts with unit columns for L1 and JumpReLU (their SAEs' smaller starts left
    most latents dead on MiniLM) and with columns of the variant's start for the TopK family
    (0.5: AuxK revives what the smaller start leaves silent, at a lower FVU, two seeds); clipping
    and Adam's betas are its variant's. A crosscoder keeps its variant's defaults (measured
    better than the old ones)."""
    sites = dict(d_in=D_IN, d_out=D_OUT, d_sae=48)
    for cls in TRANSCODERS:
        variant = next(base for base in cls.__mro__ if base.__module__ != cls.__module__)
        options = {"k": 4} if "TopK" in cls.__name__ else {}
        tc = cls(**sites, **options, encoder_init_scale=None, betas=None, gradient_clip_norm=None)
        plain = variant(d_in=D_IN, d_sae=48, **options)  # what the transcoder's form resolves
        start = 0.5 if issubclass(variant, TopKSAE) else 1.0
        assert tc.encoder_init_factor() == start, cls.__name__
        torch.testing.assert_close(tc.W_enc.norm(dim=0), torch.full((48,), start))
        assert tc.adam_betas() == plain.adam_betas(), cls.__name__
        assert tc.gradient_clip_max_norm() == plain.gradient_clip_max_norm() == 1.0, cls.__name__
        chosen = cls(**sites, **options, encoder_init_scale=0.25)  # a number is used as given
        torch.testing.assert_close(chosen.W_enc.norm(dim=0), torch.full((48,), 0.25))
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    for cls in CROSSCODERS:
        options = {"k": 4} if "TopK" in cls.__name__ else {}
        cc = cls(d_in=D_IN, d_sae=48, hooks=hooks, **options)
        variant = next(base for base in cls.__mro__ if base.__module__ != cls.__module__)
        plain = variant(d_in=D_IN, d_sae=48, **options)
        assert cc.encoder_init_factor() == plain.encoder_init_factor(), cls.__name__
        assert cc.adam_betas() == plain.adam_betas(), cls.__name__
        assert cc.gradient_clip_max_norm() == plain.gradient_clip_max_norm(), cls.__name__


LAYER_MAGNITUDES = torch.tensor([7.0] * (D_IN // 2) + [0.3] * (D_IN // 2))  # two layers


def test_every_site_is_scaled_by_its_own_factor_fitted_in_training() -> None:
    """Per-site input scaling (crosscoder papers): each site's mean norm becomes sqrt(width),
    however different the sites' magnitudes; one shared factor would leave them apart."""
    x, y = toy_map(64)
    x, y = x * 7, y * 0.2
    tc = Transcoder(d_in=D_IN, d_out=D_OUT, d_sae=16, normalize_activations=True)
    quiet_trainer(1).fit(tc, DataLoader(TensorDataset(x, y), batch_size=64))
    norm = lambda v: float(v.norm(dim=-1).mean())  # noqa: E731
    assert norm(tc.normalize(x)) == pytest.approx(D_IN**0.5, rel=1e-5)
    assert norm(tc.normalize_target(y)) == pytest.approx(D_OUT**0.5, rel=1e-5)
    with torch.no_grad():  # model units out: the reconstruction is unscaled by the output's factor
        torch.testing.assert_close(
            tc(x).x_hat, tc.forward_normalized(tc.normalize(x)).x_hat / tc.output_scale
        )
    with pytest.raises(ValueError, match="one scale per site"):
        tc.fit_input_scale(x)
    # A checkpoint from before per-site scales had one factor for both sites.
    old_state = {k: v for k, v in tc.state_dict().items() if k != "output_scale"}
    old = Transcoder(d_in=D_IN, d_out=D_OUT, d_sae=16, normalize_activations=True)
    old.load_state_dict(old_state)
    assert float(old.output_scale) == float(tc.input_scale)

    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    layers = toy_map(64)[0] * LAYER_MAGNITUDES
    cc = TopKCrossCoder(d_in=D_IN, d_sae=16, k=2, hooks=hooks, normalize_activations=True)
    quiet_trainer(1).fit(cc, DataLoader(TensorDataset(layers), batch_size=64))
    for layer in cc.normalize(layers).split(D_IN // 2, dim=-1):
        assert norm(layer) == pytest.approx((D_IN // 2) ** 0.5, rel=1e-5)
    state = cc.state_dict() | {"input_scale": torch.tensor(3.0)}  # saved with one factor
    cc.load_state_dict(state)
    torch.testing.assert_close(cc.input_scale, torch.full((D_IN,), 3.0))


def test_crosscoder_reports_fvu_in_the_models_units_though_each_layer_is_scaled() -> None:
    """The loss weighs every layer alike (per-layer scales), but train/fvu and val/fvu are those
    of the model's activations: what ``cc(x)`` and the exported crosscoder give. One scale per
    layer makes the two differ (a scalar scale cancels out of an FVU)."""

    class TrainFVU(L.Callback):  # the step's logged FVU, and the FVU its weights give
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            self.expected = _fvu(module, batch[0], batch[0])

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.logged = float(trainer.callback_metrics["train/fvu"])

    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    layers = toy_map(256)[0] * LAYER_MAGNITUDES
    cc = CrossCoder(d_in=D_IN, d_sae=16, hooks=hooks, normalize_activations=True, lr=1e-2)
    loader = DataLoader(TensorDataset(layers), batch_size=256)
    train_fvu = TrainFVU()
    trainer = quiet_trainer(3, [train_fvu], limit_val_batches=1, check_val_every_n_epoch=3)
    trainer.fit(cc, loader, loader)
    assert train_fvu.logged == pytest.approx(train_fvu.expected, rel=1e-4)
    assert float(trainer.callback_metrics["val/fvu"]) == pytest.approx(
        _fvu(cc.eval(), layers, layers), rel=1e-4
    )
    with torch.no_grad():  # in the loss's units the FVU is another number
        normalised = cc.normalize(layers)
        in_loss_units = _fvu_of(cc.forward_normalized(normalised).x_hat, normalised)
    assert abs(in_loss_units - _fvu(cc, layers, layers)) > 0.01


def _fvu_of(x_hat: Tensor, y: Tensor) -> float:
    return float((x_hat - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def _fvu(model: L.LightningModule, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        error = (model(x).x_hat - y).pow(2).sum()
    return float(error / (y - y.mean(0)).pow(2).sum())


def test_skip_transcoder_beats_plain_on_a_map_with_a_linear_part() -> None:
    """Trained the same way (same data order, init seed, steps, k, the modules' own losses),
    the skip transcoder's output FVU on held-out rows is below the plain one's: W_skip carries
    the linear part, the k latents the rest. (A plain loop: the property, not the Trainer,
    is under test; the Trainer path is covered below.)"""
    x, y = toy_map(4096)
    held_x, held_y = toy_map(1024, seed=1)
    fvu = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # [256, 48] matmuls: a second thread only adds contention
    for cls in (TopKTranscoder, TopKSkipTranscoder):
        tc = cls(d_in=D_IN, d_out=D_OUT, d_sae=48, k=3)
        optimizer = torch.optim.Adam(tc.parameters(), lr=3e-3)
        order = torch.Generator().manual_seed(0)
        for _ in range(6):
            for rows in torch.randperm(len(x), generator=order).split(256):
                loss = sum(tc.loss_terms(y[rows], tc.forward_normalized(x[rows])).values())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        fvu[cls.__name__] = _fvu(tc.eval(), held_x, held_y)
    torch.set_num_threads(threads)
    assert fvu["TopKSkipTranscoder"] < 0.8 * fvu["TopKTranscoder"], fvu


def test_paired_files_are_served_aligned_and_mismatches_are_named(tmp_path: Path) -> None:
    data = paired_data(pairs_dir(tmp_path / "ok", [700, 500]))
    data.setup("fit")
    assert data.d_ins == {IN: D_IN, OUT: D_OUT}
    x_all, y_all = toy_map(1200)
    for batch in list(data.train_dataloader())[:3]:  # shuffled across files, pairs kept
        match = (batch[IN][:, None] == x_all[None]).all(-1)
        assert match.any(1).all()
        torch.testing.assert_close(batch[OUT], y_all[match.float().argmax(1)])

    bad = pairs_dir(tmp_path / "bad", [700, 500])
    np.save(bad / OUT / "part1.npy", np.zeros((499, D_OUT), np.float32))
    with pytest.raises(ValueError, match="same rows"):
        paired_data(bad).setup("fit")
    with pytest.raises(ValueError, match="not a folder"):
        ActivationDataModule(activations_dir=str(tmp_path / "ok"), hooks=[IN, "nope"]).setup()
    tc = TopKTranscoder(d_in=D_IN, d_out=D_OUT + 1, d_sae=16, k=2, input_hook=IN, output_hook=OUT)
    with pytest.raises(ValueError, match=f"set d_out: {D_OUT}"):
        quiet_trainer(1).fit(tc, paired_data(tmp_path / "ok"))


def _fit(tmp_path: Path, steps: int, ckpt: str | None = None, every: int = 4) -> L.LightningModule:
    L.seed_everything(0)
    sites = dict(d_in=D_IN, d_out=D_OUT, input_hook=IN, output_hook=OUT)
    options = dict(d_sae=48, k=3, lr=3e-3, dead_window_tokens=256, normalize_activations=True)
    tc = TopKSkipTranscoder(**sites, **options)
    callbacks = [
        DataInformedInit(method="data", n_samples=64),
        DecoderNormConstraint(),
        DeadFeatureResampler(at_steps=[3], strategy="worst", n_batches=1, batch_size=128),
        FeatureDensityMonitor(every_n_steps=2, window_tokens=256),
        FeatureGeometryMonitor(every_n_steps=4),
        ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1),
    ]
    trainer = quiet_trainer(steps, callbacks, default_root_dir=tmp_path)
    with torch.no_grad():  # features dead from the start, so the resampler has work at step 3
        tc.b_enc[:6] = -1e3
    trainer.fit(tc, paired_data(tmp_path.parent / "data"), ckpt_path=ckpt)
    return tc


def test_every_callback_works_on_a_transcoder_and_resume_is_exact(tmp_path: Path) -> None:
    pairs_dir(tmp_path / "data", [1024, 1024])
    straight = _fit(tmp_path / "a", 8)
    x, y = toy_map(2048)
    # Decoder rows unit norm (DecoderNormConstraint) in the output space.
    torch.testing.assert_close(straight.W_dec.norm(dim=1), torch.ones(48))
    # The resampler restarted the features silenced at the start (b_enc -1e3, reset to 0).
    assert straight.b_enc[:6].abs().max() < 1
    # Resume from the step-4 checkpoint: the same weights as the straight run, exactly.
    resumed = _fit(tmp_path / "b", 8, ckpt=str(next((tmp_path / "a" / "ckpt").glob("*step=4*"))))
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert _fvu(straight.eval(), x, y) < 1


def test_data_informed_init_uses_the_output_site_for_the_decoder(tmp_path: Path) -> None:
    x, y = toy_map(256)
    tc = TopKTranscoder(d_in=D_IN, d_out=D_OUT, d_sae=16, k=2)
    init = DataInformedInit(method="data", n_samples=256, b_dec="mean")
    weights = init.initial_weights(x, tc, y)
    torch.testing.assert_close(weights["b_dec"], y.mean(0))
    assert weights["W_dec"].shape == (16, D_OUT) and weights["W_enc"].shape == (D_IN, 16)
    # Each decoder row is a centred output sample, each encoder column the input direction
    # whose activation predicts it.
    centred = y - y.mean(0)
    rows = torch.cdist(weights["W_dec"], centred / centred.norm(dim=1, keepdim=True)).argmin(1)
    torch.testing.assert_close(weights["W_dec"].norm(dim=1), torch.ones(16))
    predicted = (centred @ weights["W_dec"].T).T @ x
    torch.testing.assert_close(weights["W_enc"].T, predicted / predicted.norm(dim=1, keepdim=True))
    assert len(rows) == 16


# ----------------------------------------------------------------------------- splicing
@pytest.fixture(scope="module")
def neox() -> tuple[object, Tensor, torch.nn.Module]:
    """A config-built GPT-NeoX bridge, tokens, and block 1's MLP from an unhooked copy of the
    weights (calling the bridge's own inside its hook would re-enter that hook)."""
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=0.3,
    )
    hf, reference = GPTNeoXForCausalLM(cfg).eval(), GPTNeoXForCausalLM(cfg).eval()
    reference.load_state_dict(hf.state_dict())
    bridge = build_bridge_from_module(hf, "GPTNeoXForCausalLM", hf_config=cfg)
    tokens = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(1))
    return bridge, tokens, reference.gpt_neox.layers[1].mlp


def test_splicing_a_transcoder_at_the_mlp_output_with_zero_and_identity_controls(neox) -> None:
    bridge, tokens, mlp = neox  # mlp: the function a perfect transcoder would compute
    args = (bridge, "blocks.1.hook_mlp_out")
    kwargs = dict(tokens=tokens, input_hook="blocks.1.mlp.hook_in")
    perfect = downstream_metrics(*args, lambda x: mlp(x), **kwargs)
    assert perfect.ce_loss_recovered == pytest.approx(1.0, abs=1e-5)
    assert perfect.kl == pytest.approx(0.0, abs=1e-6)
    assert perfect.final_hidden_recovered == pytest.approx(1.0, abs=1e-6)
    zero = downstream_metrics(*args, lambda x: torch.zeros_like(x), **kwargs)
    assert zero.ce_loss_recovered == pytest.approx(0.0, abs=1e-6)
    assert zero.ce_sae == pytest.approx(zero.ce_zero) and zero.kl > 0
    assert zero.final_hidden_recovered == pytest.approx(0.0, abs=1e-6)
    # In between: half the MLP's output.
    half = downstream_metrics(*args, lambda x: 0.5 * mlp(x), **kwargs)
    assert 0 < half.ce_loss_recovered < 1 and 0 < half.final_hidden_recovered < 1
    # A transcoder module splices the same way (its forward maps the input site to the output).
    tc = Transcoder(d_in=32, d_sae=64).eval()
    result = downstream_metrics(*args, lambda x: tc(x).x_hat, **kwargs)
    assert result.ce_loss_recovered is not None and result.kl > 0
    with pytest.raises(ValueError, match="did not run before"):
        downstream_metrics(bridge, "blocks.0.hook_mlp_out", mlp, tokens,
                           input_hook="blocks.1.mlp.hook_in")  # fmt: skip


# ----------------------------------------------------------------------------- export / load
def _trained(cls: type, **kwargs) -> L.LightningModule:
    """Every parameter randomised, an input scale far from 1 (folded in on export)."""
    torch.manual_seed(0)
    sites = dict(d_in=D_IN, d_out=D_OUT, input_hook=IN, output_hook=OUT)
    tc = cls(**sites, d_sae=24, normalize_activations=True, **kwargs)
    x, y = toy_map(64)
    tc.fit_input_scale(x * 7, y * 0.2)  # the sites' scales differ: the fold must keep them apart
    with torch.no_grad():
        for param in tc.parameters():
            param.add_(torch.randn_like(param) * 0.1)
        if hasattr(tc, "threshold_updates"):  # BatchTopK's inference threshold, as if trained
            tc.threshold.fill_(0.4)
            tc.threshold_updates.fill_(1)
    return tc.eval()


# name -> (class, options, architecture in cfg.json)
EXPORTS = {
    "transcoder": (Transcoder, {}, "transcoder"),
    "skip_transcoder": (SkipTranscoder, {}, "skip_transcoder"),
    "jumprelu_skip_transcoder": (JumpReLUSkipTranscoder, {}, "jumprelu_skip_transcoder"),
    "batchtopk_skip": (BatchTopKSkipTranscoder, {"k": 4}, "jumprelu_skip_transcoder"),
    "topk_skip": (TopKSkipTranscoder, {"k": 4}, "lightning_sae_topk_skip_transcoder"),
    "crosscoder": (TopKCrossCoder, {"k": 4}, "lightning_sae_topk_crosscoder"),
    "batchtopk_crosscoder": (BatchTopKCrossCoder, {"k": 4}, "lightning_sae_batchtopk_crosscoder"),
}


def saelens_transcoders() -> dict[str, L.LightningModule]:
    """One of each transcoder type SAELens 6 loads; tests/test_io.py has SAELens read their
    exports (in its one SAELens run) and checks its outputs against ours."""
    return {
        name: _trained(cls, **kwargs)
        for name, (cls, kwargs, architecture) in EXPORTS.items()
        if not architecture.startswith("lightning_sae_")
    }


def test_export_load_round_trip_in_saelens_or_our_format(tmp_path: Path) -> None:
    x = toy_map(32)[0] * 7
    for name, (cls, kwargs, architecture) in EXPORTS.items():
        if cls in CROSSCODERS:
            hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
            model = cls(d_in=D_IN, d_sae=24, hooks=hooks, normalize_activations=True, **kwargs)
            model.fit_input_scale(x * LAYER_MAGNITUDES)  # one scale per layer, far apart
            if cls is BatchTopKCrossCoder:  # a learned threshold, as after training
                model.threshold.fill_(0.3)
                model.threshold_updates.fill_(1)
            model.eval()
        else:
            model = _trained(cls, **kwargs)
        folder = export_sae(model, tmp_path / name)
        cfg = json.loads((folder / "cfg.json").read_text())
        assert cfg["architecture"] == architecture
        if cls not in CROSSCODERS:
            assert cfg["d_out"] == D_OUT and not cfg["apply_b_dec_to_input"]
            assert cfg["metadata"]["hook_name"] == IN and cfg["metadata"]["hook_name_out"] == OUT
        loaded = load(folder)
        assert type(loaded) is cls
        with torch.no_grad():
            torch.testing.assert_close(loaded.encode(x), model.encode(x))
            torch.testing.assert_close(loaded(x).x_hat, model(x).x_hat, atol=1e-5, rtol=1e-5)
    # Our own format names its class in metadata.lightning_sae; without it nothing can load it.
    cfg_path = tmp_path / "topk_skip" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["metadata"]["lightning_sae"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="lightning-sae's own format"):
        load(tmp_path / "topk_skip")


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    "configs",
    [
        ["minilm/transcoder-l3.yaml"],
        ["minilm/transcoder-l3.yaml", "minilm/skip-transcoder-l3.yaml"],
        ["pythia-70m/transcoder-l3.yaml"],
        ["minilm/transcoders-all-layers.yaml"],
        ["minilm/crosscoder-resid.yaml"],
    ],
)
def test_transcoder_configs_parse(configs: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """The offline MiniLM config was also run end to end with `lightning-sae fit`
    (docs/variants.md); the Pythia one needs the hub."""
    args = [arg for config in configs for arg in ("--config", str(CONFIGS / config))]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    model = printed["model"]
    if "hooks" in model["init_args"]:  # a crosscoder reads and writes its layers
        assert printed["data"]["init_args"]["hooks"] == model["init_args"]["hooks"]
        assert variant_class(model["class_path"]) in CROSSCODERS
        return
    transcoders = model["init_args"].get("members", [model])  # a group: one per layer
    sites = [tc["init_args"][f"{site}_hook"] for tc in transcoders for site in ("input", "output")]
    assert printed["data"]["init_args"]["hooks"] == sites
    for tc in transcoders:
        assert variant_class(tc["class_path"]) in TRANSCODERS

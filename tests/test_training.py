"""Decoder-norm constraint, exact resume, and clear errors on bad input."""

from pathlib import Path

import lightning as L
import pytest
import torch
from _trainer import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_sae.callbacks.decoder_norm import DecoderNormConstraint
from lightning_sae.data.toy import ToySuperpositionDataModule
from lightning_sae.models.standard import StandardSAE


def _small_sae(**kwargs: object) -> StandardSAE:
    defaults = {"d_in": 32, "d_sae": 64, "lr": 1e-3, "l1_coefficient": 0.1, "lr_warmup_steps": 3}
    return StandardSAE(**{**defaults, **kwargs})


def _small_data(**kwargs: object) -> ToySuperpositionDataModule:
    defaults = {"n_features": 64, "d_in": 32, "batch_size": 64, "batches_per_epoch": 5}
    return ToySuperpositionDataModule(**{**defaults, **kwargs})


def _trainer(root: Path, max_steps: int, callbacks: list, **kwargs: object) -> L.Trainer:
    return quiet_trainer(max_steps, callbacks, default_root_dir=root, **kwargs)


def test_decoder_norm_constraint_removes_parallel_gradient_and_renormalises() -> None:
    sae = _small_sae()
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(64, 1) + 0.5)
    constraint = DecoderNormConstraint()
    x = torch.randn(16, 32)
    out = sae(x)
    sae.loss_terms(x, out)["mse"].backward()
    constraint.on_before_optimizer_step(None, sae, None)  # type: ignore[arg-type]
    parallel = (sae.W_dec.grad * sae.W_dec).sum(1)
    assert parallel.abs().max() < 1e-5
    assert sae.W_dec.grad.abs().sum() > 0  # only the parallel part was removed
    constraint.on_train_batch_end(None, sae, None, None, 0)  # type: ignore[arg-type]
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-6)


def test_norms_stay_at_one_through_training(tmp_path: Path) -> None:
    sae = _small_sae(lr=1e-2)
    _trainer(tmp_path, 10, [DecoderNormConstraint()], enable_checkpointing=False).fit(
        sae, _small_data()
    )
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)


def test_resume_from_half_way_is_bitwise_identical(tmp_path: Path) -> None:
    """N steps straight vs N/2 then resume to N: same weights to the last bit.

    The straight run writes a checkpoint at N/2 as a side effect; a fresh module, data module and
    trainer resume from it. Seven steps per epoch and N = 12 make the checkpoint fall mid-epoch.
    """
    steps = 12

    def run(root: Path, ckpt_path: str | None, callbacks: list) -> StandardSAE:
        L.seed_everything(0)
        sae = _small_sae(l1_warmup_steps=8, lr_decay_steps=4)
        data = _small_data(batches_per_epoch=7)
        trainer = _trainer(root, steps, [DecoderNormConstraint(), *callbacks])
        trainer.fit(sae, data, ckpt_path=ckpt_path)
        return sae

    half = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=steps // 2, save_top_k=-1)
    straight = run(tmp_path / "a", None, [half])
    midway = tmp_path / "ckpt" / f"epoch=0-step={steps // 2}.ckpt"
    assert midway.exists(), sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    resumed = run(tmp_path / "b", str(midway), [])
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert not torch.equal(straight.W_dec, _small_sae().W_dec)  # training did move the weights


def test_normalisation_scale_is_fitted_and_raw_api_undoes_it(tmp_path: Path) -> None:
    sae = _small_sae(normalize_activations=True)
    data = _small_data()
    _trainer(tmp_path, 2, [], enable_checkpointing=False).fit(sae, data)
    x = next(iter(data.train_dataloader()))
    assert bool(sae.input_scale_fitted)
    scaled_norm = (x * sae.input_scale).norm(dim=1).mean()
    assert abs(scaled_norm.item() - 32**0.5) < 0.5
    out = sae(x)
    assert torch.allclose(out.x_hat, sae.decode(sae.encode(x)), atol=1e-6)
    assert torch.allclose(
        out.x_hat * sae.input_scale, sae.forward_normalized(x * sae.input_scale).x_hat, atol=1e-5
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d_sae": 0}, "model.init_args.d_sae"),
        ({"l1_coefficient": -1.0}, "model.init_args.l1_coefficient"),
        ({"lr": 0.0}, "model.init_args.lr"),
        ({"l1_warmup_steps": -5}, "model.init_args.l1_warmup_steps"),
    ],
)
def test_bad_hyperparameters_name_the_option(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _small_sae(**kwargs)


def test_d_in_mismatch_is_caught_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"Set model.init_args.d_in: 16"):
        _trainer(tmp_path, 1, [], enable_checkpointing=False).fit(
            _small_sae(), _small_data(d_in=16)
        )

"""Speed options on every variant: bf16 autocast (``trainer.precision: bf16-mixed``) and
``torch.compile`` (``model.init_args.compile``), each trained against a float32 eager run."""

from __future__ import annotations

import copy
import importlib
from typing import Any

import lightning as L
import pytest
import torch
from _trainer import quiet_trainer
from torch.profiler import ProfilerActivity, profile

from lightning_sae.callbacks.decoder_norm import DecoderNormConstraint
from lightning_sae.data.toy import ToySuperpositionDataModule
from lightning_sae.models import optimizers
from lightning_sae.models.base import SAEOutput, SparseAutoencoder

VARIANTS = {
    "standard": ("standard.StandardSAE", {"l1_coefficient": 0.03}),
    "standard_sparse": ("standard.StandardSAE", {"l1_coefficient": 0.03, "decode_impl": "sparse"}),
    "topk_sparse": ("topk.TopKSAE", {"k": 4, "decode_impl": "sparse"}),
    "topk_dense": ("topk.TopKSAE", {"k": 4, "decode_impl": "dense"}),
    "batchtopk": ("topk.BatchTopKSAE", {"k": 4}),
    "matryoshka": ("matryoshka.MatryoshkaSAE", {"k": 4, "group_sizes": [16, 16, 32, 64]}),
    "jumprelu": ("jumprelu.JumpReLUSAE", {}),
    "gated": ("gated.GatedSAE", {}),
    "approx_l0": ("approx_l0.ApproxL0SAE", {}),
}


def build(name: str, **overrides: Any) -> SparseAutoencoder:
    path, kwargs = VARIANTS[name]
    module, _, cls = f"lightning_sae.models.{path}".rpartition(".")
    model_cls = getattr(importlib.import_module(module), cls)
    return model_cls(d_in=32, d_sae=128, lr=3e-3, **{**kwargs, **overrides})


class RecordStepDtypes(L.Callback):
    """Dtypes of the SAE's activations inside training steps."""

    def __init__(self) -> None:
        self.acts_dtypes: set[torch.dtype] = set()

    def on_fit_start(self, trainer: L.Trainer, pl_module: SparseAutoencoder) -> None:
        forward = pl_module.forward_normalized

        def recording(x_n: torch.Tensor) -> SAEOutput:
            out = forward(x_n)
            if pl_module.training:
                self.acts_dtypes.add(out.acts.dtype)
            return out

        pl_module.forward_normalized = recording


def fit(model: SparseAutoencoder, steps: int, **trainer_kwargs: Any) -> float:
    """Train on toy data; the final float32 eager MSE on held-out samples."""
    L.seed_everything(0, verbose=False)
    data = ToySuperpositionDataModule(n_features=64, d_in=32, batch_size=256, val_batches=1)
    quiet_trainer(steps, accelerator="cpu", **trainer_kwargs).fit(model, data)
    x = data.sample(2048, seed=1)
    model.eval()
    with torch.no_grad():
        return (model(x).x_hat - x).pow(2).sum(-1).mean().item() / x.pow(2).sum(-1).mean().item()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_bf16_autocast_trains_every_variant_like_float32(name: str) -> None:
    recorder = RecordStepDtypes()
    bf16 = build(name)
    callbacks = [DecoderNormConstraint(), recorder]
    bf16_error = fit(bf16, 150, precision="bf16-mixed", callbacks=callbacks)
    assert recorder.acts_dtypes == {torch.bfloat16}  # the [batch, d_sae] work really ran in bf16
    # Parameters, and so Adam's state, stay float32 under mixed precision.
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    fp32_error = fit(build(name), 150, callbacks=[DecoderNormConstraint()])
    assert fp32_error < 0.5  # the runs learn something
    assert bf16_error == pytest.approx(fp32_error, rel=0.15, abs=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_compiled_step_trains_like_eager(name: str) -> None:
    torch._dynamo.reset()
    compiled = build(name, compile=True)
    fit(compiled, 12, callbacks=[DecoderNormConstraint()])
    assert hasattr(compiled.forward_normalized, "_torchdynamo_orig_callable")
    eager = build(name)
    fit(eager, 12, callbacks=[DecoderNormConstraint()])
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[key], value, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("options", [{}, {"amsgrad": True}, {"weight_decay": 0.01}])
@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_fused_adam_steps_a_transposed_encoder_without_copying_it(
    optimizer: str, options: dict[str, Any]
) -> None:
    """W_enc lies latent by latent (its transpose is contiguous). torch's fused CPU Adam copies
    such a gradient to a contiguous tensor that it never reads; the module's optimizer hands
    the kernel the transposes instead: the same steps bit for bit, and no copy of W_enc."""
    sae = build("topk_sparse")
    assert not sae.W_enc.is_contiguous() and sae.W_enc.T.is_contiguous()
    twin = copy.deepcopy(sae)
    ours_cls, torch_cls = {
        "adam": (optimizers.Adam, torch.optim.Adam),
        "adamw": (optimizers.AdamW, torch.optim.AdamW),
    }[optimizer]
    ours = ours_cls(sae.parameters(), lr=0.01, fused=True, **options)
    theirs = torch_cls(twin.parameters(), lr=0.01, fused=True, **options)
    for step in range(3):
        for module in (sae, twin):
            for param in module.parameters():  # gradients in their parameters' layouts
                generator = torch.Generator().manual_seed(step)
                grad = torch.randn(param.T.shape if param.ndim == 2 else param.shape,
                                   generator=generator)  # fmt: skip
                param.grad = grad.T if not param.is_contiguous() else grad.view(param.shape)
        theirs.step()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as seen:
            ours.step()
        copies = [e for e in seen.events() if e.name in ("aten::clone", "aten::copy_")]
        assert not [e for e in copies if e.input_shapes and e.input_shapes[0] == [32, 128]]
    for (name, param), twin_param in zip(sae.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(param, twin_param), name
        state, twin_state = ours.state[param], theirs.state[twin_param]
        for key, value in twin_state.items():
            assert torch.equal(state[key], value) and state[key].stride() == value.stride(), key

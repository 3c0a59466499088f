"""Cross-layer transcoders: the interface identities (model units, scales folded), the loss
terms against a direct computation, the activations' selection rules, training, exact resume,
export/load, and the replacement-model evaluation on a tiny GPT-NeoX."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lightning_sae.models import VARIANTS, variant_class
from lightning_sae.models.clt import (
    CROSS_LAYER_TRANSCODERS,
    BatchTopKCrossLayerTranscoder,
    CrossLayerTranscoder,
    JumpReLUCrossLayerTranscoder,
    TopKCrossLayerTranscoder,
)

N_LAYERS, D_IN, D_OUT, D_SAE = 3, 8, 6, 16  # d_in != d_out, so a site mix-up fails on shapes
IN_HOOKS = [f"blocks.{layer}.hook_mlp_in" for layer in range(N_LAYERS)]
OUT_HOOKS = [f"blocks.{layer}.hook_mlp_out" for layer in range(N_LAYERS)]


def make(cls: type[CrossLayerTranscoder] = JumpReLUCrossLayerTranscoder, **kwargs) -> Tensor:
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
    theta = clt.log_threshold.exp()
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
    grad = clt.log_threshold.grad
    assert bool((grad[~near] == 0).all()) and bool((grad[near] < 0).all())


@pytest.mark.parametrize("scope", ["layer", "all"])
def test_topk_keeps_the_k_largest_decoder_weighted_writes(scope: str) -> None:
    clt = scrambled(make(TopKCrossLayerTranscoder, k=3, topk_scope=scope))
    x, _ = layered_batch(5)
    pre = clt.pre_activations(x)
    acts = clt.activation(pre)
    written = torch.relu(pre) * clt.decoder_norms()
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
    kept = (torch.relu(clt.pre_activations(x)) * clt.decoder_norms())[acts != 0]
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


def test_a_batch_missing_a_layer_names_the_hook() -> None:
    clt = make()
    x, y = layered_batch(4)
    batch = {h: x[:, i] for i, h in enumerate(IN_HOOKS)} | {OUT_HOOKS[0]: y[:, 0]}
    with pytest.raises(ValueError, match="'blocks.1.hook_mlp_out' .* add it to data"):
        clt.input_and_target(batch)

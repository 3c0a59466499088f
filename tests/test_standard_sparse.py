"""A ReLU SAE's sparse step (decode and encoder gradient through the active latents alone)
against dense autograd, and the per-step choice between it and the dense step.

The reference is ``decode_impl: dense``: every product recorded by autograd. The sparse step and
the dense step of ``auto`` (the pre-activations made without a graph, the product's gradient
attached after) must give the same values and gradients within float tolerance (the sums run
in another order).
"""

import pytest
import torch
from test_sparse_backward import Shapes

from lightning_sae.models.standard import StandardSAE
from lightning_sae.models.transcoder import CrossCoder, SkipTranscoder

D_IN, D_SAE, ROWS = 12, 64, 40
SIZES = {"d_in": D_IN, "d_sae": D_SAE}
VARIANTS = {
    "l1": lambda impl: StandardSAE(**SIZES, decode_impl=impl),
    "tanh-weighted": lambda impl: StandardSAE(
        **SIZES, decode_impl=impl, sparsity_penalty="tanh", weight_by_decoder_norm=True,
        tanh_scale=0.7,
    ),
    "no-b_dec": lambda impl: StandardSAE(**SIZES, decode_impl=impl, use_b_dec=False),
    "skip-transcoder": lambda impl: SkipTranscoder(**SIZES, d_out=8, decode_impl=impl),
    "crosscoder": lambda impl: CrossCoder(**SIZES, hooks=["a", "b"], decode_impl=impl),
}  # fmt: skip


def step(name: str, impl: str, sparsity: float) -> dict:
    """One training step's outputs, loss terms and gradients; ``sparsity`` lowers b_enc so that
    few latents fire (0: about half fire)."""
    torch.manual_seed(0)
    sae = VARIANTS[name](impl)
    with torch.no_grad():
        for param in sae.parameters():
            param.add_(0.1 * torch.randn_like(param))
        sae.b_enc.sub_(sparsity)
    x = torch.randn(ROWS, sae.d_in)
    y = torch.randn(ROWS, sae.d_out) if sae.d_out != sae.d_in else x
    out = sae.forward_normalized(x)
    terms = sae.loss_terms(y, out)
    sum(terms.values()).backward()
    return {
        "sae": sae,
        "out": out,
        "terms": {k: v.detach() for k, v in terms.items()},
        "grads": {k: p.grad for k, p in sae.named_parameters()},
    }


@pytest.mark.parametrize("sparsity", [0.0, 0.8], ids=["half-firing", "few-firing"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_sparse_and_auto_steps_equal_dense_autograd(name: str, sparsity: float) -> None:
    dense = step(name, "dense", sparsity)
    for impl in ("sparse", "auto"):
        run = step(name, impl, sparsity)
        assert torch.equal(run["out"].pre_acts, dense["out"].pre_acts)
        assert torch.equal(run["out"].acts, dense["out"].acts)
        torch.testing.assert_close(run["out"].x_hat, dense["out"].x_hat, rtol=1e-5, atol=1e-6)
        assert run["terms"].keys() == dense["terms"].keys()
        for term, value in dense["terms"].items():
            torch.testing.assert_close(run["terms"][term], value, rtol=1e-5, atol=1e-6)
        for param, grad in dense["grads"].items():
            torch.testing.assert_close(run["grads"][param], grad, rtol=1e-5, atol=1e-6, msg=param)
            assert grad.abs().max() > 0, param
        fired = dense["out"].fired(D_SAE)
        assert torch.equal(run["out"].fired(D_SAE), fired)


def test_auto_picks_the_sparse_step_by_the_density_of_the_step() -> None:
    """Above the cut-off (1/16 on CPU) a step is dense: dense activations, no code; below, the
    code alone, and the backward makes no [rows, d_sae] tensor."""
    half = step("l1", "auto", 0.0)
    assert half["out"].code is None and (half["out"].acts != 0).float().mean() > 1 / 16
    sae = step("l1", "auto", 0.8)["sae"]
    torch.manual_seed(1)
    x = torch.randn(ROWS, D_IN)
    out = sae.forward_normalized(x)
    assert out.code is not None and 0 < out.code.values.numel() <= ROWS * D_SAE / 16
    assert torch.equal(out.acts, torch.relu(out.pre_acts))
    loss = sum(sae.loss_terms(x, out).values())
    with Shapes() as seen:
        loss.backward()
    assert seen.shapes and (ROWS, D_SAE) not in seen.shapes


def test_dense_step_of_auto_equals_the_recorded_product_bit_for_bit() -> None:
    """Attaching the product's gradient after the fact runs the products autograd runs."""
    dense, auto = step("l1", "dense", 0.0), step("l1", "auto", 0.0)
    assert auto["out"].code is None
    assert torch.equal(auto["out"].x_hat, dense["out"].x_hat)
    for param, grad in dense["grads"].items():
        assert torch.equal(auto["grads"][param], grad), param


def test_sparse_step_under_bf16_autocast_matches_dense_within_bf16() -> None:
    runs = {}
    for impl in ("dense", "sparse"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            runs[impl] = step("l1", impl, 0.8)
    for param, grad in runs["dense"]["grads"].items():
        assert runs["sparse"]["grads"][param].dtype == torch.float32
        torch.testing.assert_close(runs["sparse"]["grads"][param], grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("penalty", ["l1", "tanh"])
def test_the_weighted_penalty_of_a_sparse_step_has_the_same_gradient_every_run(
    penalty: str,
) -> None:
    # Many entries per latent: the decoder norms' gradient sums each latent's entries. Autograd's
    # own backward of a gather (index_put with accumulate) adds them in an order that varies
    # between runs on a multi-threaded CPU, so two identical runs drifted apart by an ulp a step
    # (a group's members then no longer equalled their separate runs bitwise).
    generator = torch.Generator().manual_seed(0)
    sae = StandardSAE(d_in=16, d_sae=64, decode_impl="sparse", sparsity_penalty=penalty)
    x = torch.randn(4096, 16, generator=generator)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(4):
            sae.zero_grad(set_to_none=True)
            out = sae(x)
            sae.loss_terms(x, out)[penalty].backward()
            grads.append(sae.W_dec.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], g) for g in grads[1:])


def test_the_weighted_penalty_of_a_float64_sparse_step_keeps_float64_precision() -> None:
    # The decoder norms' gradient of the sparse step's weighted L1 sums each latent's entries
    # (a bincount on CPU): in a float64 run those sums stay float64, as dense autograd's do.
    grads = {}
    for impl in ("dense", "sparse"):
        torch.manual_seed(0)
        sae = StandardSAE(**SIZES, decode_impl=impl).double()
        x = torch.randn(ROWS, D_IN, dtype=torch.float64)
        out = sae.forward_normalized(x)
        sae.loss_terms(x, out)["l1"].backward()
        grads[impl] = sae.W_dec.grad
    assert grads["sparse"].dtype == torch.float64
    torch.testing.assert_close(grads["sparse"], grads["dense"], rtol=1e-12, atol=1e-12)

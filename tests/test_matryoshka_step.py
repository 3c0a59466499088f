"""Matryoshka's training step against dense autograd, written out from the definition.

The step computes its prefix losses with one custom autograd function (models/matryoshka.py,
``_PrefixSquaredErrors``), decodes the groups sparsely with the decoder's gradient summed per
latent (``sparse.decode_with_latent_bags``) and sends the encoder's gradient through the kept
latents alone. The reference here recomputes everything densely with plain autograd from the
same kept entries: pre-activations with a graph, prefix m as the first m groups' product plus
``b_dec``, the mean (or sum) over prefixes of the mean squared error, and AuxK over the dead
latents' largest pre-activations.
"""

import copy

import pytest
import torch

from lightning_sae.models.matryoshka import (
    MatryoshkaSAE,
    _PrefixSquaredErrors,
    prefix_squared_errors,
)

D_IN, D_SAE, ROWS, GROUPS = 12, 48, 40, [8, 16, 24]
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def prepared(**kwargs: object) -> tuple[MatryoshkaSAE, torch.Tensor]:
    """A Matryoshka SAE with non-trivial biases, a third of its latents dead, and a batch;
    decoding sparsely unless told (``auto`` would decode these shapes densely)."""
    torch.manual_seed(0)
    kwargs = {"decode_impl": "sparse", **kwargs}
    sae = MatryoshkaSAE(d_in=D_IN, d_sae=D_SAE, k=4, aux_k=6, group_sizes=GROUPS, **kwargs)
    with torch.no_grad():
        for param in sae.parameters():
            param.add_(0.1 * torch.randn_like(param))
    sae.tokens_since_fired[::3] = sae.dead_window()
    return sae, torch.randn(ROWS, D_IN)


def dense_terms(sae: MatryoshkaSAE, x: torch.Tensor, kept: torch.Tensor) -> dict:
    """The loss terms by dense autograd, for the kept entries ``kept`` [rows, d_sae] (bool)."""
    hp = sae.hparams
    bias = sae.b_enc - sae.b_dec @ sae.W_enc if hp.apply_b_dec_to_input else sae.b_enc
    pre_acts = x @ sae.W_enc + bias
    acts = torch.relu(pre_acts) * kept
    ends = [0, *torch.tensor(GROUPS).cumsum(0).tolist()]
    prefixes = torch.stack([acts[:, :end] @ sae.W_dec[:end] + sae.b_dec for end in ends[1:]], 1)
    per_prefix = (prefixes - x[:, None]).pow(2).sum(-1).mean(0)
    terms = {"prefix_mse": per_prefix.sum() if hp.prefix_loss == "sum" else per_prefix.mean()}
    if hp.aux_coefficient > 0:
        dead = sae.dead_mask()
        n_dead = int(dead.sum())
        scores = pre_acts.detach().masked_fill(~dead, -torch.inf)
        chosen = scores.topk(min(sae.aux_k, n_dead), dim=1).indices
        aux_mask = torch.zeros_like(kept).scatter(1, chosen, True)
        residual = (x - prefixes[:, -1]).detach()
        error = ((torch.relu(pre_acts) * aux_mask) @ sae.W_dec - residual).pow(2).sum(-1).mean()
        if hp.auxk_normalization == "residual_variance":
            error = error / (residual - residual.mean(0)).pow(2).sum(-1).mean()
        terms["auxk"] = hp.aux_coefficient * min(n_dead / sae.aux_k, 1.0) * error
    return terms


def gradients(sae: MatryoshkaSAE, terms: dict) -> dict[str, torch.Tensor]:
    params = [getattr(sae, name) for name in PARAMS]
    return dict(zip(PARAMS, torch.autograd.grad(sum(terms.values()), params), strict=True))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"aux_coefficient": 0.0},
        {"apply_b_dec_to_input": False, "aux_coefficient": 0.5},
        {"prefix_loss": "sum", "auxk_normalization": "residual_variance"},
        {"decode_impl": "dense", "aux_coefficient": 0.5},
        {"decode_impl": "dense", "prefix_loss": "sum", "aux_coefficient": 0.0},
    ],
    ids=["defaults", "no-auxk", "no-b_dec-in", "sum+normalised-auxk", "dense-decode", "dense-sum"],
)
def test_step_equals_dense_autograd(options: dict) -> None:
    sae, x = prepared(**options)
    sae.train()
    out = sae.forward_normalized(x)
    terms = sae.loss_terms(x, out)
    ours = gradients(sae, terms)
    kept = out.acts.detach() != 0
    reference = dense_terms(sae, x, kept)
    assert terms.keys() == reference.keys()
    assert ("auxk" in terms) == (options.get("aux_coefficient", 1 / 32) > 0)
    for name, value in reference.items():
        torch.testing.assert_close(terms[name], value, rtol=1e-5, atol=1e-7, msg=name)
    for name, grad in gradients(sae, reference).items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-5, atol=1e-6, msg=name)
        assert grad.abs().max() > 0, name
    full = sae.prefix_reconstructions(out)[:, -1]
    torch.testing.assert_close(out.x_hat, full, rtol=1e-5, atol=1e-6)


def test_prefix_errors_under_bf16_autocast_sum_in_float32() -> None:
    """Under bf16 autocast the groups' decode is bf16; the errors are summed in float32, and
    each input's gradient comes back in its own dtype."""
    torch.manual_seed(0)
    groups = torch.randn(3, ROWS, D_IN).bfloat16().requires_grad_()
    b_dec = torch.randn(D_IN, requires_grad=True)
    x = torch.randn(ROWS, D_IN, requires_grad=True)
    weights = torch.tensor([0.5, 1.0, 2.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = prefix_squared_errors(groups, b_dec, x)
    assert ours.dtype == torch.float32
    grads = torch.autograd.grad((ours * weights).sum(), (groups, b_dec, x))
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]
    exact = (groups.float().cumsum(0) + b_dec - x).pow(2).sum(-1).mean(1)
    torch.testing.assert_close(ours, exact, rtol=1e-6, atol=0)
    reference = torch.autograd.grad((exact * weights).sum(), (groups, b_dec, x))
    for mine, theirs in zip(grads, reference, strict=True):
        torch.testing.assert_close(mine.float(), theirs.float(), rtol=1e-2, atol=1e-2)


def test_the_reconstruction_beside_the_prefix_errors_has_its_own_gradients() -> None:
    """The prefix loss also returns the full reconstruction (its last error plus x), which the
    step's ``out.x_hat`` is taken from: its value and its gradients are those of
    ``groups.sum(0) + b_dec`` (x cancels), added to the prefixes' own."""
    torch.manual_seed(0)
    groups = torch.randn(3, ROWS, D_IN, requires_grad=True)
    b_dec = torch.randn(D_IN, requires_grad=True)
    x = torch.randn(ROWS, D_IN, requires_grad=True)
    weights, probe = torch.tensor([0.5, 1.0, 2.0]), torch.randn(ROWS, D_IN)
    per_prefix, x_hat = _PrefixSquaredErrors.apply(groups, b_dec, x, None)
    ours = torch.autograd.grad(
        (per_prefix * weights).sum() + (x_hat * probe).sum(), (groups, b_dec, x)
    )
    exact_prefixes = (groups.cumsum(0) + b_dec - x).pow(2).sum(-1).mean(1)
    exact_x_hat = groups.sum(0) + b_dec
    torch.testing.assert_close(x_hat, exact_x_hat)
    exact = (exact_prefixes * weights).sum() + (exact_x_hat * probe).sum()
    for mine, theirs in zip(ours, torch.autograd.grad(exact, (groups, b_dec, x)), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    # In a step the loss sets out.x_hat; read first, it is built from the groups: same gradients.
    sae, x = prepared(aux_coefficient=0.0)
    sae.train()
    grads = []
    for read_first in (False, True):
        out = sae.forward_normalized(x)
        if read_first:
            out.x_hat  # noqa: B018
        total = sae.loss_terms(x, out)["prefix_mse"] + (out.x_hat * probe).sum()
        grads.append(gradients(sae, {"total": total}))
    for name in PARAMS:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)


def test_the_error_tensor_is_reused_only_after_its_backward() -> None:
    """In training the [rows, groups, d] error tensor comes back from each backward and the
    next step writes into it; two forwards before one backward each get their own, so their
    summed loss has the gradients of the two taken apart, and a second backward through a
    retained graph is refused rather than reading the gradient left in the tensor."""
    sae, x = prepared(aux_coefficient=0.0)
    sae.train()
    loss = sae.loss_terms(x, sae.forward_normalized(x))["prefix_mse"]
    loss.backward(retain_graph=True)
    (spare,) = sae._spare_errors
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    twin = copy.deepcopy(sae)
    x2 = torch.randn_like(x)
    both = sum(sae.loss_terms(z, sae.forward_normalized(z))["prefix_mse"] for z in (x, x2))
    ours = gradients(sae, {"both": both})
    assert len(sae._spare_errors) == 1 and sae._spare_errors[0].data_ptr() == spare.data_ptr()
    twin.train(False)  # drops the spare: every forward of the twin allocates its own
    twin.train(True)
    apart = [gradients(twin, twin.loss_terms(z, twin.forward_normalized(z))) for z in (x, x2)]
    for name in PARAMS:
        torch.testing.assert_close(ours[name], apart[0][name] + apart[1][name], msg=name)

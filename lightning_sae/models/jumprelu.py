"""JumpReLU SAE with straight-through threshold gradients (Rajamanoharan et al. 2024).

JumpReLU_theta(z) = z * H(z - theta) zeroes every pre-activation below a learned per-feature
threshold theta > 0. The step H has zero derivative almost everywhere, so the threshold would
never learn from the loss; the straight-through estimator replaces the derivative with respect
to theta by a kernel density estimate over the batch. With a rectangle kernel
K(u) = 1[|u| < 1/2] and bandwidth epsilon:

    d/dtheta JumpReLU(z) := -(theta / epsilon) K((z - theta) / epsilon)
    d/dtheta H(z - theta) := -(1 / epsilon)     K((z - theta) / epsilon)

Only pre-activations within epsilon/2 of the threshold move it. The derivative of H with
respect to z stays zero, so the L0 penalty acts on the thresholds alone; the derivative of
JumpReLU with respect to z is the exact one, H(z - theta).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from lightning_sae.models.base import (
    SAEOutput,
    SparseAutoencoder,
    check_nonnegative,
    check_positive,
)


def _rectangle_gradient(z: Tensor, threshold: Tensor, grad_out: Tensor, eps: float) -> Tensor:
    """sum over the batch of grad_out * rect((z - theta) / eps), in theta's shape and dtype.

    The rectangle is 1 where |z - theta| < eps / 2; selecting there and summing takes a few
    passes over the [batch, d_sae] tensors, where building the kernel as floats takes twice as
    many. theta is compared in z's dtype: under bf16 autocast a float32 theta would promote
    every [batch, d_sae] operand to float32 (sums accumulate in float32 either way).
    """
    near = (z - threshold.to(z.dtype)).abs() < eps / 2
    selected = torch.where(near, grad_out, 0).reshape(-1, z.shape[-1])
    return selected.sum(0).reshape(threshold.shape).to(threshold.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """z * H(z - theta), with the rectangle-kernel pseudo-derivative for theta."""

    @staticmethod
    def forward(ctx: FunctionCtx, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return torch.where(z > threshold.to(z.dtype), z, 0)

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor, Tensor, None]:
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = torch.where(z > threshold.to(z.dtype), grad_out, 0)
        grad_threshold = -(threshold / eps) * _rectangle_gradient(z, threshold, grad_out, eps)
        return grad_z, grad_threshold, None


class HeavisideFunction(torch.autograd.Function):
    """H(z - theta), with zero derivative for z and the rectangle-kernel one for theta."""

    @staticmethod
    def forward(ctx: FunctionCtx, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold.to(z.dtype)).to(z.dtype)

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[None, Tensor, None]:
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        # None, not zeros, for z: a zero gradient would be a [batch, d_sae] tensor to add up.
        return None, -(1.0 / eps) * _rectangle_gradient(z, threshold, grad_out, eps), None


def jumprelu(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    return JumpReLUFunction.apply(z, threshold, bandwidth)


def heaviside(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    return HeavisideFunction.apply(z, threshold, bandwidth)


def at_least_zero(theta: Tensor) -> Tensor:
    """``theta`` clamped at 0 in value with the gradient of ``theta`` itself: a threshold Adam
    stepped below 0 lets no negative pre-activation through and can still be lifted back."""
    return theta + (theta.clamp_min(0) - theta).detach()


def threshold_from_its_log(state_dict: dict[str, Any], prefix: str) -> None:
    """Checkpoints written before theta was its own parameter hold log(theta): convert them."""
    log_threshold = state_dict.pop(prefix + "log_threshold", None)
    if log_threshold is not None and prefix + "threshold" not in state_dict:
        state_dict[prefix + "threshold"] = log_threshold.exp()


class JumpReLUSAE(SparseAutoencoder):
    """JumpReLU encoder with learned per-feature thresholds theta; loss = MSE + L0 terms.

    Sparsity term, two modes:

    - ``l0_target`` unset: ``l0_coefficient * L0``, L0 being the batch mean of
      sum_j H(z_j - theta_j) (the paper's loss).
    - ``l0_target`` set: ``l0_coefficient * (L0 / l0_target - 1)^2``, which pulls L0 towards
      the target from either side instead of always down; the coefficient then sets how
      tightly. Useful to train a family of SAEs at chosen L0s without sweeping coefficients.

    Either way the coefficient ramps linearly from 0 over ``l0_warmup_steps``.

    Optional pre-activation loss (Anthropic, "Circuits Updates", January 2025): for features
    that are dead (no firing within ``dead_window_tokens``), ``preact_coefficient`` *
    mean_batch sum_j ReLU(theta_j - z_j) * ||W_dec_j||. The L0 gradient only reaches thresholds
    near which some pre-activation lies; a feature whose pre-activations all sit far below
    theta gets no signal at all, and this term pulls its pre-activations back up to the
    threshold, through the encoder.

    The paper encodes x itself, without subtracting ``b_dec`` first; the base class subtracts it
    by default (``apply_b_dec_to_input``), so set that to false for the paper's encoder.

    Args:
        threshold_init: initial theta for every feature, in the SAE's input units (normalised
            ones with ``normalize_activations``: mean norm sqrt(d_in)). 0.001, measured
            (docs/defaults.md): thresholds move about lr per step, so a run of a few thousand
            steps finds them from any start; a start above a latent's pre-activations leaves it
            without a gradient for good (2.0 on normalised MiniLM inputs: 478 of 768 latents
            never fired; 1.0 on the raw toy data: all of them). A run shorter than about
            (threshold / lr) steps needs a start near the thresholds it will end at.
        bandwidth: epsilon, the width of the rectangle kernel in the threshold gradient, in the
            same units. 0.1, measured (docs/defaults.md): on MiniLM activations (raw or
            normalised) 0.1 reaches a lower FVU at matched L0 than 0.001, the paper's (0.184
            against 0.189 at L0 42, two seeds), as does 0.3; the narrower of the two biases the
            gradient estimate less.
        l0_coefficient: weight of the sparsity term.
        l0_warmup_steps: linear warm-up of that weight.
        l0_target: when set, the target L0 of the squared-relative-error mode.
        preact_coefficient: weight of the pre-activation loss on dead features (0 = off).
        **kwargs: everything :class:`SparseAutoencoder` takes (d_in, d_sae, lr, ...).
    """

    def __init__(
        self,
        *args: Any,
        threshold_init: float = 0.001,
        bandwidth: float = 0.1,
        l0_coefficient: float = 1.0,
        l0_warmup_steps: int = 0,
        l0_target: float | None = None,
        preact_coefficient: float = 0.0,
        **kwargs: Any,
    ) -> None:
        check_positive("threshold_init", threshold_init, "model.init_args.threshold_init")
        check_positive("bandwidth", bandwidth, "model.init_args.bandwidth")
        check_nonnegative("l0_coefficient", l0_coefficient, "model.init_args.l0_coefficient")
        check_nonnegative("l0_warmup_steps", l0_warmup_steps, "model.init_args.l0_warmup_steps")
        if l0_target is not None:
            check_positive("l0_target", l0_target, "model.init_args.l0_target")
        check_nonnegative(
            "preact_coefficient", preact_coefficient, "model.init_args.preact_coefficient"
        )
        super().__init__(*args, **kwargs)
        # theta itself, not its log (the paper's): Adam moves a parameter by about lr per step
        # whatever its gradient, so a log step moves theta by theta x lr, and from a small start
        # theta could grow at most e^(lr x steps)-fold (1.22x in 200 steps at lr 1e-3; from
        # 0.001 at lr 4e-4 it needs 17k steps to reach 1). docs/defaults.md measures it.
        self.threshold = nn.Parameter(torch.full((self.d_sae,), float(threshold_init)))

    def default_encoder_init_scale(self) -> float:
        # Measured (docs/defaults.md): d_in/d_sae of the transpose, with clipping at 1 and beta2
        # 0.99, reaches FVU 0.208 at L0 32 on the MiniLM frontier data against 0.243 (two
        # seeds), and ground-truth MMCS 0.81 against 0.68 on the toy side-by-side.
        return min(1.0, self.d_in / self.d_sae)

    def default_betas(self) -> tuple[float, float]:
        return (0.9, 0.99)

    def default_gradient_clip_norm(self) -> float:
        return 1.0

    def positive_threshold(self) -> Tensor:
        """theta as the encoder uses it: at least 0 in value, with the gradient of theta itself.

        Adam may step a threshold below 0, where it would let negative pre-activations through;
        a clamp's zero gradient there would pin it for good, so the gradient passes straight
        through and the L0 term can lift it back."""
        return at_least_zero(self.threshold)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        threshold_from_its_log(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def reset_features(
        self,
        indices: Tensor,
        directions: Tensor,
        encoder_norm: float,
        encoder_directions: Tensor | None = None,
    ) -> list[tuple[nn.Parameter, int]]:
        touched = super().reset_features(indices, directions, encoder_norm, encoder_directions)
        # A dead feature's threshold may sit above anything its new encoder column produces.
        self.threshold[indices] = self.hparams.threshold_init
        return [*touched, (self.threshold, 0)]

    def activation(self, pre_acts: Tensor) -> Tensor:
        return jumprelu(pre_acts, self.positive_threshold(), self.hparams.bandwidth)

    def loss_terms(self, x_n: Tensor, out: SAEOutput) -> dict[str, Tensor]:
        hp = self.hparams
        terms = super().loss_terms(x_n, out)
        threshold = self.positive_threshold()
        l0 = heaviside(out.pre_acts, threshold, hp.bandwidth).sum(-1).mean()
        sparsity = l0 if hp.l0_target is None else (l0 / hp.l0_target - 1).pow(2)
        terms["l0"] = hp.l0_coefficient * self.warmup_factor(hp.l0_warmup_steps) * sparsity
        if hp.preact_coefficient > 0:
            dead = self.dead_mask()
            shortfall = torch.relu(threshold - out.pre_acts) * (self.decoder_norms() * dead)
            terms["preact"] = hp.preact_coefficient * shortfall.sum(-1).mean()
        return terms

"""ReLU SAE with an L1 (or tanh) sparsity penalty."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx

from lightning_sae.models.base import SAEOutput, SparseAutoencoder, check_nonnegative
from lightning_sae.models.penalties import (
    l1_penalty,
    l1_penalty_of_code,
    tanh_penalty,
    tanh_penalty_of_code,
)
from lightning_sae.models.sparse import (
    DecodeImpl,
    SparseCode,
    check_decode_impl,
    decodes_sparsely,
    sparse_encoder_values,
)

DENSITY_SAMPLE_ROWS = 256  # rows whose L0 picks the decode path of a step
EncoderInit = Literal["transpose", "independent"]


class StandardSAE(SparseAutoencoder):
    """ReLU encoder; loss = MSE + coefficient * sparsity penalty.

    Args:
        l1_coefficient: weight of the sparsity penalty, ramped linearly from 0 over
            ``l1_warmup_steps`` optimizer steps.
        l1_warmup_steps: length of that ramp.
        weight_by_decoder_norm: penalise |a_j| * ||W_dec_j|| (the default, as SAELens and
            Anthropic's April 2024 update), so the penalty cannot be dodged by shrinking
            activations and growing decoder rows: the decoder rows are free, and nothing else
            has to hold them at unit norm. ``False`` penalises |a_j| alone, which is sound only
            with :class:`~lightning_sae.callbacks.DecoderNormConstraint` (under it both forms
            train alike: the weights are 1 and the gradient they add is parallel to each row,
            which the callback projects out).
        sparsity_penalty: ``l1`` or ``tanh`` (sum of tanh(tanh_scale * |a_j| * ||W_dec_j||)).
        tanh_scale: the scale c inside the tanh penalty.
        decode_impl: ``dense`` (acts @ W_dec), ``sparse`` (embedding_bag over the active
            latents) or ``auto``: sparse in the steps whose L0 / d_sae is below the measured
            per-device cut-off (``models/sparse.py``). Once the penalty has warmed up a ReLU SAE
            has a low L0, so most of a run decodes sparsely; the first steps, dense. A step that
            decodes sparsely also sends the encoder's gradient through the active latents
            alone (:meth:`forward_normalized`); ``dense`` keeps every product dense.
        use_b_dec: ``False`` drops the decoder bias, as the reference toy-model autoencoder
            does: ``b_dec`` becomes a zero buffer (not trained, still saved and exported, so
            every reader of the weights works unchanged) and nothing is subtracted from the
            input.
        encoder_init: ``transpose`` (the encoder starts as the decoder's transpose) or
            ``independent`` (``torch.nn.Linear``'s default, as in the reference:
            W_enc and b_enc uniform in +-1/sqrt(d_in), drawn from ``init_seed``).
        **kwargs: everything :class:`SparseAutoencoder` takes (d_in, d_sae, lr, ...).
    """

    def __init__(
        self,
        *args: Any,
        l1_coefficient: float = 5.0,
        l1_warmup_steps: int = 0,
        weight_by_decoder_norm: bool = True,
        sparsity_penalty: Literal["l1", "tanh"] = "l1",
        tanh_scale: float = 1.0,
        decode_impl: DecodeImpl = "auto",
        use_b_dec: bool = True,
        encoder_init: EncoderInit = "transpose",
        **kwargs: Any,
    ) -> None:
        check_decode_impl(decode_impl)
        if encoder_init not in ("transpose", "independent"):
            raise ValueError(
                f"encoder_init must be 'transpose' or 'independent', got {encoder_init!r}: "
                "set model.init_args.encoder_init."
            )
        check_nonnegative("l1_coefficient", l1_coefficient, "model.init_args.l1_coefficient")
        check_nonnegative("l1_warmup_steps", l1_warmup_steps, "model.init_args.l1_warmup_steps")
        if sparsity_penalty not in ("l1", "tanh"):
            raise ValueError(f"sparsity_penalty must be 'l1' or 'tanh', got {sparsity_penalty!r}.")
        super().__init__(*args, **kwargs)
        if not use_b_dec:
            # A buffer, not a parameter: the optimizer never sees it and it stays exactly zero.
            del self.b_dec
            self.register_buffer("b_dec", torch.zeros(self.d_in))
        if encoder_init == "independent":
            self._init_encoder_independently()

    def default_encoder_init_scale(self) -> float:
        # About half of the d_sae ReLU latents fire on a random start, each adding a projection
        # of 1/d_in of the input's energy: the transpose reconstructs ~d_sae/(2 d_in) times the
        # input. d_in/d_sae brings that to ~half the input (docs/defaults.md measures it).
        return min(1.0, self.d_in / self.d_sae)

    def default_betas(self) -> tuple[float, float]:
        # Measured (docs/defaults.md): beta2 0.99 recovers more ground truth on the toy
        # side-by-side and reaches a lower FVU at a lower L0 on MiniLM than 0.999.
        return (0.9, 0.99)

    def default_gradient_clip_norm(self) -> float:
        # Measured (docs/defaults.md): on MiniLM activations (norm ~13) clipping at 1 lowers
        # both L0 and FVU at every L1 coefficient of the frontier; on toy data it never engages.
        return 1.0

    @torch.no_grad()
    def _init_encoder_independently(self) -> None:
        # nn.Linear(d_in, d_sae).reset_parameters(): kaiming_uniform(a=sqrt(5)) on the weight
        # and the bias both reduce to uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = d_in.
        generator = torch.Generator().manual_seed(self.hparams.init_seed + 0xE4C)
        bound = 1 / math.sqrt(self.d_in)
        for param in (self.W_enc, self.b_enc):
            param.copy_(torch.rand(param.shape, generator=generator) * 2 * bound - bound)

    def input_offset_source(self) -> Tensor | None:
        return super().input_offset_source() if self.hparams.use_b_dec else None

    def reconstruct(self, acts: Tensor) -> Tensor:
        impl = self.hparams.decode_impl
        if impl == "dense":
            return super().reconstruct(acts)
        flat = acts.reshape(-1, self.d_sae)
        if not self._sparse_enough(flat[:DENSITY_SAMPLE_ROWS] != 0):
            return super().reconstruct(acts)
        decoded = SparseCode.from_mask(flat != 0, flat).decode(self.W_dec)
        return (decoded + self.b_dec).reshape(*acts.shape[:-1], self.d_out)

    def steps_sparsely(self, pre_acts: Tensor) -> bool:
        """Whether this step keeps only the active latents (sparse decode and encoder
        gradient): as configured, or for ``auto`` by the L0 of a slice of the step's rows (one
        host sync, a fraction of a full count's cost)."""
        impl = self.hparams.decode_impl
        if impl != "auto":
            return impl == "sparse"
        return self._sparse_enough(pre_acts[:DENSITY_SAMPLE_ROWS] > 0)

    def _sparse_enough(self, active: Tensor) -> bool:
        """Whether ``decode_impl`` picks the sparse path at the density of ``active`` (a slice
        of a step's rows, as a mask). The choice needs the density on the host (one sync); a
        slice of rows estimates it at a fraction of a full count's cost."""
        active_per_sample = int(active.sum()) / max(len(active), 1)
        return decodes_sparsely(
            self.hparams.decode_impl, active_per_sample, self.d_sae, self.W_dec.device
        )

    def forward_normalized(self, x_n: Tensor) -> SAEOutput:
        """The dense pre-activations, made without a graph; then, in a sparse step, the active
        latents alone carry the gradient (as the TopK family's kept ones: the encoder's weight
        gradient is a sum over the rows where each latent fired, the decode an embedding_bag,
        no [rows, d_sae] gradient), and in a dense step the product's own gradient is
        attached to them (:class:`_EncoderGraph`). Both are exact: a ReLU latent that is zero
        passes no gradient, so only the order of the sums differs from dense autograd."""
        if self.hparams.decode_impl == "dense":
            return super().forward_normalized(x_n)
        lead = x_n.shape[:-1]
        x_rows = x_n.reshape(-1, self.d_in)
        bias = self.encoder_bias()
        with torch.no_grad():
            # As pre_activation computes it (bias inside the product: bf16 under autocast).
            pre_acts = F.linear(x_rows, self.W_enc.T, bias)
        shape = (*lead, self.d_sae)
        if not self.steps_sparsely(pre_acts):
            acts = torch.relu(_EncoderGraph.apply(pre_acts, x_rows, self.W_enc, bias))
            acts = acts.reshape(shape)
            return SAEOutput(
                x_hat=self.reconstruct(acts), acts=acts, pre_acts=pre_acts.reshape(shape)
            )
        code = SparseCode.from_mask(pre_acts > 0, pre_acts)
        code.values = sparse_encoder_values(code, pre_acts, x_rows, self.W_enc, bias)
        x_hat = self.decode_code(code) + self.b_dec
        return SAEOutput(
            x_hat=x_hat.reshape(*lead, self.d_out),
            pre_acts=pre_acts.reshape(shape),
            code=code,
            acts_shape=shape,
        )

    def decode_code(self, code: SparseCode) -> Tensor:
        """The W_dec part of the reconstruction from the active latents (no bias)."""
        return code.decode(self.W_dec)

    def loss_terms(self, x_n: Tensor, out: SAEOutput) -> dict[str, Tensor]:
        hp = self.hparams
        terms = super().loss_terms(x_n, out)
        norms = self.decoder_norms() if hp.weight_by_decoder_norm else None
        # From the active latents when the step kept them alone: no [rows, d_sae] pass.
        if out.code is not None and hp.sparsity_penalty == "tanh":
            penalty = tanh_penalty_of_code(out.code, hp.tanh_scale, norms)
        elif out.code is not None:
            penalty = l1_penalty_of_code(out.code, norms)
        elif hp.sparsity_penalty == "tanh":
            penalty = tanh_penalty(out.acts, hp.tanh_scale, norms)
        else:
            penalty = l1_penalty(out.acts, norms)
        coefficient = hp.l1_coefficient * self.warmup_factor(hp.l1_warmup_steps)
        terms[hp.sparsity_penalty] = coefficient * penalty
        return terms


class _EncoderGraph(torch.autograd.Function):
    """``pre_acts`` as they are, with the gradient of ``F.linear(x, W_enc.T, bias)`` attached:
    a dense step's pre-activations, computed without a graph before the step knew it was dense,
    backpropagate as if the product had been recorded (the same products autograd runs)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, pre_acts: Tensor, x: Tensor, W_enc: Tensor, bias: Tensor
    ) -> Tensor:
        ctx.save_for_backward(x, W_enc)
        ctx.bias_dtype = bias.dtype
        return pre_acts.view_as(pre_acts)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, grad: Tensor
    ) -> tuple[Tensor | None, ...]:
        x, W_enc = ctx.saved_tensors
        needs_x, needs_W, needs_bias = ctx.needs_input_grad[1:4]
        # In the product's dtype (bf16 under autocast), as autograd computes a linear's gradient.
        grad_x = (grad @ W_enc.T.to(grad.dtype)).to(x.dtype) if needs_x else None
        grad_W = (x.to(grad.dtype).T @ grad).to(W_enc.dtype) if needs_W else None
        grad_bias = grad.sum(0).to(ctx.bias_dtype) if needs_bias else None
        return None, grad_x, grad_W, grad_bias

"""ReLU SAE with an L1 (or tanh) sparsity penalty."""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor

from lightning_sae.models.base import SAEOutput, SparseAutoencoder, check_nonnegative
from lightning_sae.models.penalties import l1_penalty, tanh_penalty


class StandardSAE(SparseAutoencoder):
    """ReLU encoder; loss = MSE + coefficient * sparsity penalty.

    Args:
        l1_coefficient: weight of the sparsity penalty, ramped linearly from 0 over
            ``l1_warmup_steps`` optimizer steps.
        l1_warmup_steps: length of that ramp.
        weight_by_decoder_norm: penalise |a_j| * ||W_dec_j||, so the penalty cannot be dodged by
            shrinking activations and growing decoder rows (needed when decoder rows are free).
        sparsity_penalty: ``l1`` or ``tanh`` (sum of tanh(tanh_scale * |a_j| * ||W_dec_j||)).
        tanh_scale: the scale c inside the tanh penalty.
        **kwargs: everything :class:`SparseAutoencoder` takes (d_in, d_sae, lr, ...).
    """

    def __init__(
        self,
        *args: Any,
        l1_coefficient: float = 5.0,
        l1_warmup_steps: int = 0,
        weight_by_decoder_norm: bool = False,
        sparsity_penalty: Literal["l1", "tanh"] = "l1",
        tanh_scale: float = 1.0,
        **kwargs: Any,
    ) -> None:
        check_nonnegative("l1_coefficient", l1_coefficient, "model.init_args.l1_coefficient")
        check_nonnegative("l1_warmup_steps", l1_warmup_steps, "model.init_args.l1_warmup_steps")
        if sparsity_penalty not in ("l1", "tanh"):
            raise ValueError(f"sparsity_penalty must be 'l1' or 'tanh', got {sparsity_penalty!r}.")
        super().__init__(*args, **kwargs)

    def loss_terms(self, x_n: Tensor, out: SAEOutput) -> dict[str, Tensor]:
        hp = self.hparams
        terms = super().loss_terms(x_n, out)
        norms = self.decoder_norms() if hp.weight_by_decoder_norm else None
        if hp.sparsity_penalty == "tanh":
            penalty = tanh_penalty(out.acts, hp.tanh_scale, norms)
        else:
            penalty = l1_penalty(out.acts, norms)
        coefficient = hp.l1_coefficient * self.warmup_factor(hp.l1_warmup_steps)
        terms[hp.sparsity_penalty] = coefficient * penalty
        return terms

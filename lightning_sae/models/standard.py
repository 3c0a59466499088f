"""ReLU SAE with an L1 (or tanh) sparsity penalty."""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor

from lightning_sae.models.base import SAEOutput, SparseAutoencoder, check_nonnegative
from lightning_sae.models.penalties import l1_penalty, tanh_penalty
from lightning_sae.models.sparse import DecodeImpl, SparseCode, check_decode_impl, decodes_sparsely

DENSITY_SAMPLE_ROWS = 256  # rows whose L0 picks the decode path of a step


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
        decode_impl: ``dense`` (acts @ W_dec), ``sparse`` (embedding_bag over the active
            latents) or ``auto``: sparse in the steps whose L0 / d_sae is below the measured
            per-device cut-off (``models/sparse.py``). Once the penalty has warmed up a ReLU SAE
            has a low L0, so most of a run decodes sparsely; the first steps, dense.
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
        decode_impl: DecodeImpl = "auto",
        **kwargs: Any,
    ) -> None:
        check_decode_impl(decode_impl)
        check_nonnegative("l1_coefficient", l1_coefficient, "model.init_args.l1_coefficient")
        check_nonnegative("l1_warmup_steps", l1_warmup_steps, "model.init_args.l1_warmup_steps")
        if sparsity_penalty not in ("l1", "tanh"):
            raise ValueError(f"sparsity_penalty must be 'l1' or 'tanh', got {sparsity_penalty!r}.")
        super().__init__(*args, **kwargs)

    def reconstruct(self, acts: Tensor) -> Tensor:
        impl = self.hparams.decode_impl
        if impl == "dense":
            return super().reconstruct(acts)
        flat = acts.reshape(-1, self.d_sae)
        # The choice needs the density on the host (one sync); a slice of rows estimates it at
        # a fraction of a full count's cost.
        sample = flat[:DENSITY_SAMPLE_ROWS]
        active_per_sample = int(sample.count_nonzero()) / max(len(sample), 1)
        if not decodes_sparsely(impl, active_per_sample, self.d_sae, self.W_dec.device):
            return super().reconstruct(acts)
        decoded = SparseCode.from_mask(flat != 0, flat).decode(self.W_dec)
        return (decoded + self.b_dec).reshape(*acts.shape[:-1], self.d_in)

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

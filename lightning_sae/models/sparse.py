"""Decoding from the active latents alone: (indices, values) summed by ``embedding_bag``.

Only a small fraction of d_sae latents is nonzero per sample (k in TopK, L0 in a trained ReLU
SAE), so the decoder can sum those rows instead of multiplying by a mostly-zero matrix.
``embedding_bag(mode="sum", per_sample_weights=...)`` does that sum and its backward in one
fused op; whether it beats the dense product depends on the density and the hardware, so
``decode_impl="auto"`` picks by a density cut-off measured per device type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

DecodeImpl = Literal["auto", "dense", "sparse"]

# Largest density (active latents / d_sae) at which ``auto`` decodes sparsely, per device type.
# Measured with ``python benchmarks/train_step.py --decode-sweep`` (forward + backward,
# docs/benchmarks.md): on a 2-core CPU at batch 4096, d_in 512, d_sae 8192 sparse took 0.46-0.74x
# the dense time at 512 active latents (1/16) and 1.15-1.26x at 1024; on an H200 at batch 4096,
# d_in 768, d_sae 24576 it took 0.65x at 256 and 1.27x at 512, so about 1/64 there.
SPARSE_DECODE_MAX_DENSITY = {"cpu": 1 / 16, "cuda": 1 / 64}


def bag_offsets(rows: Tensor, n_rows: int) -> Tensor:
    """Start of each row's run in ``rows`` (ascending row ids), as embedding_bag wants them."""
    counts = torch.bincount(rows, minlength=n_rows)
    return counts.cumsum(0) - counts


@dataclass
class SparseCode:
    """The nonzero activations of ``n_rows`` samples, without the zeros.

    Either ``indices`` and ``values`` are ``[n_rows, k]`` (the same count for every sample, as in
    TopK) and ``rows`` is None, or they are flat ``[nnz]`` with ``rows`` giving each entry's
    sample in ascending order (as in BatchTopK, where the count varies).
    """

    indices: Tensor
    values: Tensor
    n_rows: int
    rows: Tensor | None = None

    @classmethod
    def from_mask(cls, mask: Tensor, values: Tensor) -> SparseCode:
        """The entries of ``values`` [n_rows, d_sae] where ``mask`` is set, flat and sorted by
        (sample, latent), as embedding_bag's offsets need."""
        rows, indices = mask.nonzero(as_tuple=True)
        return cls(indices, values[rows, indices], mask.shape[0], rows)

    def to_dense(self, d_sae: int) -> Tensor:
        dense = self.values.new_zeros(self.n_rows, d_sae)
        if self.rows is None:
            return dense.scatter(1, self.indices, self.values)
        return dense.index_put((self.rows, self.indices), self.values)

    def decode(self, W_dec: Tensor) -> Tensor:
        """sum_i values_i * W_dec[indices_i] per sample, shape [n_rows, d_in]; no bias.

        Computed in the dtype of ``values``: embedding_bag is not an autocast op, so under bf16
        autocast the float32 decoder is cast here, as autocast casts a matmul's weight.
        """
        W_dec = W_dec.to(self.values.dtype)
        if self.rows is None:
            return F.embedding_bag(self.indices, W_dec, mode="sum", per_sample_weights=self.values)
        offsets = bag_offsets(self.rows, self.n_rows)
        return F.embedding_bag(
            self.indices, W_dec, offsets, mode="sum", per_sample_weights=self.values
        )


def check_decode_impl(decode_impl: str) -> None:
    if decode_impl not in ("auto", "dense", "sparse"):
        raise ValueError(
            f"decode_impl must be 'auto', 'dense' or 'sparse', got {decode_impl!r}: "
            "set model.init_args.decode_impl."
        )


def decodes_sparsely(
    decode_impl: DecodeImpl, active_per_sample: float, d_sae: int, device: torch.device
) -> bool:
    """Whether to decode from (indices, values): as configured, or for ``auto`` by density."""
    if decode_impl == "auto":
        max_density = SPARSE_DECODE_MAX_DENSITY.get(device.type, 1 / 64)
        return active_per_sample <= max_density * d_sae
    return decode_impl == "sparse"

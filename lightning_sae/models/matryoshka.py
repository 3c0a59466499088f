"""Matryoshka SAE: nested prefixes of a BatchTopK dictionary, each reconstructing the input.

After Bussmann et al. 2025 and Nabeshima 2024 ("Matryoshka sparse autoencoders"). Training the
first m latents to reconstruct the input on their own, for every prefix size m in a ladder,
pushes general features into the early latents and specific ones later, and discourages
feature absorption.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from lightning_sae.models.base import SAEOutput
from lightning_sae.models.sparse import SparseCode
from lightning_sae.models.topk import BatchTopKSAE


class MatryoshkaSAE(BatchTopKSAE):
    """BatchTopK whose loss is the mean (or sum) of the reconstruction losses of nested prefixes.

    The dictionary is split into consecutive groups; prefix m is groups 0..m. Prefix m
    reconstructs x with only its latents (plus ``b_dec``), and the loss is the mean over
    prefixes of each prefix's squared error (logged as ``train/loss/prefix_mse``), plus AuxK.
    The mean (the default; ``prefix_loss`` picks the sum) keeps the term on the scale of a
    single MSE, so its balance with AuxK carries over from BatchTopK; the full-dictionary MSE
    is the last prefix's and is still logged as ``train/mse``. Every prefix sum comes out of
    one pass of the decoder: per-group partial reconstructions, then a cumulative sum over
    groups.

    Args:
        group_sizes: latents per group, in order, summing to d_sae. Default: prefixes of
            d_sae/16, d_sae/8, d_sae/4, d_sae/2 and d_sae (groups d_sae/16, d_sae/16, d_sae/8,
            d_sae/4, d_sae/2).
        prefix_loss: ``mean`` (default) or ``sum`` of the prefixes' squared errors. The sum is
            the form of Bussmann et al. and SAELens; it weighs reconstruction n_prefixes times
            as much against AuxK (Adam's steps do not scale with the loss, that balance does).
        **kwargs: everything :class:`BatchTopKSAE` takes (k, threshold_momentum, aux_k,
            aux_coefficient, decode_impl, ...).
    """

    def __init__(
        self,
        *args: Any,
        group_sizes: list[int] | None = None,
        prefix_loss: Literal["mean", "sum"] = "mean",
        **kwargs: Any,
    ) -> None:
        if prefix_loss not in ("mean", "sum"):
            raise ValueError(
                f"prefix_loss must be 'mean' or 'sum', got {prefix_loss!r}: "
                "set model.init_args.prefix_loss."
            )
        super().__init__(*args, **kwargs)
        if group_sizes is None:
            group_sizes = [self.d_sae // 16, self.d_sae // 16, self.d_sae // 8, self.d_sae // 4]
            group_sizes.append(self.d_sae - sum(group_sizes))
        if any(size <= 0 for size in group_sizes) or sum(group_sizes) != self.d_sae:
            raise ValueError(
                f"group_sizes must be positive and sum to d_sae={self.d_sae}, got {group_sizes}: "
                "fix model.init_args.group_sizes."
            )
        self.group_sizes = list(group_sizes)
        self.register_buffer("group_ends", torch.tensor(group_sizes).cumsum(0), persistent=False)

    def group_decode(self, code: SparseCode, acts: Tensor | None) -> Tensor:
        """Each group's share of the reconstruction, [n, n_groups, d_in], without bias."""
        n_groups = len(self.group_sizes)
        if self.decodes_code_sparsely(code):
            # Entries are sorted by (sample, latent) and groups are latent ranges, so bag ids
            # sample * n_groups + group are already ascending.
            group = torch.bucketize(code.indices, self.group_ends, right=True)
            bags = SparseCode(
                code.indices, code.values, code.n_rows * n_groups, code.rows * n_groups + group
            )
            return bags.decode(self.W_dec).reshape(code.n_rows, n_groups, self.d_out)
        parts = zip(
            acts.split(self.group_sizes, -1), self.W_dec.split(self.group_sizes), strict=True
        )
        return torch.stack([a @ w for a, w in parts], dim=1)

    def forward_normalized(self, x_n: Tensor) -> SAEOutput:
        code, pre_acts = self._encode(x_n)
        acts = None if self.decodes_code_sparsely(code) else code.to_dense(self.d_sae)
        prefix_x_hat = self.group_decode(code, acts).cumsum(1) + self.b_dec
        lead = x_n.shape[:-1]
        return SAEOutput(
            x_hat=prefix_x_hat[:, -1].reshape(*lead, self.d_out),
            acts=None if acts is None else acts.reshape(*lead, self.d_sae),
            pre_acts=pre_acts.reshape(*lead, self.d_sae),
            extras={"prefix_x_hat": prefix_x_hat, "encoder_input": x_n},
            code=code,
            acts_shape=(*lead, self.d_sae),
        )

    def loss_terms(self, x_n: Tensor, out: SAEOutput) -> dict[str, Tensor]:
        x = x_n.reshape(-1, 1, self.d_out)
        per_prefix = (out.extras["prefix_x_hat"] - x).pow(2).sum(-1).mean(0)
        reduced = per_prefix.sum() if self.hparams.prefix_loss == "sum" else per_prefix.mean()
        terms = {"prefix_mse": reduced}
        if self.hparams.aux_coefficient > 0:
            terms["auxk"] = self.hparams.aux_coefficient * self.auxk_loss(x_n, out)
        return terms

"""A trained SAE's sparsity for benchmarks that start from a fresh one (torch only: it is also
imported by the SAELens side of vs_saelens.py, which runs in another environment)."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def shift_bias_to_l0(W_enc: Tensor, b_enc: Tensor, x: Tensor, l0: float) -> None:
    """Set the encoder bias to one value so that ``l0`` latents per sample fire on ``x``.

    At initialisation about half of a ReLU SAE's latents fire; once the sparsity penalty has
    warmed up a few dozen do, for the rest of the run, and that is the step worth timing.
    """
    pre_acts = (x @ W_enc).flatten()
    cutoff = pre_acts.kthvalue(pre_acts.numel() - int(l0 * len(x))).values
    b_enc.fill_(-cutoff.item())

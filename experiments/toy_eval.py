"""Metrics of an SAE on saved toy data, in plain torch so that both sides of the SAELens
comparison (this project's environment and SAELens's own virtualenv) measure with the same code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


@torch.no_grad()
def toy_metrics(
    encode: Callable[[Tensor], Tensor],
    decode: Callable[[Tensor], Tensor],
    W_dec: Tensor,
    x_eval: Tensor,
    features: Tensor,
) -> dict[str, float]:
    """Ground-truth MMCS, L0, FVU and dead latents (never firing on ``x_eval``)."""
    acts = encode(x_eval)
    x_hat = decode(acts)
    fired = (acts > 0).any(0)
    unit_dec = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    unit_gt = features / features.norm(dim=1, keepdim=True)
    return {
        "gt_mmcs": float((unit_gt @ unit_dec.T).max(1).values.mean()),
        "l0": float((acts > 0).float().sum(1).mean()),
        "fvu": float((x_hat - x_eval).pow(2).sum() / (x_eval - x_eval.mean(0)).pow(2).sum()),
        "dead": int((~fired).sum()),
    }

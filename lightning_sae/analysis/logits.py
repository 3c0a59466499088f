"""Direct logit effects of decoder directions: which tokens a feature pushes up and down.

For a causal LM the effect of feature ``f`` on the logits through the direct path is its decoder
direction taken through the final norm as the model applies it, then the unembedding:

    LayerNorm:  effect = ((d - mean(d)) * w_ln) @ W_U
    RMSNorm:    effect = (d * w_norm) @ W_U

This is the standard linearisation (SAELens and Neuronpedia use ``W_dec @ W_U`` with the norm's
weight folded in). Two things are dropped, and neither changes which tokens rank where:
the norm's division by the residual's scale (a positive number that depends on the token, not
on the feature) and its bias (the same for every feature). Paths through later layers are not
included: this is the direct effect only.

Encoder-only models (BERT, MiniLM) are skipped, with a note saying why (see ``ENCODER_NOTE``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_sae.metrics.downstream import has_next_token_objective

ENCODER_NOTE = (
    "logit effects skipped: {model} is an encoder (bidirectional attention, BERT-style). Its "
    "masked-LM head applies a dense layer and a GELU before its LayerNorm and unembedding, so a "
    "decoder direction has no linear effect on the logits to report; all-MiniLM-L6-v2 besides "
    "ships without that head's trained weights (transformers initialises them at random)."
)


@dataclass
class LogitEffects:
    """Top ``k`` raised and lowered tokens per feature (``[F, k]`` each), or a note."""

    up_ids: Tensor | None = None
    up_values: Tensor | None = None
    down_ids: Tensor | None = None
    down_values: Tensor | None = None
    note: str | None = None


def _final_norm(model: Any) -> tuple[str, Tensor | None]:
    """(kind, weight) of the model's final norm: kind ``LN``, ``RMS`` or ``none``."""
    kind = str(getattr(model.cfg, "normalization_type", None) or "none")
    norm = getattr(model, "ln_final", None)
    module = getattr(norm, "original_component", norm)
    weight = getattr(module, "weight", None)
    if kind.startswith("LN"):
        return "LN", weight
    if kind.startswith("RMS"):
        return "RMS", weight
    return "none", None


def through_final_norm(model: Any, directions: Tensor) -> Tensor:
    """``directions`` ``[F, d_model]`` as the final norm passes them on (see the module doc)."""
    kind, weight = _final_norm(model)
    out = directions.float()
    if kind == "LN":
        out = out - out.mean(dim=-1, keepdim=True)
    if weight is not None:
        out = out * weight.detach().float().to(out.device)
    return out


@torch.no_grad()
def logit_effects(
    model: Any, directions: Tensor, k: int, name: str | None = None, block: int = 1024
) -> LogitEffects:
    """The ``k`` tokens each direction raises and lowers most through the direct path;
    ``name`` names the model in notes."""
    name = name or getattr(model.cfg, "model_name", "the model")
    if not has_next_token_objective(model):
        return LogitEffects(note=ENCODER_NOTE.format(model=name))
    W_U = model.W_U.detach()  # [d_model, vocab]
    if directions.shape[1] != W_U.shape[0]:
        return LogitEffects(
            note=f"logit effects skipped: the SAE's d_in ({directions.shape[1]}) is not the "
            f"residual width d_model ({W_U.shape[0]}) of {name}, so its directions are not in "
            "the residual stream (an MLP hidden or per-head hook)."
        )
    W_U = W_U.float().to(directions.device)
    k = min(k, W_U.shape[1])
    parts: dict[str, list[Tensor]] = {
        "up_ids": [],
        "up_values": [],
        "down_ids": [],
        "down_values": [],
    }
    for start in range(0, directions.shape[0], block):
        effect = through_final_norm(model, directions[start : start + block]) @ W_U
        up, down = effect.topk(k, dim=1), (-effect).topk(k, dim=1)
        parts["up_ids"].append(up.indices.cpu())
        parts["up_values"].append(up.values.cpu())
        parts["down_ids"].append(down.indices.cpu())
        parts["down_values"].append(-down.values.cpu())
    return LogitEffects(**{key: torch.cat(value) for key, value in parts.items()})

"""How much of the model's behaviour survives when the SAE's reconstruction replaces an activation.

The SAE is spliced in at its hook: the activation there is replaced by ``sae_fn(activation)``
for the rest of the forward pass. For causal language models we compare next-token
cross-entropy with clean activations, with the reconstruction and with the activation
zero-ablated:

    ce_loss_recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)

(1 = the reconstruction loses nothing, 0 = no better than deleting the activation), and the
mean of KL(p_clean || p_spliced) of the next-token distributions over the positions the SAE
replaces (those from ``first_position`` on: earlier ones are untouched, their KL is 0 and would
only dilute the mean).

Encoder-only models (BERT-style, bidirectional attention) have no next-token objective, so CE
and KL are not measured for them. For every model we measure what happens to the final hidden
state (the output of the last block): the mean cosine similarity between clean and spliced
vectors per position, the relative MSE ``sum ||h_spliced - h_clean||^2 / sum ||h_clean||^2``,
the same for the zero-ablated activation, and from the two a CE-recovered-style score

    final_hidden_recovered = 1 - rel_mse_spliced / rel_mse_zero

(1 = the final hidden state is untouched, 0 = as damaged as by deleting the activation).

A transcoder replaces an MLP rather than reconstructing an activation: with ``input_hook`` the
function reads the activation at ``input_hook`` (the MLP's input) and its output replaces the
activation at ``hook_name`` (the MLP's output); zero-ablation then zeroes the MLP's output.

This module knows nothing of Lightning or of SAE classes: the SAE is any function from
activations to reconstructions (to the output site's activations, for a transcoder).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_sae.data import lm

ENCODER_ONLY_NOTE = (
    "CE loss recovered and KL are not available for encoder-only (bidirectional) models such as "
    "BERT/MiniLM: they have no next-token prediction. Reporting the final hidden state's cosine "
    "similarity and relative MSE after splicing instead."
)

SAEFunction = Callable[[Tensor], Tensor]


@dataclass
class DownstreamMetrics:
    """Results of :func:`downstream_metrics`; CE fields are None for encoder-only models."""

    final_hidden_cosine: float
    final_hidden_rel_mse: float
    final_hidden_rel_mse_zero: float | None = None
    final_hidden_recovered: float | None = None
    ce_clean: float | None = None
    ce_sae: float | None = None
    ce_zero: float | None = None
    ce_loss_recovered: float | None = None
    kl: float | None = None
    n_tokens: int = 0
    note: str | None = None

    def to_log_dict(self, prefix: str = "downstream/") -> dict[str, float]:
        """The measured values under their logged names (``downstream/ce_loss_recovered``...)."""
        skip = {"note", "n_tokens"}
        return {
            f"{prefix}{k}": float(v)
            for k, v in asdict(self).items()
            if k not in skip and v is not None
        }


def has_next_token_objective(bridge: Any) -> bool:
    """Whether next-token CE means anything for this model (causal attention)."""
    return getattr(bridge.cfg, "attention_dir", "causal") == "causal"


def final_hidden_hook(bridge: Any) -> str:
    return lm.final_hidden_hook(bridge)


def _splice(sae_fn: SAEFunction, first_position: int) -> Callable[..., Tensor]:
    def hook(activation: Tensor, hook: Any) -> Tensor:
        spliced = activation.clone()
        part = activation[:, first_position:]
        # Per-head hooks ([batch, pos, head, d_head]) are seen by the SAE flattened per position.
        flat = part.flatten(2) if part.ndim > 3 else part
        spliced[:, first_position:] = sae_fn(flat).to(activation.dtype).reshape(part.shape)
        return spliced

    return hook


def _transcode(
    sae_fn: SAEFunction, first_position: int, input_hook: str
) -> tuple[Callable[..., None], Callable[..., Tensor]]:
    """(capture at the input hook, splice at the output hook): the output site is replaced by
    the transcoder's prediction from the same forward pass's input site."""
    seen: dict[str, Tensor] = {}

    def capture(activation: Tensor, hook: Any) -> None:
        seen["input"] = activation

    def splice(activation: Tensor, hook: Any) -> Tensor:
        if "input" not in seen:
            raise ValueError(
                f"input_hook {input_hook!r} did not run before the output hook {hook.name!r}: "
                "a transcoder's input site must come earlier in the forward pass."
            )
        source = seen.pop("input")[:, first_position:]
        spliced = activation.clone()
        flat = source.flatten(2) if source.ndim > 3 else source
        part = spliced[:, first_position:]
        spliced[:, first_position:] = sae_fn(flat).to(activation.dtype).reshape(part.shape)
        return spliced

    return capture, splice


def _zero(first_position: int) -> Callable[..., Tensor]:
    def hook(activation: Tensor, hook: Any) -> Tensor:
        ablated = activation.clone()
        ablated[:, first_position:] = 0
        return ablated

    return hook


def _run(
    bridge: Any, tokens: Tensor, hooks: list, final_hook: str, return_type: str | None
) -> tuple[Tensor | None, Tensor]:
    """(logits or None, final hidden state) of one forward pass with ``hooks`` applied."""
    captured: dict[str, Tensor] = {}

    def keep(activation: Tensor, hook: Any) -> None:
        captured["final"] = activation.float()

    # Registered after ``hooks``, so on the same hook point it sees the spliced activation.
    fwd_hooks = [*hooks, (final_hook, keep)]
    logits = bridge.run_with_hooks(tokens, return_type=return_type, fwd_hooks=fwd_hooks)
    return logits, captured["final"]


def _next_token_ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """Summed next-token cross-entropy over every predicted position."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum"
    )


@torch.no_grad()
def downstream_metrics(
    bridge: Any,
    hook_name: str,
    sae_fn: SAEFunction,
    tokens: Tensor,
    batch_size: int = 8,
    first_position: int = 0,
    input_hook: str | None = None,
) -> DownstreamMetrics:
    """Splice ``sae_fn`` into ``bridge`` at ``hook_name`` and measure the damage.

    Args:
        bridge: a TransformerLens ``TransformerBridge`` or an hf-backend ``HFModel`` (anything
            with ``run_with_hooks``, ``cfg.n_layers`` and ``cfg.attention_dir``).
        hook_name: where the SAE reads and writes, e.g. ``blocks.3.hook_resid_post``.
        sae_fn: activations ``[..., d]`` in model units -> reconstructions of the same shape.
        tokens: ``[n_windows, context]`` token ids; every position of every window counts.
        batch_size: windows per forward pass.
        first_position: the SAE (and the zero-ablation) replaces positions from this one on;
            earlier ones keep their clean activation. Use 1 when the SAE was trained without
            BOS activations (``exclude_bos``), which it cannot be expected to reconstruct.
        input_hook: for a transcoder, the hook ``sae_fn`` reads (e.g. ``blocks.3.hook_mlp_in``,
            or ``model.layers.3.mlp:input`` with the hf backend); its output replaces the
            activation at ``hook_name`` (``blocks.3.hook_mlp_out``, ``model.layers.3.mlp``).
    """
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [n_windows, context >= 2], got {tuple(tokens.shape)}.")
    lm.validate_hooks(bridge, [hook_name] if input_hook is None else [input_hook, hook_name])
    causal = has_next_token_objective(bridge)
    device = next(bridge.parameters()).device
    final_hook = final_hidden_hook(bridge)
    if not 0 <= first_position < tokens.shape[1]:
        raise ValueError(
            f"first_position must be in [0, {tokens.shape[1]}) for windows of "
            f"{tokens.shape[1]} tokens, got {first_position}."
        )
    zero = _zero(first_position)
    if input_hook is None:
        splice_hooks = [(hook_name, _splice(sae_fn, first_position))]
    else:
        capture, splice = _transcode(sae_fn, first_position, input_hook)
        splice_hooks = [(input_hook, capture), (hook_name, splice)]
    ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    kl_sum = cos_sum = err_sq = zero_err_sq = clean_sq = 0.0
    n_predicted = n_positions = n_spliced = 0

    return_type = "logits" if causal else None  # encoder-only: skip the (untrained) LM head
    for batch in tokens.to(device).split(batch_size):
        clean_logits, clean_h = _run(bridge, batch, [], final_hook, return_type)
        spliced_logits, sae_h = _run(bridge, batch, splice_hooks, final_hook, return_type)
        cos_sum += F.cosine_similarity(sae_h, clean_h, dim=-1).sum().item()
        err_sq += (sae_h - clean_h).pow(2).sum().item()
        clean_sq += clean_h.pow(2).sum().item()
        n_positions += batch.numel()
        zero_logits, zero_h = _run(bridge, batch, [(hook_name, zero)], final_hook, return_type)
        zero_err_sq += (zero_h - clean_h).pow(2).sum().item()

        if causal:
            ce["clean"] += _next_token_ce(clean_logits, batch).item()
            ce["sae"] += _next_token_ce(spliced_logits, batch).item()
            ce["zero"] += _next_token_ce(zero_logits, batch).item()
            n_predicted += batch.shape[0] * (batch.shape[1] - 1)
            log_p = clean_logits[:, first_position:].float().log_softmax(-1)
            log_q = spliced_logits[:, first_position:].float().log_softmax(-1)
            kl_sum += (log_p.exp() * (log_p - log_q)).sum().item()
            n_spliced += log_p.shape[0] * log_p.shape[1]

    result = DownstreamMetrics(
        final_hidden_cosine=cos_sum / n_positions,
        final_hidden_rel_mse=err_sq / clean_sq if clean_sq > 0 else math.nan,
        final_hidden_rel_mse_zero=zero_err_sq / clean_sq if clean_sq > 0 else math.nan,
        n_tokens=n_positions,
    )
    # Undefined when deleting the activation leaves the final hidden state as it was.
    result.final_hidden_recovered = 1 - err_sq / zero_err_sq if zero_err_sq > 0 else math.nan
    if not causal:
        result.note = ENCODER_ONLY_NOTE
        return result
    ce_clean, ce_sae, ce_zero = (ce[k] / n_predicted for k in ("clean", "sae", "zero"))
    result.ce_clean, result.ce_sae, result.ce_zero = ce_clean, ce_sae, ce_zero
    denominator = ce_zero - ce_clean
    # When zero-ablation does not hurt, there is nothing to recover and the ratio is undefined.
    result.ce_loss_recovered = (ce_zero - ce_sae) / denominator if denominator != 0 else math.nan
    result.kl = kl_sum / n_spliced
    return result

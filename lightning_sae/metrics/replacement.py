"""The replacement model: every MLP of a language model replaced by a cross-layer transcoder.

In the replacement forward pass, when the pass reaches layer ``l``'s MLP input the CLT encodes
it (``encode_layer``), and layer ``l``'s MLP output is replaced by what the features of layers
``0..l`` write there (``decode_layer``). The inputs are the replacement pass's own, so errors
compound through the layers as they would in a model that runs on the CLT alone. Compared
with the original model on the same tokens:

- ``top1_agreement``: share of positions whose most likely next token is the same (causal);
- ``kl``: mean KL(p_original || p_replacement) of the next-token distributions (causal);
- ``ce_loss_recovered`` = (CE_zero - CE_replacement) / (CE_zero - CE_original), where
  CE_zero is the loss with every MLP output zero-ablated (causal);
- ``final_hidden_*``: cosine, relative MSE and recovered score of the last block's output, as
  :mod:`lightning_sae.metrics.downstream` defines them (every model; the only ones for an
  encoder-only model such as MiniLM, which has no next-token head);
- ``layer_fvu``: per layer, the fraction of variance of the MLP output the CLT leaves
  unexplained on the original model's own MLP inputs (no compounding).

``with_errors``: each layer's output is the CLT's plus that layer's error on the original pass
(MLP output minus the CLT's prediction from the original inputs). By induction over the layers
the replacement pass then sees the original inputs and reproduces the original model up to
float rounding: a check of the splice (hooks, layer order, units), and the identity the local
replacement model of an attribution graph rests on.

Positions before ``first_position`` (a BOS the CLT was not trained on) keep their original MLP
outputs. Like the downstream module this one knows nothing of Lightning or of the CLT's class:
it needs ``n_layers``, ``input_hooks``, ``output_hooks``, ``encode_layer``, ``decode_layer``
and ``forward`` (for ``layer_fvu``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_sae.data.lm import gated_mlp_in, validate_hooks
from lightning_sae.metrics.downstream import (
    ENCODER_ONLY_NOTE,
    _next_token_ce,
    _run,
    final_hidden_hook,
    has_next_token_objective,
)


@dataclass
class ReplacementMetrics:
    """Results of :func:`replacement_metrics`; next-token fields are None for encoder-only
    models."""

    final_hidden_cosine: float
    final_hidden_rel_mse: float
    final_hidden_recovered: float
    layer_fvu: list[float] = field(default_factory=list)
    top1_agreement: float | None = None
    kl: float | None = None
    ce_clean: float | None = None
    ce_replacement: float | None = None
    ce_zero: float | None = None
    ce_loss_recovered: float | None = None
    n_tokens: int = 0
    note: str | None = None

    def to_log_dict(self, prefix: str = "replacement/") -> dict[str, float]:
        values = {
            f"{prefix}{key}": float(value)
            for key, value in asdict(self).items()
            if key not in ("note", "n_tokens", "layer_fvu") and value is not None
        }
        for layer, fvu in enumerate(self.layer_fvu):
            values[f"{prefix}fvu/layer{layer}"] = fvu
        return values


def _replacement_hooks(
    clt: Any, first_position: int, errors: Tensor | None
) -> list[tuple[str, Any]]:
    """Hooks that run the CLT in place of every MLP: encode at each MLP input, write at each
    MLP output from the activations of that layer and the earlier ones."""
    acts: list[Tensor] = []

    def encode(layer: int) -> Any:
        def hook(activation: Tensor, hook: Any) -> None:
            if len(acts) != layer:
                raise ValueError(
                    f"the CLT's input hook {clt.input_hooks[layer]!r} ran out of order (layer "
                    f"{layer} after {len(acts)} layers): input_hooks must be the MLP inputs in "
                    "forward order."
                )
            acts.append(clt.encode_layer(layer, activation[:, first_position:].float()))

        return hook

    def write(layer: int) -> Any:
        def hook(activation: Tensor, hook: Any) -> Tensor:
            if len(acts) != layer + 1:
                raise ValueError(
                    f"the CLT's output hook {clt.output_hooks[layer]!r} ran before its layer's "
                    "input hook: each layer's MLP input must come before its output in the "
                    "forward pass."
                )
            written = clt.decode_layer(layer, torch.stack(acts, dim=-2))
            if errors is not None:
                written = written + errors[:, :, layer]
            spliced = activation.clone()
            spliced[:, first_position:] = written.to(activation.dtype)
            if layer == clt.n_layers - 1:
                acts.clear()  # the next forward pass starts at layer 0 again
            return spliced

        return hook

    hooks: list[tuple[str, Any]] = []
    for layer in range(clt.n_layers):
        hooks.append((clt.input_hooks[layer], encode(layer)))
        hooks.append((clt.output_hooks[layer], write(layer)))
    return hooks


def _zero_every(hooks: list[str], first_position: int) -> list[tuple[str, Any]]:
    def zero(activation: Tensor, hook: Any) -> Tensor:
        ablated = activation.clone()
        ablated[:, first_position:] = 0
        return ablated

    return [(hook, zero) for hook in hooks]


def _capture(hooks: list[str], store: dict[str, Tensor], first_position: int) -> list:
    # Keyed by the name asked for: an alias (hook_mlp_out) reports its target's name.
    def keep(name: str) -> Any:
        def hook(activation: Tensor, hook: Any) -> None:
            store[name] = activation[:, first_position:].float()

        return hook

    return [(name, keep(name)) for name in hooks]


@torch.no_grad()
def replacement_metrics(
    bridge: Any,
    clt: Any,
    tokens: Tensor,
    batch_size: int = 8,
    first_position: int = 0,
    with_errors: bool = False,
) -> ReplacementMetrics:
    """Run ``bridge`` with every MLP replaced by ``clt`` and compare with the original.

    Args:
        bridge: a TransformerLens ``TransformerBridge`` (``run_with_hooks``, ``hook_dict``,
            ``cfg.n_layers``, ``cfg.attention_dir``).
        clt: a cross-layer transcoder in eval mode (``models/clt.py``), on the bridge's device.
        tokens: ``[n_windows, context]`` token ids.
        batch_size: windows per forward pass.
        first_position: the CLT replaces positions from this one on.
        with_errors: add each layer's error on the original pass (module docstring).
    """
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [n_windows, context >= 2], got {tuple(tokens.shape)}.")
    if not 0 <= first_position < tokens.shape[1]:
        raise ValueError(
            f"first_position must be in [0, {tokens.shape[1]}) for windows of "
            f"{tokens.shape[1]} tokens, got {first_position}."
        )
    validate_hooks(bridge, [*clt.input_hooks, *clt.output_hooks])
    with _mlp_in_hooks_enabled(bridge, clt.input_hooks):
        return _replacement_metrics(bridge, clt, tokens, batch_size, first_position, with_errors)


@contextmanager
def _mlp_in_hooks_enabled(bridge: Any, hooks: list[str]) -> Iterator[None]:
    """Turn a gated ``hook_mlp_in`` on for the measurement (``data.lm.gated_mlp_in``), and back
    off after."""
    if not gated_mlp_in(bridge, hooks):
        yield
        return
    bridge.set_use_hook_mlp_in(True)
    try:
        yield
    finally:
        bridge.set_use_hook_mlp_in(False)


def _replacement_metrics(
    bridge: Any,
    clt: Any,
    tokens: Tensor,
    batch_size: int,
    first_position: int,
    with_errors: bool,
) -> ReplacementMetrics:
    causal = has_next_token_objective(bridge)
    return_type = "logits" if causal else None
    final_hook = final_hidden_hook(bridge)
    device = next(bridge.parameters()).device
    n_layers = clt.n_layers

    sums = {"cos": 0.0, "err": 0.0, "zero_err": 0.0, "clean_sq": 0.0, "kl": 0.0, "agree": 0.0}
    ce = {"clean": 0.0, "replacement": 0.0, "zero": 0.0}
    layer_err = torch.zeros(n_layers, dtype=torch.float64)
    layer_sq = torch.zeros(n_layers, dtype=torch.float64)
    layer_sum = torch.zeros(n_layers, clt.d_out, dtype=torch.float64)
    n_positions = n_predicted = n_spliced = n_rows = 0
    for batch in tokens.to(device).split(batch_size):
        seen: dict[str, Tensor] = {}
        site_hooks = [*clt.input_hooks, *clt.output_hooks]
        clean_logits, clean_h = _run(
            bridge, batch, _capture(site_hooks, seen, first_position), final_hook, return_type
        )
        x = torch.stack([seen[hook] for hook in clt.input_hooks], dim=-2)  # [b, p, L, d_in]
        y = torch.stack([seen[hook] for hook in clt.output_hooks], dim=-2).double()
        predicted = clt(x).x_hat.double()
        layer_err += (predicted - y).pow(2).sum((0, 1, 3)).cpu()
        layer_sq += y.pow(2).sum((0, 1, 3)).cpu()
        layer_sum += y.sum((0, 1)).cpu()
        n_rows += y.shape[0] * y.shape[1]
        errors = (y - predicted).float() if with_errors else None
        hooks = _replacement_hooks(clt, first_position, errors)
        logits, h = _run(bridge, batch, hooks, final_hook, return_type)
        zero_logits, zero_h = _run(
            bridge, batch, _zero_every(clt.output_hooks, first_position), final_hook, return_type
        )
        sums["cos"] += F.cosine_similarity(h, clean_h, dim=-1).sum().item()
        sums["err"] += (h - clean_h).pow(2).sum().item()
        sums["zero_err"] += (zero_h - clean_h).pow(2).sum().item()
        sums["clean_sq"] += clean_h.pow(2).sum().item()
        n_positions += batch.numel()
        if causal:
            ce["clean"] += _next_token_ce(clean_logits, batch).item()
            ce["replacement"] += _next_token_ce(logits, batch).item()
            ce["zero"] += _next_token_ce(zero_logits, batch).item()
            n_predicted += batch.shape[0] * (batch.shape[1] - 1)
            log_p = clean_logits[:, first_position:].float().log_softmax(-1)
            log_q = logits[:, first_position:].float().log_softmax(-1)
            sums["kl"] += (log_p.exp() * (log_p - log_q)).sum().item()
            sums["agree"] += (log_p.argmax(-1) == log_q.argmax(-1)).sum().item()
            n_spliced += log_p.shape[0] * log_p.shape[1]

    variance = layer_sq - layer_sum.pow(2).sum(-1) / n_rows
    layer_fvu = [
        float(err / var) if var > 0 else math.nan
        for err, var in zip(layer_err, variance, strict=True)
    ]
    clean_sq, zero_err = sums["clean_sq"], sums["zero_err"]
    result = ReplacementMetrics(
        final_hidden_cosine=sums["cos"] / n_positions,
        final_hidden_rel_mse=sums["err"] / clean_sq if clean_sq > 0 else math.nan,
        final_hidden_recovered=1 - sums["err"] / zero_err if zero_err > 0 else math.nan,
        layer_fvu=layer_fvu,
        n_tokens=n_positions,
    )
    if not causal:
        result.note = ENCODER_ONLY_NOTE
        return result
    ce_clean, ce_repl, ce_zero = (ce[k] / n_predicted for k in ("clean", "replacement", "zero"))
    result.ce_clean, result.ce_replacement, result.ce_zero = ce_clean, ce_repl, ce_zero
    denominator = ce_zero - ce_clean
    result.ce_loss_recovered = (ce_zero - ce_repl) / denominator if denominator else math.nan
    result.kl = sums["kl"] / n_spliced
    result.top1_agreement = sums["agree"] / n_spliced
    return result

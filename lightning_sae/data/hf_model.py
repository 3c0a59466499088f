"""Any Hugging Face ``transformers`` model, without TransformerLens: hooks are module paths.

``model: {backend: hf, name: Qwen/Qwen2.5-0.5B}`` (the stream's model options) or
``model_backend: hf`` (the cache's flat options) loads the plain transformers model, so a model
works the day transformers supports it, before TransformerLens has an adapter for it. The model
is ``AutoModelForCausalLM`` when its config names a causal-LM architecture (``...ForCausalLM``,
``...LMHeadModel``) or is built from ``model_config``, else ``AutoModel`` (encoders such as
all-MiniLM-L6-v2). Nothing read from a model's files chooses code: ``trust_remote_code`` stays
off, so an architecture must be one the installed transformers knows.

Hook names are the loaded model's module paths (``named_modules()``), with a side:

- ``<path>`` or ``<path>:output``: what the module returns (the first element when it returns a
  tuple). ``model.layers.6`` is the residual stream after decoder layer 6 of Llama, Qwen2 or
  Mistral (``gpt_neox.layers.6`` for GPT-NeoX/Pythia, ``transformer.h.6`` for GPT-2,
  ``encoder.layer.3`` for BERT/MiniLM); ``model.layers.6.mlp`` the MLP's output, and
  ``model.layers.6.self_attn`` the attention's.
- ``<path>:input``: the hidden states the module receives (its first positional argument, or
  its ``hidden_states`` keyword): ``model.layers.6:input`` is the residual stream before
  layer 6, ``model.layers.6.mlp:input`` the MLP's input (after ``post_attention_layernorm``), the
  pair a transcoder reads and predicts.

Every hook gives ``[batch, pos, d]``; one that does not (a rotary embedding's ``(cos, sin)``, an
attention's per-head tensors) is refused with its shape. Unknown names are refused before any
forward pass, in one line listing the closest valid ones and then every valid one (per-layer
paths once, as ``model.layers.<N>...``).

The forward pass stops as soon as the last requested activation is captured: the hook that
completes the set raises a private exception, so caching layer 3 of a 32-layer model runs
four layers and never the LM head. A module that runs more than once per forward (weights shared
across layers, as in ALBERT) is captured at its first call.

Splicing takes TransformerLens-style ``(name, fn(activation, hook))`` pairs in
:meth:`HFModel.run_with_hooks`, so :mod:`lightning_sae.metrics.downstream` and the inspect
paths run on either backend unchanged.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sae.data import sources

INPUT, OUTPUT = "input", "output"
# A config's architectures naming one of these is loaded with its LM head (next-token logits).
_CAUSAL_ARCHITECTURE = ("ForCausalLM", "LMHeadModel")
_INDEX = re.compile(r"\.\d+(?=\.|$)")

# fn(activation) -> replacement, or None to leave the activation as it is.
Rewrite = Callable[[Tensor], Tensor | None]


class _StopForward(Exception):
    """Raised by the hook that captures the last activation a forward pass was run for."""


@dataclass(frozen=True)
class HookPoint:
    """``model.layers.6.mlp:input`` -> module ``model.layers.6.mlp``, side ``input``."""

    module: str
    side: str

    @classmethod
    def parse(cls, name: str) -> HookPoint:
        module, _, side = name.partition(":")
        return cls(module, side or OUTPUT)


@dataclass(frozen=True)
class HFModelConfig:
    """The facts about the model its users read, under TransformerLens's ``cfg`` names."""

    model_name: str
    device: torch.device
    n_layers: int
    d_model: int
    attention_dir: str  # "causal" or "bidirectional"
    normalization_type: str | None  # of the final norm: "LN", "RMS" or None


def is_causal_architecture(config: Any) -> bool:
    return any(name.endswith(_CAUSAL_ARCHITECTURE) for name in config.architectures or [])


def load_hf_model(
    spec: str,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    revision: str | None = None,
    hf_config: dict[str, Any] | None = None,
    seed: int = 0,
) -> HFModel:
    """An :class:`HFModel` in eval mode with gradients off (arguments as ``lm.load_model``)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    device, weights_dtype = sources.resolve_device(device), sources.torch_dtype(dtype)
    if hf_config is not None:
        module, causal = sources.seeded_causal_lm(spec, hf_config, seed), True
    else:
        sources.require_hub(spec, "model")
        path = sources.resolve_model_path(spec)
        try:
            config = AutoConfig.from_pretrained(path, revision=revision)
            causal = is_causal_architecture(config)
            auto = AutoModelForCausalLM if causal else AutoModel
            module = auto.from_pretrained(
                path, config=config, revision=revision, dtype=weights_dtype
            )
        except OSError as error:
            raise sources.hub_failure(spec, "model", error) from None
    module = module.to(device=device, dtype=weights_dtype).eval()
    module.requires_grad_(False)
    module.config.use_cache = False  # one forward per window: no key/value cache to build
    return HFModel(module, spec, causal)


class HFModel:
    """A transformers model behind the interface the cache, stream, splice evaluation and inspect
    use: :meth:`validate_hooks`, :meth:`capture`, :meth:`run_with_hooks`, ``cfg``,
    ``final_hidden_hook``, and for logit effects ``W_U`` and ``ln_final``."""

    def __init__(self, module: nn.Module, name: str, causal: bool) -> None:
        self.module = module
        text_config = module.config.get_text_config()
        n_layers = int(text_config.num_hidden_layers)
        self.modules = {path: sub for path, sub in module.named_modules() if path}
        self.layers_path = _layer_list(self.modules, n_layers, name)
        self.ln_final = _final_norm(module) if causal else None
        norm_class = type(self.ln_final).__name__ if self.ln_final is not None else ""
        norm_kind = "RMS" if "RMS" in norm_class else "LN" if "Norm" in norm_class else None
        self.cfg = HFModelConfig(
            model_name=name,
            device=next(module.parameters()).device,
            n_layers=n_layers,
            d_model=int(text_config.hidden_size),
            attention_dir="causal" if causal else "bidirectional",
            normalization_type=norm_kind,
        )

    @property
    def final_hidden_hook(self) -> str:
        """The last layer's output: the residual stream before the final norm."""
        return f"{self.layers_path}.{self.cfg.n_layers - 1}"

    @property
    def W_U(self) -> Tensor:
        """The unembedding ``[d_model, vocab]`` (causal LMs only)."""
        return self.module.get_output_embeddings().weight.T

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.module.parameters()

    # ----------------------------------------------------------------- hook names
    def validate_hooks(self, names: Sequence[str]) -> None:
        """Raise ``ValueError`` in one line, the closest valid names first, for unknown hooks."""
        bad_side = [name for name in names if HookPoint.parse(name).side not in (INPUT, OUTPUT)]
        if bad_side:
            raise ValueError(
                f"hook(s) {bad_side} on model {self.cfg.model_name!r} (backend hf): after ':' "
                f"give {INPUT} (what the module receives) or {OUTPUT} (what it returns, the "
                "default), e.g. model.layers.6.mlp:input."
            )
        unknown = [name for name in names if HookPoint.parse(name).module not in self.modules]
        if not unknown:
            return
        close = [
            match
            for name in unknown
            for match in difflib.get_close_matches(HookPoint.parse(name).module, self.modules, 3)
        ]
        closest = f"Closest: {', '.join(dict.fromkeys(close))}. " if close else ""
        raise ValueError(
            f"unknown hook point(s) {unknown} on model {self.cfg.model_name!r} (backend hf). "
            f"{closest}Valid hooks are the module paths of {type(self.module).__name__}, "
            f"with :{INPUT} for what a module receives and :{OUTPUT} (the default) for what it "
            f"returns: {_describe_paths(self.modules, self.layers_path, self.cfg.n_layers)}."
        )

    # ----------------------------------------------------------------- forward passes
    @torch.no_grad()
    def capture(self, tokens: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
        """Activations ``[batch, pos, d]`` at every hook in ``names``, from one forward pass
        that stops once the last of them is captured."""
        self.validate_hooks(names)
        tokens = tokens.to(self.cfg.device)
        captured: dict[str, Tensor] = {}
        wanted = len(set(names))

        def keeper(name: str) -> Rewrite:
            def keep(activation: Tensor) -> None:
                captured.setdefault(name, activation)
                if len(captured) == wanted:
                    raise _StopForward

            return keep

        keepers = [(name, keeper(name)) for name in dict.fromkeys(names)]
        with self._rewriting(keepers, tokens), suppress(_StopForward):
            self.module(input_ids=tokens)
        missing = [name for name in names if name not in captured]
        if missing:
            raise RuntimeError(
                f"hook(s) {missing} of model {self.cfg.model_name!r} did not run during the "
                "forward pass: the module is not used on this model's forward path."
            )
        return {name: captured[name] for name in names}

    def run_with_hooks(
        self,
        tokens: Tensor,
        fwd_hooks: Sequence[tuple[str, Callable[..., Tensor | None]]] = (),
        return_type: str | None = "logits",
    ) -> Tensor | None:
        """One forward pass with TransformerLens-style ``(name, fn(activation, hook))`` hooks
        (``hook.name`` is the name; ``fn`` returns a replacement or None), in their order.
        Returns the logits, or None for ``return_type=None`` (then the pass stops once every
        hook has run)."""
        if return_type not in ("logits", None):
            raise ValueError(f"return_type must be 'logits' or None, got {return_type!r}.")
        if return_type == "logits" and self.cfg.attention_dir != "causal":
            raise ValueError(f"{self.cfg.model_name!r} is not a causal LM: it has no logits.")
        self.validate_hooks([name for name, _ in fwd_hooks])
        tokens = tokens.to(self.cfg.device)
        pending = set(range(len(fwd_hooks)))

        def adapted(index: int, name: str, fn: Callable[..., Tensor | None]) -> Rewrite:
            hook = SimpleNamespace(name=name)

            def rewrite(activation: Tensor) -> Tensor | None:
                replaced = fn(activation, hook)
                pending.discard(index)
                if return_type is None and not pending:
                    raise _StopForward  # the caller sees only what its hooks saw
                return replaced

            return rewrite

        rewrites = [(name, adapted(i, name, fn)) for i, (name, fn) in enumerate(fwd_hooks)]
        with self._rewriting(rewrites, tokens):
            try:
                output = self.module(input_ids=tokens)
            except _StopForward:
                return None
        return output.logits if return_type == "logits" else None

    @contextmanager
    def _rewriting(self, rewrites: Sequence[tuple[str, Rewrite]], tokens: Tensor) -> Iterator[None]:
        """The rewrites attached to their modules (in order, so later ones see earlier ones'
        replacements) for the duration of the block."""
        handles = []
        try:
            for name, rewrite in rewrites:
                point = HookPoint.parse(name)
                module = self.modules[point.module]
                checked = _checked(name, rewrite, tuple(tokens.shape))
                if point.side == INPUT:
                    hook = _input_hook(name, checked)
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                else:
                    handles.append(module.register_forward_hook(_output_hook(name, checked)))
            yield
        finally:
            for handle in handles:
                handle.remove()


# --------------------------------------------------------------------------- module hooks
def _checked(name: str, rewrite: Rewrite, tokens_shape: tuple[int, ...]) -> Rewrite:
    def check(activation: Tensor) -> Tensor | None:
        if activation.ndim != 3 or tuple(activation.shape[:2]) != tokens_shape:
            raise ValueError(
                f"hook {name!r} gives a tensor of shape {tuple(activation.shape)}, not [batch, "
                f"pos, d] = [{tokens_shape[0]}, {tokens_shape[1]}, d]: hook a module whose "
                "input or output is one vector per token (a layer, its MLP or attention)."
            )
        return rewrite(activation)

    return check


def _input_hook(name: str, rewrite: Rewrite) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args and isinstance(args[0], Tensor):
            replaced = rewrite(args[0])
            return None if replaced is None else ((replaced, *args[1:]), kwargs)
        if isinstance(kwargs.get("hidden_states"), Tensor):
            replaced = rewrite(kwargs["hidden_states"])
            return None if replaced is None else (args, {**kwargs, "hidden_states": replaced})
        raise ValueError(
            f"hook {name!r}: the module receives no tensor as its first argument or as "
            "hidden_states; hook the output of the module before it instead."
        )

    return hook


def _output_hook(name: str, rewrite: Rewrite) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, Tensor):
            return rewrite(output)
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            replaced = rewrite(output[0])
            return None if replaced is None else (replaced, *output[1:])
        raise ValueError(
            f"hook {name!r}: the module returns a {type(output).__name__}, not a tensor; hook a "
            "module inside it (e.g. a layer rather than the whole model)."
        )

    return hook


# --------------------------------------------------------------------------- structure
def _layer_list(modules: dict[str, nn.Module], n_layers: int, name: str) -> str:
    """Path of the ``ModuleList`` of the ``n_layers`` transformer layers."""
    for path, module in modules.items():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return path
    raise ValueError(
        f"model {name!r}: no list of its {n_layers} layers (a ModuleList) was found among its "
        "modules; the hf backend needs one to know the final hidden state."
    )


def _final_norm(module: nn.Module) -> nn.Module | None:
    """The base model's last norm child: the norm applied before the LM head."""
    norms = [child for child in module.base_model.children() if "Norm" in type(child).__name__]
    return norms[-1] if norms else None


def _describe_paths(modules: dict[str, nn.Module], layers_path: str, n_layers: int) -> str:
    """Every module path once, per-layer ones as ``<layers>.<N>...`` (N in 0..n_layers-1)."""
    patterns = dict.fromkeys(_INDEX.sub(".<N>", path) for path in modules)
    return f"{', '.join(patterns)} (N in 0..{n_layers - 1} for {layers_path}.<N>)"

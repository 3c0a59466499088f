"""Dictionaries that map one site to another: transcoders, skip transcoders and crosscoders.

A transcoder (Dunefsky et al. 2024) encodes an MLP's input and decodes to the MLP's output: a
sparse, interpretable replacement for the MLP. A skip transcoder (Paulo et al. 2025) adds a
learned linear map ``W_skip x`` (initialised at zero) that carries the MLP's linear part, so the
features only have to explain the rest. A crosscoder (Anthropic 2024) reads several layers'
activations at once and writes all of them back: one dictionary shared across layers.

Each class here is an existing variant with its own activation function and losses (ReLU + L1,
TopK + AuxK, BatchTopK, JumpReLU), plus one of two small mixins:

- :class:`Transcoding`: the encoder reads the input site (``W_enc`` [d_in, d_sae]); the
  decoder writes the output site (``W_dec`` [d_sae, d_out], output bias ``b_dec`` [d_out]).
  Every loss term of the variant (MSE, AuxK's residual, FVU) is scored against the output
  site, because the base class scores against the target :meth:`input_and_target` returns.
- :class:`CrossCoding`: the layers' activations are concatenated, so "the sum of per-layer
  encodes" is one matmul with ``W_enc`` [n_layers * d_layer, d_sae], and the decoder writes
  every layer. The sparsity penalty is weighted by the sum of per-layer decoder norms
  (:meth:`CrossCoding.decoder_norms`), as in the crosscoder paper.

Batches: a dict ``{hook: [batch, width]}`` (``ActivationDataModule`` or
``StreamingActivationDataModule`` with ``hooks: [input, output]``; rows aligned), or, from
Python, a pair ``(x, y)`` (e.g. a ``TensorDataset``).

Input scaling is per site, as in the crosscoder papers: with ``normalize_activations`` each site
gets its own factor, fitted on the first training batch so that the site's mean norm is
sqrt(its width). A transcoder scales its input by ``input_scale`` and its output site by
``output_scale``; a crosscoder scales every layer by its own factor (``input_scale`` holds one
value per input dimension, constant within a layer). A site whose activations are ten times
larger than another's (residual streams grow with depth; an MLP's output is often far smaller
than its input) then weighs as much in the loss, instead of dominating it. Exporting folds the
factors into the weights (``W_enc`` by the input's, ``W_dec`` and ``b_dec`` by the output's,
``W_skip`` by their ratio), so the exported dictionary reads and writes model units. The
logged ``train/fvu`` and ``val/fvu`` are those of the model's units too: a transcoder's FVU
does not see its output site's one scale, and a crosscoder reports its mse and fvu on its
reconstruction unscaled layer by layer (:meth:`CrossCoding.in_reported_units`), since one scale
per layer would change the FVU.

Defaults (docs/defaults.md, measured on MiniLM): a transcoder's encoder starts with unit columns
(``encoder_init_scale`` 1, :meth:`Transcoding.default_encoder_init_scale`), a TopK or BatchTopK
transcoder's with columns of norm 0.5 (its variant's start); clipping and Adam's betas are its
variant's. A crosscoder takes its variant's defaults as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sae.metrics.reconstruction import FVU, MSE
from lightning_sae.models.base import (
    SAEOutput,
    SparseAutoencoder,
    check_fits_in_memory,
    check_positive,
)
from lightning_sae.models.jumprelu import JumpReLUSAE
from lightning_sae.models.standard import StandardSAE
from lightning_sae.models.topk import BatchTopKSAE, TopKSAE

_INIT_OFFSET = 0x7C0DE  # the decoder and encoder draws of a transcoder differ from an SAE's


def _unit_rows(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _hook_tensor(batch: Mapping[str, Tensor], hook: str | None, role: str) -> Tensor:
    if hook is None:
        raise ValueError(
            f"the batch serves hooks {', '.join(batch)}, but model.init_args.{role} is not set: "
            f"set it to the hook the {role.removesuffix('_hook')} site is read from."
        )
    if hook not in batch:
        raise ValueError(
            f"model.init_args.{role} is {hook!r}, which the batch does not hold (it holds "
            f"{', '.join(batch)}). Add it to data.init_args.hooks or set {role} to one of those."
        )
    return batch[hook]


def cross_directions(directions: Tensor, x_n: Tensor, residual: Tensor) -> Tensor:
    """Input-space directions for output-space ``directions`` [n, d_out], from paired rows.

    Direction j is sum_i <residual_i, d_j> x_i (unit norm): the inputs weighted by how much of
    what is left to explain lies along d_j, i.e. the row of the input-output cross-covariance
    that predicts d_j. Resampling and data-informed init use it for a transcoder's encoder,
    which reads a different site than its decoder writes.
    """
    weights = residual.float() @ directions.float().T  # [rows, n]
    return _unit_rows(weights.T @ x_n.float())


class Transcoding:
    """Mixin: the encoder reads ``input_hook``, the decoder writes ``output_hook``.

    Put it before a variant in the bases; the variant's activation and losses are used as they
    are. ``skip_connection`` (a class attribute) adds ``W_skip`` [d_out, d_in], initialised at
    zero: ``y_hat = W_dec f(x) + W_skip x + b_dec``.

    Args:
        d_in: width of the input site.
        d_out: width of the output site (default: d_in).
        input_hook: hook whose activations the encoder reads, e.g. ``blocks.3.hook_mlp_in``.
        output_hook: hook whose activations the decoder predicts, e.g. ``blocks.3.hook_mlp_out``.
        **kwargs: everything the variant takes. ``apply_b_dec_to_input`` must stay false:
            ``b_dec`` is the output bias, in another space than the input.
    """

    skip_connection: ClassVar[bool] = False
    maps_sites: ClassVar[bool] = True  # callbacks: the target differs from the input

    def __init__(
        self,
        *args: Any,
        d_out: int | None = None,
        input_hook: str | None = None,
        output_hook: str | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("apply_b_dec_to_input", False):
            raise ValueError(
                "a transcoder cannot subtract b_dec from its input: b_dec is the bias of the "
                "output site. Remove model.init_args.apply_b_dec_to_input (it is false here)."
            )
        kwargs["apply_b_dec_to_input"] = False
        if d_out is not None:
            check_positive("d_out", d_out, "model.init_args.d_out")
        if input_hook is not None and input_hook == output_hook:
            raise ValueError(
                f"input_hook and output_hook are both {input_hook!r}: a transcoder maps one site "
                "to another; for x -> x train an SAE instead."
            )
        super().__init__(*args, **kwargs)
        # Under LightningCLI the hparams are the parsed options, which leave out what this
        # constructor fixes; the base class reads it from there.
        self.hparams["apply_b_dec_to_input"] = False
        self.d_out = self.d_in if d_out is None else d_out
        self.input_hook, self.output_hook = input_hook, output_hook
        d_in, d_sae, d_out = self.d_in, self.d_sae, self.d_out
        # The base class counted an SAE's weights; the output width and the skip add more.
        check_fits_in_memory(
            d_in * d_sae
            + d_sae
            + d_sae * d_out
            + d_out
            + (d_out * d_in if self.skip_connection else 0),
            d_sae,
            f"d_sae={d_sae:,} with d_in={d_in:,} and d_out={d_out:,}",
            "model.init_args.d_sae",
        )
        # Encoder and decoder live in different spaces: draw them independently (an SAE's
        # tied start, W_enc = W_dec^T, means nothing across sites).
        generator = torch.Generator().manual_seed(self.hparams.init_seed + _INIT_OFFSET)
        self.W_dec = nn.Parameter(
            _unit_rows(torch.randn(self.d_sae, self.d_out, generator=generator))
        )
        # Stored latent by latent (the transpose of a contiguous [d_sae, d_in]), as an SAE's
        # encoder: the layout the TopK family's sparse gradient is computed in, so autograd
        # need not copy it into another (a transposing copy of d_in x d_sae every step).
        self.W_enc = nn.Parameter(
            _unit_rows(torch.randn(self.d_sae, self.d_in, generator=generator)).T
            * self.encoder_init_factor()
        )
        if "b_dec" in self._buffers:  # StandardSAE with use_b_dec=False: a zero buffer
            self.register_buffer("b_dec", torch.zeros(self.d_out))
        else:
            self.b_dec = nn.Parameter(torch.zeros(self.d_out))
        if self.hparams.get("encoder_init") == "independent":  # StandardSAE's nn.Linear init
            self._init_encoder_independently()
        self.W_skip = (
            nn.Parameter(torch.zeros(self.d_out, self.d_in)) if self.skip_connection else None
        )
        # The output site's own factor (module docstring); fitted with the input's.
        self.register_buffer("output_scale", torch.tensor(1.0))
        self.val_mse, self.val_fvu = MSE(), FVU(self.d_out)

    def default_encoder_init_scale(self) -> float:
        # The encoder is drawn apart from the decoder (it reads another site), so the SAE's
        # reason for a smaller start (the transpose's first reconstruction is too large) does
        # not hold; measured on MiniLM (docs/defaults.md), the L1 and JumpReLU SAEs' smaller
        # starts left most latents dead (1085 and 1366 of 1536 at d_sae/d_in 4) where unit
        # columns left 557 and 561, at a lower FVU. The TopK family keeps its variant's 0.5:
        # its AuxK (a dead window of 100 d_sae / k tokens) revives what the smaller start
        # leaves silent, and columns of norm 0.5 reach a lower FVU than unit columns for the
        # TopK and BatchTopK transcoders, skip or not (two seeds each).
        if isinstance(self, TopKSAE):
            return super().default_encoder_init_scale()
        return 1.0

    # ----------------------------------------------------------------- per-site scales
    @torch.no_grad()
    def fit_input_scale(self, x: Tensor, target: Tensor | None = None) -> None:
        """Fit both sites' scales: the input's on ``x``, the output's on ``target``."""
        if target is None:
            raise ValueError(
                "a transcoder fits one scale per site: pass the output site's sample as target."
            )
        scales = self.site_scales([x, target], [self.d_in, self.d_out])
        self.input_scale.fill_(scales[0])
        self.output_scale.fill_(scales[1])
        self.input_scale_fitted.fill_(True)

    def target_scale(self) -> Tensor:
        return self.output_scale

    def scale_metadata(self) -> dict[str, Any]:
        return {"input_scale": float(self.input_scale), "output_scale": float(self.output_scale)}

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # Saved before per-site scales: one factor scaled both sites.
        if prefix + "input_scale" in state_dict and prefix + "output_scale" not in state_dict:
            state_dict[prefix + "output_scale"] = state_dict[prefix + "input_scale"].clone()
        super()._load_from_state_dict(state_dict, prefix, *args)

    # ----------------------------------------------------------------- the map
    def forward_normalized(self, x_n: Tensor) -> SAEOutput:
        out = super().forward_normalized(x_n)
        if self.W_skip is not None:
            out.x_hat = out.x_hat + F.linear(x_n, self.W_skip)
        return out

    # ----------------------------------------------------------------- data
    def input_and_target(self, batch: Any) -> tuple[Tensor, Tensor]:
        if isinstance(batch, Mapping):
            x = _hook_tensor(batch, self.input_hook, "input_hook")
            y = _hook_tensor(batch, self.output_hook, "output_hook")
        elif isinstance(batch, (list, tuple)) and len(batch) == 2:
            x, y = batch
        else:
            raise ValueError(
                f"{type(self).__name__} trains on paired batches: a dict {{hook: tensor}} (set "
                "data.init_args.hooks: [<input hook>, <output hook>]) or a pair (x, y); got "
                f"{type(batch).__name__}."
            )
        for name, tensor, width in (("input", x, self.d_in), ("output", y, self.d_out)):
            if tensor.shape[-1] != width:
                option = "d_in" if name == "input" else "d_out"
                raise ValueError(
                    f"the {name} site's vectors have width {tensor.shape[-1]} but the transcoder "
                    f"was built with model.init_args.{option}={width}. Set {option}: "
                    f"{tensor.shape[-1]}."
                )
        if x.shape[:-1] != y.shape[:-1]:
            raise ValueError(
                f"input and output batches hold different rows ({tuple(x.shape)} vs "
                f"{tuple(y.shape)}): the pairs must be aligned, row i of each the same token."
            )
        return x, y

    def setup(self, stage: str) -> None:
        super().setup(stage)
        widths = getattr(self.trainer.datamodule, "d_ins", None)
        if isinstance(widths, Mapping) and len(widths) >= 2:
            self.check_sites(widths)
        # else pairs from Python, or a datamodule without hook names: checked per batch

    def check_sites(self, widths: Mapping[str, int]) -> None:
        """Both sites are among the data's hooks ``{hook: width}``, at this transcoder's widths."""
        for role, hook, width in (
            ("input_hook", self.input_hook, self.d_in),
            ("output_hook", self.output_hook, self.d_out),
        ):
            served = widths.get(hook)
            if served is None:
                _hook_tensor(dict.fromkeys(widths), hook, role)  # raises, naming the fix
            if served != width:
                option = "d_in" if role == "input_hook" else "d_out"
                raise ValueError(
                    f"{role} {hook} has width {served} but model.init_args.{option} is {width}: "
                    f"set {option}: {served}."
                )

    # ----------------------------------------------------------------- callbacks
    def restart_encoder_directions(
        self, directions: Tensor, x_n: Tensor, residual: Tensor
    ) -> Tensor:
        """Encoder columns for features restarted along ``directions`` (see
        :func:`cross_directions`)."""
        return cross_directions(directions, x_n, residual)

    def _d_in_mismatch(self, data_d_in: int) -> str:
        return (
            f"the data serves one hook of width {data_d_in}; a transcoder needs two sites: set "
            "data.init_args.hooks: [<input hook>, <output hook>] and model.init_args.input_hook "
            "and output_hook."
        )


class CrossCoding:
    """Mixin: read and write the concatenation of ``hooks`` (every layer, same order).

    Args:
        d_in: width of all layers together (n_layers * d_layer).
        hooks: the layers' hooks, e.g. ``[blocks.1.hook_resid_post, blocks.2.hook_resid_post]``.
        **kwargs: everything the variant takes.
    """

    maps_sites: ClassVar[bool] = False  # input and target are the same vectors
    writes_layers: ClassVar[bool] = True  # several sites at once: no single-hook splice

    def __init__(self, *args: Any, hooks: list[str] | None = None, **kwargs: Any) -> None:
        if not hooks or len(set(hooks)) != len(hooks) or len(hooks) < 2:
            raise ValueError(
                f"a crosscoder reads two or more distinct layers; model.init_args.hooks is "
                f"{hooks!r}. Set it, e.g. [blocks.1.hook_resid_post, blocks.2.hook_resid_post]."
            )
        super().__init__(*args, **kwargs)
        if self.d_in % len(hooks):
            raise ValueError(
                f"d_in={self.d_in} is the width of the {len(hooks)} layers together, so it must "
                f"be a multiple of {len(hooks)}: set model.init_args.d_in to n_layers * d_layer."
            )
        self.hooks = list(hooks)
        self.d_layer = self.d_in // len(hooks)
        # One factor per layer (module docstring), stored per input dimension so that scaling,
        # unscaling and the export's fold are elementwise.
        self.register_buffer("input_scale", torch.ones(self.d_in))

    # ----------------------------------------------------------------- per-layer scales
    @torch.no_grad()
    def fit_input_scale(self, x: Tensor, target: Tensor | None = None) -> None:
        """Fit each layer's scale so that its mean norm is sqrt(d_layer)."""
        layers = list(x.reshape(-1, self.d_in).split(self.d_layer, dim=-1))
        scales = self.site_scales(layers, [self.d_layer] * len(layers))
        self.input_scale.copy_(scales.repeat_interleave(self.d_layer))
        self.input_scale_fitted.fill_(True)

    def scale_metadata(self) -> dict[str, Any]:
        return {"input_scale": self.input_scale[:: self.d_layer].tolist()}  # one per layer

    def in_reported_units(self, x_hat_n: Tensor, y_n: Tensor) -> tuple[Tensor, Tensor]:
        # Each layer's own scale weighs the layers alike in the loss, but would make the
        # reported mse and fvu differ from what the crosscoder does to the model's activations
        # (and from the exported crosscoder's): report those in the model's units.
        return x_hat_n / self.input_scale, y_n / self.input_scale

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # Saved before per-layer scales: one factor for every layer.
        scale = state_dict.get(prefix + "input_scale")
        if scale is not None and scale.ndim == 0:
            state_dict[prefix + "input_scale"] = scale.expand(self.d_in).clone()
        super()._load_from_state_dict(state_dict, prefix, *args)

    def decoder_norms(self) -> Tensor:
        """sum over layers of ||W_dec_j^layer||: what the sparsity penalty is weighted by."""
        return self.W_dec.reshape(self.d_sae, len(self.hooks), self.d_layer).norm(dim=-1).sum(-1)

    def _layers(self, batch: Any) -> Tensor:
        if isinstance(batch, (list, tuple)):
            batch = batch[0]
        if isinstance(batch, Mapping):
            missing = [hook for hook in self.hooks if hook not in batch]
            if missing:
                raise ValueError(
                    f"the crosscoder reads {', '.join(missing)}, which the batch does not hold "
                    f"(it holds {', '.join(batch)}): set data.init_args.hooks to "
                    "model.init_args.hooks."
                )
            widths = {hook: batch[hook].shape[-1] for hook in self.hooks}
            if set(widths.values()) != {self.d_layer}:
                raise ValueError(
                    f"the crosscoder's layers must each have width {self.d_layer} "
                    f"(model.init_args.d_in / len(hooks)); the batch has {widths}."
                )
            return torch.cat([batch[hook] for hook in self.hooks], dim=-1)
        if batch.ndim == 3:  # [batch, n_layers, d_layer]
            return batch.flatten(1)
        return batch

    def input_and_target(self, batch: Any) -> tuple[Tensor, Tensor]:
        x = self._batch_tensor(self._layers(batch))
        return x, x

    def setup(self, stage: str) -> None:
        super().setup(stage)
        widths = getattr(self.trainer.datamodule, "d_ins", None)
        if isinstance(widths, Mapping) and len(widths) > 1:
            self.check_sites(widths)

    def check_sites(self, widths: Mapping[str, int]) -> None:
        """Every layer is among the data's hooks ``{hook: width}``, each ``d_layer`` wide."""
        self._layers({hook: torch.empty(0, width) for hook, width in widths.items()})


# ----------------------------------------------------------------------------- transcoders
class Transcoder(Transcoding, StandardSAE):
    """ReLU transcoder, loss = MSE to the output site + L1 (SAELens architecture
    ``transcoder``). Options: :class:`Transcoding` and :class:`StandardSAE`.

    Train it with ``DecoderNormConstraint``: unlike the standard SAE's, its rows trained free
    (the L1 weighted by their norms) reached a higher FVU at every matched L0 on both seeds
    measured, and so did the skip transcoder's (docs/defaults.md, "Free decoder rows for
    transcoders and crosscoders")."""


class SkipTranscoder(Transcoder):
    """ReLU transcoder with a linear skip ``W_skip x`` (SAELens ``skip_transcoder``)."""

    skip_connection = True


class TopKTranscoder(Transcoding, TopKSAE):
    """TopK transcoder, loss = MSE to the output site + AuxK. Options: :class:`Transcoding` and
    :class:`TopKSAE`."""


class TopKSkipTranscoder(TopKTranscoder):
    """TopK transcoder with a linear skip ``W_skip x`` (Paulo et al. 2025)."""

    skip_connection = True


class BatchTopKTranscoder(Transcoding, BatchTopKSAE):
    """BatchTopK transcoder; exports as SAELens ``jumprelu_transcoder`` (one threshold)."""


class BatchTopKSkipTranscoder(BatchTopKTranscoder):
    """BatchTopK transcoder with a linear skip; exports as ``jumprelu_skip_transcoder``."""

    skip_connection = True


class JumpReLUTranscoder(Transcoding, JumpReLUSAE):
    """JumpReLU transcoder, loss = MSE to the output site + L0 (SAELens
    ``jumprelu_transcoder``). Options: :class:`Transcoding` and :class:`JumpReLUSAE`."""


class JumpReLUSkipTranscoder(JumpReLUTranscoder):
    """JumpReLU transcoder with a linear skip (SAELens ``jumprelu_skip_transcoder``)."""

    skip_connection = True


# ----------------------------------------------------------------------------- crosscoders
class CrossCoder(CrossCoding, StandardSAE):
    """ReLU crosscoder, loss = MSE over every layer + L1 of each activation times the sum of
    its per-layer decoder norms (Anthropic 2024). Options: :class:`CrossCoding` and
    :class:`StandardSAE` (``weight_by_decoder_norm`` is always on). Its rows may train free:
    measured at least as good as under ``DecoderNormConstraint`` (docs/defaults.md)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("weight_by_decoder_norm") is False:
            raise ValueError(
                "a crosscoder weights its L1 by the sum of per-layer decoder norms; remove "
                "model.init_args.weight_by_decoder_norm: false."
            )
        kwargs["weight_by_decoder_norm"] = True
        super().__init__(*args, **kwargs)
        self.hparams["weight_by_decoder_norm"] = True  # as apply_b_dec_to_input in Transcoding


class TopKCrossCoder(CrossCoding, TopKSAE):
    """TopK crosscoder (k latents per row over all layers; AuxK for dead latents). Options:
    :class:`CrossCoding` and :class:`TopKSAE`."""


class BatchTopKCrossCoder(CrossCoding, BatchTopKSAE):
    """BatchTopK crosscoder (k latents per row on average over the batch, all layers together;
    the model-diffing crosscoders of Minder et al. 2025). Options: :class:`CrossCoding` and
    :class:`BatchTopKSAE`."""


TRANSCODERS: tuple[type[SparseAutoencoder], ...] = (
    Transcoder,
    SkipTranscoder,
    TopKTranscoder,
    TopKSkipTranscoder,
    BatchTopKTranscoder,
    BatchTopKSkipTranscoder,
    JumpReLUTranscoder,
    JumpReLUSkipTranscoder,
)
CROSSCODERS: tuple[type[SparseAutoencoder], ...] = (CrossCoder, TopKCrossCoder, BatchTopKCrossCoder)

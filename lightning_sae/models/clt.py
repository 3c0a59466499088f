"""Cross-layer transcoders (Anthropic, "Circuit Tracing", 2025).

A cross-layer transcoder (CLT) replaces every MLP of a model at once. Layer ``l`` has its own
encoder, which reads that layer's MLP input; each of its ``d_sae`` features writes, through its
own decoder, to the MLP output of layer ``l`` and of every later layer:

    a_l     = f(x_l W_enc[l] + b_enc[l])                      x_l: MLP input of layer l
    y_hat_t = sum_{s <= t} a_s W_dec[s][:, t - s] + b_dec[t]   y_t: MLP output of layer t

``W_dec[s]`` is ``[d_sae, n_layers - s, d_out]``: slot ``t - s`` holds the feature's direction
in layer ``t``'s output. A feature's decoder norm is the norm of that whole slab (every target
layer concatenated), which weights the sparsity penalty, as in the paper.

Units. Each layer's input and output get their own scale (``normalize_activations``; fitted on
the first training batch so that the layer's mean norm is sqrt(width), as the per-site scales of
``models/transcoder.py``), buffers ``input_scale`` and ``output_scale`` [n_layers]. The public
methods take and give model units; the accessors :meth:`encoder_direction`,
:meth:`encoder_bias`, :meth:`decoder_directions` and :meth:`decoder_bias` fold the scales in,
so that (to float rounding)

    pre_activations(x)[:, l] == x[:, l] @ encoder_direction(l) + encoder_bias(l)
    decode(a)[:, t] == sum_{s <= t} a[:, s] @ decoder_directions(s)[:, t - s] + decoder_bias()[t]

Pre-activations (hence activations and thresholds) are the same in both unit systems.

Batches: a dict ``{hook: [batch, width]}`` holding every input and output hook, rows aligned (the
cache and the stream serve it with ``hooks: [...]``), or a pair ``(x, y)`` of ``[batch,
n_layers, width]`` tensors. Inside, inputs are ``[batch, n_layers, d_in]`` and outputs
``[batch, n_layers, d_out]``; activations ``[batch, n_layers, d_sae]``.

The variants differ in the activation and the sparsity term:

- :class:`JumpReLUCrossLayerTranscoder`: the paper's. JumpReLU with learned thresholds and the
  straight-through threshold gradient of ``models/jumprelu.py``; sparsity
  ``lambda * sum tanh(c * ||W_dec_i|| * a_i)``; pre-activation loss
  ``lambda_p * sum ReLU(theta_i - h_i) * ||W_dec_i||``.
- :class:`TopKCrossLayerTranscoder`: the k features with the largest ``a_i * ||W_dec_i||`` (what
  they write, in model units, so that the encoder and decoder cannot trade scale to win a slot
  and an export selects as the trained module does), per layer or over all layers together
  (``topk_scope``).
- :class:`BatchTopKCrossLayerTranscoder`: the same over the global batch in training; a
  threshold (per layer or one) learned for inference.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sae.metrics.reconstruction import FVU, L0, MSE, DeadFraction
from lightning_sae.models.base import (
    SAEOutput,
    SparseAutoencoder,
    _is_distributed,
    _non_finite_terms,
    check_finite,
    check_fits_in_memory,
    check_nonnegative,
    check_positive,
)
from lightning_sae.models.jumprelu import at_least_zero, jumprelu, threshold_from_its_log
from lightning_sae.models.transcoder import cross_directions

TopKScope = Literal["layer", "all"]
_INIT_OFFSET = 0xC17  # a CLT's draws differ from an SAE's or a transcoder's of the same seed


class CrossLayerTranscoder(SparseAutoencoder):
    """The cross-layer transcoder's structure, with ReLU features and the MSE loss alone; the
    variants below add their activation and sparsity term.

    Args:
        d_in: width of each layer's MLP input.
        d_sae: features per layer (``n_layers * d_sae`` in all).
        n_layers: layers covered (default: the number of ``input_hooks``).
        d_out: width of each layer's MLP output (default: d_in).
        input_hooks: the layers' MLP-input hooks, in order, e.g. ``blocks.0.hook_mlp_in``.
        output_hooks: the layers' MLP-output hooks, in the same order.
        **kwargs: the options of :class:`SparseAutoencoder` (lr, normalize_activations,
            dead_window_tokens, init_seed, ...). ``apply_b_dec_to_input`` stays false (``b_dec``
            is the output's bias) and the orthogonality regulariser is not offered. Left
            unset, ``encoder_init_scale``, ``betas`` and ``gradient_clip_norm`` are the
            measured defaults of every CLT (docs/defaults.md): unit-norm encoder columns,
            Adam (0.9, 0.999), the gradient's norm clipped at 1.
    """

    maps_sites: ClassVar[bool] = True  # what the decoder writes is not what the encoder reads
    writes_layers: ClassVar[bool] = True  # several sites at once: no single-hook splice

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        n_layers: int | None = None,
        d_out: int | None = None,
        input_hooks: list[str] | None = None,
        output_hooks: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        n_layers = _layer_count(n_layers, input_hooks, output_hooks)
        if kwargs.get("apply_b_dec_to_input", False):
            raise ValueError(
                "a cross-layer transcoder cannot subtract b_dec from its input: b_dec is the "
                "bias of the output sites. Remove model.init_args.apply_b_dec_to_input."
            )
        if kwargs.get("orthogonality_coefficient", 0.0):
            raise ValueError(
                "the orthogonality regulariser is not offered for cross-layer transcoders; "
                "remove model.init_args.orthogonality_coefficient."
            )
        if d_out is not None:
            check_positive("d_out", d_out, "model.init_args.d_out")
        check_positive("d_sae", d_sae, "model.init_args.d_sae")
        width_out = d_in if d_out is None else d_out
        check_fits_in_memory(
            type(self).parameter_count(d_in, d_sae, n_layers, width_out),
            n_layers * d_sae,
            f"a cross-layer transcoder of n_layers={n_layers} with d_sae={d_sae:,} features each "
            f"(d_in={d_in:,}, d_out={width_out:,}, a decoder from each layer to every later one)",
            "model.init_args.d_sae, or the layers covered (model.init_args.n_layers, "
            "input_hooks and output_hooks)",
        )
        kwargs["apply_b_dec_to_input"] = False
        # The base class keeps one dead clock (and one firing count) per feature of all layers.
        super().__init__(d_in=d_in, d_sae=n_layers * d_sae, **kwargs)
        self.hparams["apply_b_dec_to_input"] = False
        self.hparams["d_sae"] = d_sae
        self.hparams["n_layers"] = n_layers
        self.n_layers, self.d_sae, self.n_features = n_layers, d_sae, n_layers * d_sae
        self.d_out = d_in if d_out is None else d_out
        self.input_hooks = None if input_hooks is None else list(input_hooks)
        self.output_hooks = None if output_hooks is None else list(output_hooks)

        generator = torch.Generator().manual_seed(self.hparams.init_seed + _INIT_OFFSET)
        # Encoder columns are unit directions: on inputs of norm sqrt(d_in) the pre-activations
        # start of order 1. Each target layer sums up to n_layers * d_sae features, so decoder
        # entries start with that fan-in.
        W_enc = torch.randn(n_layers, d_sae, d_in, generator=generator)
        W_enc = W_enc / W_enc.norm(dim=-1, keepdim=True)
        del self.W_enc, self.W_dec, self.b_enc, self.b_dec
        self.W_enc = nn.Parameter(W_enc.transpose(1, 2).contiguous() * self.encoder_init_factor())
        self.b_enc = nn.Parameter(torch.zeros(n_layers, d_sae))
        fan_in = math.sqrt(n_layers * d_sae)
        self.W_dec = nn.ParameterList(
            nn.Parameter(torch.randn(d_sae, n_layers - s, self.d_out, generator=generator) / fan_in)
            for s in range(n_layers)
        )
        self.b_dec = nn.Parameter(torch.zeros(n_layers, self.d_out))

        self.register_buffer("input_scale", torch.ones(n_layers))
        self.register_buffer("output_scale", torch.ones(n_layers))
        self.val_l0, self.val_mse, self.val_fvu = L0(), MSE(), FVU(n_layers * self.d_out)
        self.val_layer_fvu = nn.ModuleList(FVU(self.d_out) for _ in range(n_layers))
        self.val_dead = DeadFraction(self.n_features)

    # The measured defaults (docs/defaults.md, "Cross-layer transcoders"), shared by every
    # variant. A CLT's encoder columns start at unit norm, independent of its decoder (not the
    # decoder's transpose): encoder_init_scale multiplies them.
    def default_encoder_init_scale(self) -> float:
        # Half the start left more features that never fire at a higher FVU on MiniLM (TopK,
        # JumpReLU) and lowered ground-truth MMCS on the toy CLT.
        return 1.0

    def default_betas(self) -> tuple[float, float]:
        # beta2 0.99 alone was close to 0.999 on MiniLM; with clipping it was not measured.
        return (0.9, 0.999)

    def default_gradient_clip_norm(self) -> float:
        # On MiniLM's MLP inputs and outputs clipping at 1 lowers the held-out FVU of the TopK,
        # BatchTopK and JumpReLU CLTs by 0.01-0.03 (two seeds).
        return 1.0

    @classmethod
    def parameter_count(cls, d_in: int, d_sae: int, n_layers: int, d_out: int) -> int:
        """The parameters this class allocates: an encoder and its bias per layer, a decoder
        from each layer to it and every later layer (n_layers (n_layers + 1) / 2 slabs), the
        output biases, and what the variant adds (:meth:`extra_parameter_count`)."""
        encoders = n_layers * (d_in * d_sae + d_sae)
        decoders = n_layers * (n_layers + 1) // 2 * d_sae * d_out + n_layers * d_out
        return encoders + decoders + cls.extra_parameter_count(d_sae, n_layers)

    @classmethod
    def extra_parameter_count(cls, d_sae: int, n_layers: int) -> int:
        return 0

    # ----------------------------------------------------------------- interface accessors
    def encoder_direction(self, layer: int) -> Tensor:
        """Layer ``layer``'s encoder in model units, [d_in, d_sae]."""
        return self.W_enc[layer] * self.input_scale[layer]

    def encoder_bias(self, layer: int | None = None) -> Tensor:
        """Layer ``layer``'s encoder bias [d_sae] (all layers' [n_layers, d_sae] when None)."""
        return self.b_enc if layer is None else self.b_enc[layer]

    def decoder_directions(self, source: int) -> Tensor:
        """What source layer ``source``'s features write, in model units:
        [d_sae, n_layers - source, d_out], slot ``t - source`` for target layer ``t``."""
        return self.W_dec[source] / self.output_scale[source:, None]

    def decoder_bias(self) -> Tensor:
        """The output bias of every layer in model units, [n_layers, d_out]."""
        return self.b_dec / self.output_scale[:, None]

    # ----------------------------------------------------------------- the map
    def normalize(self, x: Tensor) -> Tensor:
        return x.to(self.W_enc.dtype) * self.input_scale[:, None]

    def target_scale(self) -> Tensor:
        return self.output_scale[:, None]

    def pre_activation(self, x_n: Tensor) -> Tensor:
        """Pre-activations [..., n_layers, d_sae] of normalised inputs [..., n_layers, d_in]."""
        return torch.einsum("...li,lif->...lf", x_n, self.W_enc) + self.b_enc

    def pre_activations(self, x_in: Tensor) -> Tensor:
        """Pre-activations [..., n_layers, d_sae] of inputs in model units."""
        return self.pre_activation(self.normalize(x_in))

    def decoder_norms(self) -> Tensor:
        """Each feature's decoder norm over every layer it writes, [n_layers, d_sae], in the
        normalised units the losses are computed in."""
        return torch.stack([W.pow(2).sum((1, 2)).sqrt() for W in self.W_dec])

    def written_norms(self) -> Tensor:
        """Each feature's decoder norm in model units, [n_layers, d_sae]: what TopK ranks by.
        Unlike :meth:`decoder_norms` it does not change when an export folds the scales in, so
        an exported CLT selects exactly the features the trained one does."""
        return torch.stack(
            [self.decoder_directions(s).pow(2).sum((1, 2)).sqrt() for s in range(self.n_layers)]
        )

    def reconstruct(self, acts: Tensor) -> Tensor:
        """Outputs [..., n_layers, d_out] in normalised units of activations
        [..., n_layers, d_sae]."""
        lead = acts.shape[:-2]
        out = self.b_dec.to(acts.dtype).expand(*lead, self.n_layers, self.d_out)
        for source, W in enumerate(self.W_dec):
            written = acts[..., source, :] @ W.reshape(self.d_sae, -1).to(acts.dtype)
            written = written.reshape(*lead, self.n_layers - source, self.d_out)
            out = out + F.pad(written, (0, 0, source, 0))
        return out

    def forward_normalized(self, x_n: Tensor) -> SAEOutput:
        acts, pre_acts = self.encode_normalized(x_n)
        return SAEOutput(x_hat=self.reconstruct(acts), acts=acts, pre_acts=pre_acts)

    # encode(x_in) and decode(acts) (model units) are the base class's: normalize, encode, and
    # reconstruct / target_scale(), both per layer here.

    # ----------------------------------------------------------------- one layer at a time
    def encode_layer(self, layer: int, x: Tensor) -> Tensor:
        """Layer ``layer``'s activations [..., d_sae] from its MLP input [..., d_in] alone (model
        units), as a forward pass meets them: what the replacement model runs. Equal to
        ``encode(x_all)[..., layer, :]`` for every variant whose activation is causal across
        layers (all but TopK over all layers together; :meth:`layer_activation`)."""
        x_n = x.to(self.W_enc.dtype) * self.input_scale[layer]
        return self.layer_activation(layer, x_n @ self.W_enc[layer] + self.b_enc[layer])

    def layer_activation(self, layer: int, pre: Tensor) -> Tensor:
        """The activation of one layer's pre-activations [..., d_sae]."""
        return torch.relu(pre)

    @property
    def replaces_layer_by_layer(self) -> bool:
        """Whether a layer's activations depend on its own input alone (then
        :meth:`encode_layer` runs the replacement model as a forward pass reaches each layer)."""
        return True

    def decode_layer(self, target: int, acts: Tensor) -> Tensor:
        """Layer ``target``'s MLP output [..., d_out] (model units) from the activations of
        layers 0..target, ``acts`` [..., target + 1, d_sae] (later layers' are not read)."""
        out = self.b_dec[target].to(acts.dtype)
        for source in range(target + 1):
            out = out + acts[..., source, :] @ self.W_dec[source][:, target - source].to(acts.dtype)
        return out / self.output_scale[target]

    # ----------------------------------------------------------------- scales
    @torch.no_grad()
    def fit_input_scale(self, x: Tensor, target: Tensor | None = None) -> None:
        """Fit every layer's input and output scale (mean norm sqrt(width)) on one sample."""
        if target is None:
            raise ValueError("a cross-layer transcoder fits its output scales on the targets.")
        samples = [x[:, layer] for layer in range(self.n_layers)]
        samples += [target[:, layer] for layer in range(self.n_layers)]
        widths = [self.d_in] * self.n_layers + [self.d_out] * self.n_layers
        scales = self.site_scales(samples, widths).to(self.input_scale)
        self.input_scale.copy_(scales[: self.n_layers])
        self.output_scale.copy_(scales[self.n_layers :])
        self.input_scale_fitted.fill_(True)

    def scale_metadata(self) -> dict[str, Any]:
        return {
            "input_scale": self.input_scale.tolist(),
            "output_scale": self.output_scale.tolist(),
        }

    def normalize_target(self, y: Tensor) -> Tensor:
        return y.to(self.W_enc.dtype) * self.output_scale[:, None]

    # ----------------------------------------------------------------- export
    @torch.no_grad()
    def folded_weights(self) -> dict[str, Tensor]:
        """The weights in model units (scales folded in, in float64 so that they round once),
        as an export writes them: ``W_enc``, ``b_enc``, ``W_dec.<s>``, ``b_dec`` and the
        variant's own (:meth:`extra_folded_weights`)."""
        dtype = self.W_enc.dtype
        weights = {
            "W_enc": self.W_enc.double() * self.input_scale.double()[:, None, None],
            "b_enc": self.b_enc.double(),
            "b_dec": self.b_dec.double() / self.output_scale.double()[:, None],
        }
        for source, W in enumerate(self.W_dec):
            weights[f"W_dec.{source}"] = W.double() / self.output_scale.double()[source:, None]
        weights |= self.extra_folded_weights()
        return {k: v.to(dtype).contiguous().cpu() for k, v in weights.items()}

    def extra_folded_weights(self) -> dict[str, Tensor]:
        return {}

    # ----------------------------------------------------------------- data
    def input_and_target(self, batch: Any) -> tuple[Tensor, Tensor]:
        """(inputs [B, n_layers, d_in], outputs [B, n_layers, d_out]) of a batch."""
        if isinstance(batch, Mapping):
            x = torch.stack([_hook(batch, hook, "input_hooks") for hook in self._hooks("in")], 1)
            y = torch.stack([_hook(batch, hook, "output_hooks") for hook in self._hooks("out")], 1)
        elif isinstance(batch, (list, tuple)) and len(batch) == 2:
            x, y = batch
        else:
            raise ValueError(
                f"{type(self).__name__} trains on a dict {{hook: tensor}} holding every layer's "
                "MLP input and output (set data.init_args.hooks to the input_hooks and "
                f"output_hooks) or a pair (x, y); got {type(batch).__name__}."
            )
        for name, tensor, width in (("input", x, self.d_in), ("output", y, self.d_out)):
            if tensor.ndim != 3 or tensor.shape[1:] != (self.n_layers, width):
                option = "d_in" if name == "input" else "d_out"
                raise ValueError(
                    f"the {name} batch has shape {tuple(tensor.shape)}, but this cross-layer "
                    f"transcoder reads [batch, {self.n_layers}, {width}] (n_layers, {option}); "
                    f"set model.init_args.n_layers and {option} to the data's."
                )
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"input and output batches hold different rows ({x.shape[0]} vs {y.shape[0]}): "
                "the pairs must be aligned, row i of each the same token."
            )
        return x, y

    def _hooks(self, side: Literal["in", "out"]) -> list[str]:
        hooks = self.input_hooks if side == "in" else self.output_hooks
        if hooks is None:
            option = "input_hooks" if side == "in" else "output_hooks"
            raise ValueError(
                f"the batch is a dict of hooks but model.init_args.{option} is not set: set it "
                "to the layers' hooks, in order."
            )
        return hooks

    def setup(self, stage: str) -> None:
        if self.hparams.compile and not hasattr(
            self.forward_normalized, "_torchdynamo_orig_callable"
        ):
            self.forward_normalized = torch.compile(self.forward_normalized)
        widths = getattr(self.trainer.datamodule, "d_ins", None)
        if isinstance(widths, Mapping) and len(widths) >= 2:
            self.check_sites(widths)

    def check_sites(self, widths: Mapping[str, int]) -> None:
        """Every hook is among the data's ``{hook: width}``, at this CLT's widths."""
        for role, width in (("in", self.d_in), ("out", self.d_out)):
            option = "input_hooks" if role == "in" else "output_hooks"
            for hook in self._hooks(role):
                if hook not in widths:
                    _hook(dict.fromkeys(widths), hook, option)  # raises, naming the fix
                if widths[hook] != width:
                    name = "d_in" if role == "in" else "d_out"
                    raise ValueError(
                        f"{hook} (in {option}) has width {widths[hook]} but "
                        f"model.init_args.{name} is {width}: set {name}: {widths[hook]}."
                    )

    # ----------------------------------------------------------------- steps
    def step_and_statistics(
        self, batch: Any
    ) -> tuple[Tensor, Tensor, Callable[[list[float]], None]]:
        x, y = self.input_and_target(batch)
        if not self._input_scale_is_fitted():
            self.fit_input_scale(x, y)
        x_n, y_n = self.normalize(x), self.normalize_target(y)
        out = self.forward_normalized(x_n)
        terms = self.loss_terms(y_n, out)
        loss = torch.stack(list(terms.values())).sum()
        stats = self._training_statistics(y_n, out, terms, loss, read=x_n)
        return loss, stats, functools.partial(self._report_training_statistics, list(terms))

    def loss_terms(self, y_n: Tensor, out: SAEOutput) -> dict[str, Tensor]:
        """MSE: the squared error summed over every layer's output, averaged over rows."""
        return {"mse": (out.x_hat - y_n).pow(2).sum((-2, -1)).mean()}

    @torch.no_grad()
    def _training_statistics(
        self,
        y_n: Tensor,
        out: SAEOutput,
        terms: dict[str, Tensor],
        loss: Tensor,
        read: Tensor | None = None,
    ) -> Tensor:
        """The step's sums over the global batch in one all-reduce (per-layer errors and
        variances included), and the dead clock advanced; returned as one float64 tensor."""
        y64, y_hat64 = y_n.double(), out.x_hat.detach().double()
        L, n_rows = self.n_layers, y_n.shape[0]
        read_sq = y64.new_zeros(()) if read is None else read.double().pow(2).sum()
        fired = (out.acts != 0).reshape(-1, self.n_features).sum(0, dtype=torch.int32)
        sums = torch.cat(
            [
                fired.double(),
                y64.sum(0).reshape(-1),  # [L * d_out]
                (y_hat64 - y64).pow(2).sum((0, 2)),  # [L]
                y64.pow(2).sum((0, 2)),  # [L]
                torch.stack(
                    [
                        y64.new_full((), float(n_rows)),
                        read_sq,
                        loss.detach().double(),
                        *[t.detach().double() for t in terms.values()],
                    ]
                ),
            ]
        )
        if _is_distributed():
            dist.all_reduce(sums)
        F_, D = self.n_features, L * self.d_out
        fired, sum_y = sums[:F_], sums[F_ : F_ + D].reshape(L, self.d_out)
        sq_err, sum_sq = sums[F_ + D : F_ + D + L], sums[F_ + D + L : F_ + D + 2 * L]
        rest = sums[F_ + D + 2 * L :]
        n = rest[0]
        self.tokens_since_fired += n.long()
        self.tokens_since_fired.masked_fill_(fired > 0, 0)
        self._clock_version_at_statistics = self._clock_version()
        dead = self.dead_mask().sum()[None].double()
        variance = sum_sq - sum_y.pow(2).sum(-1) / n  # per layer
        active = fired.reshape(L, self.d_sae).sum(-1)
        return torch.cat([rest, sq_err, variance, active, sum_sq.sum()[None], dead])

    def _report_training_statistics(
        self,
        term_names: list[str],
        scalars: list[float],
        replicas: int | None = None,
        n_features: int | None = None,
    ) -> None:
        """Check and log the step's sums; the loss sums are over ``replicas`` copies of the
        step's loss (DDP's ranks by default; a latent-sharded run's data-parallel group), the
        dead count over ``n_features`` (this module's by default; a latent group's in all)."""
        world = replicas or (dist.get_world_size() if _is_distributed() else 1)
        n_features = n_features or self.n_features
        L, n_terms = self.n_layers, len(term_names)
        n, read_sq, total, *term_values = scalars[: 3 + n_terms]
        rest = scalars[3 + n_terms :]
        sq_err, variance, active = rest[:L], rest[L : 2 * L], rest[2 * L : 3 * L]
        sum_sq, n_dead = rest[3 * L], rest[3 * L + 1]
        self._known_dead_count = (int(n_dead), self._clock_version_at_statistics)
        if not (all(math.isfinite(v) for v in (*sq_err, *variance)) and math.isfinite(read_sq)):
            raise ValueError(self._non_finite_batch())
        if not math.isfinite(total):
            terms = _non_finite_terms(dict.fromkeys(term_names), term_values)
            raise ValueError(self._diverged("the loss is " + terms))
        total_var = sum(variance)
        if n > 1 and total_var <= 1e-12 * sum_sq:
            raise ValueError(self._zero_variance_batch(sum_sq))
        self.log("train/loss", total / world, prog_bar=True)
        for name, value in zip(term_names, term_values, strict=True):
            self.log(f"train/loss/{name}", value / world)
        self.log("train/l0", sum(active) / n, prog_bar=True)
        self.log("train/mse", sum(sq_err) / n)
        self.log("train/fvu", sum(sq_err) / total_var if total_var > 0 else float("nan"))
        for layer in range(L):
            self.log(f"train/l0/layer{layer}", active[layer] / n)
            fvu = sq_err[layer] / variance[layer] if variance[layer] > 0 else float("nan")
            self.log(f"train/fvu/layer{layer}", fvu)
        if self.dead_window_passed(int(n)):
            self.log("train/dead_fraction", n_dead / n_features)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = self.input_and_target(batch)
        out = self.forward_normalized(self.normalize(x))
        y_n = self.normalize_target(y)
        terms = self.loss_terms(y_n, out)
        self.log("val/loss", torch.stack(list(terms.values())).sum(), sync_dist=True)
        for name, value in terms.items():
            self.log(f"val/loss/{name}", value, sync_dist=True)
        rows = y_n.shape[0]
        self.val_l0.update(out.acts.reshape(rows, -1))
        self.val_mse.update(out.x_hat.reshape(rows, -1), y_n.reshape(rows, -1))
        self.val_fvu.update(out.x_hat.reshape(rows, -1), y_n.reshape(rows, -1))
        self.val_dead.update(out.acts.reshape(rows, -1))
        for layer, metric in enumerate(self.val_layer_fvu):
            metric.update(out.x_hat[:, layer], y_n[:, layer])
            self.log(f"val/fvu/layer{layer}", metric)
        for name in ("l0", "mse", "fvu"):
            self.log(f"val/{name}", getattr(self, f"val_{name}"))
        self.log("val/dead_fraction", self.val_dead)

    # ----------------------------------------------------------------- callbacks
    @torch.no_grad()
    def reset_features(
        self,
        indices: Tensor,
        directions: Tensor,
        encoder_norm: float,
        encoder_directions: Tensor | None = None,
    ) -> list[tuple[nn.Parameter, int, int | str]]:
        """Restart features ``indices`` (flat over all layers: ``layer * d_sae + j``) as new ones.

        ``directions`` [n, n_layers * d_out] (or [n, n_layers, d_out]): what each restarted
        feature should write, per target layer; a feature of layer ``s`` keeps the slots of
        layers ``s`` and later, scaled to unit norm together. ``encoder_directions``
        [n, n_layers * d_in]: the input directions per layer (:meth:`restart_encoder_directions`);
        the feature's encoder column is its own layer's, at unit norm, times ``encoder_norm``.
        ``b_enc`` goes to 0 and the dead clock to zero.

        Returns (parameter, feature dim, layer) for every touched parameter: ``layer`` an int for
        a parameter of one source layer (``W_dec[s]``), ``"stacked"`` for one with the layers
        along dim 0; the resampler restarts the optimizer's statistics per layer from that.
        """
        if encoder_directions is None:
            raise ValueError("a cross-layer transcoder restarts features with encoder directions")
        indices = indices.to(self.b_enc.device)
        layers, features = indices // self.d_sae, indices % self.d_sae
        directions = directions.to(self.b_dec).reshape(-1, self.n_layers, self.d_out)
        encoders = encoder_directions.to(self.W_enc).reshape(-1, self.n_layers, self.d_in)
        for source in range(self.n_layers):
            chosen = layers == source
            if not bool(chosen.any()):
                continue
            slab = directions[chosen][:, source:]
            slab = slab / slab.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]
            self.W_dec[source][features[chosen]] = slab
            encoder = encoders[chosen][:, source]
            encoder = encoder / encoder.norm(dim=1, keepdim=True).clamp_min(1e-12)
            self.W_enc[source][:, features[chosen]] = encoder.T * encoder_norm
        self.b_enc[layers, features] = 0.0
        self.tokens_since_fired[indices] = 0
        return self.feature_parameters()

    def feature_parameters(self) -> list[tuple[nn.Parameter, int, int | str]]:
        """(parameter, feature dim, layer) of every per-feature parameter (see
        :meth:`reset_features`)."""
        stacked = [(self.W_enc, 2, "stacked"), (self.b_enc, 1, "stacked")]
        return [*stacked, *[(W, 0, source) for source, W in enumerate(self.W_dec)]]

    def restart_encoder_directions(
        self, directions: Tensor, x_n: Tensor, residual: Tensor
    ) -> Tensor:
        """Input directions [n, n_layers * d_in] for output ``directions`` [n, n_layers * d_out]
        from paired rows (inputs and residuals flattened over layers), as a transcoder's
        (:func:`~lightning_sae.models.transcoder.cross_directions`): per layer, the inputs
        weighted by how much of the residual lies along the direction."""
        return cross_directions(directions, x_n.flatten(1), residual.flatten(1))


# ----------------------------------------------------------------------------- JumpReLU
class JumpReLUCrossLayerTranscoder(CrossLayerTranscoder):
    """The paper's CLT: JumpReLU features, tanh sparsity weighted by decoder norms, and a
    pre-activation loss.

    Loss = MSE over every layer
         + ``sparsity_coefficient`` * (warm-up) * mean_rows sum_i tanh(``sparsity_c`` *
           ||W_dec_i|| * a_i)
         + ``preact_coefficient`` * mean_rows sum_i ReLU(theta_i - h_i) * ||W_dec_i||

    where ``i`` runs over every feature of every layer, ``||W_dec_i||`` is the norm of all that
    feature writes (every target layer concatenated), ``h`` the pre-activations and ``theta``
    the thresholds. The tanh penalty acts like an L1 for small contributions and like an L0
    for large ones; its gradient reaches the thresholds through the JumpReLU's
    straight-through estimator (``models/jumprelu.py``). The pre-activation loss (applied to
    every feature, as in the paper) keeps features from dying: it lifts pre-activations that
    sit below the threshold.

    Args:
        threshold_init: initial theta for every feature (normalised units).
        bandwidth: width of the rectangle kernel of the threshold gradient.
        sparsity_coefficient: lambda.
        sparsity_c: c, the scale inside the tanh.
        sparsity_warmup_steps: linear warm-up of lambda from 0.
        preact_coefficient: lambda_p (0 = off).
        **kwargs: the options of :class:`CrossLayerTranscoder`.
    """

    def __init__(
        self,
        *args: Any,
        threshold_init: float = 0.03,
        bandwidth: float = 0.1,
        sparsity_coefficient: float = 1e-3,
        sparsity_c: float = 1.0,
        sparsity_warmup_steps: int = 0,
        preact_coefficient: float = 3e-6,
        **kwargs: Any,
    ) -> None:
        check_positive("threshold_init", threshold_init, "model.init_args.threshold_init")
        check_positive("bandwidth", bandwidth, "model.init_args.bandwidth")
        for name, value in (
            ("sparsity_coefficient", sparsity_coefficient),
            ("sparsity_warmup_steps", sparsity_warmup_steps),
            ("preact_coefficient", preact_coefficient),
        ):
            check_nonnegative(name, value, f"model.init_args.{name}")
        check_positive("sparsity_c", sparsity_c, "model.init_args.sparsity_c")
        super().__init__(*args, **kwargs)
        # theta [n_layers, d_sae] itself, not its log, as JumpReLUSAE's (models/jumprelu.py):
        # Adam moves a parameter by about lr per step, so a log step moves theta by theta x lr
        # and from a small start theta could grow at most e^(lr x steps)-fold.
        self.threshold = nn.Parameter(
            torch.full((self.n_layers, self.d_sae), float(threshold_init))
        )

    @classmethod
    def extra_parameter_count(cls, d_sae: int, n_layers: int) -> int:
        return n_layers * d_sae  # the thresholds

    def positive_threshold(self) -> Tensor:
        """theta [n_layers, d_sae] as the encoder uses it (pre-activation units, the same in
        model units): at least 0 in value, with the gradient of theta itself, so that a
        threshold Adam stepped below 0 lets no negative pre-activation through and can still
        be lifted back (:meth:`JumpReLUSAE.positive_threshold`)."""
        return at_least_zero(self.threshold)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        threshold_from_its_log(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def activation(self, pre: Tensor) -> Tensor:
        # The kernel sums its threshold gradient over the rows of a [rows, features] tensor.
        flat = pre.reshape(-1, self.n_features)
        acts = jumprelu(flat, self.positive_threshold().reshape(-1), self.hparams.bandwidth)
        return acts.reshape(pre.shape)

    def layer_activation(self, layer: int, pre: Tensor) -> Tensor:
        return jumprelu(pre, self.positive_threshold()[layer], self.hparams.bandwidth)

    def loss_terms(self, y_n: Tensor, out: SAEOutput) -> dict[str, Tensor]:
        hp = self.hparams
        terms = super().loss_terms(y_n, out)
        norms = self.decoder_norms()
        weight = hp.sparsity_coefficient * self.warmup_factor(hp.sparsity_warmup_steps)
        tanh = torch.tanh(hp.sparsity_c * norms * out.acts)
        terms["sparsity"] = weight * tanh.sum((-2, -1)).mean()
        if hp.preact_coefficient > 0:
            shortfall = torch.relu(self.positive_threshold() - out.pre_acts) * norms
            terms["preact"] = hp.preact_coefficient * shortfall.sum((-2, -1)).mean()
        return terms

    @torch.no_grad()
    def reset_features(self, indices: Tensor, *args: Any, **kwargs: Any) -> list:
        touched = super().reset_features(indices, *args, **kwargs)
        # A dead feature's threshold may sit above anything its new encoder column produces.
        indices = indices.to(self.threshold.device)
        self.threshold.view(-1)[indices] = self.hparams.threshold_init
        return touched

    def feature_parameters(self) -> list[tuple[nn.Parameter, int, int | str]]:
        return [*super().feature_parameters(), (self.threshold, 1, "stacked")]

    def extra_folded_weights(self) -> dict[str, Tensor]:
        return {"threshold": self.positive_threshold().detach().double()}


# ----------------------------------------------------------------------------- TopK family
class TopKCrossLayerTranscoder(CrossLayerTranscoder):
    """Keep the ``k`` features writing the most, ``a_i * ||W_dec_i||``, per row; loss = MSE.

    Args:
        k: features kept per row: per layer (``topk_scope: layer``, k of each layer's d_sae) or
            over all layers together (``topk_scope: all``, k of n_layers * d_sae).
        topk_scope: ``layer`` or ``all``.
        **kwargs: the options of :class:`CrossLayerTranscoder`.
    """

    def __init__(self, *args: Any, k: int = 32, topk_scope: TopKScope = "layer", **kwargs: Any):
        check_positive("k", k, "model.init_args.k")
        if topk_scope not in ("layer", "all"):
            raise ValueError(
                f"topk_scope must be 'layer' or 'all', got {topk_scope!r}: set "
                "model.init_args.topk_scope."
            )
        super().__init__(*args, **kwargs)
        limit = self.d_sae if topk_scope == "layer" else self.n_features
        if k > limit:
            raise ValueError(
                f"k={k} exceeds the {limit} features a row selects from ({topk_scope} scope): "
                f"set model.init_args.k <= {limit}."
            )
        self.k = k

    def selection_scores(self, pre: Tensor) -> Tensor:
        """What a feature would write, ReLU(h_i) * ||W_dec_i||, grouped for selection:
        [groups, rows, features] (per layer: one group per layer; all: one group)."""
        scores = torch.relu(pre.detach()) * self.written_norms().detach().to(pre.dtype)
        scores = scores.reshape(-1, self.n_layers, self.d_sae)
        if self.hparams.topk_scope == "layer":
            return scores.transpose(0, 1)
        return scores.reshape(1, -1, self.n_features)

    def _ungroup(self, mask: Tensor, shape: torch.Size) -> Tensor:
        if self.hparams.topk_scope == "layer":
            mask = mask.transpose(0, 1)
        return mask.reshape(shape)

    def keep_mask(self, scores: Tensor) -> Tensor:
        """The kept entries of grouped ``scores`` [groups, rows, features]."""
        top = scores.topk(self.k, dim=-1).indices
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True) & (scores > 0)

    def activation(self, pre: Tensor) -> Tensor:
        mask = self._ungroup(self.keep_mask(self.selection_scores(pre)), pre.shape)
        return torch.where(mask, torch.relu(pre), 0)

    @property
    def replaces_layer_by_layer(self) -> bool:
        return self.hparams.topk_scope == "layer"

    def layer_activation(self, layer: int, pre: Tensor) -> Tensor:
        if self.hparams.topk_scope == "all":
            raise ValueError(
                f"{type(self).__name__} with topk_scope 'all' selects over every layer at once, "
                "so one layer's activations depend on later layers' inputs and cannot be "
                "computed as a forward pass reaches them; use topk_scope 'layer' (or BatchTopK, "
                "whose inference threshold is per feature) for a replacement model."
            )
        written = torch.relu(pre) * self.written_norms()[layer].to(pre.dtype)
        rows = written.reshape(-1, self.d_sae)
        top = rows.topk(self.k, dim=-1).indices
        mask = torch.zeros_like(rows, dtype=torch.bool).scatter_(-1, top, True) & (rows > 0)
        return torch.where(mask.reshape(pre.shape), torch.relu(pre), 0)


class BatchTopKCrossLayerTranscoder(TopKCrossLayerTranscoder):
    """TopK over the global batch in training (k per row on average, per layer or over all
    layers), a threshold on ``a_i * ||W_dec_i||`` at inference.

    The threshold (one per layer, or one for all) is the running average
    (``threshold_momentum``) of the smallest score kept in each training batch; until a first
    training batch has been seen, eval mode selects over its batch too. Under DDP the global
    batch's cut-off is found from every rank's candidates (one all_gather), so a DDP step equals
    one process's step on the same global batch.
    """

    def __init__(self, *args: Any, threshold_momentum: float = 0.99, **kwargs: Any) -> None:
        check_finite("threshold_momentum", threshold_momentum, "model.init_args.threshold_momentum")
        if not 0 <= threshold_momentum < 1:
            raise ValueError(
                f"threshold_momentum must be in [0, 1), got {threshold_momentum}: "
                "set model.init_args.threshold_momentum."
            )
        super().__init__(*args, **kwargs)
        groups = self.n_layers if self.hparams.topk_scope == "layer" else 1
        self.register_buffer("threshold", torch.zeros(groups))
        self.register_buffer("threshold_updates", torch.tensor(0, dtype=torch.long))

    def keep_mask(self, scores: Tensor) -> Tensor:
        """The k x batch largest of each group of ``scores`` [groups, rows, features] (in
        training over the global batch), or those above the threshold (eval, once learned).

        Of the entries tied at a group's cut-off, the first in the batch's order (row, then
        feature) are kept, as the SAE's BatchTopK does (``models/sparse.py``,
        :func:`~lightning_sae.models.sparse.keep_above_and_first_ties`): keeping every tied
        entry would keep more than k x batch, and other entries under DDP than in one process.
        """
        if not self.training and int(self.threshold_updates) > 0:
            return scores > self.threshold.to(scores.dtype)[:, None, None]
        groups, rows, width = scores.shape
        flat = scores.reshape(groups, -1)
        world = dist.get_world_size() if self.training and _is_distributed() else 1
        wanted = min(self.k * rows, flat.shape[1]) * world
        candidates = flat.topk(min(wanted, flat.shape[1]), dim=-1).values  # [groups, c]
        if world > 1:
            cutoff, ties = self._global_cutoff_and_ties(candidates, wanted)
        else:
            cutoff = candidates[:, -1]
            ties = wanted - (candidates > cutoff[:, None]).sum(-1)
        keep = keep_above_and_first_ties_per_group(flat, cutoff, ties).view_as(scores)
        mask = keep & (scores > 0)
        if self.training:
            self._update_threshold(torch.where(mask, scores, torch.inf).reshape(groups, -1))
        return mask

    def _global_cutoff_and_ties(self, candidates: Tensor, wanted: int) -> tuple[Tensor, Tensor]:
        """Each group's cut-off over every rank's ``candidates`` [groups, c] (its own ``wanted``
        largest: any rank's share of the global top set is among them), and how many of this
        rank's entries tied at it to keep: the global batch is the ranks' rows in rank order,
        so the ties of the lower ranks come first. A rank's candidates hold as many of its ties
        as it may be given."""
        gathered = [torch.empty_like(candidates) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, candidates.contiguous())
        everyone = torch.stack(gathered)  # [world, groups, c]
        cutoff = everyone.transpose(0, 1).flatten(1).topk(wanted, dim=-1).values[:, -1]
        tied = (everyone == cutoff[:, None]).sum(-1)  # [world, groups]
        ties_before = (tied.cumsum(0) - tied)[dist.get_rank()]
        above = (everyone > cutoff[:, None]).sum((0, 2))
        return cutoff, wanted - above - ties_before

    @property
    def replaces_layer_by_layer(self) -> bool:
        return True  # at inference every feature has a threshold of its own

    def layer_activation(self, layer: int, pre: Tensor) -> Tensor:
        if self.training or int(self.threshold_updates) == 0:
            raise ValueError(
                f"{type(self).__name__} selects over its batch until it has an inference "
                "threshold (eval mode, after a training step); a replacement model needs the "
                "threshold."
            )
        written = torch.relu(pre) * self.written_norms()[layer].to(pre.dtype)
        group = layer if self.hparams.topk_scope == "layer" else 0
        return torch.where(written > self.threshold[group].to(pre.dtype), torch.relu(pre), 0)

    @torch.no_grad()
    def _update_threshold(self, kept: Tensor) -> None:
        batch_min = kept.min(dim=-1).values.to(self.threshold.dtype)
        if _is_distributed():
            dist.all_reduce(batch_min, op=dist.ReduceOp.MIN)
        seen = torch.isfinite(batch_min)
        averaged = self.threshold.lerp(batch_min, 1 - self.hparams.threshold_momentum)
        first = self.threshold_updates == 0
        updated = torch.where(first, batch_min, averaged)
        self.threshold.copy_(torch.where(seen, updated, self.threshold))
        self.threshold_updates += seen.all().long()

    def extra_folded_weights(self) -> dict[str, Tensor]:
        if int(self.threshold_updates) == 0:
            raise ValueError(
                f"this {type(self).__name__} has no inference threshold yet (no training step "
                "ran), so its eval-mode code still depends on the batch; train it before "
                "exporting."
            )
        return {"threshold": self.threshold.detach().double()}


CROSS_LAYER_TRANSCODERS: tuple[type[SparseAutoencoder], ...] = (
    CrossLayerTranscoder,
    JumpReLUCrossLayerTranscoder,
    TopKCrossLayerTranscoder,
    BatchTopKCrossLayerTranscoder,
)


# ----------------------------------------------------------------------------- helpers
def _layer_count(
    n_layers: int | None, input_hooks: list[str] | None, output_hooks: list[str] | None
) -> int:
    if input_hooks is not None and output_hooks is not None:
        if len(input_hooks) != len(output_hooks):
            raise ValueError(
                f"input_hooks has {len(input_hooks)} hooks and output_hooks {len(output_hooks)}: "
                "give one MLP input and one MLP output per layer, in the same order."
            )
        if len(set(input_hooks) | set(output_hooks)) != 2 * len(input_hooks):
            raise ValueError(
                "input_hooks and output_hooks must be distinct hooks (a hook repeats): give "
                "each layer's MLP input and output once."
            )
    given = [len(h) for h in (input_hooks, output_hooks) if h is not None]
    if n_layers is None:
        if not given:
            raise ValueError(
                "set model.init_args.n_layers, or input_hooks and output_hooks (one per layer)."
            )
        n_layers = given[0]
    check_positive("n_layers", n_layers, "model.init_args.n_layers")
    if any(count != n_layers for count in given):
        raise ValueError(
            f"n_layers is {n_layers} but the hooks name {given[0]} layers: set n_layers to the "
            "number of hooks, or leave it out."
        )
    return int(n_layers)


def keep_above_and_first_ties_per_group(scores: Tensor, cutoff: Tensor, ties: Tensor) -> Tensor:
    """:func:`~lightning_sae.models.sparse.keep_above_and_first_ties` for each row of
    ``scores`` [groups, n] (a BatchTopK group), with its own ``cutoff`` and ``ties`` [groups]:
    the entries above the cut-off and the first ``ties`` equal to it."""
    tied = scores == cutoff[:, None]
    return (scores > cutoff[:, None]) | (tied & (tied.cumsum(-1) <= ties[:, None]))


def _hook(batch: Mapping[str, Tensor], hook: str, option: str) -> Tensor:
    if hook not in batch:
        raise ValueError(
            f"{hook!r} (in model.init_args.{option}) is not in the batch, which holds "
            f"{', '.join(batch)}: add it to data.init_args.hooks."
        )
    return batch[hook]

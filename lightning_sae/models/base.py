"""The shared SAE: parameters, encode/decode, training and validation steps, metrics, optimiser.

A variant subclasses :class:`SparseAutoencoder` and overrides ``activation`` (or
``encode_normalized`` when its encoder differs) and ``loss_terms``. Everything else (logging,
dead-feature tracking, input normalisation, the optimiser and its schedule, the optional
orthogonality regulariser) lives here once.

Activations enter and leave the public API (``encode``, ``decode``, ``forward``) in the units of
the model they came from. With ``normalize_activations`` the SAE works internally on inputs
scaled so that their mean norm is sqrt(d_in); the factor is a buffer, saved with the weights and
folded into them on export.

A forward in eval mode is pure and local: it changes no state (BatchTopK's threshold and
ApproxL0's frequency window advance only in training mode) and enters no collective (BatchTopK's
global top-k runs only in training mode). Callbacks measure through :meth:`measuring`, which
relies on that, so that rank 0 may measure alone under DDP.
"""

from __future__ import annotations

import contextvars
import functools
import math
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning import LightningModule
from torch import Tensor, nn

from lightning_sae.metrics.reconstruction import FVU, L0, MSE, DeadFraction
from lightning_sae.models.host_log import LogEntry, log_host_scalars
from lightning_sae.models.optimizers import Adam, AdamW
from lightning_sae.models.penalties import OrthogonalityShape, orthogonality_penalty
from lightning_sae.models.sparse import SparseCode


class SAEOutput:
    """What a forward pass produces: reconstruction, feature activations, pre-activations.

    A variant with a sparse code (the TopK family) may pass ``code`` instead of ``acts``: the
    dense ``acts`` [..., d_sae] (``acts_shape``) are then built on first use only, and the
    step's firing counts (:meth:`fired`) come from the code, so a training step that needs no
    dense activations makes none.
    """

    def __init__(
        self,
        x_hat: Tensor,
        acts: Tensor | None = None,
        pre_acts: Tensor | None = None,
        extras: dict[str, Tensor] | None = None,
        *,
        code: SparseCode | None = None,
        acts_shape: tuple[int, ...] | None = None,
    ) -> None:
        if acts is None and (code is None or acts_shape is None):
            raise ValueError("SAEOutput needs acts, or a code with acts_shape")
        self.x_hat, self._acts, self.pre_acts = x_hat, acts, pre_acts
        self.extras = {} if extras is None else extras
        self.code, self.acts_shape = code, acts_shape

    @property
    def acts(self) -> Tensor:
        if self._acts is None:
            d_sae = self.acts_shape[-1]
            self._acts = self.code.to_dense(d_sae).reshape(self.acts_shape)
        return self._acts

    @acts.setter
    def acts(self, value: Tensor) -> None:
        self._acts = value

    def fired(self, d_sae: int) -> Tensor:
        """How many rows each latent is nonzero in, [d_sae] int32."""
        if self._acts is None:
            counts = torch.zeros(d_sae, dtype=torch.int32, device=self.code.values.device)
            nonzero = (self.code.values != 0).reshape(-1).to(torch.int32)
            return counts.index_add_(0, self.code.indices.reshape(-1), nonzero)
        # int32: a bool sum at the default int64 is several times slower on CPU.
        return (self.acts != 0).reshape(-1, d_sae).sum(0, dtype=torch.int32)


def check_finite(name: str, value: float, option: str) -> None:
    # The range checks compare with < and >, which NaN passes silently: check this first.
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}: set {option}.")


def check_positive(name: str, value: float, option: str) -> None:
    check_finite(name, value, option)
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}: set {option} to a value > 0.")


def check_nonnegative(name: str, value: float, option: str) -> None:
    check_finite(name, value, option)
    if value < 0:
        raise ValueError(
            f"{name} must be >= 0, got {value}: set {option} to zero (off) or a positive value."
        )


def _gib(n: int) -> str:
    return f"{n:,} bytes ({n / (1 << 30):,.1f} GiB)"


def check_fits_in_memory(parameters: int, counters: int, sizes: str, option: str) -> None:
    """Refuse, before anything is allocated, a model whose weights alone exceed this machine's
    memory: the allocator's own error names neither the option nor the sizes.

    ``parameters``: its float32 parameters, as the model's class counts them (an SAE, a
    cross-layer transcoder: each its own layout); ``counters``: its int64 per-feature counters
    (the dead clock). ``sizes`` names the sizes in the message, ``option`` what to lower."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # no sysconf (Windows): the allocator decides
        return
    weights = 4 * parameters + 8 * counters
    if weights > memory:
        # Training adds a gradient and Adam's two moments per parameter.
        training = weights + 3 * 4 * parameters
        raise ValueError(
            f"{sizes}: the weights need {_gib(weights)}, and training them with Adam (gradients "
            f"and two moments) {_gib(training)}; this machine has {_gib(memory)} of memory: "
            f"lower {option}."
        )


def check_all_finite(hparams: Mapping[str, Any]) -> None:
    """Every numeric option (and every number in a list option, such as betas) is finite."""
    for name, value in hparams.items():
        if isinstance(value, (list, tuple)):
            if not all(math.isfinite(v) for v in value if isinstance(v, float)):
                raise ValueError(
                    f"{name} must be finite numbers, got {value}: set model.init_args.{name}."
                )
        elif isinstance(value, float):
            check_finite(name, value, f"model.init_args.{name}")


def _non_finite_terms(terms: Mapping[str, Tensor], values: list[float]) -> str:
    bad = [name for name, value in zip(terms, values, strict=True) if not math.isfinite(value)]
    return f"non-finite ({', '.join(bad)})" if bad else "non-finite"


# Set while an SAE steps on a whole global batch held by one rank (a group member placed on one
# rank, parallel/members.py): its step is a one-process step, so it joins no collective.
_STEPS_ALONE: contextvars.ContextVar[bool] = contextvars.ContextVar("steps_alone", default=False)


@contextmanager
def stepping_alone() -> Iterator[None]:
    """SAE steps inside see a one-process world: no collective, whatever the process group."""
    token = _STEPS_ALONE.set(True)
    try:
        yield
    finally:
        _STEPS_ALONE.reset(token)


def _sum_of_squares(values: Tensor) -> Tensor:
    flat = values.reshape(-1)
    return flat.dot(flat)


def _is_distributed() -> bool:
    if _STEPS_ALONE.get():
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class SparseAutoencoder(LightningModule):
    """ReLU SAE with MSE loss; the base every variant builds on.

    Args:
        d_in: width of the activation vectors.
        d_sae: number of dictionary features.
        lr: peak learning rate.
        optimizer: ``adam`` or ``adamw``.
        betas: Adam betas. ``None``: the variant's measured default (:meth:`default_betas`;
            docs/defaults.md): (0.9, 0.99) for the L1, JumpReLU, Gated and ApproxL0 SAEs,
            (0.9, 0.999) for the TopK family and the cross-layer transcoders.
        weight_decay: AdamW weight decay (ignored by Adam).
        lr_warmup_steps: linear warm-up of the learning rate from 0.
        lr_decay_steps: linear decay to ``lr_end_factor * lr`` over the last this many steps.
        lr_end_factor: learning-rate multiplier reached at the end of the decay.
        normalize_activations: scale inputs to mean norm sqrt(d_in) (factor fitted on the first
            training batch and stored as the buffer ``input_scale``).
        apply_b_dec_to_input: subtract ``b_dec`` from the input before encoding.
        dead_window_tokens: a feature is dead when it has not fired for this many tokens.
            ``train/dead_fraction`` is logged once this many tokens have been trained on.
            ``None``: the variant's default (:meth:`default_dead_window_tokens`): 10M tokens,
            and for the TopK family a window sized to the dictionary (docs/defaults.md).
        orthogonality_coefficient: weight of the decoder orthogonality regulariser; negative
            values pull active features towards their nearest neighbours instead.
        orthogonality_shape: ``sigmoid``, ``power`` or ``linear`` penalty of the cosine.
        orthogonality_power: exponent p >= 2 for the ``power`` shape.
        init_seed: seed for the weight initialisation, independent of the global RNG.
        encoder_init_scale: the encoder starts as this multiple of the decoder's transpose
            (decoder rows at unit norm). ``None``: the variant's measured default
            (:meth:`default_encoder_init_scale`; docs/defaults.md): a ReLU SAE whose start
            reconstructs twice its input (half of d_sae directions fire) learns slower, because
            its first large gradients inflate Adam's second moment for the rest of the run.
        gradient_clip_norm: before each optimizer step, scale the gradient of all parameters
            down to this global norm when it is larger. ``None``: the variant's measured default
            (:meth:`default_gradient_clip_norm`; docs/defaults.md): 1 for the L1, TopK,
            JumpReLU, Gated and ApproxL0 SAEs (and the transcoders and crosscoders built on
            them) and for the cross-layer transcoders; 0: off. A
            ``trainer.gradient_clip_val`` replaces it. The gradient's norm scales with the
            data's (clipping at 1 engages on activations of norm ~10, rarely on unit-scale toy
            data); while it engages, Adam's
            second moment tracks the current gradient instead of remembering the large first
            ones, so the steps keep their size through a run.
        compile: compile ``forward_normalized`` (encode + decode, where the FLOPs are) with
            ``torch.compile``. Loss terms stay eager: their warm-up factors change every step.
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        lr: float = 4e-4,
        optimizer: Literal["adam", "adamw"] = "adam",
        betas: tuple[float, float] | None = None,
        weight_decay: float = 0.0,
        lr_warmup_steps: int = 0,
        lr_decay_steps: int = 0,
        lr_end_factor: float = 0.0,
        normalize_activations: bool = False,
        apply_b_dec_to_input: bool = True,
        dead_window_tokens: int | None = None,
        orthogonality_coefficient: float = 0.0,
        orthogonality_shape: OrthogonalityShape = "sigmoid",
        orthogonality_power: float = 2.0,
        init_seed: int = 0,
        encoder_init_scale: float | None = None,
        gradient_clip_norm: float | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        check_positive("d_in", d_in, "model.init_args.d_in")
        check_positive("d_sae", d_sae, "model.init_args.d_sae")
        check_fits_in_memory(
            2 * d_in * d_sae + d_sae + d_in,  # W_enc, W_dec, b_enc, b_dec
            d_sae,
            f"d_sae={d_sae:,} with d_in={d_in:,}",
            "model.init_args.d_sae",
        )
        check_positive("lr", lr, "model.init_args.lr")
        if encoder_init_scale is not None:
            check_positive(
                "encoder_init_scale", encoder_init_scale, "model.init_args.encoder_init_scale"
            )
        if gradient_clip_norm is not None:
            check_nonnegative(
                "gradient_clip_norm", gradient_clip_norm, "model.init_args.gradient_clip_norm"
            )
        if dead_window_tokens is not None:
            check_positive(
                "dead_window_tokens", dead_window_tokens, "model.init_args.dead_window_tokens"
            )
        for name in ("lr_warmup_steps", "lr_decay_steps", "weight_decay", "lr_end_factor"):
            check_nonnegative(name, locals()[name], f"model.init_args.{name}")
        if optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be 'adam' or 'adamw', got {optimizer!r}.")
        if orthogonality_shape == "power" and orthogonality_power < 2:
            raise ValueError(
                f"orthogonality_power must be >= 2, got {orthogonality_power}: "
                "set model.init_args.orthogonality_power to 2 or more."
            )
        self.save_hyperparameters()
        # The hparams include every subclass's options too: one sweep covers every variant.
        check_all_finite(self.hparams)
        if betas is not None and not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}: set model.init_args.betas.")
        self.d_in, self.d_sae = d_in, d_sae
        # Width of what the decoder writes: the input's for an SAE; a transcoder's output site.
        self.d_out = d_in

        # Offset so that the same integer seed for data and init does not give identical draws.
        generator = torch.Generator().manual_seed(init_seed + 0x5AE_1417)
        W_dec = torch.randn(d_sae, d_in, generator=generator)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.T * self.encoder_init_factor())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("input_scale_fitted", torch.tensor(not normalize_activations))
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.long))
        # (dead count, clock version) from the last step's statistics: see dead_count().
        self._known_dead_count: tuple[int, tuple[int, int]] | None = None
        self._clock_version_at_statistics = (0, -1)
        self._fitted_flag_version = (0, -1)

        self.val_l0, self.val_mse, self.val_fvu = L0(), MSE(), FVU(d_in)
        self.val_dead = DeadFraction(d_sae)

    def default_encoder_init_scale(self) -> float:
        """The encoder's starting scale relative to the decoder's transpose, when not given."""
        return 1.0

    def default_betas(self) -> tuple[float, float]:
        """Adam's betas when not given."""
        return (0.9, 0.999)

    def default_gradient_clip_norm(self) -> float:
        """The gradient norm clipped at when not given (0: off)."""
        return 0.0

    def default_dead_window_tokens(self) -> int:
        """Tokens without firing after which a feature is dead, when not given."""
        return 10_000_000

    def dead_window(self) -> int:
        """The dead window in tokens: ``dead_window_tokens``, or the variant's default."""
        window = self.hparams.get("dead_window_tokens")
        return self.default_dead_window_tokens() if window is None else int(window)

    def gradient_clip_max_norm(self) -> float:
        clip = self.hparams.get("gradient_clip_norm")
        return self.default_gradient_clip_norm() if clip is None else float(clip)

    def adam_betas(self) -> tuple[float, float]:
        betas = self.hparams.get("betas")
        return self.default_betas() if betas is None else (float(betas[0]), float(betas[1]))

    def encoder_init_factor(self) -> float:
        scale = self.hparams.get("encoder_init_scale")
        return self.default_encoder_init_scale() if scale is None else scale

    # ----------------------------------------------------------------- the SAE itself
    def normalize(self, x: Tensor) -> Tensor:
        return x.to(self.W_enc.dtype) * self.input_scale

    def input_offset_source(self) -> Tensor | None:
        """What is subtracted from the input before encoding (``b_dec``), or None."""
        return self.b_dec if self.hparams.apply_b_dec_to_input else None

    def input_offset(self) -> Tensor | None:
        """-b_dec @ W_enc when b_dec is subtracted from the input, else None.

        (x - b_dec) W_enc = x W_enc - b_dec W_enc: folding the subtraction into the encoder bias
        spares the backward pass a full [batch, d_sae] x [d_sae, d_in] product, the gradient of
        the batch-sized x - b_dec, which would only be summed into b_dec's gradient.
        """
        source = self.input_offset_source()
        return None if source is None else -(source @ self.W_enc)

    def encoder_bias(self) -> Tensor:
        """``b_enc``, with the input offset folded in when there is one."""
        offset = self.input_offset()
        return self.b_enc if offset is None else self.b_enc + offset

    def pre_activation(self, x_n: Tensor) -> Tensor:
        bias = self.encoder_bias()
        # F.linear adds the bias inside the matmul, so under bf16 autocast the [batch, d_sae]
        # pre-activations stay bf16 instead of being promoted back to float32 by the add.
        return F.linear(x_n, self.W_enc.T, bias)

    def activation(self, pre_acts: Tensor) -> Tensor:
        return torch.relu(pre_acts)

    def encode_normalized(self, x_n: Tensor) -> tuple[Tensor, Tensor]:
        """(acts, pre_acts) for normalised inputs; variants with another encoder override this."""
        pre_acts = self.pre_activation(x_n)
        return self.activation(pre_acts), pre_acts

    def reconstruct(self, acts: Tensor) -> Tensor:
        """Reconstruction in normalised units."""
        return F.linear(acts, self.W_dec.T, self.b_dec)

    def forward_normalized(self, x_n: Tensor) -> SAEOutput:
        acts, pre_acts = self.encode_normalized(x_n)
        return SAEOutput(x_hat=self.reconstruct(acts), acts=acts, pre_acts=pre_acts)

    def encode(self, x: Tensor) -> Tensor:
        return self.encode_normalized(self.normalize(x))[0]

    def decode(self, acts: Tensor) -> Tensor:
        return self.reconstruct(acts) / self.target_scale()

    def forward(self, x: Tensor) -> SAEOutput:
        out = self.forward_normalized(self.normalize(x))
        out.x_hat = out.x_hat / self.target_scale()
        return out

    # ----------------------------------------------------------------- losses
    def loss_terms(self, x_n: Tensor, out: SAEOutput) -> dict[str, Tensor]:
        """Named loss terms; the total loss is their sum. Variants extend this dict.

        ``x_n`` is the normalised target: the input itself for an SAE, the output site for a
        transcoder (:meth:`input_and_target`).
        """
        return {"mse": (out.x_hat - x_n).pow(2).sum(-1).mean()}

    def warmup_factor(self, steps: int) -> float:
        """Linear 0 -> 1 ramp over ``steps`` optimizer steps (1 when steps is 0)."""
        return 1.0 if steps <= 0 else min(1.0, (self.global_step + 1) / steps)

    def decoder_norms(self) -> Tensor:
        return self.W_dec.norm(dim=1)

    def dead_mask(self) -> Tensor:
        """Features that have not fired within the last ``dead_window_tokens`` tokens."""
        return self.tokens_since_fired >= self.dead_window()

    def dead_window_passed(self, batch_tokens: int) -> bool:
        """Whether a whole dead window of tokens has been trained on, counting this step's
        global batch of ``batch_tokens``. Before that no feature can be dead (its clock cannot
        have reached the window), so a dead fraction would be 0 by construction, not measured.

        Tokens are counted as optimizer steps x this batch: with gradient accumulation that
        undercounts, which only delays the first report."""
        return (self.global_step + 1) * batch_tokens >= self.dead_window()

    def dead_count(self) -> int:
        """How many features are dead now. Counted on the host without a transfer when the
        dead-feature clock has not changed since the last step's statistics brought the count
        (any in-place write to the clock, a resampling or a checkpoint load, bumps its version);
        counted on the device (a host transfer) otherwise."""
        known = self._known_dead_count
        if known is not None and known[1] == self._clock_version():
            return known[0]
        return int(self.dead_mask().sum())

    def _input_scale_is_fitted(self) -> bool:
        """``input_scale_fitted``, read from the device once, then again only after the buffer
        changed (a checkpoint load writes it in place, which bumps its version)."""
        flag = self.input_scale_fitted
        if self._fitted_flag_version == (id(flag), flag._version):
            return True
        if bool(flag):
            self._fitted_flag_version = (id(flag), flag._version)
            return True
        return False

    def _clock_version(self) -> tuple[int, int]:
        return id(self.tokens_since_fired), self.tokens_since_fired._version

    @contextmanager
    def measuring(self) -> Iterator[None]:
        """Eval mode without gradients, for forwards that only measure (callbacks).

        Eval mode makes the forward pure and local (module docstring): it moves no running
        state a second time per step, and rank 0 may run it alone under DDP. The mode the
        module was in comes back afterwards.
        """
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.train(was_training)

    @torch.no_grad()
    def reset_features(
        self,
        indices: Tensor,
        directions: Tensor,
        encoder_norm: float,
        encoder_directions: Tensor | None = None,
    ) -> list[tuple[nn.Parameter, int]]:
        """Restart features ``indices`` as new ones along the unit ``directions`` [n, d_out].

        Decoder row = direction, encoder column = direction * ``encoder_norm`` (or, for a
        transcoder, whose encoder reads another site, ``encoder_directions`` [n, d_in]),
        ``b_enc`` = 0, dead clock at zero. Variants extend this to their own per-feature state,
        so that a restarted feature carries nothing of its dead predecessor.

        Returns the parameters touched, each with its feature dimension, so that the caller
        can restart the optimizer's statistics for those slices.
        """
        directions = directions.to(self.W_dec)
        self.W_dec[indices] = directions
        encoder = directions if encoder_directions is None else encoder_directions.to(directions)
        self.W_enc[:, indices] = encoder.T * encoder_norm
        self.b_enc[indices] = 0.0
        self.tokens_since_fired[indices] = 0
        return [(self.W_dec, 0), (self.W_enc, 1), (self.b_enc, 0)]

    # ----------------------------------------------------------------- normalisation
    @torch.no_grad()
    def fit_input_scale(self, x: Tensor, target: Tensor | None = None) -> None:
        """Fit the input scale on a sample (averaged over DDP ranks) so mean norm = sqrt(d_in).

        ``target`` is what the decoder reproduces when that is another site: an SAE ignores it
        (its target is its input); transcoders and crosscoders fit one scale per site
        (``models/transcoder.py``).
        """
        self.input_scale.fill_(self.site_scales([x], [self.d_in])[0])
        self.input_scale_fitted.fill_(True)

    def site_scales(self, samples: list[Tensor], widths: list[int]) -> Tensor:
        """Per site, the factor that brings the mean norm of its sample to sqrt(width).

        The mean norms of every site travel in one all-reduce, averaged over DDP ranks, so
        every rank fits the same factors.
        """
        mean_norms = torch.stack([x.float().norm(dim=-1).mean() for x in samples])
        if _is_distributed():
            dist.all_reduce(mean_norms)
            mean_norms /= dist.get_world_size()
        mean_norms = mean_norms.cpu().double()
        if not bool(torch.isfinite(mean_norms).all()):
            raise ValueError(self._non_finite_batch())
        if bool((mean_norms == 0).any()):
            raise ValueError(
                "normalize_activations cannot scale this data: the first training batch has "
                "mean norm 0 (every vector is zero) at one of the sites. Check that the hook "
                "and data produce activations (a wrong hook name or an all-padding batch gives "
                "zeros), or set model.init_args.normalize_activations: false."
            )
        return torch.tensor(widths, dtype=torch.float64).sqrt() / mean_norms

    def target_scale(self) -> Tensor:
        """The factor of the site the decoder writes: the input's for an SAE (a transcoder's
        output site has its own)."""
        return self.input_scale

    def scale_metadata(self) -> dict[str, Any]:
        """The fitted factors, as the export records them (they are folded into its weights)."""
        return {"input_scale": float(self.input_scale)}

    def normalize_target(self, y: Tensor) -> Tensor:
        """The decoder's target in normalised units."""
        return y.to(self.W_enc.dtype) * self.target_scale()

    def in_reported_units(self, x_hat_n: Tensor, y_n: Tensor) -> tuple[Tensor, Tensor]:
        """A reconstruction and its target (normalised) in the units that ``train/`` and
        ``val/`` mse and fvu report: the loss's here, where each site has one scale (which an
        FVU does not see); a crosscoder, one scale per layer, reports the model's units."""
        return x_hat_n, y_n

    # ----------------------------------------------------------------- steps
    def setup(self, stage: str) -> None:
        if self.hparams.compile and not hasattr(
            self.forward_normalized, "_torchdynamo_orig_callable"
        ):
            self.forward_normalized = torch.compile(self.forward_normalized)
        data_d_in = getattr(self.trainer.datamodule, "d_in", None)
        if data_d_in is not None and data_d_in != self.d_in:
            raise ValueError(self._d_in_mismatch(data_d_in))

    def _d_in_mismatch(self, data_d_in: int) -> str:
        return (
            f"d_in mismatch: the data yields vectors of width {data_d_in} but the SAE was built "
            f"with model.init_args.d_in={self.d_in}. Set model.init_args.d_in: {data_d_in}."
        )

    def _non_finite_batch(self) -> str:
        return (
            f"non-finite training batch at step {self.global_step}: the activations contain NaN "
            "or inf, so every weight would become NaN. Check the data source (an overflowing "
            "float16 model or a corrupt cache shard are the usual causes; rebuild the cache or "
            "collect activations in float32 or bfloat16)."
        )

    def _batch_tensor(self, batch: Any) -> Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        if x.shape[-1] != self.d_in:
            raise ValueError(self._d_in_mismatch(x.shape[-1]))
        return x

    def input_and_target(self, batch: Any) -> tuple[Tensor, Tensor]:
        """(what the encoder reads, what the decoder must reproduce) from a batch: the same
        tensor for an SAE; transcoders (``models/transcoder.py``) read two sites."""
        x = self._batch_tensor(batch)
        return x, x

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, stats, report = self.step_and_statistics(batch)
        report(stats.tolist())  # the step's one host transfer
        return loss

    def step_and_statistics(
        self, batch: Any
    ) -> tuple[Tensor, Tensor, Callable[[list[float]], None]]:
        """The training step without its host transfer: (loss, the step's statistics as one
        float64 tensor on the device, the function that checks and logs them once they are on
        the host as a list). ``training_step`` transfers them at once; an ``SAEGroup`` transfers
        every member's together."""
        x, target = self.input_and_target(batch)
        if not self._input_scale_is_fitted():
            self.fit_input_scale(x, target)
        x_n = self.normalize(x)
        y_n = x_n if target is x else self.normalize_target(target)
        out = self.forward_normalized(x_n)
        terms = self.loss_terms(y_n, out)
        if self.hparams.orthogonality_coefficient != 0:
            penalty, mean_cos = orthogonality_penalty(
                self.W_dec,
                self._active_in_global_batch(out.acts),
                shape=self.hparams.orthogonality_shape,
                power=self.hparams.orthogonality_power,
            )
            terms["orthogonality"] = self.hparams.orthogonality_coefficient * penalty
            self.log("train/orthogonality_mean_cos", mean_cos)
        loss = torch.stack(list(terms.values())).sum()
        stats = self._training_statistics(y_n, out, terms, loss, read=None if y_n is x_n else x_n)
        self.recycle(out)
        return loss, stats, functools.partial(self._report_training_statistics, list(terms))

    def recycle(self, out: SAEOutput) -> None:
        """The training step is done with ``out`` (the backward reads only what autograd
        saved): a variant may keep its buffers for the next step. Nothing by default."""

    def _diverged(self, what: str) -> str:
        return (
            f"training diverged at step {self.global_step}: {what} on finite data, so every "
            "later step and checkpoint would hold NaN weights. Lower model.init_args.lr, add "
            "warm-up (model.init_args.lr_warmup_steps) or clip gradients "
            "(trainer.gradient_clip_val), and resume from the last good checkpoint."
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The loss check above sees non-finite weights one step late, after the checkpoint of
        # the step that broke them: refuse that save so the last good checkpoint survives.
        if not all(bool(torch.isfinite(p).all()) for p in self.parameters()):
            raise ValueError(self._diverged("the weights became non-finite"))

    def _zero_variance_batch(self, sum_sq: float) -> str:
        what = "all zero" if sum_sq == 0 else "identical"
        return (
            f"training batch with zero variance at step {self.global_step}: its vectors are "
            f"{what}, so the fraction of variance unexplained (train/fvu) is undefined and "
            "there is nothing for features to learn. Check the data source: the hook name, "
            "padding or BOS positions that were not dropped, or a cache built from the wrong "
            "model."
        )

    @torch.no_grad()
    def _active_in_global_batch(self, acts: Tensor) -> Tensor:
        """Features that fired anywhere in the batch, on any DDP rank.

        Every rank then penalises the same features, so the averaged gradient equals what a
        single process sees on the same global batch.
        """
        active = (acts != 0).reshape(-1, self.d_sae).any(0)
        if _is_distributed():
            active = active.to(torch.uint8)
            dist.all_reduce(active, op=dist.ReduceOp.MAX)
        return active.bool()

    @torch.no_grad()
    def _training_statistics(
        self,
        x_n: Tensor,
        out: SAEOutput,
        terms: dict[str, Tensor],
        loss: Tensor,
        read: Tensor | None = None,
    ) -> Tensor:
        """The step's statistics over the global batch, as one float64 tensor on the device, and
        the dead-feature clock advanced (on the device: nothing here waits for the host).

        One all-reduce carries every sum, so under DDP the logged values are those of the
        global batch and every rank's ``tokens_since_fired`` stays identical. ``x_n`` is what
        the reconstruction is scored against; ``read``, what the encoder read when that is
        another site (a transcoder's input), checked for finiteness with it.
        """
        # Two float64 copies in all, squared sums as dot products: every [batch, d] temporary
        # is a fresh allocation, and on CPU its page faults cost more than the arithmetic
        # (5 temporaries took 42 ms of a 705 ms TopK step at 4096 x 512 -> 8192; 2 take ~10).
        x_hat, x_n = self.in_reported_units(out.x_hat.detach(), x_n)
        x64 = x_n.double()
        read_sq = x64.new_zeros(()) if read is None else _sum_of_squares(read.double())
        sums = torch.cat(
            [
                out.fired(self.d_sae).double(),
                x64.sum(0),
                torch.stack(
                    [
                        _sum_of_squares(x_hat.double().sub_(x64)),
                        _sum_of_squares(x64),
                        x64.new_full((), float(x_n.shape[0])),  # a fill, not a copy from the host
                        read_sq,
                        loss.detach().double(),
                        *[t.detach().double() for t in terms.values()],
                    ]
                ),
            ]
        )
        if _is_distributed():
            dist.all_reduce(sums)
        fired = sums[: self.d_sae]
        sum_x = sums[self.d_sae : self.d_sae + self.d_out]
        rows = sums[self.d_sae + self.d_out + 2]
        self.tokens_since_fired += rows.long()
        self.tokens_since_fired.masked_fill_(fired > 0, 0)
        self._clock_version_at_statistics = self._clock_version()
        dead = self.dead_mask().sum()[None].double()
        return torch.cat(
            [sums[self.d_sae + self.d_out :], fired.sum()[None], sum_x.pow(2).sum()[None], dead]
        )

    def _report_training_statistics(self, term_names: list[str], scalars: list[float]) -> None:
        """Check and log the statistics of :meth:`_training_statistics`, on the host."""
        world = dist.get_world_size() if _is_distributed() else 1
        sq_err, sum_sq, n, read_sq, total, *term_values, n_active, sum_x_sq, n_dead = scalars
        self._known_dead_count = (int(n_dead), self._clock_version_at_statistics)
        # Guards that come free with the one transfer: the float64 sum of squares of float32
        # (or bf16) inputs is finite exactly when every input is, on every rank (all-reduced),
        # so all ranks stop together.
        if not (math.isfinite(sum_sq) and math.isfinite(read_sq)):
            raise ValueError(self._non_finite_batch())
        if not math.isfinite(total):
            terms = dict.fromkeys(term_names)
            raise ValueError(self._diverged("the loss is " + _non_finite_terms(terms, term_values)))
        variance = sum_sq - sum_x_sq / n
        if n > 1 and variance <= 1e-12 * sum_sq:
            raise ValueError(self._zero_variance_batch(sum_sq))

        entries: list[LogEntry] = [("train/loss", total / world, {"prog_bar": True})]
        for name, value in zip(term_names, term_values, strict=True):
            entries.append((f"train/loss/{name}", value / world, {}))
        entries += [
            ("train/l0", n_active / n, {"prog_bar": True}),
            ("train/mse", sq_err / n, {}),
            ("train/fvu", sq_err / variance if variance > 0 else float("nan"), {}),
        ]
        if self.dead_window_passed(int(n)):
            entries.append(("train/dead_fraction", n_dead / self.d_sae, {}))
        # As host tensors, not one self.log of a number each: on a GPU every such call copies
        # the number to the device and waits for it (host_log.py).
        log_host_scalars(self, entries)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, target = self.input_and_target(batch)
        x_n = self.normalize(x)
        out = self.forward_normalized(x_n)
        if target is not x:
            x_n = self.normalize_target(target)  # from here on, what out.x_hat is scored against
        terms = self.loss_terms(x_n, out)
        self.log("val/loss", torch.stack(list(terms.values())).sum(), sync_dist=True)
        for name, value in terms.items():
            self.log(f"val/loss/{name}", value, sync_dist=True)
        self.val_l0.update(out.acts)
        x_hat, x_n = self.in_reported_units(out.x_hat, x_n)
        self.val_mse.update(x_hat, x_n)
        self.val_fvu.update(x_hat, x_n)
        self.val_dead.update(out.acts)
        for name in ("l0", "mse", "fvu"):
            self.log(f"val/{name}", getattr(self, f"val_{name}"))
        self.log("val/dead_fraction", self.val_dead)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    # ----------------------------------------------------------------- optimiser
    def configure_gradient_clipping(
        self,
        optimizer: Any,
        gradient_clip_val: int | float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if gradient_clip_val:  # the trainer's clipping, set by the user, replaces the default
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        max_norm = self.gradient_clip_max_norm()
        if max_norm > 0:
            self.clip_gradient_norm(max_norm)

    @torch.no_grad()
    def clip_gradient_norm(self, max_norm: float) -> None:
        """Scale every gradient by min(1, max_norm / global norm), as ``clip_grad_norm_``."""
        parameters = [p for p in self.parameters() if p.grad is not None]
        if parameters:
            norm = self.gradient_norm()
            torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)

    def gradient_norm(self) -> Tensor:
        """The L2 norm of the whole gradient (a latent-sharded layer adds the other slices)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        # torch's, without the fused kernel's unused copy of W_enc's gradient (optimizers.py)
        optimizer_cls = AdamW if hp.optimizer == "adamw" else Adam
        kwargs = {"weight_decay": hp.weight_decay} if hp.optimizer == "adamw" else {}
        # The fused kernel updates all parameters in one pass (CPU and CUDA).
        kwargs["fused"] = self.device.type in ("cpu", "cuda")
        optimizer = optimizer_cls(self.parameters(), lr=hp.lr, betas=self.adam_betas(), **kwargs)
        total_steps = max(int(self.trainer.estimated_stepping_batches), 1)
        decay_start = total_steps - hp.lr_decay_steps

        def schedule(step: int) -> float:
            if step < hp.lr_warmup_steps:
                return (step + 1) / hp.lr_warmup_steps
            if hp.lr_decay_steps and step >= decay_start:
                progress = (step - decay_start) / hp.lr_decay_steps
                return 1.0 - (1.0 - hp.lr_end_factor) * min(progress, 1.0)
            return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

"""TopK and BatchTopK SAEs with the AuxK loss for dead latents.

TopK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders") keeps the k largest
pre-activations of every sample, so L0 is fixed and no sparsity penalty is needed. BatchTopK
(Bussmann et al. 2024) keeps the k * batch largest over the whole batch, letting the number of
active latents vary per sample, and learns a threshold for inference.

Only k of d_sae latents are nonzero, so decoding can sum k decoder rows per sample instead
of multiplying by a mostly-zero matrix, and the encoder's gradient flows through the kept
pre-activations alone (``models/sparse.py``): the dense pre-activations are computed without a
graph, to select, and ``SAEOutput.pre_acts`` of this family carries no gradient.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from lightning_sae.models.base import (
    SAEOutput,
    SparseAutoencoder,
    _is_distributed,
    check_finite,
    check_nonnegative,
    check_positive,
)
from lightning_sae.models.sparse import (
    DecodeImpl,
    SparseCode,
    check_decode_impl,
    decode_with_latent_bags,
    decodes_sparsely,
    keep_above_and_first_ties,
    largest_of_batch,
    row_top_k,
    sparse_encoder_values,
)

# The TopK family's dead window: the tokens in which an average latent fires this many times
# (docs/defaults.md, "Dead latents of the TopK family").
DEAD_WINDOW_AVERAGE_FIRINGS = 100


class TopKSAE(SparseAutoencoder):
    """Keep the k largest pre-activations per sample (ReLU after); loss = MSE + AuxK.

    AuxK (Gao et al. 2024, appendix A.2) gives dead latents a gradient: the ``aux_k`` largest
    pre-activations among dead latents reconstruct the residual x - x_hat of the main pass. The
    residual already excludes ``b_dec``, so the auxiliary reconstruction is W_dec-only (adding
    ``b_dec`` again, as some implementations do, biases the target). The term is scaled by
    min(n_dead / aux_k, 1), so that a handful of dead latents do not receive the full weight.
    A latent is dead when it has not fired for ``dead_window_tokens`` tokens (base class); by
    default the tokens in which an average latent fires 100 times (``100 * d_sae / k``, at
    most 10M: :meth:`default_dead_window_tokens`), so that AuxK engages in runs of any length.

    Args:
        k: active latents per sample.
        aux_k: dead latents used by AuxK per sample; default ``k``, as many as the main pass
            uses (Gao et al. and SAELens take ``d_in // 2``; docs/defaults.md, "AuxK at low
            k": on MiniLM at k 4 of 768, 192 dead latents per sample made AuxK's gradient take
            most of the clipped norm and left 340 latents that never fire; with k of them,
            FVU 0.362 against 0.390 and 149 such latents, the same at k 32 and 64 and on the
            toy side-by-side).
        aux_coefficient: weight of AuxK; 0 turns it off. Default 1 (SAELens's), on the same
            raw squared error as the main MSE, so their ratio does not move with the data's
            scale (docs/defaults.md: 1/32 on the raw error revived fewer latents on the toy and
            MiniLM data).
        auxk_normalization: ``none`` (the squared error as it is) or ``residual_variance``: the
            squared error divided by the residual's variance over the (global) batch, the error
            of its best constant predictor, as in Gao et al.'s code (a normalised MSE; their
            coefficient of 1/32 goes with this form, and with their MSE normalised too). It
            makes the term scale-free, so its weight no longer moves with how well the main
            pass reconstructs.
        decode_impl: ``dense`` (acts @ W_dec), ``sparse`` (embedding_bag over the k active rows)
            or ``auto`` (sparse up to a density k / d_sae measured per device type: 1/16 on
            CPU, 1/64 on CUDA; see ``SPARSE_DECODE_MAX_DENSITY`` and docs/benchmarks.md).
        **kwargs: everything :class:`SparseAutoencoder` takes (d_in, d_sae, lr,
            dead_window_tokens, ...).
    """

    def __init__(
        self,
        *args: Any,
        k: int = 32,
        aux_k: int | None = None,
        aux_coefficient: float = 1.0,
        auxk_normalization: Literal["none", "residual_variance"] = "none",
        decode_impl: DecodeImpl = "auto",
        **kwargs: Any,
    ) -> None:
        check_positive("k", k, "model.init_args.k")
        if auxk_normalization not in ("none", "residual_variance"):
            raise ValueError(
                f"auxk_normalization must be 'none' or 'residual_variance', got "
                f"{auxk_normalization!r}: set model.init_args.auxk_normalization."
            )
        if aux_k is not None:
            check_positive("aux_k", aux_k, "model.init_args.aux_k")
        check_nonnegative("aux_coefficient", aux_coefficient, "model.init_args.aux_coefficient")
        check_decode_impl(decode_impl)
        super().__init__(*args, **kwargs)
        if k > self.d_sae:
            raise ValueError(f"k={k} exceeds d_sae={self.d_sae}: set model.init_args.k <= d_sae.")
        self.k = k
        self.aux_k = min(aux_k if aux_k is not None else k, self.d_sae)

    def default_encoder_init_scale(self) -> float:
        # Measured with clipping (docs/defaults.md): half the transpose reaches a lower FVU on
        # MiniLM at k 16, 32 and 64 than the transpose.
        return 0.5

    def default_gradient_clip_norm(self) -> float:
        # Measured (docs/defaults.md): on MiniLM, clipping at 1 lowers the FVU by ~0.02 at k
        # 16, 32 and 64 (the gap to SAELens, which clips at 1 in its trainer step).
        return 1.0

    def default_dead_window_tokens(self) -> int:
        """The tokens in which a latent firing at the average rate (k / d_sae per token) fires
        ``DEAD_WINDOW_AVERAGE_FIRINGS`` times, at most the base class's 10M.

        A window fixed in tokens suits one size of run: 10M (Gao et al.'s) never engages AuxK
        in a run of fewer tokens, and a latent that fires once per few thousand tokens is
        already useless to a small dictionary (docs/defaults.md: on the toy side-by-side no
        latent stayed silent for 1000 steps of 256 while 173 of 512 never fired on 8192
        held-out samples). Sized by the dictionary, the window grows with d_sae / k as
        legitimately rare features do. The whole dictionary's d_sae (``hparams``), so that
        a latent-sharded member judges as the whole module does.
        """
        # the tokens between two firings of an average latent
        average_gap = self.hparams.d_sae / self.hparams.k
        return min(
            super().default_dead_window_tokens(), round(DEAD_WINDOW_AVERAGE_FIRINGS * average_gap)
        )

    def decodes_sparsely(self, active_per_sample: int) -> bool:
        return decodes_sparsely(
            self.hparams.decode_impl, active_per_sample, self.d_sae, self.W_dec.device
        )

    # ----------------------------------------------------------------- encoding
    def sparse_code(self, pre_acts: Tensor) -> SparseCode:
        """The kept activations of [n, d_sae] pre-activations."""
        values, indices = row_top_k(pre_acts, self.k)
        return SparseCode(indices, torch.relu(values), pre_acts.shape[0])

    def _encode(self, x_n: Tensor) -> tuple[SparseCode, Tensor]:
        """The kept code of ``x_n`` and the dense pre-activations (without a graph)."""
        x_rows = x_n.reshape(-1, x_n.shape[-1])
        pre_acts = self._pre_activations_without_graph(x_rows)
        code = self.sparse_code(pre_acts)
        code.values = self._encoder_values(code, pre_acts, x_rows)
        return code, pre_acts

    def _encoder_values(self, code: SparseCode, pre_acts: Tensor, x_rows: Tensor) -> Tensor:
        """ReLU'd ``pre_acts`` at ``code``'s entries, the gradients through them alone; the
        input offset's gradient (``b_dec`` subtracted from the input) is folded in there too."""
        source = self.input_offset_source()
        values = sparse_encoder_values(code, pre_acts, x_rows, self.W_enc, self.b_enc, source)
        return torch.relu(values)

    @torch.no_grad()
    def _pre_activations_without_graph(self, x_rows: Tensor) -> Tensor:
        """``F.linear(x_rows, W_enc.T, bias)``, as pre_activation computes it (the bias inside
        the product: bf16 under autocast), into the last training step's pre-activations when
        :meth:`recycle` kept them. On CPU a fresh [n, d_sae] tensor is a fresh mapping whose
        page faults cost about an eighth of the product itself (32k faults, ~55 ms, for the
        128 MB at batch 4096 and d_sae 8192; docs/benchmarks.md)."""
        bias = self.encoder_bias()
        buffer = None if torch.compiler.is_compiling() else self.__dict__.pop("_recycled", None)
        if (
            buffer is None
            or buffer.shape != (x_rows.shape[0], self.d_sae)
            or not buffer.dtype == x_rows.dtype == self.W_enc.dtype == bias.dtype
            or torch.is_autocast_enabled(x_rows.device.type)
        ):
            return F.linear(x_rows, self.W_enc.T, bias)
        return torch.addmm(bias, x_rows, self.W_enc, out=buffer)  # what F.linear calls

    def recycle(self, out: SAEOutput) -> None:
        # CPU only: CUDA's caching allocator already reuses the memory. Not across an eval
        # phase (train(False) drops it), so validation does not hold a second copy; not for a
        # compiled forward, which makes its own outputs.
        compiled = hasattr(self.forward_normalized, "_torchdynamo_orig_callable")
        on_cpu = out.pre_acts is not None and out.pre_acts.device.type == "cpu"
        if self.training and on_cpu and not compiled:
            self._recycled = out.pre_acts.reshape(-1, self.d_sae)

    def train(self, mode: bool = True) -> TopKSAE:
        if not mode:
            self.__dict__.pop("_recycled", None)
        return super().train(mode)

    def encoder_values(self, code: SparseCode, out: SAEOutput) -> Tensor:
        """ReLU'd pre-activations of ``out`` at ``code``'s entries, with the encoder's gradient
        through them alone (AuxK's dead latents)."""
        x_rows = out.extras["encoder_input"].reshape(-1, self.d_in)
        return self._encoder_values(code, out.pre_acts.reshape(-1, self.d_sae), x_rows)

    def encode_normalized(self, x_n: Tensor) -> tuple[Tensor, Tensor]:
        code, pre_acts = self._encode(x_n)
        shape = (*x_n.shape[:-1], self.d_sae)
        return code.to_dense(self.d_sae).reshape(shape), pre_acts.reshape(shape)

    def decodes_code_sparsely(self, code: SparseCode) -> bool:
        return self.decodes_sparsely(self.k)

    def decode_code(self, code: SparseCode, acts: Tensor | None) -> Tensor:
        """W_dec-part of the reconstruction (no bias), sparse or dense as configured; ``acts``
        (the dense activations) is needed only for a dense decode."""
        if self.decodes_code_sparsely(code):
            return decode_with_latent_bags(code, self.W_dec)
        return acts @ self.W_dec

    def forward_normalized(self, x_n: Tensor) -> SAEOutput:
        code, pre_acts = self._encode(x_n)
        # Dense activations only where the decode needs them; else built on first use.
        acts = None if self.decodes_code_sparsely(code) else code.to_dense(self.d_sae)
        x_hat = self.decode_code(code, acts) + self.b_dec
        lead = x_n.shape[:-1]
        return SAEOutput(
            x_hat=x_hat.reshape(*lead, self.d_out),
            acts=None if acts is None else acts.reshape(*lead, self.d_sae),
            pre_acts=pre_acts.reshape(*lead, self.d_sae),
            extras={"encoder_input": x_n},
            code=code,
            acts_shape=(*lead, self.d_sae),
        )

    # ----------------------------------------------------------------- losses
    def loss_terms(self, x_n: Tensor, out: SAEOutput) -> dict[str, Tensor]:
        terms = super().loss_terms(x_n, out)
        if self.hparams.aux_coefficient > 0:
            terms["auxk"] = self.hparams.aux_coefficient * self.auxk_loss(x_n, out)
        return terms

    def auxk_loss(self, x_n: Tensor, out: SAEOutput) -> Tensor:
        """Squared error of the dead latents' reconstruction of the residual (0 if none dead)."""
        n_dead = self.dead_count()  # known from the last step's statistics: no transfer
        if n_dead == 0:
            return out.x_hat.new_zeros(())
        k_aux = min(self.aux_k, n_dead)
        pre_acts = out.pre_acts.reshape(-1, self.d_sae)
        # Among the dead columns only: a [n, n_dead] selection, not a pass over all latents.
        dead_latents = torch.nonzero_static(self.dead_mask(), size=n_dead).squeeze(1)
        slots = pre_acts.index_select(1, dead_latents).topk(k_aux, sorted=False).indices
        code = SparseCode(dead_latents[slots], pre_acts.new_empty(0), pre_acts.shape[0])
        code.values = self.encoder_values(code, out)
        if self.decodes_sparsely(k_aux):
            residual_hat = decode_with_latent_bags(code, self.W_dec)
        else:
            residual_hat = code.to_dense(self.d_sae) @ self.W_dec
        # The residual is the target; its gradient would push the main pass, not the dead ones.
        residual = (x_n - out.x_hat).detach().reshape(-1, self.d_out)
        error = (residual_hat - residual).pow(2).sum(-1).mean()
        if self.hparams.auxk_normalization == "residual_variance":
            error = error / self._global_variance(residual)
        return min(n_dead / self.aux_k, 1.0) * error

    @torch.no_grad()
    def _global_variance(self, rows: Tensor) -> Tensor:
        """Mean squared distance of ``rows`` [n, d_out] from their mean, over the global batch.

        Under DDP the sums are all-reduced, so every rank divides by the same value and a DDP
        step equals a single-process step. Float64: the variance is a difference of sums.
        """
        rows = rows.double()
        sums = torch.cat([rows.sum(0), rows.pow(2).sum()[None], rows.new_tensor([len(rows)])])
        if _is_distributed():
            dist.all_reduce(sums)
        n = sums[-1]
        variance = sums[self.d_out] / n - (sums[: self.d_out] / n).pow(2).sum()
        # A residual that is zero everywhere gives zero error too: avoid 0 / 0.
        return variance.clamp_min(torch.finfo(torch.float32).tiny).float()


class BatchTopKSAE(TopKSAE):
    """TopK over the whole batch in training, a learned threshold at inference.

    In training the k * batch largest pre-activations of the batch are kept (ReLU after), so
    samples use more or fewer latents as they need, with k on average. That rule makes a
    sample's code depend on its batch-mates, which inference must not, so the module tracks a
    threshold, the running average (exponential, ``threshold_momentum``) of the smallest
    positive activation kept in each training batch, in the buffer ``threshold``. In eval mode
    it encodes JumpReLU-style: a latent is on when its pre-activation exceeds the threshold.
    Until a first training batch has been seen, eval falls back to batch top-k.

    The threshold updates whenever the module runs forward in training mode (as BatchNorm's
    statistics do), from optimizer step ``threshold_start_step`` on. Under DDP "the batch" is
    the global batch: the k * global batch largest pre-activations over all ranks are kept, and
    the threshold takes the smallest of them, so a DDP step equals a single-process step on the
    same global batch.

    Args:
        k: average active latents per sample.
        threshold_momentum: weight of the old value in the running average of the threshold.
        threshold_start_step: the first optimizer step whose batch updates the threshold, so
            that the first, fast-moving steps can be left out of the average. Default 0 (from
            the start); dictionary_learning's BatchTopK trainer starts at step 1000, with
            momentum 0.999.
        **kwargs: everything :class:`TopKSAE` takes (aux_k, aux_coefficient, decode_impl, ...).
    """

    def __init__(
        self,
        *args: Any,
        threshold_momentum: float = 0.99,
        threshold_start_step: int = 0,
        **kwargs: Any,
    ) -> None:
        check_finite("threshold_momentum", threshold_momentum, "model.init_args.threshold_momentum")
        check_nonnegative(
            "threshold_start_step", threshold_start_step, "model.init_args.threshold_start_step"
        )
        if not 0 <= threshold_momentum < 1:
            raise ValueError(
                f"threshold_momentum must be in [0, 1), got {threshold_momentum}: "
                "set model.init_args.threshold_momentum."
            )
        super().__init__(*args, **kwargs)
        self.register_buffer("threshold", torch.tensor(0.0))
        self.register_buffer("threshold_updates", torch.tensor(0, dtype=torch.long))

    def sparse_code(self, pre_acts: Tensor) -> SparseCode:
        if self.training or self.threshold_updates == 0:
            code = self._batch_top_k(pre_acts)
            if self.training and self.global_step >= self.hparams.threshold_start_step:
                self._update_threshold(code.values)
            return code
        return SparseCode.from_mask(pre_acts > self.threshold, pre_acts)

    def _batch_top_k(self, pre_acts: Tensor) -> SparseCode:
        n = pre_acts.shape[0]
        if self.training and _is_distributed():
            return self._global_batch_top_k(pre_acts)
        # Positions ascending group the entries by sample, as embedding_bag's offsets need.
        values, flat = largest_of_batch(pre_acts, min(self.k * n, pre_acts.numel()))
        return SparseCode(flat % self.d_sae, torch.relu(values), n, flat // self.d_sae)

    def _global_batch_top_k(self, pre_acts: Tensor) -> SparseCode:
        """The k * global batch largest pre-activations over all ranks, for this rank's rows.

        Any rank's share of the global top set is among its own k * global batch largest, so
        gathering those candidates (one all_gather of k * global batch values per rank, not the
        pre-activations) gives the global cut-off exactly.
        """
        world, n = dist.get_world_size(), pre_acts.shape[0]
        n_global = min(self.k * n, pre_acts.numel()) * world
        candidates, flat = largest_of_batch(pre_acts.detach(), min(n_global, pre_acts.numel()))
        gathered = [torch.empty_like(candidates) for _ in range(world)]
        dist.all_gather(gathered, candidates)
        everyone = torch.cat(gathered)
        cutoff = everyone.topk(n_global, sorted=False).values.min()
        # Of the entries tied at the cut-off, the first in the global batch's row order, as
        # one process keeps them (largest_of_batch): those of the lower ranks first. A rank's
        # candidates hold all of its entries above the cut-off (fewer than n_global, globally)
        # and as many of its ties as it may be given (its own n_global largest, first ties
        # first), so the kept entries are chosen among them, in flat order.
        ties = torch.stack([(rank_candidates == cutoff).sum() for rank_candidates in gathered])
        ties_before = (ties.cumsum(0) - ties)[dist.get_rank()]
        ours = n_global - (everyone > cutoff).sum() - ties_before
        keep = keep_above_and_first_ties(candidates, cutoff, ours)
        flat = flat[keep]
        # ReLU after selecting, as in one process.
        return SparseCode(flat % self.d_sae, torch.relu(candidates[keep]), n, flat // self.d_sae)

    @torch.no_grad()
    def _update_threshold(self, values: Tensor) -> None:
        # The smallest kept positive activation of the global batch (inf when none): the
        # minimum over ranks' minima. Decided on the device: no host transfer per step.
        inf = values.new_full((), float("inf"))  # a fill: a copy would wait
        batch_min = torch.where(values > 0, values, inf).min() if values.numel() else inf
        batch_min = batch_min.to(self.threshold.dtype)  # values are bf16 under autocast
        if _is_distributed():
            dist.all_reduce(batch_min, op=dist.ReduceOp.MIN)
        seen = torch.isfinite(batch_min)
        averaged = self.threshold.lerp(batch_min, 1 - self.hparams.threshold_momentum)
        updated = torch.where(self.threshold_updates == 0, batch_min, averaged)
        self.threshold.copy_(torch.where(seen, updated, self.threshold))
        self.threshold_updates += seen.long()

    def decodes_code_sparsely(self, code: SparseCode) -> bool:
        return self.decodes_sparsely(code.indices.numel() // max(code.n_rows, 1))

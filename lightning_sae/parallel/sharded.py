"""Latent sharding: each member of a latent-parallel group holds a slice of the dictionary.

Member ``t`` of a group of ``L`` holds latents ``[t * d_sae / L, (t + 1) * d_sae / L)``: those
columns of ``W_enc``, entries of ``b_enc`` and rows of ``W_dec``, with every per-latent buffer
and parameter of the variant (JumpReLU's thresholds, Gated's magnitude path, ApproxL0's
frequency window, the dead-feature clock) and, through the optimizer, their Adam state.
``b_dec``, a skip transcoder's ``W_skip`` and the input and output scales are replicated. The
data-parallel dimension splits the global batch as DDP does.

A sharded module is the variant itself with a layer in front: :func:`sharded_class` makes
``LatentSharded<Variant>`` from a mixin below and the variant class, and the mixins override
only the public steps whose maths crosses latents (selection, decoding, the terms that are
not sums over latents). Everything else (the activation functions, the sums over latents,
the optimiser, the schedules) is the variant's own code running on the local slice, so
``self.d_sae`` is the local count and ``self.shard.d_sae`` the dictionary's.

Exactness (the reason for each override):

- Encoding is local: ``x W_enc[:, slice] + b_enc[slice]``; ``b_dec`` enters through
  :func:`copy_to_shards` so that its gradient sums every slice's part.
- The reconstruction is the all-reduce of the partial decodes, plus ``b_dec``.
- TopK: each member sends its ``min(k, d_sae / L)`` best ``(value)`` per row; the global top-k
  of those candidates is the true one (every member's share of the top k is among its own k
  best), and each member keeps its own winners. AuxK does the same among dead latents only,
  each member sending min(aux_k, the most dead latents any member holds) candidates per row.
- BatchTopK: each member sends its ``k * global batch`` largest pre-activations over the whole
  data x latent mesh; the cut-off of the global top set is exact (the single-process proof of
  ``BatchTopKSAE._global_batch_top_k``, one more dimension).
- Terms that sum over latents (L1, tanh, JumpReLU's L0 without a target, the pre-activation
  loss, ApproxL0's L0 and frequency floor) are each member's share; terms of the whole
  reconstruction (MSE, AuxK, Gated's auxiliary loss, Matryoshka's prefixes) and JumpReLU's
  L0-target form are replicated. The logged values are the global sums.
- Orthogonality: the active decoder rows of all members are gathered (only the active ones),
  each member finds their nearest neighbours among its own rows, and the maxima and the tie
  sums are reduced across members.
- Transcoders and crosscoders: the steps read ``input_and_target`` (a transcoder's two sites
  gathered alike) and score against the target; ``W_skip x`` is added after the all-reduce on
  every member alike, so its gradient, like ``b_dec``'s there, needs no reduction.
- Data parallel: gradients are averaged over the data-parallel group after backward (each
  rank's loss is the mean over its slice of the global batch, as under DDP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_sae.metrics.reconstruction import L0, DeadFraction
from lightning_sae.models.base import SAEOutput, SparseAutoencoder, stepping_alone
from lightning_sae.models.jumprelu import heaviside
from lightning_sae.models.penalties import (
    OrthogonalityShape,
    l1_penalty,
    shaped_orthogonality,
)
from lightning_sae.models.sparse import SparseCode, largest_of_batch
from lightning_sae.models.topk import BatchTopKSAE
from lightning_sae.parallel.comm import (
    all_reduce,
    copy_to_shards,
    gather_last,
    gather_rows,
    reduce_from_shards,
)

# Every per-latent tensor a shipped variant holds, with its latent dimension. Anything else is
# replicated; a variant with another per-latent tensor is refused rather than half-sharded.
SHARDED_DIMS: dict[str, int] = {
    "W_enc": 1,
    "b_enc": 0,
    "W_dec": 0,
    "tokens_since_fired": 0,
    "r_mag": 0,
    "b_mag": 0,
    "frequency_history": 1,
}

# A per-latent tensor's latent dim, and the shape to view it as first (None: as it is).
ShardSpec = tuple[int, tuple[int, ...] | None]


@dataclass
class LatentShard:
    """Where a member sits in the data x latent mesh, and its process groups (None when the
    dimension has size 1, so that every collective on it is skipped).

    The dictionary's features are ``layers`` blocks of ``d_sae`` (one block for an SAE; a
    cross-layer transcoder's layers, layer-major: feature ``f`` of layer ``l`` is global index
    ``l * d_sae + f``). A member holds latents ``[start, stop)`` of every block, kept
    layer-major too: local index ``l * local_size + (f - start)``. The methods below map
    between the two, so that callbacks address features by their global index."""

    d_sae: int
    latent_rank: int
    latent_size: int
    data_size: int
    latent_group: dist.ProcessGroup | None
    data_group: dist.ProcessGroup | None
    world_group: dist.ProcessGroup | None
    layers: int = 1

    @property
    def local_size(self) -> int:
        return self.d_sae // self.latent_size

    @property
    def start(self) -> int:
        return self.latent_rank * self.local_size

    @property
    def stop(self) -> int:
        return self.start + self.local_size

    def gather_rows(self, x: Tensor) -> Tensor:
        """The latent group's batch slices joined: its data-parallel slice of the global batch.

        A datamodule serves world rank ``r`` slice ``r`` of the global batch; the members of a
        latent group are consecutive world ranks, so their slices joined in order are slice
        ``data_rank`` of the batch cut into ``data_size`` parts.
        """
        return gather_rows(x, self.latent_group)

    def sum_over_latents(self, x: Tensor) -> Tensor:
        """``x`` summed over the latent group (in place)."""
        return all_reduce(x, self.latent_group)

    def sum_over_data(self, x: Tensor) -> Tensor:
        """``x`` summed over the data-parallel group (in place)."""
        return all_reduce(x, self.data_group)

    def gather_features(self, x: Tensor) -> Tensor:
        """A per-feature ``[layers * d_sae / L, ...]`` tensor of every member, as
        ``[layers * d_sae, ...]`` in global index order."""
        if x.dtype == torch.bool:  # gloo gathers no bool tensors
            return self.in_global_order(gather_rows(x.to(torch.uint8), self.latent_group)).bool()
        return self.in_global_order(gather_rows(x, self.latent_group))

    def in_global_order(self, by_member: Tensor) -> Tensor:
        """Every member's features joined in member order, reordered by global index."""
        if self.layers == 1:
            return by_member
        rest = by_member.shape[1:]
        blocks = by_member.reshape(self.latent_size, self.layers, self.local_size, *rest)
        return blocks.transpose(0, 1).reshape(-1, *rest)

    def global_indices(self) -> Tensor:
        """The global index of each of this member's features, ``[layers * local_size]``."""
        layer_starts = torch.arange(self.layers)[:, None] * self.d_sae
        return (layer_starts + torch.arange(self.start, self.stop)).reshape(-1)

    def holds(self, indices: Tensor) -> Tensor:
        """Which of the global ``indices`` this member holds (a mask)."""
        latent = indices % self.d_sae
        return (latent >= self.start) & (latent < self.stop)

    def local_indices(self, indices: Tensor) -> Tensor:
        """The global ``indices`` this member holds, as its local indices, in their order."""
        held = indices[self.holds(indices)]
        return held // self.d_sae * self.local_size + held % self.d_sae - self.start

    def local_part(self, full: Tensor, dim: int) -> Tensor:
        """This member's slice of a full ``[..., d_sae, ...]`` tensor."""
        return full.narrow(dim, self.start, self.local_size)


def shard_of(module: Any) -> LatentShard | None:
    """The module's latent shard, or None when it is not latent-sharded."""
    return getattr(module, "shard", None)


# ----------------------------------------------------------------------------- metrics
class _ShardedL0(L0):
    """L0 whose rows are counted by one member per latent group (the active latents by all)."""

    def __init__(self, counts_rows: bool) -> None:
        super().__init__()
        self.counts_rows = counts_rows

    def update(self, acts: Tensor) -> None:
        self.active += (acts != 0).sum(dtype=torch.float64)
        if self.counts_rows:
            self.n += acts.shape[0]


class _ShardedDeadFraction(DeadFraction):
    """Firing counts of the whole dictionary, each member adding its slice."""

    def __init__(self, d_sae: int, start: int, counts_rows: bool) -> None:
        super().__init__(d_sae)
        self.start, self.counts_rows = start, counts_rows

    def update(self, acts: Tensor) -> None:
        self.counts[self.start : self.start + acts.shape[-1]] += (acts != 0).sum(0)
        if self.counts_rows:
            self.n += acts.shape[0]


# ----------------------------------------------------------------------------- the layer
class ShardedSAE:
    """Overrides shared by every variant; see the module docstring for the maths."""

    shard: LatentShard

    @classmethod
    def feature_layers(cls, module: SparseAutoencoder) -> int:
        """How many blocks of ``d_sae`` features the module has (:class:`LatentShard`)."""
        return 1

    @classmethod
    def sharded_dims(cls, module: SparseAutoencoder) -> dict[str, ShardSpec]:
        """Every per-latent tensor of ``module`` by state-dict name: (latent dim, the shape to
        view it as first, or None). A flat tensor whose latents are not contiguous (a
        cross-layer transcoder's layer-major dead clock) is sliced, saved and reassembled
        through that view."""
        return {name: (dim, None) for name, dim in SHARDED_DIMS.items()}

    def on_sharded(self) -> None:
        """Replace the validation metrics that count per latent or per row with the members'
        shares (the reconstruction's are counted by the group's first member)."""
        first = self.shard.latent_rank == 0
        self.val_l0 = _ShardedL0(counts_rows=first)
        self.val_dead = _ShardedDeadFraction(self.shard.d_sae, self.shard.start, counts_rows=first)

    # Loss terms that are sums over latents: each member computes its share.
    def partial_terms(self) -> set[str]:
        return set()

    def configure_model(self) -> None:
        # ModelParallelStrategy calls this with the mesh in place; the strategy made this class.
        if shard_of(self) is None:
            shard_module(self, self.device_mesh)

    # ------------------------------------------------------------- encode / decode
    def input_offset_source(self) -> Tensor | None:
        if not self.hparams.apply_b_dec_to_input:
            return None
        return copy_to_shards(self.b_dec, self.shard.latent_group)

    def reconstruct(self, acts: Tensor) -> Tensor:
        partial = acts @ self.W_dec.to(acts.dtype)
        return reduce_from_shards(partial, self.shard.latent_group) + self.b_dec

    @torch.no_grad()
    def reset_features(
        self,
        indices: Tensor,
        directions: Tensor,
        encoder_norm: float,
        encoder_directions: Tensor | None = None,
    ) -> list[tuple[nn.Parameter, int]]:
        """Restart the features among ``indices`` (global indices) that this member holds."""
        on_host = self.shard.holds(indices).to(directions.device)
        if encoder_directions is not None:
            encoder_directions = encoder_directions[on_host]
        return super().reset_features(
            self.local_feature_indices(indices),
            directions[on_host],
            encoder_norm,
            encoder_directions,
        )

    def local_feature_indices(self, indices: Tensor) -> Tensor:
        """The global feature ``indices`` this member holds, as local indices."""
        return self.shard.local_indices(indices)

    @torch.no_grad()
    def _active_in_global_batch(self, acts: Tensor) -> Tensor:
        active = (acts != 0).reshape(-1, self.d_sae).any(0).to(torch.uint8)
        return all_reduce(active, self.shard.data_group, dist.ReduceOp.MAX).bool()

    # ------------------------------------------------------------- steps
    def _rows(self, batch: Any) -> tuple[Tensor, Tensor]:
        """(input, target) of the latent group's data-parallel slice of the global batch: the
        same tensor for an SAE, two sites for a transcoder (gathered alike, rows aligned)."""
        x, target = self.input_and_target(batch)
        gathered = self.shard.gather_rows(x)
        return gathered, gathered if target is x else self.shard.gather_rows(target)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, target = self._rows(batch)
        if not self.input_scale_fitted:
            self.fit_input_scale(x, target)
        x_n = self.normalize(x)
        y_n = x_n if target is x else self.normalize_target(target)
        out = self.forward_normalized(x_n)
        terms = self.loss_terms(y_n, out)
        if self.hparams.orthogonality_coefficient != 0:
            penalty, mean_cos = sharded_orthogonality_penalty(
                self.W_dec,
                self._active_in_global_batch(out.acts),
                self.shard,
                shape=self.hparams.orthogonality_shape,
                power=self.hparams.orthogonality_power,
            )
            terms["orthogonality"] = self.hparams.orthogonality_coefficient * penalty
            self.log("train/orthogonality_mean_cos", mean_cos)
        loss = torch.stack(list(terms.values())).sum()
        self._log_training_stats(y_n, out, terms, read=None if y_n is x_n else x_n)
        return loss

    def step_and_statistics(self, batch: Any) -> tuple[Tensor, Tensor, Any]:
        """The step as a group member takes it (a member latent-sharded inside member placement,
        ``parallel/members.py``): the sharded step reduces and logs its statistics itself, over
        its own groups, so nothing is left for the group's one host transfer."""
        loss = self.training_step(batch, 0)
        return loss, loss.new_zeros(0, dtype=torch.float64).detach(), lambda values: None

    def _global_terms(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """Detached term values with the partial ones summed over the latent group."""
        partial = [name for name in terms if name in self.partial_terms()]
        values = {name: value.detach().double() for name, value in terms.items()}
        if partial and self.shard.latent_group is not None:
            stacked = torch.stack([values[name] for name in partial])
            all_reduce(stacked, self.shard.latent_group)
            values.update(zip(partial, stacked, strict=True))
        return values

    @torch.no_grad()
    def _log_training_stats(
        self, x_n: Tensor, out: SAEOutput, terms: dict[str, Tensor], read: Tensor | None = None
    ) -> None:
        """The base class's step statistics, reduced over the right groups: firing counts over
        the data group (each member its latents), partial terms over the latent group. ``x_n``
        is what the reconstruction is scored against; ``read``, what the encoder read when that
        is another site (a transcoder's input), checked for finiteness with it."""
        shard = self.shard
        values = self._global_terms(terms)
        x_hat, x_n = self.in_reported_units(out.x_hat.detach(), x_n)
        x64, x_hat64 = x_n.double(), x_hat.double()
        fired = out.fired(self.d_sae).double()
        scalars = torch.stack(
            [
                (x_hat64 - x64).pow(2).sum(),
                x64.pow(2).sum(),
                x64.new_zeros(()) if read is None else read.double().pow(2).sum(),
                torch.tensor(float(x_n.shape[0]), device=x_n.device, dtype=torch.float64),
                *values.values(),
            ]
        )
        sums = all_reduce(torch.cat([fired, x64.sum(0), scalars]), shard.data_group)
        fired, sum_x = sums[: self.d_sae], sums[self.d_sae : self.d_sae + self.d_out]
        sq_err, sum_sq, read_sq, n, *term_values = sums[self.d_sae + self.d_out :].tolist()
        if not (math.isfinite(sum_sq) and math.isfinite(read_sq)):
            raise ValueError(self._non_finite_batch())
        if not math.isfinite(sum(term_values)):  # the same sums on every rank: all stop
            raise ValueError(self._diverged("the loss is non-finite"))
        variance = sum_sq - float(sum_x.pow(2).sum()) / n
        if n > 1 and variance <= 1e-12 * sum_sq:
            raise ValueError(self._zero_variance_batch(sum_sq))
        self.tokens_since_fired += int(n)
        self.tokens_since_fired[fired > 0] = 0
        latent = torch.stack([fired.sum(), self.dead_mask().sum().double()])
        n_active, n_dead = all_reduce(latent, shard.latent_group).tolist()

        data_size = shard.data_size
        self.log("train/loss", sum(term_values) / data_size, prog_bar=True)
        for name, value in zip(terms, term_values, strict=True):
            self.log(f"train/loss/{name}", value / data_size)
        self.log("train/l0", n_active / n, prog_bar=True)
        self.log("train/mse", sq_err / n)
        self.log("train/fvu", sq_err / variance if variance > 0 else float("nan"))
        if self.dead_window_passed(int(n)):
            self.log("train/dead_fraction", n_dead / shard.d_sae)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The base class's refusal of non-finite weights, decided together: a member alone
        # refusing would leave the others waiting in the checkpoint's collectives.
        finite = all(bool(torch.isfinite(p).all()) for p in self.parameters())
        finite = torch.tensor(float(finite), device=self.b_dec.device)
        if not all_reduce(finite, self.shard.world_group, dist.ReduceOp.MIN).item():
            raise ValueError(self._diverged("the weights became non-finite"))

    def on_after_backward(self) -> None:
        """Average gradients over the data-parallel group: DDP's step, explicitly (the module is
        not called through ``forward``, so torch's ``replicate`` hooks would never fire)."""
        group = self.shard.data_group
        if group is None:
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat /= self.shard.data_size
        for grad, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            grad.copy_(part.view_as(grad))

    @torch.no_grad()
    def gradient_norm(self) -> Tensor:
        """The whole dictionary's gradient norm: the sharded parameters' squares summed over
        the latent group, the replicated ones' (identical on every member) counted once. Every
        member enters the all-reduce, so every member clips by the same factor."""
        sharded, replicated, dims = [], [], self.sharded_dims(self)
        for name, parameter in self.named_parameters():
            if parameter.grad is not None:
                (sharded if name in dims else replicated).append(parameter.grad)
        squares = self.b_dec.new_zeros((), dtype=torch.float32)
        if sharded:
            squares += torch.nn.utils.get_total_norm(sharded).float().square()
        all_reduce(squares, self.shard.latent_group)
        if replicated:
            squares += torch.nn.utils.get_total_norm(replicated).float().square()
        return squares.sqrt()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, target = self._rows(batch)
        x_n = self.normalize(x)
        out = self.forward_normalized(x_n)
        if target is not x:
            x_n = self.normalize_target(target)  # from here on, what out.x_hat is scored against
        values = {k: v.float() for k, v in self._global_terms(self.loss_terms(x_n, out)).items()}
        self.log("val/loss", torch.stack(list(values.values())).sum(), sync_dist=True)
        for name, value in values.items():
            self.log(f"val/loss/{name}", value, sync_dist=True)
        # The reconstruction is replicated over the latent group: one member counts it.
        first = self.shard.latent_rank == 0
        rows = slice(None) if first else slice(0, 0)
        self.val_l0.update(out.acts)
        x_hat, x_n = self.in_reported_units(out.x_hat[rows], x_n[rows])
        self.val_mse.update(x_hat, x_n)
        self.val_fvu.update(x_hat, x_n)
        self.val_dead.update(out.acts)
        for name in ("l0", "mse", "fvu"):
            self.log(f"val/{name}", getattr(self, f"val_{name}"))
        self.log("val/dead_fraction", self.val_dead)

    # ------------------------------------------------------------- top-k across members
    def _row_top_k(
        self, pre_acts: Tensor, k: int, columns: Tensor | None = None, most_columns: int = 0
    ) -> SparseCode:
        """The ``k`` largest of each row over the whole dictionary, this member's part of them
        (flat, sorted by (row, latent)); values are ReLU'd as in one process.

        With ``columns`` (local latents, e.g. AuxK's dead ones), the largest among those only;
        ``most_columns`` is the most columns any member has, so that each member sends
        ``min(k, most_columns)`` candidates per row (padded with -inf where it has fewer): a
        member without dead latents sends nothing of its own.
        """
        shard = self.shard
        pre_acts = pre_acts.detach()
        among = pre_acts if columns is None else pre_acts.index_select(1, columns)
        per_member = min(k, pre_acts.shape[1] if columns is None else most_columns)
        values, slots = among.topk(min(per_member, among.shape[1]), dim=-1)
        if values.shape[1] < per_member:
            padding = values.new_full((values.shape[0], per_member - values.shape[1]), -math.inf)
            values = torch.cat([values, padding], dim=1)
        everyone = gather_last(values, shard.latent_group)  # [n, L * per_member]
        won = torch.zeros_like(everyone, dtype=torch.bool)
        won.scatter_(1, everyone.topk(k, dim=-1).indices, True)
        start = shard.latent_rank * per_member
        mine = won[:, start : start + slots.shape[1]]
        indices = slots if columns is None else columns[slots]
        mask = torch.zeros_like(pre_acts, dtype=torch.bool).scatter_(1, indices, mine)
        code = SparseCode.from_mask(mask, pre_acts)
        code.values = torch.relu(code.values)
        return code


class ShardedStandard(ShardedSAE):
    def partial_terms(self) -> set[str]:
        return {"l1", "tanh"}

    def steps_sparsely(self, pre_acts: Tensor) -> bool:
        # Dense steps: StandardSAE's sparse step decodes without the partial decodes' all-reduce
        # (reconstruct above), and the members would pick by their own slices' densities.
        return False

    def input_offset_source(self) -> Tensor | None:
        # use_b_dec: false keeps b_dec a zero buffer and subtracts nothing.
        return super().input_offset_source() if self.hparams.get("use_b_dec", True) else None


class ShardedTopK(ShardedSAE):
    def sparse_code(self, pre_acts: Tensor) -> SparseCode:
        return self._row_top_k(pre_acts, self.k)

    def decode_code(self, code: SparseCode, acts: Tensor) -> Tensor:
        return reduce_from_shards(super().decode_code(code, acts), self.shard.latent_group)

    def auxk_loss(self, x_n: Tensor, out: SAEOutput) -> Tensor:
        """AuxK over the whole dictionary's dead latents: their global top ``aux_k`` per row."""
        dead = self.dead_mask()
        dead_counts = gather_last(dead.sum()[None], self.shard.latent_group)
        n_dead = int(dead_counts.sum())
        if n_dead == 0:
            return out.x_hat.new_zeros(())
        k_aux = min(self.aux_k, n_dead)
        pre_acts = out.pre_acts.reshape(-1, self.d_sae)
        dead_latents = dead.nonzero().squeeze(1)
        code = self._row_top_k(pre_acts, k_aux, dead_latents, int(dead_counts.max()))
        code.values = self.encoder_values(code, out)
        residual_hat = reduce_from_shards(code.decode(self.W_dec), self.shard.latent_group)
        residual = (x_n - out.x_hat).detach().reshape(-1, self.d_out)
        error = (residual_hat - residual).pow(2).sum(-1).mean()
        if self.hparams.auxk_normalization == "residual_variance":
            # Replicated over the latent group, so the world sums scale sums and count alike.
            error = error / self._global_variance(residual)
        return min(n_dead / self.aux_k, 1.0) * error


class ShardedBatchTopK(ShardedTopK):
    def sparse_code(self, pre_acts: Tensor) -> SparseCode:
        return BatchTopKSAE.sparse_code(self, pre_acts)

    def _batch_top_k(self, pre_acts: Tensor) -> SparseCode:
        """The k x batch largest of the whole dictionary; in training over the global batch
        (every rank of the mesh), in eval over the rows given (the latent group)."""
        shard, n = self.shard, pre_acts.shape[0]
        rows = n * shard.data_size if self.training else n
        group = shard.world_group if self.training else shard.latent_group
        count = min(self.k * rows, rows * shard.d_sae)
        scores = pre_acts.detach()
        # This member's count largest: the only ones that can be among the mesh's count largest.
        candidates, _ = largest_of_batch(scores, min(count, scores.numel()))
        cutoff = gather_last(candidates, group).topk(count, sorted=False).values.min()
        code = SparseCode.from_mask(self._above_and_first_ties(scores, cutoff, count), pre_acts)
        code.values = torch.relu(code.values)
        return code

    @torch.no_grad()
    def _update_threshold(self, values: Tensor) -> None:
        """The variant's running threshold from the smallest kept value over the whole mesh
        (``shard.world_group``), named explicitly: inside member placement the mesh is a block
        of ranks, not the world that the variant's own reduction would span."""
        inf = values.new_tensor(float("inf"))
        smallest = torch.where(values > 0, values, inf).min() if values.numel() else inf
        smallest = smallest.to(self.threshold.dtype)  # bf16 under autocast
        all_reduce(smallest, self.shard.world_group, dist.ReduceOp.MIN)
        with stepping_alone():  # already the mesh's minimum: the variant reduces nothing more
            super()._update_threshold(smallest.reshape(1))

    def _above_and_first_ties(self, scores: Tensor, cutoff: Tensor, count: int) -> Tensor:
        """The entries above the cut-off and, of those tied at it, the first ones in the order
        of the whole batch (global row, then global latent) until ``count`` are kept: the
        entries one process keeps (``models/sparse.keep_above_and_first_ties``).

        One all_gather tells every member how many ties each member holds in each of its rows.
        In training the members are every rank (world rank = data block x latent_size + latent
        rank: the latent group is consecutive ranks); in eval the latent group's rows only."""
        shard, n = self.shard, scores.shape[0]
        group = shard.world_group if self.training else shard.latent_group
        tied = scores == cutoff
        mine = torch.cat([tied.sum(1), (scores > cutoff).sum()[None]])
        counts = gather_last(mine[None], group).view(-1, n + 1)  # [members, n rows + above]
        ties_left = count - counts[:, -1].sum()
        # Ties before each (data block, row, latent member), in the whole batch's order.
        in_order = counts[:, :-1].view(-1, shard.latent_size, n).transpose(1, 2).reshape(-1)
        before = (in_order.cumsum(0) - in_order).view(-1, n, shard.latent_size)
        position = dist.get_rank(group) if group is not None else 0
        mine_before = before[position // shard.latent_size, :, shard.latent_rank]
        tie_number = mine_before[:, None] + tied.long().cumsum(1)
        return (scores > cutoff) | (tied & (tie_number <= ties_left))


class ShardedMatryoshka(ShardedBatchTopK):
    def local_group_ends(self) -> Tensor:
        # A group wholly outside this member's slice is empty here; its share comes from others.
        return (self.group_ends - self.shard.start).clamp(0, self.d_sae)

    def group_decode(self, code: SparseCode, acts: Tensor | None) -> Tensor:
        """The groups' shares of the whole dictionary's reconstruction: this member's partial
        decode of each group, summed over the latent group."""
        return reduce_from_shards(super().group_decode(code, acts), self.shard.latent_group)


class ShardedJumpReLU(ShardedSAE):
    @classmethod
    def sharded_dims(cls, module: SparseAutoencoder) -> dict[str, ShardSpec]:
        # JumpReLU's per-latent thresholds (BatchTopK's "threshold" is one replicated number).
        return super().sharded_dims(module) | {"threshold": (0, None)}

    def partial_terms(self) -> set[str]:
        return {"preact"} | ({"l0"} if self.hparams.l0_target is None else set())

    def loss_terms(self, x_n: Tensor, out: SAEOutput) -> dict[str, Tensor]:
        hp = self.hparams
        terms = SparseAutoencoder.loss_terms(self, x_n, out)
        threshold = self.positive_threshold()
        l0 = heaviside(out.pre_acts, threshold, hp.bandwidth).sum(-1).mean()
        # Without a target, this member's share of a sum over latents; with one, a function of
        # the whole L0 of the global batch, replicated.
        target = hp.l0_target
        sparsity = l0 if target is None else (self._global_l0(l0) / target - 1).pow(2)
        terms["l0"] = hp.l0_coefficient * self.warmup_factor(hp.l0_warmup_steps) * sparsity
        if hp.preact_coefficient > 0:
            dead = self.dead_mask()
            shortfall = torch.relu(threshold - out.pre_acts) * (self.decoder_norms() * dead)
            terms["preact"] = hp.preact_coefficient * shortfall.sum(-1).mean()
        return terms

    def _global_l0(self, l0: Tensor) -> Tensor:
        """The L0 of the global batch over the whole dictionary, from this member's share on its
        data slice. Over the data group the value is the mean and the gradient stays the
        slice's own: averaged over the group (the data-parallel step), the gradients are those
        of f(global L0), which f(slice L0) averaged would not be for a nonlinear f."""
        total = reduce_from_shards(l0, self.shard.latent_group)
        if self.shard.data_group is None:
            return total
        mean = all_reduce(total.detach().clone(), self.shard.data_group) / self.shard.data_size
        return total + (mean - total.detach())


class ShardedGated(ShardedSAE):
    def partial_terms(self) -> set[str]:
        return {"l1"}

    def loss_terms(self, x_n: Tensor, out: SAEOutput) -> dict[str, Tensor]:
        hp = self.hparams
        terms = SparseAutoencoder.loss_terms(self, x_n, out)
        gate_acts = torch.relu(out.pre_acts)
        coefficient = hp.l1_coefficient * self.warmup_factor(hp.l1_warmup_steps)
        terms["l1"] = coefficient * l1_penalty(gate_acts, self.decoder_norms())
        if hp.aux_coefficient > 0:
            partial = gate_acts @ self.W_dec.detach().to(gate_acts.dtype)
            gate_x_hat = reduce_from_shards(partial, self.shard.latent_group) + self.b_dec.detach()
            terms["aux"] = hp.aux_coefficient * (gate_x_hat - x_n).pow(2).sum(-1).mean()
        return terms


class ShardedApproxL0(ShardedSAE):
    def partial_terms(self) -> set[str]:
        return {"approx_l0", "frequency_floor"}

    @torch.no_grad()
    def _record_frequencies(self, batch_estimate: Tensor) -> None:
        # Each member its latents, averaged over the data group (not the whole world).
        batch_estimate = all_reduce(batch_estimate.clone(), self.shard.data_group)
        batch_estimate /= self.shard.data_size
        slot = int(self.frequency_steps) % self.hparams.frequency_window
        self.frequency_history[slot] = batch_estimate
        self.frequency_steps += 1


def check_latent_split(module: SparseAutoencoder, latent_parallel: int) -> None:
    """The sizes that must allow ``latent_parallel`` members: one line naming what to change."""
    d_sae = module.hparams.d_sae
    if d_sae % latent_parallel:
        raise ValueError(
            f"d_sae={d_sae} is not divisible by latent_parallel={latent_parallel}: set "
            f"model.init_args.d_sae to a multiple of {latent_parallel}, or trainer.latent_parallel "
            f"to a divisor of {d_sae}."
        )
    if module.hparams.get("compile"):
        raise ValueError(
            "model.init_args.compile is not supported with latent sharding (the step holds "
            "collectives); set model.init_args.compile: false or trainer.latent_parallel: 1."
        )


@torch.no_grad()
def shard_module(module: SparseAutoencoder, mesh: Any) -> SparseAutoencoder:
    """Slice ``module`` in place to this rank's latents of the ``("data_parallel",
    "tensor_parallel")`` device mesh. Its class is already its sharded layer
    (``parallel/layers.py``: the strategy gives it); this slices the weights. Returns it."""
    latent_mesh, data_mesh = mesh["tensor_parallel"], mesh["data_parallel"]
    latent_size = latent_mesh.size()
    check_latent_split(module, latent_size)
    world = dist.get_world_size() if dist.is_initialized() else 1
    shard = LatentShard(
        d_sae=module.d_sae,
        latent_rank=latent_mesh.get_local_rank(),
        latent_size=latent_size,
        data_size=data_mesh.size(),
        latent_group=latent_mesh.get_group() if latent_size > 1 else None,
        data_group=data_mesh.get_group() if data_mesh.size() > 1 else None,
        world_group=dist.group.WORLD if world > 1 else None,
        layers=type(module).feature_layers(module),
    )
    return slice_to_shard(module, shard)


@torch.no_grad()
def slice_to_shard(module: SparseAutoencoder, shard: LatentShard) -> SparseAutoencoder:
    """Keep only ``shard``'s latents of ``module`` (its class already its sharded layer), in
    place: every per-latent parameter and buffer becomes its slice. Returns it."""
    dims = type(module).sharded_dims(module)
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if name not in dims:
            continue
        dim, view = dims[name]
        full = tensor.detach() if view is None else tensor.detach().view(view)
        local = shard.local_part(full, dim).clone()
        local = local if view is None else local.reshape(-1)
        path, _, leaf = name.rpartition(".")  # a ParameterList entry: "W_dec.0"
        owner = module.get_submodule(path) if path else module
        if isinstance(tensor, nn.Parameter):
            setattr(owner, leaf, nn.Parameter(local, requires_grad=tensor.requires_grad))
        else:
            owner._buffers[leaf] = local
    module.shard, module.d_sae = shard, shard.local_size
    module.on_sharded()
    return module


def sharded_orthogonality_penalty(
    W_dec: Tensor,
    active: Tensor,
    shard: LatentShard,
    shape: OrthogonalityShape = "sigmoid",
    power: float = 2.0,
) -> tuple[Tensor, Tensor]:
    """:func:`~lightning_sae.models.penalties.orthogonality_penalty` over the whole dictionary.

    Only the active rows travel: each member's (padded to the largest count) are gathered with a
    gradient, each member scores them against its own rows, and the nearest value, the tie sums
    and the tie counts are reduced over the latent group.
    """
    group = shard.latent_group
    directions = W_dec / W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    active_idx = active.nonzero().squeeze(-1)
    counts = gather_last(active_idx.new_tensor([len(active_idx)]), group)
    if int(counts.sum()) == 0:
        zero = W_dec.sum() * 0
        return zero, zero.detach()
    most = int(counts.max())
    mine = directions[active_idx]
    padded = torch.cat([mine, mine.new_zeros(most - len(mine), mine.shape[1])])
    everyone = gather_rows(padded, group, differentiable=True)  # [L * most, d_in]
    sims = everyone @ directions.T  # [L * most, d_sae / L]
    own_rows = shard.latent_rank * most + torch.arange(len(active_idx), device=sims.device)
    sims = sims.index_put((own_rows, active_idx), sims.new_tensor(float("-inf")))
    nearest = all_reduce(sims.detach().max(dim=1).values, group, dist.ReduceOp.MAX)
    ties = sims.detach() == nearest[:, None]
    n_ties = all_reduce(ties.sum(1).to(sims.dtype), group)
    tie_sum = reduce_from_shards(sims.where(ties, 0).sum(1), group)
    slot = torch.arange(len(counts) * most, device=sims.device)
    valid = (slot % most) < counts.to(sims.device)[slot // most]
    cos = (tie_sum / n_ties.clamp_min(1))[valid]
    return shaped_orthogonality(cos, shape, power)

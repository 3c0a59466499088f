"""Latent sharding of cross-layer transcoders (``models/clt.py``).

Member ``t`` of a latent group of ``N`` holds features ``[t * d_sae / N, (t + 1) * d_sae / N)``
of every layer: those columns of ``W_enc[l]``, entries of ``b_enc[l]`` and of JumpReLU's
``threshold[l]``, rows of every ``W_dec[s]``, and their entries of the layer-major dead clock.
``b_dec`` and the per-layer input and output scales are replicated.

Exactness, as in ``parallel/sharded.py``:

- Encoding and JumpReLU are local; each member decodes its features into every target layer and
  the partial outputs are summed over the latent group (then ``b_dec``).
- TopK ranks ``ReLU(h_i) * ||W_dec_i||`` (a feature's decoder norm is its own rows: local): per
  layer, each (row, layer) is one row of the sharded row top-k of ``parallel/sharded.py``; over
  all layers, each row is one, the member's candidates taken from all its layers.
- BatchTopK ranks the same scores over the global batch (per layer, or over all layers): each
  member sends its k x global batch largest per group over the whole data x latent mesh, the
  cut-off of those is the global one (``parallel/sharded.py``, ``ShardedBatchTopK``), and of
  the entries tied at it the first in the whole batch's order are kept, as in one process.
  The inference threshold is replicated: every rank reduces the same global minimum.
- The tanh sparsity and the pre-activation loss are sums over features, each member's share;
  the MSE is replicated. Logged values are the global sums.
- The replacement model (``ReplacementEval``) runs layer by layer on every rank: a layer's
  encoding is local (TopK per layer: the sharded row top-k of that layer), and each target
  layer's output is the all-reduce of the members' partial outputs.

Callbacks address features by their global index ``layer * d_sae + f``, as one process and the
``inspect`` pages do; the module's ``shard`` (``feature_layers`` = ``n_layers``) maps a member's
layer-major slice to and from it (``LatentShard.global_indices``, ``local_indices``,
``gather_features``), so the resampler, the density and geometry monitors work unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from lightning_sae.metrics.reconstruction import DeadFraction
from lightning_sae.models.base import SAEOutput, SparseAutoencoder, stepping_alone
from lightning_sae.models.clt import (
    CrossLayerTranscoder,
)
from lightning_sae.parallel.comm import all_reduce, gather_last, reduce_from_shards
from lightning_sae.parallel.sharded import ShardedSAE, ShardSpec, _ShardedL0


class _ShardedLayerDeadFraction(DeadFraction):
    """Firing counts of every layer's features, each member adding its slice of each layer."""

    def __init__(self, positions: Tensor, n_features: int, counts_rows: bool) -> None:
        super().__init__(n_features)
        self.register_buffer("positions", positions, persistent=False)
        self.counts_rows = counts_rows

    def update(self, acts: Tensor) -> None:
        self.counts[self.positions] += (acts != 0).sum(0)
        if self.counts_rows:
            self.n += acts.shape[0]


class ShardedCLT(ShardedSAE):
    """The cross-layer transcoder's layer: steps, decoding and statistics of a member."""

    @classmethod
    def feature_layers(cls, module: SparseAutoencoder) -> int:
        return module.n_layers

    @classmethod
    def sharded_dims(cls, module: SparseAutoencoder) -> dict[str, ShardSpec]:
        dims: dict[str, ShardSpec] = {
            "W_enc": (2, None),
            "b_enc": (1, None),
            "tokens_since_fired": (1, (module.n_layers, -1)),
        }
        return dims | {f"W_dec.{s}": (0, None) for s in range(module.n_layers)}

    def on_sharded(self) -> None:
        shard, layers = self.shard, self.n_layers
        self.n_features = layers * shard.local_size
        first = shard.latent_rank == 0
        self.val_l0 = _ShardedL0(counts_rows=first)
        self.val_dead = _ShardedLayerDeadFraction(
            shard.global_indices(), layers * shard.d_sae, counts_rows=first
        )

    def partial_terms(self) -> set[str]:
        return {"sparsity", "preact"}

    # ------------------------------------------------------------- the map
    def reconstruct(self, acts: Tensor) -> Tensor:
        lead = acts.shape[:-2]
        partial = acts.new_zeros(*lead, self.n_layers, self.d_out)
        for source, W in enumerate(self.W_dec):
            written = acts[..., source, :] @ W.reshape(self.d_sae, -1).to(acts.dtype)
            written = written.reshape(*lead, self.n_layers - source, self.d_out)
            partial = partial + F.pad(written, (0, 0, source, 0))
        return reduce_from_shards(partial, self.shard.latent_group) + self.b_dec.to(acts.dtype)

    def decode_layer(self, target: int, acts: Tensor) -> Tensor:
        """Layer ``target``'s MLP output (model units) from this member's activations of layers
        0..target: the partial outputs summed over the latent group, then ``b_dec``."""
        partial = acts.new_zeros(*acts.shape[:-2], self.d_out)
        for source in range(target + 1):
            W = self.W_dec[source][:, target - source].to(acts.dtype)
            partial = partial + acts[..., source, :] @ W
        written = reduce_from_shards(partial, self.shard.latent_group)
        return (written + self.b_dec[target].to(acts.dtype)) / self.output_scale[target]

    # ------------------------------------------------------------- steps
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return SparseAutoencoder.training_step(self, batch, batch_idx)

    def step_and_statistics(self, batch: Any) -> tuple[Tensor, Tensor, Any]:
        # The latent group's rows of the global batch (gathered), then the CLT's own step.
        rows = self._rows(batch)
        return CrossLayerTranscoder.step_and_statistics(self, rows)

    @torch.no_grad()
    def _training_statistics(
        self,
        y_n: Tensor,
        out: SAEOutput,
        terms: dict[str, Tensor],
        loss: Tensor,
        read: Tensor | None = None,
    ) -> Tensor:
        """The CLT's step sums: per-feature counts over the data group (each member its
        features), partial terms over the latent group, the rest over the data group."""
        shard = self.shard
        values = self._global_terms(terms)
        y64, y_hat64 = y_n.double(), out.x_hat.detach().double()
        L, n_rows = self.n_layers, y_n.shape[0]
        read_sq = y64.new_zeros(()) if read is None else read.double().pow(2).sum()
        fired = (out.acts != 0).reshape(-1, self.n_features).sum(0).double()
        scalars = [y64.new_tensor(float(n_rows)), read_sq, sum(values.values()), *values.values()]
        sums = torch.cat(
            [
                fired,
                y64.sum(0).reshape(-1),
                (y_hat64 - y64).pow(2).sum((0, 2)),
                y64.pow(2).sum((0, 2)),
                torch.stack(scalars),
            ]
        )
        all_reduce(sums, shard.data_group)
        F_, D = self.n_features, L * self.d_out
        fired, sum_y = sums[:F_], sums[F_ : F_ + D].reshape(L, self.d_out)
        sq_err, sum_sq = sums[F_ + D : F_ + D + L], sums[F_ + D + L : F_ + D + 2 * L]
        rest = sums[F_ + D + 2 * L :]
        n = rest[0]
        self.tokens_since_fired += n.long()
        self.tokens_since_fired.masked_fill_(fired > 0, 0)
        self._clock_version_at_statistics = self._clock_version()
        latent = torch.cat([fired.reshape(L, self.d_sae).sum(-1), self.dead_mask().sum()[None]])
        active, dead = all_reduce(latent.double(), shard.latent_group).split([L, 1])
        variance = sum_sq - sum_y.pow(2).sum(-1) / n
        return torch.cat([rest, sq_err, variance, active, sum_sq.sum()[None], dead])

    def _report_training_statistics(self, term_names: list[str], scalars: list[float]) -> None:
        shard = self.shard
        CrossLayerTranscoder._report_training_statistics(
            self, term_names, scalars, shard.data_size, self.n_layers * shard.d_sae
        )
        self._known_dead_count = None  # the count was the group's: dead_count() is the member's

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = self._rows(batch)
        out = self.forward_normalized(self.normalize(x))
        y_n = self.normalize_target(y)
        values = {k: v.float() for k, v in self._global_terms(self.loss_terms(y_n, out)).items()}
        self.log("val/loss", torch.stack(list(values.values())).sum(), sync_dist=True)
        for name, value in values.items():
            self.log(f"val/loss/{name}", value, sync_dist=True)
        # The reconstruction is replicated over the latent group: one member counts it.
        rows = y_n.shape[0] if self.shard.latent_rank == 0 else 0
        x_hat, y_n = out.x_hat[:rows], y_n[:rows]
        self.val_l0.update(out.acts.reshape(out.acts.shape[0], -1))
        width = self.n_layers * self.d_out
        self.val_mse.update(x_hat.reshape(rows, width), y_n.reshape(rows, width))
        self.val_fvu.update(x_hat.reshape(rows, width), y_n.reshape(rows, width))
        self.val_dead.update(out.acts.reshape(out.acts.shape[0], -1))
        for layer, metric in enumerate(self.val_layer_fvu):
            metric.update(x_hat[:, layer], y_n[:, layer])
            self.log(f"val/fvu/layer{layer}", metric)
        for name in ("l0", "mse", "fvu"):
            self.log(f"val/{name}", getattr(self, f"val_{name}"))
        self.log("val/dead_fraction", self.val_dead)


class ShardedJumpReLUCLT(ShardedCLT):
    @classmethod
    def sharded_dims(cls, module: SparseAutoencoder) -> dict[str, ShardSpec]:
        # JumpReLU's per-feature thresholds (BatchTopK's "threshold" is one per layer, replicated).
        return super().sharded_dims(module) | {"threshold": (1, None)}


class ShardedTopKCLT(ShardedCLT):
    def activation(self, pre: Tensor) -> Tensor:
        """TopK exact across the latent group: one selection per (row, layer), or per row over
        every layer (``topk_scope: all``)."""
        scores = torch.relu(pre.detach()) * self.written_norms().detach().to(pre.dtype)
        width = self.d_sae if self.hparams.topk_scope == "layer" else self.n_features
        rows = scores.reshape(-1, width)
        kept = self._row_top_k(rows, self.k).to_dense(width) != 0
        return torch.where(kept.reshape(pre.shape), torch.relu(pre), 0)

    def layer_activation(self, layer: int, pre: Tensor) -> Tensor:
        """One layer's TopK (``topk_scope: layer``) across the latent group, as the replacement
        model meets it; over all layers it is refused, as in one process."""
        if self.hparams.topk_scope == "all":
            return super().layer_activation(layer, pre)  # raises, saying why
        scores = torch.relu(pre.detach()) * self.written_norms()[layer].detach().to(pre.dtype)
        rows = scores.reshape(-1, self.d_sae)
        kept = self._row_top_k(rows, self.k).to_dense(self.d_sae) != 0
        return torch.where(kept.reshape(pre.shape), torch.relu(pre), 0)


class ShardedBatchTopKCLT(ShardedCLT):
    def keep_mask(self, scores: Tensor) -> Tensor:
        """BatchTopK's selection (``BatchTopKCrossLayerTranscoder.keep_mask``) over the whole
        dictionary: in training over the global batch (every rank of the mesh), in eval without
        a threshold over the rows given (the latent group's). ``scores`` [groups, rows, this
        member's features of the group]."""
        if not self.training and int(self.threshold_updates) > 0:
            return scores > self.threshold.to(scores.dtype)[:, None, None]
        shard = self.shard
        group = shard.world_group if self.training else shard.latent_group
        groups, rows, width = scores.shape
        global_rows = rows * (shard.data_size if self.training else 1)
        count = min(self.k * global_rows, global_rows * width * shard.latent_size)
        flat = scores.reshape(groups, -1)
        candidates = flat.topk(min(count, flat.shape[1]), dim=-1, sorted=False).values
        everyone = gather_last(candidates, group)  # [groups, members x c]
        cutoff = everyone.topk(count, dim=-1, sorted=False).values.amin(-1)
        # The batch's order runs over (row, layer) pairs in the all-layers scope, each holding
        # a slice of every member's features: those pairs are the units the members interleave.
        units = scores.reshape(groups, -1, self.d_sae)
        keep = self._above_and_first_ties_in_batch_order(units, cutoff, count, group)
        mask = keep.view_as(scores) & (scores > 0)
        if self.training:
            self._update_threshold(torch.where(mask, scores, torch.inf).reshape(groups, -1))
        return mask

    @torch.no_grad()
    def _update_threshold(self, kept: Tensor) -> None:
        """The running per-group threshold from the smallest kept score over the whole mesh
        (``shard.world_group``), named explicitly: inside member placement the mesh is a block
        of ranks, and the variant's own reduction (over the default group) is switched off
        there, so each rank of the block would keep the minimum of its own slice."""
        smallest = kept.min(dim=-1, keepdim=True).values.to(self.threshold.dtype)
        all_reduce(smallest, self.shard.world_group, dist.ReduceOp.MIN)
        with stepping_alone():  # already the mesh's minimum: the variant reduces nothing more
            super()._update_threshold(smallest)

    def _above_and_first_ties_in_batch_order(
        self, units: Tensor, cutoff: Tensor, count: int, group: Any
    ) -> Tensor:
        """Per group, the entries of ``units`` [groups, units, features] above its ``cutoff``
        and, of those tied at it, the first in the whole batch's order until ``count`` are kept
        (``ShardedBatchTopK._above_and_first_ties``, one group per layer or one for all).

        The order is (data block, unit, latent member, feature); ``group``'s ranks are the data
        blocks' latent groups in turn (world rank = data block x latent size + latent rank).
        One all_gather tells each member every member's ties per unit."""
        shard = self.shard
        n_groups, n_units, _ = units.shape
        at = cutoff[:, None, None]
        tied = units == at
        mine = torch.cat([tied.sum(-1), (units > at).sum((1, 2))[:, None]], dim=1)
        counts = gather_last(mine.flatten(), group).view(-1, n_groups, n_units + 1)
        ties_left = count - counts[:, :, -1].sum(0)  # [groups]
        per_unit = counts[:, :, :-1].reshape(-1, shard.latent_size, n_groups, n_units)
        in_order = per_unit.permute(2, 0, 3, 1).reshape(n_groups, -1)
        before = (in_order.cumsum(-1) - in_order).view(n_groups, -1, n_units, shard.latent_size)
        position = dist.get_rank(group) if group is not None else 0
        mine_before = before[:, position // shard.latent_size, :, shard.latent_rank]
        tie_number = mine_before[..., None] + tied.long().cumsum(-1)
        return (units > at) | (tied & (tie_number <= ties_left[:, None, None]))

"""Dead-feature resampling: point dead features at what the SAE currently reconstructs worst."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_sae.callbacks._reporting import (
    decided,
    gathered,
    log_scalars,
    measures_here,
    per_sae_state,
    sae_input_and_target,
    saes,
    scoped,
    states_by_sae,
)
from lightning_sae.metrics.similarity import import_faiss
from lightning_sae.models.base import SparseAutoencoder
from lightning_sae.parallel.sharded import LatentShard, shard_of

Strategy = Literal["worst", "loss_weighted", "cluster"]
STRATEGIES = ("worst", "loss_weighted", "cluster")


def _unit_rows(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def pick_worst(residuals: Tensor, losses: Tensor, n: int) -> Tensor:
    """Residual directions of the ``n`` worst-reconstructed inputs."""
    return _unit_rows(residuals[losses.topk(min(n, len(losses))).indices])


def pick_loss_weighted(
    residuals: Tensor, losses: Tensor, n: int, generator: torch.Generator
) -> Tensor:
    """Residual directions of inputs drawn with probability proportional to loss squared.

    As in Anthropic's "Towards Monosemanticity" resampling, without replacement.
    """
    weights = losses.double().pow(2).cpu()
    n = min(n, int((weights > 0).sum()))
    if n == 0:  # every input reconstructed exactly: nothing to aim at
        return residuals[:0]
    chosen = torch.multinomial(weights, n, replacement=False, generator=generator)
    return _unit_rows(residuals[chosen.to(residuals.device)])


def pick_clustered(
    residuals: Tensor,
    losses: Tensor,
    n: int,
    candidate_fraction: float,
    n_clusters: int | None,
    seed: int,
) -> Tensor:
    """Directions spread over clusters of the worst-reconstructed residuals.

    Picking the n worst inputs can pick the same missing feature many times, since a rare
    feature that the SAE lacks makes every input containing it reconstruct badly. Instead the
    worst ``candidate_fraction`` of inputs are clustered by residual direction (spherical
    k-means, faiss) and features are handed out round-robin over the clusters, worst mean loss
    first: the first feature given a cluster takes its centroid, later ones (only when there are
    fewer clusters than dead features) take its members, worst first.
    """
    faiss = import_faiss()
    n_candidates = max(n, int(candidate_fraction * len(losses)))
    worst = losses.topk(min(n_candidates, len(losses))).indices
    points, point_losses = _unit_rows(residuals[worst]).float().cpu(), losses[worst].cpu()
    k = min(n_clusters or n, len(points))
    kmeans = faiss.Kmeans(
        points.shape[1], k, niter=20, seed=seed, spherical=True, min_points_per_centroid=1
    )
    kmeans.train(points.numpy())
    centroids = _unit_rows(torch.from_numpy(kmeans.centroids).float())
    assignment = torch.from_numpy(kmeans.index.search(points.numpy(), 1)[1][:, 0]).long()
    mean_loss = torch.zeros(k).index_add_(0, assignment, point_losses.float())
    mean_loss /= torch.bincount(assignment, minlength=k).clamp_min(1)
    clusters = mean_loss.argsort(descending=True)
    directions = []
    for i in range(min(n, len(points))):
        cluster, rank = int(clusters[i % k]), i // k
        if rank == 0:
            directions.append(centroids[cluster])
            continue
        members = (assignment == cluster).nonzero().squeeze(1)
        members = members[point_losses[members].argsort(descending=True)]
        fallback = rank - 1 >= len(members)  # a cluster smaller than its share: reuse the centroid
        directions.append(centroids[cluster] if fallback else points[members[rank - 1]])
    return torch.stack(directions).to(residuals.device)


def restart_adam_slices(
    state: dict[str, Any],
    feature_dim: int,
    indices: Tensor,
    live: Tensor,
    shard: LatentShard | None = None,
) -> None:
    """Adam statistics for restarted features: first moment 0, second the live features' mean.

    A stale first moment would push a new direction straight back where the old one went. A
    zeroed second moment is no fresh start either: Adam's bias correction follows the tensor's
    step count, long past the first steps, so it no longer scales the new slices' small
    moments up, and their steps come out several times larger than everyone else's until the
    second moment has built up (about 1 / (1 - beta2) steps). With the live mean they start at
    the common scale. ``max_exp_avg_sq`` (amsgrad) is treated as the second moment. For a
    latent-sharded SAE (``shard``) the mean is over the live features of every member.
    """
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        if key not in state:
            continue
        by_feature = state[key].movedim(feature_dim, 0)  # a view: writes reach the state
        if shard is not None and key != "exp_avg":
            sums = torch.cat([by_feature[live].sum(0).flatten().double(), live.sum()[None]])
            sums = shard.sum_over_latents(sums)
            mean = (sums[:-1] / sums[-1]).view_as(by_feature[0]).to(by_feature.dtype)
            by_feature[indices] = mean if sums[-1] > 0 else 0.0
        elif key == "exp_avg" or not live.any():
            by_feature[indices] = 0.0
        else:
            by_feature[indices] = by_feature[live].mean(0)


def _layer_parts(
    sae: SparseAutoencoder,
    state: dict[str, Any],
    feature_dim: int,
    layer: list[int | str],
    indices: Tensor,
    live: Tensor,
) -> list[tuple[dict[str, Any], int, Tensor, Tensor]]:
    """(state, feature dim, restarted indices, live mask) for each part of a parameter that
    holds one layer's features of a cross-layer transcoder, whose ``reset_features`` names
    (parameter, feature dim, layer): an int for a parameter of that layer alone
    (``W_dec[s]``), ``"stacked"`` for one with the layers along dim 0 (``W_enc``, ``b_enc``).
    The indices and the mask are flat over every layer's features (``layer * d_sae + j``).
    An SAE's (parameter, feature dim) is one part, as it is."""
    if not layer:
        return [(state, feature_dim, indices, live)]
    d_sae = sae.d_sae
    live_by_layer = live.view(-1, d_sae)

    def in_layer(source: int) -> Tensor:
        chosen = indices[(indices // d_sae) == source]
        return chosen % d_sae

    if layer[0] != "stacked":
        source = int(layer[0])
        return [(state, feature_dim, in_layer(source), live_by_layer[source])]
    parts = []
    for source in range(live_by_layer.shape[0]):
        # A view of the layer's statistics: writes reach the optimizer's state.
        sub_state = {key: value[source] for key, value in state.items() if key != "step"}
        parts.append((sub_state, feature_dim - 1, in_layer(source), live_by_layer[source]))
    return parts


def _whole(sae: SparseAutoencoder, per_feature: Tensor) -> Tensor:
    """A per-feature tensor over the whole dictionary (a latent-sharded SAE holds a slice)."""
    shard = shard_of(sae)
    return per_feature if shard is None else shard.gather_features(per_feature)


def _decoder_row_norms(sae: SparseAutoencoder) -> Tensor | float:
    """Each latent's whole decoder row norm (every site it writes), or 1 where the decoder is not
    one [d_sae, ...] tensor (a cross-layer transcoder's rows span several tensors)."""
    W_dec = sae.W_dec
    if not isinstance(W_dec, Tensor) or W_dec.shape[0] != sae.W_enc.shape[-1]:
        return 1.0
    return W_dec.flatten(1).norm(dim=1)


class DeadFeatureResampler(Callback):
    """Re-initialise dead features towards inputs the SAE reconstructs badly.

    At each resampling step, for the features ``pl_module.dead_mask()`` reports dead, it draws
    ``n_batches`` batches of ``batch_size`` inputs through the datamodule's ``sample(n, seed)``
    (the training loader's position is untouched), measures each input's squared reconstruction
    error, and picks one residual direction (input minus reconstruction, normalised space) per
    dead feature by ``strategy``:

    - ``worst``: the worst-reconstructed inputs.
    - ``loss_weighted``: inputs sampled with probability proportional to loss squared.
    - ``cluster``: k-means (faiss) over the worst residuals, spread evenly over the worst
      clusters so that one missing feature is not picked many times.

    The module restarts those features (``pl_module.reset_features``): decoder row = the unit
    direction, encoder column = the same direction scaled to ``encoder_norm_factor`` x the mean
    encoder norm of live features times their decoder norm (so a restarted latent writes that
    fraction of what a live one writes, whether the rows are held at unit norm or left free),
    ``b_enc`` 0, the dead clock reset, and whatever per-feature state the variant has (Gated's
    magnitude path, JumpReLU's threshold, ApproxL0's frequency window). In Adam's state for every
    restarted slice the first moment is zeroed and the second set to the live features' mean, so
    that the new rows take steps the size of the others' (zeroed second moments under the tensor's
    old step count made the first ~50 steps 3-6 times larger). The candidates are measured in eval
    mode (``pl_module.measuring()``), which joins no collective, on rank 0 alone; the choice is
    broadcast, so DDP ranks stay identical. It logs ``resampling/n_resampled``.

    In an ``SAEGroup`` every member is resampled at the same steps, each from its own hook's
    samples and with its own generator (seeded alike), so each member's resampling is the one
    it gets when trained alone; it logs ``<member>/resampling/n_resampled``.

    Args:
        every_n_steps: resample every this many optimizer steps, or
        at_steps: resample at exactly these steps (give one of the two).
        last_step: no resampling after this step.
        strategy: ``worst``, ``loss_weighted`` or ``cluster``.
        n_batches: batches of candidate inputs drawn per resampling.
        batch_size: inputs per batch.
        encoder_norm_factor: what a restarted latent writes relative to the mean live latent
            (encoder norm x decoder norm; with unit rows, the mean live encoder norm).
        candidate_fraction: ``cluster``: fraction of the drawn inputs (the worst) clustered.
        n_clusters: ``cluster``: number of clusters; default the number of dead features.
        seed: seed of this callback's own generator (sample seeds, loss-weighted draws).
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        at_steps: list[int] | None = None,
        last_step: int | None = None,
        strategy: Strategy = "cluster",
        n_batches: int = 8,
        batch_size: int = 4096,
        encoder_norm_factor: float = 0.2,
        candidate_fraction: float = 0.25,
        n_clusters: int | None = None,
        seed: int = 0,
    ) -> None:
        if (every_n_steps is None) == (at_steps is None):
            raise ValueError(
                "DeadFeatureResampler needs exactly one of every_n_steps (a period) and "
                "at_steps (a list of steps)."
            )
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}.")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
        if n_batches < 1 or batch_size < 1:
            raise ValueError("n_batches and batch_size must be >= 1.")
        if not 0 < candidate_fraction <= 1:
            raise ValueError(f"candidate_fraction must be in (0, 1], got {candidate_fraction}.")
        self.every_n_steps, self.at_steps = every_n_steps, set(at_steps or ())
        self.last_step, self.strategy = last_step, strategy
        self.n_batches, self.batch_size = n_batches, batch_size
        self.encoder_norm_factor = encoder_norm_factor
        self.candidate_fraction, self.n_clusters = candidate_fraction, n_clusters
        self.seed = seed
        self.generators: dict[str, torch.Generator] = {}  # by SAE name ("" for a single SAE)
        self.resampled: dict[str, int] = {}
        self.last_resample_step = -1

    @property
    def total_resampled(self) -> int:
        """Features resampled so far, over every SAE."""
        return sum(self.resampled.values())

    def _generator(self, name: str) -> torch.Generator:
        if name not in self.generators:
            self.generators[name] = torch.Generator().manual_seed(self.seed)
        return self.generators[name]

    def is_due(self, step: int) -> bool:
        if step <= 0 or step == self.last_resample_step:
            return False
        if self.last_step is not None and step > self.last_step:
            return False
        if self.every_n_steps is not None:
            return step % self.every_n_steps == 0
        return step in self.at_steps

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not callable(getattr(trainer.datamodule, "sample", None)):
            raise ValueError(
                "DeadFeatureResampler draws candidate inputs with the datamodule's "
                "sample(n, seed); this run has no datamodule with such a method."
            )

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.is_due(step):
            self.resample(trainer, pl_module)
            self.last_resample_step = step

    @torch.no_grad()
    def resample(self, trainer: Trainer, pl_module: LightningModule) -> int:
        """Resample the dead features of every SAE now; returns how many were resampled."""
        named = saes(pl_module)
        plans = None
        # A latent-sharded forward joins its latent group's collectives, so there every rank
        # measures; rank 0's plan still decides for all. A placed member's rank plans for it.
        if measures_here(trainer, pl_module):
            plans = {name: self._plan(trainer, pl_module, name) for name in named}
        plans = decided(trainer, pl_module, plans)
        total, done = 0, {}
        for name, sae in named.items():
            plan = plans[name]
            self._generator(name).set_state(plan["generator_state"])  # ranks stay in step
            indices = plan["indices"].to(sae.device)
            if len(indices):
                self._apply(
                    trainer,
                    sae,
                    indices,
                    plan["directions"],
                    plan["encoder_norm"],
                    plan.get("encoder_directions"),
                )
            self.resampled[name] = self.resampled.get(name, 0) + len(indices)
            total += len(indices)
            done[name] = (len(indices), plan["n_dead"])
        reports = gathered(pl_module, done)
        if trainer.is_global_zero:
            for name, (n, n_dead) in reports.items():
                log_scalars(trainer, {scoped(name, "resampling/n_resampled"): float(n)})
                rank_zero_info(
                    f"step {trainer.global_step}: {scoped(name, 'resampled')} {n} of "
                    f"{n_dead} dead features ({self.strategy})"
                )
        return total

    def _plan(self, trainer: Trainer, pl_module: LightningModule, name: str = "") -> dict[str, Any]:
        sae, generator = saes(pl_module)[name], self._generator(name)
        dead = _whole(sae, sae.dead_mask())
        dead_indices = dead.nonzero().squeeze(1).cpu()
        plan: dict[str, Any] = {"n_dead": len(dead_indices), "indices": dead_indices[:0]}
        if len(dead_indices):
            residuals, losses, inputs = self._residuals(trainer, pl_module, name)
            n = len(dead_indices)
            if self.strategy == "worst":
                directions = pick_worst(residuals, losses, n)
            elif self.strategy == "loss_weighted":
                directions = pick_loss_weighted(residuals, losses, n, generator)
            else:
                seed = int(torch.randint(2**31 - 1, (), generator=generator))
                directions = pick_clustered(
                    residuals, losses, n, self.candidate_fraction, self.n_clusters, seed
                )
            # Per feature (the last axis; a cross-layer transcoder's per layer, flattened), the
            # size a live latent writes: encoder norm x decoder norm (rows left free, as the
            # standard SAE's, need not be at the unit norm a restarted row starts at).
            written = sae.W_enc.norm(dim=-2) * _decoder_row_norms(sae)
            encoder_norms = _whole(sae, written.reshape(-1))[~dead]
            plan.update(
                indices=dead_indices[: len(directions)],
                directions=directions.cpu(),
                encoder_norm=float(encoder_norms.mean()) if len(encoder_norms) else 1.0,
            )
            if getattr(sae, "maps_sites", False):
                # A transcoder's encoder reads another site than its decoder writes.
                plan["encoder_directions"] = sae.restart_encoder_directions(
                    directions, inputs, residuals
                ).cpu()
        plan["generator_state"] = generator.get_state()
        return plan

    def _residuals(
        self, trainer: Trainer, pl_module: LightningModule, name: str = ""
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(residual, squared error, input) of each candidate row, in the SAE's normalised
        space; the residual is the target's (the output site's, for a transcoder)."""
        sae, generator = saes(pl_module)[name], self._generator(name)
        residuals, losses, inputs = [], [], []
        for _ in range(self.n_batches):
            seed = int(torch.randint(2**62, (), generator=generator))
            sample = trainer.datamodule.sample(self.batch_size, seed=seed)
            x, target = sae_input_and_target(pl_module, name, sample)
            x_n = sae.normalize(x.to(sae.device))
            y_n = x_n if target is x else sae.normalize_target(target.to(sae.device))
            # Rank 0 alone: a training-mode forward could enter a collective (BatchTopK).
            with sae.measuring():
                residual = y_n - sae.forward_normalized(x_n).x_hat
            # A cross-layer transcoder's rows are [layers, width]: one vector per row here.
            residual = residual.float().flatten(1)
            residuals.append(residual)
            losses.append(residual.pow(2).sum(-1))
            inputs.append(x_n.float().flatten(1))
        return torch.cat(residuals), torch.cat(losses), torch.cat(inputs)

    def _apply(
        self,
        trainer: Trainer,
        sae: SparseAutoencoder,
        indices: Tensor,
        directions: Tensor,
        encoder_norm: float,
        encoder_directions: Tensor | None = None,
    ) -> None:
        live = ~sae.dead_mask()  # before the reset clears the restarted features' clocks
        touched = sae.reset_features(
            indices, directions, self.encoder_norm_factor * encoder_norm, encoder_directions
        )
        shard = shard_of(sae)
        if shard is not None:  # Adam's state holds this member's latents only
            indices = sae.local_feature_indices(indices)
        for optimizer in trainer.optimizers:
            for param, feature_dim, *layer in touched:
                state = optimizer.state.get(param, {})
                for part in _layer_parts(sae, state, feature_dim, layer, indices, live):
                    restart_adam_slices(*part, shard)

    def state_dict(self) -> dict[str, Any]:
        states = {
            name: {
                "generator_state": self._generator(name).get_state(),
                "total_resampled": self.resampled.get(name, 0),
            }
            for name in (self.generators or {"": None})
        }
        return {**per_sae_state(states), "last_resample_step": self.last_resample_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_resample_step = state_dict["last_resample_step"]
        for name, state in states_by_sae(state_dict).items():
            self._generator(name).set_state(state["generator_state"])
            self.resampled[name] = state["total_resampled"]

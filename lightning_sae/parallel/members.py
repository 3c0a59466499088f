"""Member parallelism: an SAEGroup's members placed on ranks, each trained on the whole batch.

Under DDP every rank holds every member of a group and its Adam state. Here each member lives
on one rank (:func:`place_members`: the largest first, each on the least-loaded rank), so the
SAE and optimizer memory of a rank is its members' share of the group. Every step the ranks
exchange their slices of the global batch once (one ``all_to_all``: each rank receives, from
every rank, the rows of the hooks its own members read), and each member steps on the whole
global batch exactly as it would in one process: its step runs with collectives off
(:func:`~lightning_sae.models.base.stepping_alone`), since it already sees every row.

A member too large for one rank is split (:func:`shard_counts`: named in ``member_shards``, or
larger than the memory budget): its latents are sharded over a block of consecutive ranks of
its own, each rank of the block holding a slice (:class:`BlockShard`, the latent-sharded layer
of ``parallel/sharded.py`` with the block as its whole mesh). Every rank of the block receives
the whole global batch in the same exchange, so the split member's step is the latent-sharded
step with no rows to gather, its collectives on the block's process group only.

What the ranks share besides the rows:

- Logged values: each rank records its members' ``self.log`` calls; one ``all_gather_object``
  per step (and per validation epoch) hands every rank every member's values, and every rank
  logs all of them, so rank 0's loggers write every member and every rank logs the same keys.
- Checkpoints: a torch distributed checkpoint folder in which each member's weights and Adam
  state are written once, by the rank that holds it (a split member's per-latent tensors as
  DTensors over its block: each slice once); ``meta.pt`` holds the rest, each member's
  schedule, optimizer options and callback state taken from the (first) rank that holds it.
  The folder resumes on any number of ranks (members are found by name) and ``lightning-sae
  export`` writes one SAELens folder per member from it.
- Callbacks act on the rank's own members (``callbacks/_reporting.saes``); see
  docs/distributed.md for how each one measures and logs.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torchmetrics import Metric

from lightning_sae.files import METADATA_LIMIT, load_torch_file
from lightning_sae.models.base import SparseAutoencoder, stepping_alone
from lightning_sae.models.clt import CrossLayerTranscoder
from lightning_sae.models.group import MemberOptimizers, SAEGroup
from lightning_sae.parallel.checkpoint import META_FILENAME, check_dcp_metadata
from lightning_sae.parallel.layers import LAYERS, sharded_class
from lightning_sae.parallel.sharded import LatentShard, ShardSpec, shard_of, slice_to_shard
from lightning_sae.parallel.strategy import _create_adam_state, _flat_shapes, param_groups_by_name

GIB = 2**30
# float32 weight, its gradient and Adam's two moments: the bytes a trained parameter holds.
STATE_COPIES = 4


def member_bytes(sae: SparseAutoencoder) -> int:
    """Bytes of the member's weights, gradients and Adam moments (buffers are negligible)."""
    return sum(STATE_COPIES * p.numel() * p.element_size() for p in sae.parameters())


def place_members(
    costs: Mapping[str, int],
    world: int,
    budget_bytes: int | None = None,
    shards: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """member -> its (first) rank, balancing ``costs`` (bytes, proportional to the FLOPs of a
    step on the shared batch). The same on every rank: it depends only on its arguments.

    A member split over ``shards[name] > 1`` ranks (latent sharding, :func:`shard_counts`)
    takes that many consecutive ranks of its own, the largest such member first from rank 0,
    each of them holding ``1 / shards`` of its cost. Then the whole members, the largest first,
    each go to the rank that holds the least so far (ties to the lower rank), which may be a
    rank that also holds a slice.

    Raises a one-line ValueError when a member, or the placement, exceeds ``budget_bytes``, or
    when the split members need more ranks than there are.
    """
    shards = dict(shards or {})
    load = [0] * world
    placement: dict[str, int] = {}
    by_size = sorted(costs, key=lambda n: (-costs[n], n))
    split = [name for name in by_size if shards.get(name, 1) > 1]
    needed = sum(shards[name] for name in split)
    if needed > world:
        counts = ", ".join(f"{name}: {shards[name]}" for name in split)
        raise ValueError(
            f"the split members ({counts}) need {needed} devices of their own, more than the "
            f"{world} there are: add devices (trainer.devices / trainer.num_nodes) or split "
            "over fewer (trainer.member_shards, trainer.member_memory_gib)."
        )
    first = 0
    for name in split:
        placement[name] = first
        for rank in range(first, first + shards[name]):
            load[rank] += math.ceil(costs[name] / shards[name])
        first += shards[name]
    for name in by_size:
        if name in placement:
            continue
        if budget_bytes is not None and costs[name] > budget_bytes:
            raise ValueError(
                f"member {name!r} needs {costs[name] / GIB:.3g} GiB of weights, gradients and "
                f"Adam state, more than a rank's budget of {budget_bytes / GIB:.3g} GiB "
                "(trainer.member_memory_gib): raise it, make the member smaller "
                "(d_sae), or split its latents over devices (trainer.member_shards)."
            )
        rank = min(range(world), key=lambda r: (load[r], r))
        placement[name] = rank
        load[rank] += costs[name]
    if budget_bytes is not None and max(load) > budget_bytes:
        rank = max(range(world), key=lambda r: load[r])
        raise ValueError(
            f"the group does not fit: rank {rank} would hold {load[rank] / GIB:.3g} GiB of "
            f"members (budget {budget_bytes / GIB:.3g} GiB, trainer."
            f"member_memory_gib) with {sum(costs.values()) / GIB:.3g} GiB over {world} ranks: "
            "add devices (trainer.devices / trainer.num_nodes) or make members smaller."
        )
    return placement


def _splittable(sae: SparseAutoencoder, count: int) -> str | None:
    """Why ``sae`` cannot be split over ``count`` ranks (None: it can)."""
    layer = LAYERS.get(type(sae))
    if layer is None:
        return f"its class {type(sae).__name__} has no latent-sharded layer for member placement"
    if sae.hparams.d_sae % count:
        return f"d_sae={sae.hparams.d_sae} does not divide into {count} slices"
    if sae.hparams.get("compile"):
        return "init_args.compile is on (a sharded step holds collectives)"
    return None


def shard_counts(
    members: Mapping[str, SparseAutoencoder],
    world: int,
    budget_bytes: int | None = None,
    requested: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """member -> over how many consecutive ranks its latents are split (1: held whole).

    ``requested`` (``trainer.member_shards``) names members and their counts; any other member
    larger than ``budget_bytes`` (``trainer.member_memory_gib``) is split over the fewest ranks
    that bring its share within the budget and divide its ``d_sae``. Raises a one-line
    ValueError naming the option to change.
    """
    requested = dict(requested or {})
    unknown = sorted(set(requested) - set(members))
    if unknown:
        raise ValueError(
            f"trainer.member_shards names {unknown}, not members of the group (its members: "
            f"{', '.join(members)}): use the members' names."
        )
    counts = {}
    for name, sae in members.items():
        count = requested.get(name, 1)
        if name in requested:
            if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= world:
                raise ValueError(
                    f"trainer.member_shards[{name!r}] is {count!r}: it must be a whole number of "
                    f"devices from 1 to the {world} there are."
                )
            why = _splittable(sae, count) if count > 1 else None
            if why:
                raise ValueError(
                    f"member {name!r} cannot be split over {count} devices "
                    f"(trainer.member_shards): {why}; set another count, or 1."
                )
        elif budget_bytes is not None and member_bytes(sae) > budget_bytes:
            cost = member_bytes(sae)
            fitting = [
                n
                for n in range(2, world + 1)
                if math.ceil(cost / n) <= budget_bytes and _splittable(sae, n) is None
            ]
            if not fitting:
                why = _splittable(sae, 2) or "no device count divides its d_sae and fits"
                raise ValueError(
                    f"member {name!r} needs {cost / GIB:.3g} GiB of weights, gradients and Adam "
                    f"state, more than a rank's budget of {budget_bytes / GIB:.3g} GiB "
                    f"(trainer.member_memory_gib) even split over the {world} devices ({why}): "
                    "add devices, raise trainer.member_memory_gib, or make it smaller (d_sae)."
                )
            count = fitting[0]
        counts[name] = count
    return counts


def check_placeable(
    module: Any,
    world: int | None,
    budget_bytes: int | None,
    requested: Mapping[str, int] | None = None,
) -> None:
    """Refuse (ValueError, one line) a model member placement cannot train: not an SAEGroup,
    or, when the rank count is known, a group that cannot be split and placed within
    ``budget_bytes`` per rank."""
    if not isinstance(module, SAEGroup):
        raise ValueError(
            f"member_parallel places the members of an SAEGroup on ranks; the model is a "
            f"{type(module).__name__}: use model.class_path: SAEGroup, or train it with DDP "
            "(trainer.member_parallel: false) or trainer.latent_parallel."
        )
    if world is not None:
        members = dict(module.members.items())
        shards = shard_counts(members, world, budget_bytes, requested)
        costs = {name: member_bytes(sae) for name, sae in members.items()}
        place_members(costs, world, budget_bytes, shards)


@dataclass
class BlockShard(LatentShard):
    """The latent shard of a member split over a block of ranks under member placement.

    Every rank of the block already holds the whole global batch (the group's row exchange), so
    there are no rows to gather and no data-parallel group; the block is the shard's whole mesh.
    """

    def gather_rows(self, x: Tensor) -> Tensor:
        return x


def split_member(sae: SparseAutoencoder, block: dist.ProcessGroup, count: int) -> None:
    """Make ``sae`` its sharded layer, holding this rank's slice of ``count`` over ``block``."""
    sae.__class__ = sharded_class(type(sae))
    shard = BlockShard(
        d_sae=sae.d_sae,
        latent_rank=dist.get_rank(block),
        latent_size=count,
        data_size=1,
        latent_group=block,
        data_group=None,
        world_group=block,
        layers=type(sae).feature_layers(sae),  # a cross-layer transcoder's slice of each layer
    )
    slice_to_shard(sae, shard)


def member_sites(sae: SparseAutoencoder, hook: str | None) -> list[str | None]:
    """The hooks a member reads from a ``{hook: tensor}`` batch (None: the batch's only one)."""
    if isinstance(sae, CrossLayerTranscoder):  # maps sites and writes layers: its own lists
        return [*sae._hooks("in"), *sae._hooks("out")]
    if getattr(sae, "maps_sites", False):
        return [sae.input_hook, sae.output_hook]
    if getattr(sae, "writes_layers", False):
        return list(sae.hooks)
    return [hook]


_MISSING = object()


def merge_by_owner(values: Sequence[Any], owner: Mapping[str, int]) -> Any:
    """One checkpoint entry from every rank's (``values[r]``: rank r's): under a ``"members"``
    key each member's entry is the one of the rank that holds it; elsewhere the entries are the
    same on every rank that has one (loops, hyperparameters) and the first is taken. A rank
    without members may lack an entry (a schedule) that the others have."""
    present = [v for v in values if v is not _MISSING]
    if all(isinstance(v, dict) for v in present):
        merged = {}
        for key in dict.fromkeys(k for v in present for k in v):
            column = [v.get(key, _MISSING) if isinstance(v, dict) else _MISSING for v in values]
            if key == "members" and all(isinstance(v, dict) for v in column if v is not _MISSING):
                merged[key] = {
                    name: column[rank][name]
                    for name, rank in owner.items()
                    if isinstance(column[rank], dict) and name in column[rank]
                }
            else:
                merged[key] = merge_by_owner(column, owner)
        return merged
    if all(isinstance(v, list) for v in present):
        longest = max(len(v) for v in present)
        return [
            merge_by_owner(
                [v[i] if isinstance(v, list) and len(v) > i else _MISSING for v in values], owner
            )
            for i in range(longest)
        ]
    return present[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (in memory, between the run's own processes), in rank order."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def placement_of(module: Any) -> dict[str, int] | None:
    """member -> rank of a member-parallel group, or None when its members are not placed."""
    return getattr(module, "placement", None)


class MemberParallelGroup(SAEGroup):
    """An SAEGroup whose members live on the ranks :func:`place_members` chose.

    :class:`MemberParallelStrategy` gives a group this class once processes exist;
    ``configure_model`` then drops the members of other ranks and splits the latents of each
    member that :func:`shard_counts` splits over its block of ranks. ``member_names`` keeps
    every member's name in the group's order, ``placement`` its (first) rank, ``shards`` over
    how many ranks it is split (1: held whole).
    """

    placement: dict[str, int] | None = None
    member_names: list[str]
    shards: dict[str, int]
    budget_bytes: int | None = None
    member_shards: dict[str, int] | None = None

    def ranks_of(self, name: str) -> range:
        """The ranks that hold member ``name`` (one, or its block of consecutive ranks)."""
        first = self.placement[name]
        return range(first, first + self.shards[name])

    def configure_model(self) -> None:
        if self.placement is not None:
            return
        world, rank = dist.get_world_size(), dist.get_rank()
        members = dict(self.members.items())
        self.shards = shard_counts(members, world, self.budget_bytes, self.member_shards)
        costs = {name: member_bytes(sae) for name, sae in members.items()}
        self.placement = place_members(costs, world, self.budget_bytes, self.shards)
        self.member_names = list(self.members)
        self.sites = {
            name: member_sites(sae, self.hooks[name]) for name, sae in self.members.items()
        }
        split = [name for name in self.member_names if self.shards[name] > 1]
        clips_by_norm = self.trainer.gradient_clip_algorithm in (None, "norm")
        if split and self.trainer.gradient_clip_val and clips_by_norm:
            raise ValueError(
                "trainer.gradient_clip_val with gradient_clip_algorithm 'norm' is not "
                f"supported with split members ({', '.join(split)}): each rank would clip by "
                "its own slice's norm. Set trainer.gradient_clip_algorithm: value, or leave "
                "clipping to the members (model...init_args.gradient_clip_norm)."
            )
        # Every rank creates every block's process group, in the same order: new_group is a
        # collective of the whole world, even for the ranks outside the block.
        self.blocks: dict[str, dist.ProcessGroup] = {}
        for name in split:
            block = dist.new_group(list(self.ranks_of(name)))
            if rank in self.ranks_of(name):
                self.blocks[name] = block
        for name in self.member_names:
            if rank not in self.ranks_of(name):
                del self.members[name]
        for name, member in self.members.items():
            block = self.blocks.get(name)
            if block is not None:
                split_member(member, block, self.shards[name])
            for module in member.modules():
                if not isinstance(module, Metric):
                    continue
                if block is None:
                    # Each member's metrics see the whole batch on its own rank: nothing to sync
                    # (and a sync would be a collective that only this rank enters).
                    module.sync_on_compute = module._to_sync = False
                else:  # a split member's metrics count its slice: summed over its block
                    module.process_group = block
        idle = world - len({r for name in self.member_names for r in self.ranks_of(name)})
        if idle:
            rank_zero_warn(
                f"member_parallel: {len(self.member_names)} members on {world} ranks leaves "
                f"{idle} ranks without a member (they only serve data); use fewer devices, "
                "add members, or split a member over more (trainer.member_shards).",
                category=UserWarning,
            )
        self._recorded: list[tuple[str, Any, dict[str, Any]]] | None = None
        self._epoch_values: dict[str, list[float]] = {}
        self._epoch_metrics: dict[str, Metric] = {}
        self.exchanged_bytes = 0  # sent by this rank at the last exchange

    def _publishes(self, key: str) -> bool:
        """Whether this rank logs ``<member>/...``: a split member's values are the same on
        every rank of its block, and its first rank speaks for it (a key of no member: every
        rank that recorded it)."""
        first = self.placement.get(key.split("/", 1)[0])
        return first is None or first == dist.get_rank()

    # ----------------------------------------------------------------- rows
    def _needs(self, rank: int) -> list[str | None]:
        """The hooks rank ``rank``'s members read, in a fixed order (None: a plain batch)."""
        hooks = {
            hook
            for name in self.member_names
            if rank in self.ranks_of(name)
            for hook in self.sites[name]
        }
        return sorted(hooks, key=lambda hook: "" if hook is None else hook)

    def exchange_rows(self, batch: Any) -> Any:
        """The global batch of every hook this rank's members read, from each rank's slice.

        One ``all_to_all`` of bytes: rank r sends rank q its rows of the hooks q's members
        read, so a rank receives only what it trains on. A datamodule serves rank r slice r of
        the global batch, so the slices joined in rank order are the one-process batch.
        """
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        tensors = x if isinstance(x, Mapping) else {None: x}
        world = dist.get_world_size()
        needs = [self._needs(rank) for rank in range(world)]

        def pick(hook: str | None) -> Tensor:
            if hook is None and None not in tensors:
                return next(iter(tensors.values()))
            return tensors[hook]

        sends = [
            torch.cat([pick(h).contiguous().view(torch.uint8).reshape(-1) for h in hooks])
            if hooks
            else torch.empty(0, dtype=torch.uint8, device=next(iter(tensors.values())).device)
            for hooks in needs
        ]
        mine = needs[dist.get_rank()]
        shapes = [pick(h).shape for h in mine]
        dtypes = [pick(h).dtype for h in mine]
        sizes = [pick(h).numel() * pick(h).element_size() for h in mine]
        send = torch.cat(sends)
        received = torch.empty(sum(sizes) * world, dtype=torch.uint8, device=send.device)
        dist.all_to_all_single(received, send, [sum(sizes)] * world, [s.numel() for s in sends])
        self.exchanged_bytes = int(send.numel() - sends[dist.get_rank()].numel())
        parts = received.split(sizes * world)
        gathered = {}
        for i, hook in enumerate(mine):
            rows = [
                parts[r * len(mine) + i].view(dtypes[i]).reshape(shapes[i]) for r in range(world)
            ]
            gathered[hook] = torch.cat(rows)
        if not isinstance(x, Mapping):
            full = gathered.get(None, x)
        else:
            full = {hook: gathered[hook] for hook in mine if hook is not None}
        return (full, *batch[1:]) if isinstance(batch, (list, tuple)) else full

    # ----------------------------------------------------------------- logging
    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if self._recorded is None:
            super().log(name, value, *args, **kwargs)
        elif args:
            raise TypeError(f"log({name!r}, ...) under member placement takes keyword options")
        else:
            self._recorded.append((name, value, kwargs))

    @contextmanager
    def _recording(self) -> Iterator[list[tuple[str, Any, dict[str, Any]]]]:
        self._recorded = []
        try:
            yield self._recorded
        finally:
            self._recorded = None

    def _log_everywhere(self, records: list[tuple[str, Any, dict[str, Any]]]) -> None:
        """Every rank's records, logged on every rank in rank order (one collective)."""
        for rank_records in gather_objects(records):
            for name, value, kwargs in rank_records:
                super().log(name, value, **{**kwargs, "sync_dist": False})

    # ----------------------------------------------------------------- steps
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        batch = self.exchange_rows(batch)
        self.global_batch = batch  # what callbacks measure this step's members on
        with self._recording() as records, stepping_alone():
            loss = super().training_step(batch, batch_idx) if len(self.members) else None
        plain = [
            (n, float(v) if isinstance(v, Tensor) else v, kw)
            for n, v, kw in records
            if self._publishes(n)
        ]
        self._log_everywhere(plain)
        if loss is None:  # a rank without members: nothing to train, a loss autograd accepts
            return torch.zeros((), device=self.device, requires_grad=True)
        return loss

    def _evaluate(self, step: Any, batch: Any, batch_idx: int) -> None:
        batch = self.exchange_rows(batch)
        with self._recording() as records, stepping_alone():
            step(batch, batch_idx)
        for name, value, _ in records:
            if isinstance(value, Metric):
                self._epoch_metrics[name] = value
            else:  # Lightning's epoch value: the mean over batches (all the same size)
                self._epoch_values.setdefault(name, []).append(float(value))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(super().validation_step, batch, batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(super().test_step, batch, batch_idx)

    def _log_epoch(self) -> None:
        values = {name: sum(v) / len(v) for name, v in self._epoch_values.items()}
        for name, metric in self._epoch_metrics.items():
            # Every rank of a split member's block computes (a sync over the block); one logs.
            values[name] = float(metric.compute())
            metric.reset()
        self._epoch_values, self._epoch_metrics = {}, {}
        published = [(name, value, {}) for name, value in values.items() if self._publishes(name)]
        self._log_everywhere(published)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch()

    def on_test_epoch_end(self) -> None:
        self._log_epoch()

    def configure_optimizers(self) -> Any:
        if not self.members:  # a rank without members still steps, an optimizer of nothing
            return MemberOptimizers({})
        return super().configure_optimizers()


class MemberParallelStrategy(ModelParallelStrategy):
    """Each member of an SAEGroup on its ranks, trained on the whole global batch.

    Args:
        member_memory_gib: the most a rank may hold of members' weights, gradients and Adam
            state (GiB); a larger member is split over the fewest consecutive ranks that fit
            it, and placement fails in one line when nothing fits. None: no limit on CPU, the
            device's memory on a GPU.
        member_shards: members to split, by name, and over how many consecutive ranks each
            (``{"l3": 4}``: member l3's latents in four slices on four ranks of its own), as
            under ``latent_parallel``; the other members are held whole.
        **kwargs: ``ModelParallelStrategy``'s ``process_group_backend`` and ``timeout``.
    """

    def __init__(
        self,
        member_memory_gib: float | None = None,
        member_shards: Mapping[str, int] | None = None,
        **kwargs: Any,
    ) -> None:
        if member_memory_gib is not None and not member_memory_gib > 0:
            raise ValueError(
                f"member_memory_gib must be positive, got {member_memory_gib!r}: set "
                "trainer.member_memory_gib (or leave it out)."
            )
        if member_shards is not None and not isinstance(member_shards, Mapping):
            raise ValueError(
                f"member_shards must map member names to device counts, got {member_shards!r}: "
                "set trainer.member_shards, e.g. {l3: 4}."
            )
        super().__init__(**kwargs)
        self.member_memory_gib = member_memory_gib
        self.member_shards = dict(member_shards or {})
        self._meshes: dict[str, DeviceMesh] = {}

    def setup_environment(self) -> None:
        module = self.lightning_module
        check_placeable(module, None, None)
        devices = self.num_nodes * self.num_processes
        self._data_parallel_size, self._tensor_parallel_size = devices, 1
        super().setup_environment()
        module.__class__ = MemberParallelGroup
        module.budget_bytes = self._budget_bytes()
        module.member_shards = self.member_shards
        # Every rank logs every member's values, gathered (the same on every rank): Lightning's
        # advice to sync them at epoch level does not apply to the members' keys.
        names = "|".join(re.escape(name) for name in module.members)
        warnings.filterwarnings(
            "ignore",
            message=rf"It is recommended to use `self\.log\('({names})/",
            category=PossibleUserWarning,
        )

    def _budget_bytes(self) -> int | None:
        if self.member_memory_gib is not None:
            return int(self.member_memory_gib * GIB)
        if self.root_device.type == "cuda":
            return torch.cuda.get_device_properties(self.root_device).total_memory
        return None

    # ----------------------------------------------------------------- checkpoints
    def _saved_spec(self, name: str) -> tuple[str, ShardSpec] | None:
        """The member name and sharded spec of a per-latent tensor ``members.<member>.<tensor>``
        held on this rank (None: any other tensor)."""
        module = self.lightning_module
        parts = name.split(".", 2)  # members, <member>, <tensor>
        if len(parts) != 3 or parts[0] != "members" or parts[1] not in module.members:
            return None
        member = module.members[parts[1]]
        # A split member's class is its sharded layer already; a whole member's is looked up.
        layer = type(member) if shard_of(member) is not None else LAYERS.get(type(member))
        dims = layer.sharded_dims(member) if layer is not None else {}
        return (parts[1], dims[parts[2]]) if parts[2] in dims else None

    def _as_saved(self, name: str, tensor: Tensor) -> Tensor:
        """A split member's per-latent tensor (``members.<member>.<tensor>``) as a DTensor
        sharded over its block, so that each rank writes its slice and a load reshards; any
        other tensor as it is. A tensor kept flat but sharded through a view (a cross-layer
        transcoder's layer-major dead clock) is saved through that view, by whole members too,
        so that a folder resumes on any split; the view shares its storage: loads land in
        place."""
        found = self._saved_spec(name)
        if found is None or tensor.dim() == 0:
            return tensor
        member, (dim, view) = found
        local = tensor if view is None else tensor.view(view)
        if member not in self.lightning_module.blocks:  # held whole
            return local
        if member not in self._meshes:  # the block's ranks only: from_group is no collective
            block = self.lightning_module.blocks[member]
            self._meshes[member] = DeviceMesh.from_group(block, self.root_device.type)
        return DTensor.from_local(local, self._meshes[member], [Shard(dim)], run_check=False)

    def _viewed(self) -> dict[str, list[int]]:
        """This rank's members' tensors saved through a view, with their one-process (flat)
        shapes, for :func:`~lightning_sae.parallel.checkpoint.consolidate_checkpoint`."""
        viewed = {}
        for name, tensor in self.lightning_module.state_dict().items():
            found = self._saved_spec(name)
            if found is not None and found[1][1] is not None:
                viewed[name] = [tensor.numel() * self.lightning_module.shards[found[0]]]
        return viewed

    def lightning_module_state_dict(self) -> dict[str, Any]:
        state = self.lightning_module.state_dict()
        return {name: self._as_saved(name, tensor) for name, tensor in state.items()}

    def _optimizer_tensors(self, opt: Any, names: dict[int, str]) -> dict[str, Any]:
        return {
            names[id(p)]: {key: self._as_saved(names[id(p)], v) for key, v in s.items()}
            for p, s in opt.state.items()
        }

    def _optimizers_by_member(self) -> dict[str, Any]:
        optimizers = [getattr(o, "_optimizer", o) for o in self.optimizers]
        members = getattr(optimizers[0], "optimizers", {}) if optimizers else {}
        return dict(members)

    def _param_names(self) -> dict[int, str]:
        return {id(p): name for name, p in self.lightning_module.named_parameters()}

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """Adam state by member and parameter name; options (lr, betas) by member."""
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        names = self._param_names()
        state, groups = {}, {}
        for member, opt in getattr(optimizer, "optimizers", {}).items():
            state[member] = self._optimizer_tensors(opt, names)
            groups[member] = param_groups_by_name(opt, names)
        return {"state": state, "param_groups": groups}

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        path = Path(self.broadcast(str(filepath)))
        if self.global_rank == 0:
            if path.is_file():
                path.unlink()
            path.mkdir(parents=True, exist_ok=True)
        self.barrier()
        optimizers = checkpoint.pop("optimizer_states", [])
        optimizer = optimizers[0] if optimizers else {"state": {}, "param_groups": {}}
        # Every tensor is held by one rank (its member's): each is written once, by that rank.
        tensors = {"state_dict": checkpoint.pop("state_dict"), "optimizer": optimizer["state"]}
        dcp.save(tensors, checkpoint_id=path)
        checkpoint["member_param_groups"] = {"members": optimizer["param_groups"]}
        checkpoint["viewed_tensors"] = self._viewed()  # merged: every rank's members
        owner = self.lightning_module.placement
        meta = merge_by_owner(gather_objects(checkpoint), owner)
        if self.global_rank == 0:
            meta["member_placement"] = dict(owner)
            meta["member_shards"] = dict(self.lightning_module.shards)
            torch.save(meta, path / META_FILENAME)
        self.barrier()

    def load_checkpoint(
        self, checkpoint_path: Any, weights_only: bool | None = None
    ) -> dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        if not (path / META_FILENAME).is_file():
            raise ValueError(
                f"{path} is not a member-parallel checkpoint folder (no {META_FILENAME}): "
                "resume with the strategy that wrote it."
            )
        meta = load_torch_file(path / META_FILENAME, METADATA_LIMIT, what="checkpoint's meta.pt")
        if "member_param_groups" not in meta:
            raise ValueError(
                f"{path} was not written by member_parallel (it is a latent-sharded folder): "
                "resume it with trainer.latent_parallel, or start anew with --init_from."
            )
        names = self._param_names()
        state = {}
        for member, opt in self._optimizers_by_member().items():
            _create_adam_state(opt)
            state[member] = self._optimizer_tensors(opt, names)
        # In place: the entries are the live tensors (a split member's wrapped as DTensors
        # that view them), so torch reshards whatever split the folder was written with.
        tensors = {"state_dict": self.lightning_module_state_dict(), "optimizer": state}
        check_dcp_metadata(path, expected=_flat_shapes(tensors))
        dcp.load(tensors, checkpoint_id=path)
        saved_groups = meta["member_param_groups"]["members"]
        for member, opt in self._optimizers_by_member().items():
            for group, saved in zip(opt.param_groups, saved_groups[member], strict=True):
                group.update({k: v for k, v in saved.items() if k != "params"})
        return meta

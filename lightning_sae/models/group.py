"""Several SAEs trained in one run on one stream of batches: a sweep, or one SAE per hook.

:class:`SAEGroup` holds member SAEs (any variant, each with its own hyperparameters and hook)
and trains every one of them on every batch. Each member does exactly what it does alone: it
computes its own losses, advances its own dead-feature clock and updates its own metrics in its
own ``training_step`` / ``validation_step``, and its own optimizer and LR schedule (the ones its
``configure_optimizers`` builds) step it. The group only

- hands each member its input: the batch's tensor for the member's hook (a datamodule serving
  several hooks yields ``dict[hook, Tensor]``; one serving a single hook, a plain tensor);
- routes each member's ``self.log`` to ``<member>/<name>`` (``k16/train/loss``);
- transfers every member's step statistics to the host at once (one transfer per group step,
  not one per member) and logs them at once, as host tensors (:mod:`.host_log`);
- returns the plain sum of the members' losses, whose gradient with respect to a member's
  parameters is that member's own gradient, bit for bit;
- presents the members' optimizers and schedules to Lightning as one (:class:`MemberOptimizers`,
  :class:`MemberSchedulers`): automatic optimisation steps one optimizer per step, and manual
  optimisation would count every member's step in ``global_step``.

So a member trained in a group ends with the weights it would have trained to alone on the same
batches. Members' classes are looked up in the project's table (:data:`VARIANTS`), never
imported by name, so a checkpoint's hyperparameters cannot make this import code.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from lightning import LightningModule
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_sae.models import class_path_of, variant_class
from lightning_sae.models.base import SparseAutoencoder
from lightning_sae.models.host_log import LogEntry, log_host_scalars

MEMBER_KEYS = ("class_path", "init_args", "hook", "name")
# A name becomes a log prefix, a folder of the export and a state_dict key: no dots or slashes.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_EXAMPLE = (
    "e.g.\n  members:\n    - class_path: TopKSAE\n      init_args: {d_in: 384, d_sae: 3072, k: 32}"
    "\n      hook: blocks.3.hook_resid_post\n      name: k32"
)


def names_group(class_path: str) -> bool:
    """Whether a class path (any spelling jsonargparse or a user writes) names SAEGroup."""
    short = SAEGroup.__name__
    spellings = (class_path_of(SAEGroup), f"lightning_sae.models.{short}", f"lightning_sae.{short}")
    return class_path in (*spellings, short)


def _slug(hook: str) -> str:
    """A readable name part from a hook: ``blocks.3.hook_resid_post`` -> ``blocks_3_resid_post``."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", hook.replace("hook_", "")).strip("_-")


def reads_sites(sae: SparseAutoencoder) -> bool:
    """Whether ``sae`` picks its own hooks from a ``{hook: tensor}`` batch (a transcoder's two
    sites, a crosscoder's layers) instead of being handed one hook's tensor."""
    return getattr(sae, "maps_sites", False) or getattr(sae, "writes_layers", False)


def _default_name(cls: type[SparseAutoencoder], init_args: Mapping[str, Any], hook: Any) -> str:
    hook = init_args.get("input_hook") if hook is None else hook  # a transcoder: where it reads
    parts = [_slug(hook)] if isinstance(hook, str) and _slug(hook) else []
    parts.append(cls.__name__.removesuffix("SAE").lower() or "sae")
    if "k" in init_args:
        parts.append(f"k{init_args['k']}")
    return "-".join(parts)


def _member_error(label: str, index: int, message: str) -> ValueError:
    # The member's own messages name model.init_args.X; in a group that option lives elsewhere.
    message = message.replace("model.init_args.", f"model.init_args.members[{index}].init_args.")
    return ValueError(f"member {label} (model.init_args.members[{index}]): {message}")


def build_members(specs: list[Mapping[str, Any]]) -> dict[str, tuple[SparseAutoencoder, Any]]:
    """name -> (SAE, hook) from member specs; every mistake is a ValueError naming the member."""
    if not specs:
        raise ValueError(
            "model.init_args.members is empty: an SAEGroup needs at least one member, " + _EXAMPLE
        )
    built: dict[str, tuple[SparseAutoencoder, Any]] = {}
    where: dict[str, int] = {}
    for index, spec in enumerate(specs):
        label = f"#{index}"
        if not isinstance(spec, Mapping) or "class_path" not in spec:
            raise _member_error(label, index, f"needs a class_path (got {spec!r}); " + _EXAMPLE)
        unknown = sorted(set(spec) - set(MEMBER_KEYS))
        if unknown:
            raise _member_error(
                label, index, f"unknown keys {unknown}; a member has {', '.join(MEMBER_KEYS)}."
            )
        name = spec.get("name")
        label = repr(name) if name is not None else label
        source = f"model.init_args.members[{index}].class_path"
        try:
            cls = variant_class(str(spec["class_path"]), source)
        except ValueError as error:
            raise _member_error(label, index, str(error)) from None
        init_args = dict(spec.get("init_args") or {})
        hook = spec.get("hook")
        if hook is not None and not isinstance(hook, str):
            raise _member_error(label, index, f"hook must be a hook name, got {hook!r}.")
        if name is None:
            name = _default_name(cls, init_args, hook)
        elif not isinstance(name, str) or not _NAME.fullmatch(name):
            raise _member_error(
                label,
                index,
                "name must be letters, digits, '_' or '-' (it names log keys and export "
                "folders): rename it, e.g. k32.",
            )
        if name in built:
            raise ValueError(
                f"two members are named {name!r} (model.init_args.members[{where[name]}] and "
                f"[{index}]): give each its own name, e.g. name: {name}-{index} on the second."
            )
        try:
            # In a fresh context: LightningCLI hands the hyperparameters it instantiates the
            # group with to save_hyperparameters through a context variable, which would give
            # every member the group's hparams instead of its own.
            sae = contextvars.Context().run(cls, **init_args)
        except (TypeError, ValueError) as error:
            raise _member_error(repr(name), index, str(error)) from None
        if reads_sites(sae) and hook is not None:
            raise _member_error(
                repr(name),
                index,
                f"{cls.__name__} names its own sites (init_args.input_hook and output_hook, or "
                f"hooks), so the member's hook: {hook!r} would be ignored: remove it.",
            )
        built[name], where[name] = (sae, hook), index
    return built


class _States(Mapping):
    """The members' optimizer states as one read-only mapping, parameter -> state.

    Not a ChainMap: its lookups index each map in turn, and indexing an optimizer's state (a
    defaultdict) with another member's parameter would add it there.
    """

    def __init__(self, states: list[Mapping[Tensor, Any]]) -> None:
        self.states = states

    def __getitem__(self, param: Tensor) -> Any:
        for state in self.states:
            if param in state:
                return state[param]
        raise KeyError(param)

    def __iter__(self) -> Iterator[Tensor]:
        for state in self.states:
            yield from state

    def __len__(self) -> int:
        return sum(len(state) for state in self.states)


class MemberOptimizers(Optimizer):
    """The members' own optimizers, stepped as one after one forward and backward.

    Each member keeps the optimizer its ``configure_optimizers`` builds (class, options, fused
    kernel, state), so its update is the one it gets alone. ``param_groups`` and ``state`` are
    live views of the members' (the LR monitor, the resampler's Adam-state restart and Lightning's
    device moves see every member); the state dict holds each member's under its name.
    """

    def __init__(self, optimizers: dict[str, Optimizer]) -> None:
        # Not Optimizer.__init__: there is nothing of its own to hold; the members' optimizers
        # own the parameters and their state.
        self.optimizers = optimizers
        self.defaults: dict[str, Any] = {}
        self.param_groups = [group for opt in optimizers.values() for group in opt.param_groups]
        self.state = _States([opt.state for opt in optimizers.values()])  # type: ignore[assignment]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers.values():
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"members": {name: opt.state_dict() for name, opt in self.optimizers.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state_dict["members"][name])


class MemberSchedulers:
    """The members' LR schedules, stepped together (each against its member's optimizer)."""

    def __init__(self, optimizer: MemberOptimizers, schedulers: dict[str, Any]) -> None:
        self.optimizer, self.schedulers = optimizer, schedulers

    def step(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return {"members": {name: s.state_dict() for name, s in self.schedulers.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(state_dict["members"][name])


def _optimizer_and_scheduler(name: str, config: Any) -> tuple[Optimizer, Any]:
    """A member's ``configure_optimizers`` result as (optimizer, per-step scheduler or None)."""
    if isinstance(config, Optimizer):
        return config, None
    if isinstance(config, Mapping) and isinstance(config.get("optimizer"), Optimizer):
        scheduler = config.get("lr_scheduler")
        if isinstance(scheduler, Mapping):
            if scheduler.get("interval", "epoch") != "step" or scheduler.get("frequency", 1) != 1:
                raise ValueError(
                    f"member {name!r} schedules its learning rate per epoch; an SAEGroup steps "
                    "every member's schedule once per optimizer step."
                )
            scheduler = scheduler["scheduler"]
        return config["optimizer"], scheduler
    raise ValueError(
        f"member {name!r}: configure_optimizers returned {type(config).__name__}; a group member "
        "needs one optimizer and at most one per-step LR scheduler."
    )


def served_widths(data: Any) -> dict[str | None, int] | None:
    """hook -> width of what a datamodule serves, from ``d_ins`` (several hooks) or ``hook`` and
    ``d_in``; the key is None when the data names no hook (toy data); None when unknown."""
    d_ins = getattr(data, "d_ins", None)
    if isinstance(d_ins, Mapping):
        return {str(hook): int(width) for hook, width in d_ins.items()}
    d_in = getattr(data, "d_in", None)
    if d_in is None:
        return None
    hook = getattr(data, "hook", None)
    return {hook if isinstance(hook, str) else None: int(d_in)}


class SAEGroup(LightningModule):
    """Several SAEs trained together on every batch, each exactly as it would train alone.

    Logged names are the members' own under their name: ``<member>/train/loss``,
    ``<member>/val/fvu``, ... The state dict holds member ``m``'s weights under ``members.m.``.

    Args:
        members: one entry per SAE, each with ``class_path`` (one of the project's variants, by
            full path or short name), ``init_args`` (its constructor arguments), ``hook`` (the
            hook whose activations it reads; may be left out when the data serves one hook)
            and ``name`` (default: from hook, variant and k, e.g. ``blocks_3_resid_post-topk-k32``).
    """

    def __init__(self, members: list[dict[str, Any]]) -> None:
        super().__init__()
        self.save_hyperparameters()
        built = build_members(members)
        self.members = nn.ModuleDict({name: sae for name, (sae, _) in built.items()})
        # The configured hooks; setup resolves an unset one to the data's only hook.
        self.hooks: dict[str, str | None] = {name: hook for name, (_, hook) in built.items()}

    # Lightning hands the trainer only to LightningModules that are direct children; the
    # members sit one level further down, in a ModuleDict, and need it for global_step, their
    # LR schedule length and their own logging checks.
    @LightningModule.trainer.setter
    def trainer(self, trainer: Any) -> None:
        LightningModule.trainer.fset(self, trainer)
        for member in self._modules.get("members", {}).values():
            member.trainer = trainer

    def named_saes(self) -> dict[str, SparseAutoencoder]:
        return dict(self.members.items())

    # ----------------------------------------------------------------- data
    def check_data(self, data: Any) -> None:
        """Each member's hook is served and its width is the member's d_in; unset hooks resolve
        to the data's only hook. Raises a ValueError naming the member and the fix."""
        widths = served_widths(data)
        if widths is None:
            return
        named = [hook for hook in widths if hook is not None]
        for name, member in self.members.items():
            if reads_sites(member):
                if named:  # else data without hook names: its batches are checked per step
                    try:
                        member.check_sites({hook: widths[hook] for hook in named})
                    except ValueError as error:
                        raise ValueError(f"member {name!r}: {error}") from None
                continue
            hook = self.hooks[name]
            if hook is None and len(widths) > 1:
                raise ValueError(
                    f"member {name!r} has no hook, but the data serves {len(widths)}: "
                    f"{', '.join(named)}. Set its hook: to one of them."
                )
            if hook is None or not named:  # the data's only hook, or data without hook names
                width = next(iter(widths.values())) if hook is None else widths[None]
                self.hooks[name] = named[0] if hook is None and named else hook
            elif hook in widths:
                width = widths[hook]
            else:
                raise ValueError(
                    f"member {name!r} reads hook {hook!r}, which the data does not serve (it "
                    f"serves {', '.join(named)}). Set the member's hook: to one of those, or add "
                    f"{hook} to the data's hooks."
                )
            if width != member.d_in:
                where = f" at {self.hooks[name]}" if self.hooks[name] else ""
                raise ValueError(
                    f"member {name!r} has d_in {member.d_in}, but the data{where} has width "
                    f"{width}. Set its init_args.d_in: {width} (or its hook: to a hook of width "
                    f"{member.d_in})."
                )

    def input_of(self, name: str, batch: Any) -> Any:
        """Member ``name``'s input from a batch: its hook's tensor, or the batch's only one; the
        whole batch for a transcoder or crosscoder, which picks its own sites."""
        if reads_sites(self.members[name]):
            return batch
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        if not isinstance(x, Mapping):
            return x
        hook = self.hooks[name]
        if hook is None and len(x) == 1:
            return next(iter(x.values()))
        if hook not in x:
            raise ValueError(
                f"member {name!r} reads hook {hook!r}, but the batch holds {', '.join(x)}. Set "
                "the member's hook: to one of those."
            )
        return x[hook]

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            self.check_data(datamodule)
        for member in self.members.values():
            # What SparseAutoencoder.setup does besides its single-hook d_in check.
            if member.hparams.compile and not hasattr(
                member.forward_normalized, "_torchdynamo_orig_callable"
            ):
                member.forward_normalized = torch.compile(member.forward_normalized)

    # ----------------------------------------------------------------- steps
    @contextmanager
    def _speaking_for(
        self, name: str, member: SparseAutoencoder, into: list[LogEntry] | None = None
    ) -> Iterator[None]:
        """Route the member's ``self.log`` to the group's, under ``<name>/``; or, with ``into``,
        collect its calls there, for the group to log them with every other member's at once.

        Lightning records logs only from the module it runs the hook on (the group); the member
        logs through it for the duration of its step.
        """

        def log(key: str, value: Any, **kwargs: Any) -> None:
            if into is None:
                self.log(f"{name}/{key}", value, **kwargs)
            else:
                into.append((f"{name}/{key}", value, kwargs))

        member.log = log  # an instance attribute shadows the method until deleted
        try:
            yield
        except ValueError as error:  # a member's data or divergence error: say which member
            raise ValueError(f"member {name!r}: {error}") from error
        finally:
            del member.log

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        losses, statistics, reports = [], [], []
        for name, member in self.members.items():
            with self._speaking_for(name, member):
                loss, stats, report = member.step_and_statistics(self.input_of(name, batch))
            losses.append(loss)
            statistics.append(stats)
            reports.append(report)
        # One host transfer for the whole group: every member's statistics at once.
        values = torch.cat(statistics).tolist()
        logged: list[LogEntry] = []
        start = 0
        for (name, member), stats, report in zip(
            self.members.items(), statistics, reports, strict=True
        ):
            with self._speaking_for(name, member, into=logged):
                report(values[start : start + len(stats)])
            start += len(stats)
        # Then every member's scalars in one go, as host tensors (no copy back to the device).
        log_host_scalars(self, logged)
        # d(sum)/d(loss_i) is exactly 1: each member's gradient is its own, bit for bit.
        return torch.stack(losses).sum()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        for name, member in self.members.items():
            with self._speaking_for(name, member):
                member.validation_step(self.input_of(name, batch), batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        for name, member in self.members.items():
            with self._speaking_for(name, member):
                member.test_step(self.input_of(name, batch), batch_idx)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for name, member in self.members.items():
            with self._speaking_for(name, member):
                member.on_save_checkpoint(checkpoint)  # refuses non-finite weights

    def forward(self, batch: Any) -> dict[str, Any]:
        """Every member's :class:`SAEOutput` on its input, by name."""
        return {name: member(self.input_of(name, batch)) for name, member in self.members.items()}

    # ----------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> Any:
        optimizers, schedulers = {}, {}
        for name, member in self.members.items():
            optimizer, scheduler = _optimizer_and_scheduler(name, member.configure_optimizers())
            groups = optimizer.param_groups
            for index, group in enumerate(groups):
                # LearningRateMonitor names each group's rate by this: lr/<member>.
                group["name"] = name if len(groups) == 1 else f"{name}/pg{index + 1}"
            optimizers[name] = optimizer
            if scheduler is not None:
                schedulers[name] = scheduler
        optimizer = MemberOptimizers(optimizers)
        if not schedulers:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": MemberSchedulers(optimizer, schedulers),
                "interval": "step",
                "name": "lr",
            },
        }

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        scheduler.step()

    def configure_gradient_clipping(
        self,
        optimizer: Optimizer,
        gradient_clip_val: int | float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # Clipping by norm over all members at once would couple them; each member is clipped
        # over its own parameters, as it would be alone: by the trainer's clipping when set,
        # else by the member's own default (SparseAutoencoder.configure_gradient_clipping).
        for name, member_optimizer in optimizer.optimizers.items():
            if gradient_clip_val:
                self.clip_gradients(member_optimizer, gradient_clip_val, gradient_clip_algorithm)
                continue
            member = self.members[name]
            max_norm = member.gradient_clip_max_norm()
            if max_norm > 0:
                member.clip_gradient_norm(max_norm)

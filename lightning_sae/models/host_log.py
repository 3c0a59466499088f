"""Logging a training step's scalars that are already on the host, at the cost of one.

A step's statistics reach the host in one transfer (``SparseAutoencoder.step_and_statistics``)
and are then logged one ``LightningModule.log`` call per scalar, which costs twice per scalar
and per step, and an :class:`~lightning_sae.models.group.SAEGroup` pays it for every member:

- a Python number becomes a tensor on the module's device: on a GPU a host-to-device copy,
  which waits for the device (``copy_`` of pageable memory synchronises its stream), so one
  synchronisation per logged scalar;
- Lightning's result collection moves its record of the key to the value's device on every
  call (``_ResultMetric.to``, a walk over the record's attributes): in benchmarks/many_saes.py's
  group (24 scalars a step) 8.9-9.2 ms of the main thread's CPU per step, against 2.5-2.8 ms
  this way (docs/many-saes.md).

:func:`log_host_scalars` logs the numbers as one CPU tensor (no device copy) and hands a key
that Lightning has already registered, with the same options, straight to the record's update,
the call ``LightningModule.log`` ends in. What ``trainer.callback_metrics``, the progress bar
and the loggers receive is unchanged (``tests/test_group.py`` compares them at every step).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch
from lightning import LightningModule

# (name, value, keyword arguments of LightningModule.log)
LogEntry = tuple[str, Any, dict[str, Any]]


def _logged_dtype() -> torch.dtype:
    """The dtype ``LightningModule.log`` gives a number: the default, but at least float32."""
    dtype = torch.get_default_dtype()
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _registered(module: LightningModule, name: str, prog_bar: bool) -> Any:
    """The result record of ``name`` when a plain ``module.log(name, cpu_scalar,
    prog_bar=prog_bar)`` in this hook would only update it (registered with exactly those
    options, on the CPU); else None, and the entry takes the public path."""
    # Outside a fit (no trainer attached) module.log warns and logs nothing: let it say so.
    results = getattr(module._trainer, "_results", None)
    if (
        results is None
        or results.dataloader_idx is not None
        or not hasattr(results, "update_metrics")
    ):
        return None
    record = results.get(f"{module._current_fx_name}.{name}")
    meta = getattr(record, "meta", None)
    if meta is None or not getattr(record, "is_tensor", False):
        return None
    plain = (
        meta.prog_bar == prog_bar
        and meta.logger
        and meta.on_step
        and not meta.on_epoch  # so the update neither reduces nor reads a batch size
        and meta.is_mean_reduction  # the default reduce_fx
        and not meta.enable_graph
        and not meta.sync.should
        and meta.metric_attribute is None
        and record.value.device.type == "cpu"
    )
    return results if plain else None


def log_host_scalars(module: LightningModule, entries: Sequence[LogEntry]) -> None:
    """Log ``entries`` as ``module.log(name, value, **kwargs)`` each would, within one hook.

    Python numbers logged with at most ``prog_bar`` become one CPU tensor (in the dtype
    Lightning gives a number); after the first entry, which takes the public path (it resets the
    hook's records when Lightning starts a new one), each of those whose key is registered with
    the same options updates its record directly. Anything else (a tensor, other options, a new
    key) goes through ``module.log``; so does every entry, as it is, when the module overrides
    ``log``.
    """
    if type(module).log is not LightningModule.log or "log" in vars(module):
        # A module with its own log (member placement records its ranks' calls and logs them
        # on every rank) is given every entry as it is.
        for name, value, kwargs in entries:
            module.log(name, value, **kwargs)
        return
    numbers_at = [
        index
        for index, (_, value, kwargs) in enumerate(entries)
        if isinstance(value, numbers.Number)
        and not isinstance(value, bool)
        and set(kwargs) <= {"prog_bar"}
    ]
    as_tensors = torch.tensor(
        [float(entries[i][1]) for i in numbers_at], dtype=_logged_dtype()
    ).unbind()
    values = [value for _, value, _ in entries]
    for index, tensor in zip(numbers_at, as_tensors, strict=True):
        values[index] = tensor
    fast = set(numbers_at)
    for index, ((name, _, kwargs), value) in enumerate(zip(entries, values, strict=True)):
        results = None
        if index > 0 and index in fast:
            results = _registered(module, name, bool(kwargs.get("prog_bar", False)))
        if results is None:
            module.log(name, value, **kwargs)
        else:
            # batch_size is unused: a step-only record keeps the value as it is
            results.update_metrics(f"{module._current_fx_name}.{name}", value, 1)

"""The identity of a run's data, kept in its checkpoints, so that a resume cannot change it.

Every DataModule of the project says what its data is through one contract,
``data_identity() -> dict`` (plain values: for cached or streamed activations the fingerprint
fields: model, revision, dataset, hook(s), context, dtype, seed; for toy data its generating
parameters and seed; for your own activation files their names, sizes and contents).
:class:`IdentifiedData` stores that dict as the datamodule's ``state_dict``, which Lightning
writes into every checkpoint, and on a resumed fit refuses data whose identity differs, naming
the fields. Starting a new run from trained weights on other data is a different thing, with
its own option: ``init_from`` (see :class:`lightning_sae.callbacks.init_from.InitFrom`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

IDENTITY_KEY = "data_identity"


class DataMismatchError(ValueError):
    """A checkpoint is resumed onto data other than the data it was trained on."""


def plain(identity: Mapping[str, Any]) -> dict[str, Any]:
    """``identity`` as JSON values (tuples become lists), as it reads back from a checkpoint."""
    return json.loads(json.dumps(identity, sort_keys=True))


def differences(saved: Mapping[str, Any], here: Mapping[str, Any]) -> list[str]:
    """``field: <saved> there, <here> here`` for every field whose value differs."""
    absent = "(absent)"
    found = []
    for field in sorted(set(saved) | set(here)):
        before, now = saved.get(field, absent), here.get(field, absent)
        if before != now:
            found.append(f"{field}: {_short(before)} there, {_short(now)} here")
    return found


def _short(value: Any, limit: int = 120) -> str:
    text = value if isinstance(value, str) and value == "(absent)" else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_same_data(
    saved: Mapping[str, Any] | None, here: Mapping[str, Any], checkpoint: str = "the checkpoint"
) -> None:
    """Refuse to resume ``checkpoint`` (whose data identity is ``saved``) on data ``here``.

    A checkpoint written before identities were recorded (``saved`` None) is not checked.
    """
    if saved is None:
        return
    found = differences(plain(saved), plain(here))
    if found:
        raise DataMismatchError(
            f"{checkpoint} was trained on other data ({'; '.join(found)}): resume it with the "
            "data it was trained on, or start a new run from its weights with init_from "
            "(`lightning-sae fit --init_from <checkpoint> --trainer.default_root_dir <new run "
            "folder>`: weights only, a fresh optimizer from step 0)."
        )


def saved_identity(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The data identity a Lightning checkpoint holds (under its datamodule's class name)."""
    for value in checkpoint.values():
        if isinstance(value, Mapping) and IDENTITY_KEY in value:
            return dict(value[IDENTITY_KEY])
    return None


class IdentifiedData:
    """Mix-in for a ``LightningDataModule`` (listed before it): checkpoints hold
    ``data_identity()``, and a fit resumed onto other data is refused. Validating or testing a
    checkpoint on other data stays allowed (that is an evaluation, not a resume)."""

    def data_identity(self) -> dict[str, Any]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {IDENTITY_KEY: plain({"data": type(self).__name__, **self.data_identity()})}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        trainer = getattr(self, "trainer", None)
        fn = getattr(getattr(trainer, "state", None), "fn", None)
        if fn is not None and fn != "fit":
            return
        here = {"data": type(self).__name__, **self.data_identity()}
        check_same_data(state_dict.get(IDENTITY_KEY), here)


def activation_files_identity(store: Any) -> list[list[Any]]:
    """Your own activation files (a ``ShardedActivations``): per file its name, its shape and
    the sha256 of its first and last rows, so that files rewritten with other activations (of
    another layer, say) differ while a moved folder does not; read cheaply, two rows a file."""
    found = []
    for name, array in zip(store.names, store.arrays, strict=True):
        digest = hashlib.sha256()
        for row in (array[0], array[-1]):
            digest.update(np.ascontiguousarray(row).tobytes())
        found.append([Path(name).name, list(array.shape), digest.hexdigest()[:16]])
    return found

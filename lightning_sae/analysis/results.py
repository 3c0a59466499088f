"""The files ``inspect`` writes, and :func:`load_inspection` to read them back.

A result folder holds:

- ``inspect.json``: what was inspected (SAE, config, model, hook, tokens, options), the
  histogram's bin edges and notes (e.g. why logit effects are missing);
- ``features.parquet``: one row per feature: ``feature``, ``frequency``, ``n_fired``,
  ``mean_act`` (over the tokens where it fires), ``max_act``, ``histogram`` (counts on the log
  bins),
  ``neighbours`` / ``neighbour_cos`` (nearest features by decoder cosine), and with
  ``--compare`` ``match`` / ``match_cos`` (best feature of the other SAE);
- ``contexts.parquet``: one row per context: ``feature``, ``kind`` (``top`` or ``interval``),
  ``rank``, ``interval``, ``value`` (max activation in the context), ``window`` (row of the
  cache's ``tokens.npy``), ``position`` (of the max token in that window), ``max_index`` (its
  index in ``tokens``), ``tokens`` (ids, -1 outside the window), ``strs`` (token text) and
  ``acts`` (the feature's activation per token);
- ``logits.parquet``: ``feature``, ``direction`` (``up``/``down``), ``rank``, ``token``,
  ``str``, ``effect``;
- ``index.html`` and ``features/<id>.html``: the browser.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lightning_sae.files import read_text_bounded

META_FILENAME = "inspect.json"
FEATURES_FILENAME = "features.parquet"
CONTEXTS_FILENAME = "contexts.parquet"
LOGITS_FILENAME = "logits.parquet"


def list_column(values: np.ndarray) -> pa.Array:
    """A ``[n, k]`` array as a fixed-size list column, built without a Python loop."""
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def write_table(path: Path, columns: dict[str, Any]) -> None:
    arrays = {
        name: list_column(v) if isinstance(v, np.ndarray) and v.ndim == 2 else pa.array(v)
        for name, v in columns.items()
    }
    pq.write_table(pa.table(arrays), path)


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    (folder / META_FILENAME).write_text(json.dumps(meta, indent=2) + "\n")


@dataclass
class Inspection:
    """A result folder loaded as pandas tables (see the module docstring for the columns)."""

    folder: Path
    meta: dict[str, Any]
    features: pd.DataFrame  # indexed by feature id
    contexts: pd.DataFrame
    logits: pd.DataFrame

    def feature(self, feature: int) -> pd.Series:
        """One feature's row; a feature not inspected is a one-line error."""
        if feature not in self.features.index:
            ids = self.features.index
            raise KeyError(
                f"feature {feature} is not in this inspection: it holds {len(ids)} features "
                f"({ids.min()}..{ids.max()}) of an SAE with d_sae={self.meta['sae']['d_sae']}."
            )
        return self.features.loc[feature]

    def top_contexts(self, feature: int) -> pd.DataFrame:
        self.feature(feature)
        rows = self.contexts[(self.contexts.feature == feature) & (self.contexts.kind == "top")]
        return rows.sort_values("rank")

    def interval_contexts(self, feature: int) -> pd.DataFrame:
        self.feature(feature)
        rows = self.contexts[
            (self.contexts.feature == feature) & (self.contexts.kind == "interval")
        ]
        return rows.sort_values(["interval", "rank"], ascending=[False, True])

    def logit_effects(self, feature: int) -> pd.DataFrame:
        self.feature(feature)
        return self.logits[self.logits.feature == feature].sort_values(["direction", "rank"])


def load_inspection(folder: str | Path) -> Inspection:
    """Read the folder that ``lightning-sae inspect`` (or :func:`~lightning_sae.analysis.inspect`)
    wrote."""
    folder = Path(folder)
    if not (folder / META_FILENAME).exists():
        raise FileNotFoundError(
            f"{folder / META_FILENAME} does not exist: pass the --out folder of lightning-sae "
            "inspect."
        )
    meta = json.loads(read_text_bounded(folder / META_FILENAME))
    features = pd.read_parquet(folder / FEATURES_FILENAME).set_index("feature", drop=False)
    return Inspection(
        folder=folder,
        meta=meta,
        features=features,
        contexts=pd.read_parquet(folder / CONTEXTS_FILENAME),
        logits=pd.read_parquet(folder / LOGITS_FILENAME),
    )

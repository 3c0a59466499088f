"""The static HTML feature browser: ``index.html`` plus one page per feature.

Everything a page needs is inside it: CSS and JavaScript inline, its data as a JSON script
block, so the folder opens from disk (``file://``) with no server and no network. Each feature
has its own page (``features/00012.html``) so that a 16k-feature SAE gives 16k small files
instead of one page too large for a browser. Pages are rendered with jinja2 (autoescaping on);
the JSON is escaped for a ``<script>`` block and the page's JavaScript inserts every value with
``textContent``, so no token text can become markup or code.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from lightning_sae.analysis.results import CONTEXTS_FILENAME, LOGITS_FILENAME, load_inspection

TEMPLATES = Path(__file__).parent / "templates"
PAGE = "features/ID.html"


def _script_json(value: Any) -> Markup:
    """JSON that cannot end its ``<script>`` block or open a comment inside it."""
    text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    return Markup(text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


def _asset(name: str) -> Markup:
    # Our own files, inlined as they are; read as text, never rendered as templates.
    return Markup((TEMPLATES / name).read_text())


def _finite(x: float) -> float:
    return float(x) if np.isfinite(x) else 0.0


def _context(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "value": _finite(record["value"]),
        "tokens": record["tokens"],
        "strs": record["strs"],
        "acts": [round(_finite(a), 5) for a in record["acts"]],
        "max_index": record["max_index"],
        "repeats": 1,
    }


def _unique(contexts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Contexts with the same tokens shown once (the first, the strongest of a ranked list),
    counting how often each appeared: repeated text (boilerplate, a quoted line) would
    otherwise fill the list with copies."""
    kept: dict[tuple[int, ...], dict[str, Any]] = {}
    for context in contexts:
        key = tuple(context["tokens"])
        if key in kept:
            kept[key]["repeats"] += 1
        else:
            kept[key] = context
    return list(kept.values())


def _interval_colours(n: int) -> list[str]:
    """One colour per activation interval, light (low) to dark (high) orange."""
    light, dark = np.array([253, 186, 116]), np.array([154, 52, 18])
    steps = np.linspace(0, 1, n) if n > 1 else np.ones(1)
    rgbs = [np.rint(light + (dark - light) * t).astype(int) for t in steps]
    return ["#" + "".join(f"{value:02x}" for value in rgb) for rgb in rgbs]


def _bin_intervals(edges: np.ndarray, max_act: float, n_intervals: int) -> list[int]:
    """The activation interval (equal-width in (0, max]) each log-spaced bin's centre is in."""
    if max_act <= 0 or n_intervals == 0 or len(edges) < 2:
        return [0] * max(len(edges) - 1, 0)
    centres = np.sqrt(edges[:-1] * edges[1:])
    return (
        np.clip(np.ceil(centres / max_act * n_intervals) - 1, 0, n_intervals - 1)
        .astype(int)
        .tolist()
    )


def _by_feature(folder: Path, filename: str) -> dict[int, list[dict[str, Any]]]:
    """A result table's rows as plain dicts, grouped by feature in one linear pass (pandas
    filtering per feature would be quadratic in the number of features)."""
    groups: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for record in pq.read_table(folder / filename).to_pylist():
        groups[record["feature"]].append(record)
    return groups


def _snippet(top: list[dict[str, Any]], width: int = 6) -> str:
    """A short text of the top context around its max token, the max token in brackets."""
    if not top:
        return ""
    strs, tokens, m = top[0]["strs"], top[0]["tokens"], top[0]["max_index"]
    first = max(m - width, 0)
    before = "".join(s for s, t in zip(strs[first:m], tokens[first:m], strict=True) if t >= 0)
    after = "".join(
        s for s, t in zip(strs[m + 1 : m + 3], tokens[m + 1 : m + 3], strict=True) if t >= 0
    )
    return f"{before.lstrip()}[{strs[m].strip()}]{after}"


def _feature_page(
    meta: dict[str, Any],
    row: Any,  # a features row from itertuples()
    contexts: list[dict[str, Any]],
    logits: list[dict[str, Any]],
    inspected: set[int],
) -> dict[str, Any]:
    edges = np.asarray(meta["hist_edges"])
    counts = np.asarray(row.histogram)
    occupied = np.flatnonzero(counts)
    lo, hi = (occupied[0], occupied[-1] + 1) if len(occupied) else (0, 0)
    n_intervals = meta["options"]["n_intervals"]
    max_act = _finite(row.max_act)
    # contexts.parquet lists each feature's top contexts by rank, then its intervals.
    top = _unique([_context(c) for c in contexts if c["kind"] == "top"])
    colours = _interval_colours(n_intervals)
    intervals = [
        {
            "lo": max_act * i / n_intervals,
            "hi": max_act * (i + 1) / n_intervals,
            "colour": colours[i],
            "contexts": _unique([_context(c) for c in contexts if c["interval"] == i]),
        }
        for i in (reversed(range(n_intervals)) if max_act > 0 else ())
    ]
    shown = edges[lo : hi + 1]
    bins = _bin_intervals(shown, max_act, n_intervals)
    bin_colours = [colours[i] for i in bins] if n_intervals else ["#ea7a3c"] * len(bins)
    match = None
    if "match" in row._fields:
        match = {"id": int(row.match), "cos": float(row.match_cos), "sae": meta["compare"]["path"]}
    return {
        "id": int(row.feature),
        "frequency": float(row.frequency),
        "n_fired": int(row.n_fired),
        "n_tokens": int(meta["n_tokens"]),
        "mean_act": _finite(row.mean_act),
        "max_act": max_act,
        "hist": {
            "edges": shown.tolist(),
            "counts": counts[lo:hi].tolist(),
            "interval": bins,  # which interval's samples (below) each bin's values belong to
            "colours": bin_colours,
        },
        "logits": {
            direction: [[r["str"], r["effect"]] for r in logits if r["direction"] == direction]
            for direction in ("up", "down")
        },
        "logit_note": next((n for n in meta["notes"] if n.startswith("logit effects")), None),
        "neighbours": [
            [int(i), float(c), int(i) in inspected]  # linked when it has a page
            for i, c in zip(row.neighbours, row.neighbour_cos, strict=True)
        ],
        "match": match,
        "clt": _clt_feature(meta, row),
        "top": top,
        "intervals": intervals,
    }


def _clt_feature(meta: dict[str, Any], row: Any) -> dict[str, Any] | None:
    """A cross-layer transcoder's feature: its layer, the hook it reads and the norm of what it
    writes to each output hook from its own layer on; ``None`` for another SAE."""
    clt = meta.get("clt")
    if not clt:
        return None
    layer = int(row.layer)
    return {
        "layer": layer,
        "feature": int(row.layer_feature),
        "reads": clt["input_hooks"][layer],
        "writes": [
            [clt["output_hooks"][target], float(row.writes[target])]
            for target in range(layer, clt["n_layers"])
        ],
    }


def write_browser(folder: str | Path) -> Path:
    """Write ``index.html`` and ``features/<id>.html`` for the results in ``folder``."""
    folder = Path(folder)
    inspection = load_inspection(folder)
    meta = inspection.meta
    env = Environment(
        loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"])
    )
    css, index_js, feature_js = _asset("browser.css"), _asset("index.js"), _asset("feature.js")
    title = f"{meta['sae']['class']} on {meta['model']} {meta['hook']}"
    subtitle = (
        f"{meta['n_features']} of {meta['sae']['d_sae']} features · "
        f"{meta['n_tokens']:,} tokens ({meta['split']} split) · {meta['sae']['path']}"
    )
    ids = inspection.features.feature.to_numpy()
    pad = len(str(meta["sae"]["d_sae"] - 1))
    contexts = _by_feature(folder, CONTEXTS_FILENAME)
    logits = _by_feature(folder, LOGITS_FILENAME)
    pages = [int(i) for i in ids]
    inspected = set(pages)
    feature_template = env.get_template("feature.html.j2")
    index_rows = []
    (folder / "features").mkdir(exist_ok=True)
    for position, row in enumerate(inspection.features.itertuples(index=False)):
        mine = contexts.get(row.feature, [])
        data = _feature_page(meta, row, mine, logits.get(row.feature, []), inspected)
        data |= {
            "page": "ID.html",  # relative to features/
            "pad": pad,
            "prev": pages[position - 1] if position > 0 else None,
            "next": pages[position + 1] if position + 1 < len(pages) else None,
        }
        html = feature_template.render(
            feature=row.feature, title=title, subtitle=subtitle, css=css, js=feature_js,
            data=_script_json(data),
        )  # fmt: skip
        (folder / PAGE.replace("ID", str(row.feature).zfill(pad))).write_text(html)
        index_rows.append(
            [int(row.feature), float(row.frequency), _finite(row.max_act),
             _finite(row.mean_act), _snippet(data["top"])]
        )  # fmt: skip
    index = env.get_template("index.html.j2").render(
        title=title, subtitle=subtitle, notes=meta["notes"], css=css, js=index_js,
        data=_script_json({"features": index_rows, "page": PAGE, "pad": pad}),
    )  # fmt: skip
    path = folder / "index.html"
    path.write_text(index)
    return path

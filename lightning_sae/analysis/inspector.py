"""``lightning-sae inspect``: what each feature of an SAE responds to, saved as data and HTML.

The SAE runs over the token windows of a config's activation cache. The cache stores, per
window, the activations of every cached position in window order (``tokens.npy`` holds the
windows), so encoding the cached rows gives every position's feature activations aligned to its
token, with no forward pass of the language model. One pass over the windows feeds a
:class:`~lightning_sae.analysis.recorder.FeatureRecorder` (bounded memory: running top-k and
samples per feature, no stored activations). Then per feature: nearest features by decoder
cosine (and the best match in a second SAE), logit effects where the model has an unembedding,
and the files described in :mod:`lightning_sae.analysis.results` plus the static browser.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from torch import Tensor
from tqdm.auto import tqdm

from lightning_sae import __version__
from lightning_sae.analysis import browser
from lightning_sae.analysis.logits import LogitEffects, logit_effects
from lightning_sae.analysis.recorder import FeatureRecorder, Picked, hist_edges, pick_contexts
from lightning_sae.analysis.results import (
    CONTEXTS_FILENAME,
    FEATURES_FILENAME,
    LOGITS_FILENAME,
    write_meta,
    write_table,
)
from lightning_sae.commands import INSPECT_SPLITS, data_overrides, inspect_parser
from lightning_sae.data import lm
from lightning_sae.data.activations import ActivationDataModule
from lightning_sae.data.cache import ShardedActivations, open_hook_cache
from lightning_sae.files import UnreadableFileError, read_text_bounded
from lightning_sae.hub import is_hub_path, sae_folder
from lightning_sae.io import (
    CONFIG_FILENAME,
    export_checkpoint,
    load,
    sae_metadata,
)
from lightning_sae.metrics.similarity import load_sae_weights, nearest_neighbours
from lightning_sae.models import SparseAutoencoder
from lightning_sae.models.clt import CrossLayerTranscoder

# The data classes a config may name; the name is compared, never imported.
DATA_CLASS_PATHS = (
    "lightning_sae.data.activations.ActivationDataModule",
    "lightning_sae.ActivationDataModule",
    "ActivationDataModule",
)
# A streamed run's config: its data computes activations as it trains and keeps no tokens, so
# inspect builds an activation cache of the same model, hooks and text (compared by name).
STREAM_CLASS_PATHS = (
    "lightning_sae.data.stream.StreamingActivationDataModule",
    "lightning_sae.StreamingActivationDataModule",
    "StreamingActivationDataModule",
)
STREAM_CACHE_TOKENS = 100_000  # training tokens of that cache unless data.init_args.n_tokens
TEXT_OPTIONS = (
    "dataset", "dataset_config", "dataset_split", "text_column", "streaming", "context_size",
    "prepend_bos", "exclude_bos",
)  # fmt: skip
# Upper bound on one batch's activations (tokens x features), so memory stays flat: 2^25
# float32 values are 128 MiB.
MAX_BATCH_ELEMENTS = 1 << 25


class InspectError(ValueError):
    """Input that cannot be inspected; the message is one line that says the fix."""


# ----------------------------------------------------------------------------- inputs
def load_saes(
    path: str | Path, class_path: str | None = None, member: str | None = None
) -> dict[str, tuple[SparseAutoencoder, dict]]:
    """{name: (SAE in model units, its export metadata)} from a Lightning checkpoint, an SAE
    folder or a ``hf://`` path: ``{"": ...}`` for one SAE; an SAEGroup's members (``member``:
    one name, or ``None`` / ``"all"`` for every one), by name.

    A checkpoint goes through ``export_checkpoint`` into a scratch folder: that folds the input
    scale into the weights and records the checkpoint's model and hook, as an export would.
    """
    if is_hub_path(path):  # hf://org/repo[/subfolder][@revision]: its cached folder
        return _pick_members(sae_folder(path), Path(path), member)
    path = Path(path)
    if path.is_dir():
        return _pick_members(path, path, member)
    with tempfile.TemporaryDirectory(prefix="lightning-sae-inspect-") as scratch:
        export_checkpoint(path, scratch, class_path)
        return _pick_members(Path(scratch), path, member)


def load_sae(path: str | Path, class_path: str | None = None) -> tuple[SparseAutoencoder, dict]:
    """(SAE in model units, its export metadata) of a checkpoint or export folder of one SAE."""
    ((sae, meta),) = load_saes(path, class_path, member=None).values()
    return sae, meta


def _pick_members(
    folder: Path, given: Path, member: str | None
) -> dict[str, tuple[SparseAutoencoder, dict]]:
    """The SAEs of an export ``folder`` (one, or a group's member folders) that ``member``
    names; ``given`` is the path the user gave, for messages."""
    members = (
        sorted(p.name for p in folder.iterdir() if (p / CONFIG_FILENAME).is_file())
        if folder.is_dir() and not (folder / CONFIG_FILENAME).is_file()
        else []
    )
    if not members:  # one SAE (load() explains a folder that is none)
        if member not in (None, "all"):
            raise InspectError(f"{given} holds one SAE, not an SAEGroup: leave out --member.")
        return {"": (load(folder), _metadata(folder))}
    if member not in (None, "all", *members):
        raise InspectError(
            f"--member {member!r} is not in {given}; its members: {', '.join(members)} "
            "(or --member all)."
        )
    names = members if member in (None, "all") else [member]
    return {name: (load(folder / name), _metadata(folder / name)) for name in names}


def _metadata(folder: Path) -> dict[str, Any]:
    return sae_metadata(folder)


def datamodule_from_config(
    config: str | Path,
    overrides: dict[str, Any] | None = None,
    extra_hooks: Sequence[str] = (),
    say: Any = None,
) -> ActivationDataModule:
    """The config's ``data:`` section as an ActivationDataModule, caching ``extra_hooks`` too.

    A StreamingActivationDataModule's options become those of the cache of the same model,
    hooks and text (``STREAM_CACHE_TOKENS`` training tokens unless ``overrides`` sets
    ``n_tokens``; ``overrides`` name the cache's options), announced through ``say``.
    """
    try:
        content = yaml.safe_load(read_text_bounded(config))
    except (OSError, yaml.YAMLError, UnicodeDecodeError, UnreadableFileError) as error:
        detail = " ".join(str(error).split())
        raise InspectError(f"cannot read the config {config}: {detail}") from None
    data = (content or {}).get("data") if isinstance(content, dict) else None
    class_path = data.get("class_path") if isinstance(data, dict) else None
    if class_path not in (*DATA_CLASS_PATHS, *STREAM_CLASS_PATHS):
        raise InspectError(
            f"{config}: data.class_path must be ActivationDataModule or "
            f"StreamingActivationDataModule (inspect reads token windows), got {class_path!r}."
        )
    args = dict(data.get("init_args") or {})
    streamed = class_path in STREAM_CLASS_PATHS
    if streamed:
        args = _cache_options_of_stream(args, config)
    args.update(overrides or {})
    if args.get("activations_dir"):
        raise InspectError(
            f"{config} reads activations_dir (your own activation files), which have no tokens "
            "to show; inspect needs a config with data.init_args.model and hook."
        )
    served = set(args.get("hooks") or [args.get("hook")]) | set(args.get("extra_hooks") or [])
    missing = [hook for hook in dict.fromkeys(extra_hooks) if hook and hook not in served]
    if missing:
        args["extra_hooks"] = [*(args.get("extra_hooks") or []), *missing]
    try:
        datamodule = ActivationDataModule(**args)
    except TypeError as error:
        raise InspectError(f"{config}: {error}") from None
    if streamed and say is not None:
        say(
            f"inspect: {config} streams its activations (no tokens on disk), so a cache of "
            f"{args['n_tokens']:,} tokens of the same model, hooks and text is read, built if "
            f"missing, at {datamodule.cache_root}"
        )
    return datamodule


def _cache_options_of_stream(stream: dict[str, Any], config: str | Path) -> dict[str, Any]:
    """ActivationDataModule options of the cache a StreamingActivationDataModule's options
    describe: the same model, hooks, text windows and held-out tokens."""
    model = stream.get("model")
    if not isinstance(model, dict) or not model.get("name"):
        raise InspectError(f"{config}: data.init_args.model.name is missing.")
    text = stream.get("text") or {}
    options = {
        "model": model["name"],
        "revision": model.get("revision"),
        "tokenizer": model.get("tokenizer"),
        "model_config": model.get("config"),
        "model_seed": model.get("seed", 0),
        "model_dtype": model.get("dtype", "float32"),
        "model_backend": model.get("backend"),
        "hooks": stream.get("hooks"),
        **{key: text[key] for key in TEXT_OPTIONS if key in text},
        "n_tokens": STREAM_CACHE_TOKENS,
        "dtype": stream.get("dtype", "float32"),
        "device": stream.get("device") or "auto",
    }
    for key in ("val_tokens", "model_batch_size", "seed"):
        if key in stream:
            options[key] = stream[key]
    return {key: value for key, value in options.items() if value is not None}


def open_cache(
    datamodule: ActivationDataModule, progress: bool, hook: str | None = None
) -> tuple[ShardedActivations, Path]:
    """(activations, cache folder) of ``hook`` (default: the data module's); the cache is built
    if missing."""
    datamodule.build_cache(progress=progress)
    hook = hook or datamodule.hook
    fingerprint = {**datamodule.fingerprint, "hook": hook, "dtype": datamodule.hparams.dtype}
    store, _ = open_hook_cache(datamodule.cache_root, hook, fingerprint, "size", datamodule.layout)
    return store, datamodule.cache_root


def parse_features(spec: str | Sequence[int] | None, d_sae: int) -> np.ndarray:
    """Feature ids from ``"0-99,120"`` or a sequence; every id must be below ``d_sae``."""
    if spec is None:
        return np.arange(d_sae)
    ids: list[int] = []
    if isinstance(spec, str):
        for part in filter(None, (p.strip() for p in spec.split(","))):
            lo, _, hi = part.partition("-")
            try:
                ids += range(int(lo), int(hi) + 1) if hi else [int(lo)]
            except ValueError:
                raise InspectError(
                    f"--features {spec!r}: give ids and ranges like 0-99,120."
                ) from None
    else:
        ids = [int(i) for i in spec]
    bad = [i for i in ids if not 0 <= i < d_sae]
    if bad:
        raise InspectError(
            f"feature {bad[0]} is out of range: this SAE has d_sae={d_sae} features "
            f"(ids 0..{d_sae - 1})."
        )
    if not ids:
        raise InspectError(f"--features {spec!r} names no feature.")
    return np.unique(np.array(ids, dtype=np.int64))


def window_range(layout: Any, split: str, n_tokens: int | None) -> tuple[int, int]:
    """(first, stop) windows of the split, cut to the windows holding ``n_tokens`` positions."""
    if split not in INSPECT_SPLITS:
        raise InspectError(f"split must be one of {INSPECT_SPLITS}, got {split!r}.")
    first, stop = {
        "train": (0, layout.n_train_windows),
        "val": (layout.n_train_windows, layout.n_windows),
        "all": (0, layout.n_windows),
    }[split]
    if n_tokens is not None:
        if n_tokens <= 0:
            raise InspectError(
                f"--n_tokens must be positive, got {n_tokens}: no tokens to inspect."
            )
        stop = min(stop, first + math.ceil(n_tokens / layout.positions))
    if stop <= first:
        raise InspectError(
            f"no tokens to inspect: the {split!r} split of this cache has no windows "
            "(data.init_args.val_tokens is 0?); choose --split train or all."
        )
    return first, stop


def batches(
    store: ShardedActivations, positions: int, first: int, stop: int, windows_per_batch: int
) -> Any:
    """(window ids, rows ``[W * positions, d_in]``) of windows ``[first, stop)`` in order; a
    batch never crosses a shard, so each is one sequential read."""
    for lo, hi in store.shard_bounds:
        w_lo, w_hi = max(lo // positions, first), min(hi // positions, stop)
        for w in range(w_lo, w_hi, windows_per_batch):
            w_end = min(w + windows_per_batch, w_hi)
            out = store.empty((w_end - w) * positions)
            store.read(w * positions, w_end * positions, out)
            yield torch.arange(w, w_end), store.to_torch(out)


# ----------------------------------------------------------------------------- token text
class TokenText:
    """Display text of token ids, with the spacing the tokenizer gives them in running text
    (``ization`` after ``token``, `` world`` after a word): each id is decoded after a fixed
    anchor token and the anchor's text is cut off."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.anchor = (tokenizer.encode("a", add_special_tokens=False) or [None])[0]
        self.cache: dict[int, str] = {-1: ""}

    def __call__(self, ids: np.ndarray) -> list[str]:
        missing = sorted({int(i) for i in np.unique(ids)} - set(self.cache))
        if missing:
            if self.anchor is None:
                texts = self.tokenizer.batch_decode([[i] for i in missing])
            else:
                prefix = self.tokenizer.decode([self.anchor])
                pairs = self.tokenizer.batch_decode([[self.anchor, i] for i in missing])
                texts = [
                    t[len(prefix) :] if t.startswith(prefix) else self.tokenizer.decode([i])
                    for t, i in zip(pairs, missing, strict=True)
                ]
            self.cache.update(zip(missing, texts, strict=True))
        return [self.cache[int(i)] for i in ids]


# ----------------------------------------------------------------------------- inspect
def inspect(
    ckpt_path: str | Path,
    config: str | Path,
    out: str | Path,
    *,
    class_path: str | None = None,
    split: str = "all",
    n_tokens: int | None = None,
    features: str | Sequence[int] | None = None,
    n_top: int = 20,
    n_intervals: int = 5,
    per_interval: int = 4,
    context_left: int = 16,
    context_right: int = 8,
    n_neighbours: int = 8,
    n_logits: int = 10,
    compare: str | Path | None = None,
    batch_windows: int = 128,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    html: bool = True,
    data_overrides: dict[str, Any] | None = None,
    member: str | None = None,
) -> Path:
    """Record what every feature of an SAE responds to and write it to ``out``.

    Every member of an SAEGroup is written to ``out/<member>``; one named member to ``out``.

    Args:
        ckpt_path: Lightning checkpoint (``.ckpt``), SAE folder or ``hf://`` path of the SAE.
        config: YAML whose ``data:`` is the ActivationDataModule the SAE was trained on (or any
            with the same model and hook); its activation cache is built if missing. A
            streamed run's config (StreamingActivationDataModule) reads a cache of the same
            model, hooks and text, built on first use (``STREAM_CACHE_TOKENS`` tokens).
        out: folder for the results (data files and ``index.html``).
        class_path: the SAE class, for checkpoints that do not record it.
        split: windows to read: ``train``, ``val`` (held out) or ``all``.
        n_tokens: at most this many cached positions (whole windows), from the split's start.
        features: only these feature ids (``"0-99,120"`` or a list); default all.
        n_top: top-activating contexts kept per feature.
        n_intervals, per_interval: sampled contexts from equal-width intervals of (0, max].
        context_left, context_right: tokens shown around the max token of a context.
        n_neighbours: nearest features by decoder cosine.
        n_logits: tokens raised / lowered most (0 skips the model load).
        compare: a second SAE (checkpoint, export folder or .safetensors): best match per feature.
        batch_windows: windows encoded together (lowered so a batch stays under 128 MiB).
        device: where the SAE runs (``cpu``, ``cuda``, ``auto``).
        seed: seed of the interval samples.
        progress: show a tqdm bar with tokens/s and ETA.
        html: write the static browser too.
        data_overrides: ``data.init_args`` values that replace the config's (for a streamed
            run's config, the options of the cache built from it).
        member: an SAEGroup's member to inspect, or ``None`` / ``"all"`` for every member.

    Returns:
        ``out`` as a Path.
    """
    for name, value in {
        "n_top": n_top,
        "batch_windows": batch_windows,
        "context_left + context_right + 1": context_left + context_right + 1,
    }.items():
        if value <= 0:
            raise InspectError(f"{name} must be positive, got {value}.")
    for name, value in {
        "n_intervals": n_intervals,
        "per_interval": per_interval,
        "n_neighbours": n_neighbours,
        "n_logits": n_logits,
        "context_left": context_left,
        "context_right": context_right,
    }.items():
        if value < 0:
            raise InspectError(f"{name} must be >= 0, got {value}.")
    device = lm.resolve_device(device)
    saes = load_saes(ckpt_path, class_path, member)
    group = list(saes) != [""]
    # A group's members may read other hooks than the config's first: cache theirs too.
    member_hooks = [meta.get("hook_name") for _, meta in saes.values()] if group else []
    # A cross-layer transcoder reads every layer's MLP input: cache them all.
    clt_hooks = [h for sae, _ in saes.values() if isinstance(sae, CrossLayerTranscoder)
                 for h in sae.input_hooks]  # fmt: skip
    if clt_hooks and compare is not None:
        raise InspectError(
            "--compare matches decoder rows of one hook; a cross-layer transcoder writes to "
            "several layers: leave out --compare."
        )
    datamodule = datamodule_from_config(
        config, data_overrides, [*member_hooks, *clt_hooks], say=_say
    )
    options = {
        "ckpt_path": ckpt_path, "config": config, "split": split, "n_tokens": n_tokens,
        "features": features, "n_top": n_top, "n_intervals": n_intervals,
        "per_interval": per_interval, "context_left": context_left,
        "context_right": context_right, "n_neighbours": n_neighbours, "n_logits": n_logits,
        "compare": compare, "batch_windows": batch_windows, "device": device, "seed": seed,
        "progress": progress, "html": html,
    }  # fmt: skip
    out = Path(out)
    for name, (sae, sae_meta) in saes.items():
        hook = sae_meta.get("hook_name") if group else None
        hook = hook if hook in datamodule.hooks else datamodule.hook
        folder = out / name if group and member in (None, "all") else out
        _inspect_sae(sae, sae_meta, name or None, datamodule, hook, folder, **options)
    return out


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _inspect_sae(
    sae: SparseAutoencoder,
    sae_meta: dict[str, Any],
    member: str | None,
    datamodule: ActivationDataModule,
    hook: str,
    out: Path,
    *,
    ckpt_path: str | Path,
    config: str | Path,
    split: str,
    n_tokens: int | None,
    features: str | Sequence[int] | None,
    n_top: int,
    n_intervals: int,
    per_interval: int,
    context_left: int,
    context_right: int,
    n_neighbours: int,
    n_logits: int,
    compare: str | Path | None,
    batch_windows: int,
    device: str,
    seed: int,
    progress: bool,
    html: bool,
) -> None:
    """:func:`inspect` of one SAE (a group's ``member``) on ``hook`` of ``datamodule``; a
    cross-layer transcoder reads its input hooks instead, and its feature ``f`` of layer ``l``
    is recorded as the flat feature ``l * d_sae + f``."""
    sae = sae.to(device)
    clt = sae if isinstance(sae, CrossLayerTranscoder) else None
    hooks = list(clt.input_hooks) if clt is not None else [hook]
    n_features = sae.d_sae * (clt.n_layers if clt is not None else 1)
    ids = parse_features(features, n_features)
    stores = []
    for read in hooks:
        store, cache_root = open_cache(datamodule, progress, read)
        stores.append(store)
    model_spec = datamodule.hparams.model
    for read, store in zip(hooks, stores, strict=True):
        if store.d_in != sae.d_in:
            which = f"member {member} of {ckpt_path}" if member else f"SAE {ckpt_path}"
            raise InspectError(
                f"the {which} reads d_in={sae.d_in} vectors, but {read} of {model_spec} "
                f"has d_in={store.d_in}: pass the config the SAE was trained with."
            )
    # The second SAE is checked before the pass, so a bad one fails at once.
    other = None if compare is None else load_sae_weights(compare)["W_dec"].to(device)
    if other is not None and other.shape[1] != sae.d_in:
        raise InspectError(
            f"--compare {compare} has d_in={other.shape[1]}, this SAE d_in={sae.d_in}: "
            "compare SAEs trained on the same hook."
        )
    notes: list[str] = []
    if sae_meta.get("hook_name") not in (None, hook):
        notes.append(f"the SAE was trained on {sae_meta['hook_name']}, inspected on {hook}.")
        warnings.warn(notes[-1], stacklevel=2)
    layout = datamodule.layout
    first, stop = window_range(layout, split, n_tokens)
    positions = layout.positions
    tokens = np.load(cache_root / "tokens.npy", mmap_mode="r")

    n_samples = max(n_intervals * per_interval * 2, 1)
    recorder = FeatureRecorder(
        len(ids), n_top, n_samples, context_left, context_right, device, seed
    )
    windows_per_batch = max(1, min(batch_windows, MAX_BATCH_ELEMENTS // (positions * n_features)))
    select = None if len(ids) == n_features else torch.from_numpy(ids).to(device)
    with (
        torch.no_grad(),
        tqdm(
            total=(stop - first) * positions,
            unit="tok",
            unit_scale=True,
            desc="inspect",
            disable=not progress,
        ) as bar,
    ):
        started = time.perf_counter()
        for window_ids, rows in _layer_batches(stores, positions, first, stop, windows_per_batch):
            # One hook: rows [N, d_in]; a CLT: [N, n_layers, d_in], its acts flattened by layer.
            acts = sae.encode(rows.to(device).float()).flatten(1)
            if select is not None:
                acts = acts[:, select]
            recorder.update(acts.view(len(window_ids), positions, -1), window_ids.to(device))
            bar.update(rows.shape[0])
        pass_seconds = time.perf_counter() - started

    # The rows compared for neighbours, and what each feature writes to the residual stream.
    W_dec = _decoder_rows(clt) if clt is not None else sae.W_dec.detach().float()
    written = _total_writes(clt) if clt is not None else W_dec
    selected = torch.from_numpy(ids).to(device)
    directions = W_dec[selected]
    picked = pick_contexts(recorder, n_intervals, per_interval)
    text = TokenText(datamodule.tokenizer)
    (out / "features").mkdir(parents=True, exist_ok=True)

    context_ids = _context_tokens(tokens, picked, layout, context_left, recorder.width)
    flat_strs = text(context_ids.reshape(-1))
    context_strs = [
        flat_strs[i : i + recorder.width] for i in range(0, len(flat_strs), recorder.width)
    ]
    write_table(
        out / CONTEXTS_FILENAME,
        {
            "feature": ids[picked.feature],
            "kind": picked.kind.astype(str),
            "rank": picked.rank,
            "interval": picked.interval,
            "value": picked.value.astype(np.float32),
            "window": picked.window,
            "position": picked.position + layout.first_position,
            "max_index": np.full(len(picked.feature), context_left, dtype=np.int64),
            "tokens": context_ids,
            "strs": context_strs,
            "acts": picked.acts.astype(np.float32),
        },
    )

    n_neighbours = min(n_neighbours, n_features - 1)
    neighbour_ids, neighbour_cos = _neighbours(directions, W_dec, ids, n_neighbours)
    feature_columns: dict[str, Any] = {
        "feature": ids,
        "frequency": recorder.frequency().cpu().numpy(),
        "n_fired": recorder.n_fired.cpu().numpy(),
        "mean_act": recorder.mean_when_fired().cpu().numpy(),
        "max_act": recorder.max_act().cpu().numpy(),
        "histogram": recorder.histograms().cpu().numpy(),
        "neighbours": neighbour_ids,
        "neighbour_cos": neighbour_cos,
    }
    if clt is not None:
        layer, feature = np.divmod(ids, clt.d_sae)
        # [source layer, d_sae, target layer]: the norm of what a feature writes to each layer.
        norms = _decoder_rows(clt).view(clt.n_layers, clt.d_sae, clt.n_layers, -1).norm(dim=-1)
        feature_columns |= {
            "layer": layer,
            "layer_feature": feature,
            "writes": norms[layer, feature].cpu().numpy().astype(np.float32),
        }
    compare_meta = None
    if other is not None:
        cos, found = nearest_neighbours(directions, other, 1)
        feature_columns["match"] = found[:, 0].cpu().numpy()
        feature_columns["match_cos"] = cos[:, 0].cpu().numpy().astype(np.float32)
        compare_meta = {"path": str(compare), "d_sae": int(other.shape[0])}
    write_table(out / FEATURES_FILENAME, feature_columns)

    effects = (
        logit_effects(_load_model(datamodule, device), written[selected], n_logits, model_spec)
        if n_logits
        else LogitEffects(note="logit effects skipped (--n_logits 0).")
    )
    if effects.note:
        notes.append(effects.note)
    elif clt is not None and n_logits:
        notes.append(
            "logit effects of a cross-layer transcoder's feature: the sum of its writes to its "
            "own and every later layer's MLP output, through the final norm and unembedding "
            "(the direct path)."
        )
    _write_logits(out, ids, effects, text)

    meta = {
        "lightning_sae_version": __version__,
        "sae": {
            "path": str(ckpt_path),
            "class": type(sae).__name__,
            "d_in": sae.d_in,
            "d_sae": n_features,
            "metadata": sae_meta,
            "member": member,
        },
        "clt": None
        if clt is None
        else {
            "n_layers": clt.n_layers,
            "d_sae": clt.d_sae,
            "input_hooks": list(clt.input_hooks),
            "output_hooks": list(clt.output_hooks),
        },
        "config": str(config),
        "model": model_spec,
        "hook": hook if clt is None else f"{hooks[0]} .. {hooks[-1]}",
        "cache": str(cache_root),
        "split": split,
        "windows": [first, stop],
        "n_tokens": recorder.n_tokens,
        "pass_seconds": pass_seconds,  # the recording pass alone (read, encode, record)
        "context_size": layout.context_size,
        "first_position": layout.first_position,
        "context_left": context_left,
        "context_right": context_right,
        "n_features": len(ids),
        "options": {
            "n_top": n_top,
            "n_intervals": n_intervals,
            "per_interval": per_interval,
            "n_neighbours": n_neighbours,
            "n_logits": n_logits,
            "seed": seed,
        },
        "hist_edges": hist_edges().tolist(),
        "compare": compare_meta,
        "notes": notes,
    }
    write_meta(out, meta)
    if html:
        browser.write_browser(out)


def _layer_batches(
    stores: list[ShardedActivations], positions: int, first: int, stop: int, per_batch: int
) -> Any:
    """:func:`batches` of one hook's store; of several (a CLT's layers, cached alike), the
    same rows of each stacked ``[N, n_layers, d_in]``."""
    if len(stores) == 1:
        yield from batches(stores[0], positions, first, stop, per_batch)
        return
    readers = [batches(store, positions, first, stop, per_batch) for store in stores]
    for parts in zip(*readers, strict=True):
        (window_ids, _), *others = parts
        if any(not torch.equal(window_ids, w) for w, _ in others):
            raise InspectError(
                "the CLT's input hooks are cached in different shards; rebuild the cache."
            )
        yield window_ids, torch.stack([rows for _, rows in parts], dim=1)


def _decoder_rows(clt: CrossLayerTranscoder) -> Tensor:
    """``[n_layers * d_sae, n_layers * d_out]``: each feature's writes to every layer side by
    side (zero before its own layer), so decoder cosine compares features of any layers."""
    rows = torch.zeros(clt.n_layers, clt.d_sae, clt.n_layers, clt.d_out)
    for source in range(clt.n_layers):
        rows[source, :, source:] = clt.decoder_directions(source).detach().float().cpu()
    return rows.flatten(2).flatten(0, 1).to(clt.W_enc.device)


def _total_writes(clt: CrossLayerTranscoder) -> Tensor:
    """``[n_layers * d_sae, d_out]``: the sum of each feature's writes over its target layers,
    what it adds to the residual stream through the MLP outputs; its direct logit effect."""
    total = [clt.decoder_directions(s).detach().float().sum(dim=1) for s in range(clt.n_layers)]
    return torch.cat(total)


def _context_tokens(
    tokens: np.ndarray, picked: Picked, layout: Any, left: int, width: int
) -> np.ndarray:
    """``[n, width]`` token ids around each picked max position; -1 outside the window's
    cached positions."""
    cached = picked.position[:, None] - left + np.arange(width)[None]
    inside = (cached >= 0) & (cached < layout.positions)
    columns = np.clip(cached, 0, layout.positions - 1) + layout.first_position
    return np.where(inside, tokens[picked.window[:, None], columns], -1).astype(np.int32)


def _neighbours(
    directions: Tensor, W_dec: Tensor, ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, cosines) ``[F, k]`` of each direction's nearest other decoder rows. One extra
    neighbour is searched and each feature's own row dropped: a feature subset cannot use
    ``exclude_self``, which needs queries == keys."""
    if k == 0:
        return np.zeros((len(ids), 0), dtype=np.int64), np.zeros((len(ids), 0), dtype=np.float32)
    cos, found = nearest_neighbours(directions, W_dec, k + 1)
    cos, found = cos.cpu().numpy(), found.cpu().numpy()
    keep = found != ids[:, None]
    keep[keep.all(axis=1), -1] = False  # own row pushed out by ties: drop the last instead
    return found[keep].reshape(-1, k), cos[keep].reshape(-1, k).astype(np.float32)


def _load_model(datamodule: ActivationDataModule, device: str) -> Any:
    return datamodule.language_model.load(device)


def _write_logits(out: Path, ids: np.ndarray, effects: LogitEffects, text: TokenText) -> None:
    columns: dict[str, list[Any]] = {
        "feature": [], "direction": [], "rank": [], "token": [], "str": [], "effect": []
    }  # fmt: skip
    for direction, token_ids, values in (
        ("up", effects.up_ids, effects.up_values),
        ("down", effects.down_ids, effects.down_values),
    ):
        if token_ids is None or values is None:
            continue
        n, k = token_ids.shape
        flat_ids = token_ids.reshape(-1).numpy()
        columns["feature"] += np.repeat(ids, k).tolist()
        columns["direction"] += [direction] * (n * k)
        columns["rank"] += np.tile(np.arange(k), n).tolist()
        columns["token"] += flat_ids.tolist()
        columns["str"] += text(flat_ids)
        columns["effect"] += values.reshape(-1).tolist()
    types = {
        "feature": pa.int64(), "direction": pa.string(), "rank": pa.int64(),
        "token": pa.int64(), "str": pa.string(), "effect": pa.float32(),
    }  # fmt: skip
    table = pa.table({k: pa.array(v, type=types[k]) for k, v in columns.items()})
    pq.write_table(table, out / LOGITS_FILENAME)


# ----------------------------------------------------------------------------- command line
def inspect_main(argv: list[str]) -> None:
    """``lightning-sae inspect --ckpt_path CKPT --config CFG --out DIR``."""
    args, rest = inspect_parser().parse_known_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in ("ckpt_path", "config", "out")}
    options["progress"] = not options.pop("no_progress")
    options["html"] = not options.pop("no_html")
    try:
        overrides = data_overrides(rest, "inspect")
        out = inspect(args.ckpt_path, args.config, args.out, **options, data_overrides=overrides)
    except (ValueError, FileNotFoundError) as error:  # bad input (InspectError, DataError...)
        raise SystemExit(f"error: {error}") from None
    folders = (
        [out]
        if (out / FEATURES_FILENAME).is_file()
        else sorted(folder.parent for folder in out.glob(f"*/{FEATURES_FILENAME}"))
    )
    for folder in folders:
        print(f"wrote {folder / 'index.html'} and the data beside it ({FEATURES_FILENAME}, ...)")

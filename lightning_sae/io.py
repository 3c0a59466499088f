"""Export SAEs as SAELens-loadable folders and load such folders back into our module classes.

A folder holds ``cfg.json`` and ``sae_weights.safetensors`` in the layout of SAELens 6.x
(``SAE.load_from_disk(folder)`` reads it). The weights are in the units of the model the
activations came from: the input scale our modules train with is folded in, so

    W_enc' = s * W_enc,  W_dec' = W_dec / s,  b_dec' = b_dec / s,  (b_enc, thresholds unchanged)

and the pre-activations, hence the feature activations, are exactly those of the module.

``cfg.json`` carries, besides SAELens's keys, ``metadata.lightning_sae`` with our class path and
constructor arguments, so :func:`load` rebuilds the same class; a folder written by SAELens has
no such entry and loads into the class that implements its ``architecture``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from lightning_sae import __version__, hub, peers
from lightning_sae.commands import EXPORT_WEIGHTS_FILENAMES, export_parser
from lightning_sae.files import load_safetensors_file, load_torch_file, read_text_bounded
from lightning_sae.models import (
    GatedSAE,
    JumpReLUSAE,
    JumpReLUSkipTranscoder,
    JumpReLUTranscoder,
    SkipTranscoder,
    SparseAutoencoder,
    StandardSAE,
    TopKSAE,
    Transcoder,
    class_path_of,
    variant_class,
)
from lightning_sae.models.group import SAEGroup, names_group

CONFIG_FILENAME = "cfg.json"
# SAELens's load_from_disk reads exactly this name; ``sae.safetensors`` is accepted on load.
WEIGHTS_FILENAME, WEIGHTS_FALLBACK_FILENAME = EXPORT_WEIGHTS_FILENAMES
# A sparsify run's training config, beside its hookpoint folders: the model and dataset.
RUN_CONFIG_FILENAME = hub.RUN_CONFIG_FILENAME
# The cfg.json format this file writes: SAELens's 6.x layout. SAELens picks its loader by
# ``metadata.sae_lens_version`` (below 6.0 it converts from the old layout), so that key holds
# the format's version, not a SAELens install that wrote the file; ``metadata.lightning_sae``
# says which program did. Tested against SAELens 6.x (tests/test_io.py).
SAELENS_FORMAT_VERSION = "6.0.0"

# Checkpoint data-module hyperparameters copied into SAELens metadata, under SAELens's names.
_METADATA_SYNONYMS = {
    "model_name": ("model_name", "model"),
    "hook_name": ("hook_name", "hook"),
    "context_size": ("context_size", "context_length", "seq_len"),
    "dataset_path": ("dataset_path", "dataset", "dataset_name"),
    "prepend_bos": ("prepend_bos",),
    "model_revision": ("model_revision", "revision"),
}


# ----------------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class _Format:
    """How one of our classes maps onto a SAELens architecture.

    ``to_saelens(sae)`` gives the class-specific tensors (raw units) and cfg keys;
    ``from_saelens(weights, cfg)`` gives our class-specific tensors and constructor arguments.
    W_enc, W_dec and b_dec are handled once for all.
    """

    class_path: str
    architecture: str
    to_saelens: Callable[[SparseAutoencoder], tuple[dict[str, Tensor], dict[str, Any]]]
    from_saelens: Callable[[dict[str, Tensor], dict[str, Any]], tuple[dict[str, Tensor], dict]]


def _relu_to(sae: SparseAutoencoder) -> tuple[dict[str, Tensor], dict[str, Any]]:
    return {"b_enc": sae.b_enc.detach()}, {}


def _relu_from(weights: dict[str, Tensor], cfg: dict[str, Any]) -> tuple[dict, dict]:
    return {"b_enc": weights["b_enc"]}, {}


def _topk_to(sae: SparseAutoencoder) -> tuple[dict[str, Tensor], dict[str, Any]]:
    cfg = {"k": int(sae.hparams.k), "rescale_acts_by_decoder_norm": False}
    return {"b_enc": sae.b_enc.detach()}, cfg


def _topk_from(weights: dict[str, Tensor], cfg: dict[str, Any]) -> tuple[dict, dict]:
    return {"b_enc": weights["b_enc"]}, {"k": int(cfg["k"])}


def _jumprelu_to(sae: SparseAutoencoder) -> tuple[dict[str, Tensor], dict[str, Any]]:
    return {"b_enc": sae.b_enc.detach(), "threshold": sae.positive_threshold().detach()}, {}


def _saelens_threshold(weights: dict[str, Tensor]) -> Tensor:
    # Older SAELens folders store log_threshold instead.
    return weights["threshold"] if "threshold" in weights else weights["log_threshold"].exp()


def _jumprelu_from(weights: dict[str, Tensor], cfg: dict[str, Any]) -> tuple[dict, dict]:
    return {"b_enc": weights["b_enc"], "threshold": _saelens_threshold(weights)}, {}


def _batchtopk_to(sae: SparseAutoencoder) -> tuple[dict[str, Tensor], dict[str, Any]]:
    # At inference BatchTopK is a JumpReLU with one threshold for every latent (SAELens
    # exports its own BatchTopK the same way).
    if int(sae.threshold_updates) == 0:
        raise ValueError(
            f"this {type(sae).__name__} has no inference threshold yet (no training step ran), "
            "so its eval-mode code still depends on the batch; train it before exporting."
        )
    threshold = sae.threshold.detach().expand(sae.d_sae)
    return {"b_enc": sae.b_enc.detach(), "threshold": threshold}, {}


def _batchtopk_from(weights: dict[str, Tensor], cfg: dict[str, Any]) -> tuple[dict, dict]:
    threshold = _saelens_threshold(weights)
    if not torch.all(threshold == threshold[0]):
        raise ValueError(
            "a BatchTopK SAE has one threshold for all latents, but this folder's thresholds "
            "differ; load it as a JumpReLU SAE (drop metadata.lightning_sae from cfg.json)."
        )
    state = {"b_enc": weights["b_enc"], "threshold": threshold[0].clone()}
    return state | {"threshold_updates": torch.tensor(1)}, {}


def _gated_to(sae: SparseAutoencoder) -> tuple[dict[str, Tensor], dict[str, Any]]:
    # Our gate bias is b_enc; SAELens calls it b_gate and has no b_enc.
    weights = {"b_gate": sae.b_enc, "b_mag": sae.b_mag, "r_mag": sae.r_mag}
    return {k: v.detach() for k, v in weights.items()}, {}


def _gated_from(weights: dict[str, Tensor], cfg: dict[str, Any]) -> tuple[dict, dict]:
    return {"b_enc": weights["b_gate"], "b_mag": weights["b_mag"], "r_mag": weights["r_mag"]}, {}


def _transcoding(
    to: Callable[[SparseAutoencoder], tuple[dict[str, Tensor], dict[str, Any]]],
    from_: Callable[[dict[str, Tensor], dict[str, Any]], tuple[dict[str, Tensor], dict]],
) -> tuple[Callable, Callable]:
    """A variant's conversions plus what a transcoder adds: ``d_out`` and the skip ``W_skip``
    [d_out, d_in], folded by the ratio of the input's scale to the output's (model units in,
    model units out)."""

    def to_saelens(sae: SparseAutoencoder) -> tuple[dict[str, Tensor], dict[str, Any]]:
        weights, cfg = to(sae)
        if sae.W_skip is not None:
            ratio = sae.input_scale.double() / sae.output_scale.double()
            weights["W_skip"] = (sae.W_skip.detach().double() * ratio).to(sae.W_skip.dtype)
        return weights, cfg | {"d_out": int(sae.d_out)}

    def from_saelens(weights: dict[str, Tensor], cfg: dict[str, Any]) -> tuple[dict, dict]:
        ours, kwargs = from_(weights, cfg)
        if "W_skip" in weights:
            ours["W_skip"] = weights["W_skip"]
        return ours, kwargs | {"d_out": int(cfg["d_out"])}

    return to_saelens, from_saelens


def _clt_to(sae: SparseAutoencoder) -> tuple[dict[str, Tensor], dict[str, Any]]:
    # Every tensor in model units (models/clt.py folds its per-layer scales); no SAELens
    # architecture reads a cross-layer transcoder, so this is lightning-sae's own layout.
    cfg = {"d_out": int(sae.d_out), "n_layers": int(sae.n_layers)}
    return sae.folded_weights(), cfg


def _clt_from(weights: dict[str, Tensor], cfg: dict[str, Any]) -> tuple[dict, dict]:
    expected = {"W_enc", "b_enc", "b_dec", *(f"W_dec.{s}" for s in range(int(cfg["n_layers"])))}
    missing = sorted(expected - set(weights))
    if missing:
        raise ValueError(
            f"the weights file lacks {', '.join(missing)} of a {cfg['n_layers']}-layer "
            "cross-layer transcoder; the folder is incomplete: export it again."
        )
    ours = {key: value for key, value in weights.items() if key != "threshold"}
    if "threshold" in weights:
        threshold = weights["threshold"]
        if threshold.dim() == 2:  # JumpReLU: one per feature
            ours["threshold"] = threshold
        else:  # BatchTopK: one per layer (or one), learned in training
            ours |= {"threshold": threshold, "threshold_updates": torch.tensor(1)}
    return ours, {}


_MODELS = "lightning_sae.models"
_TC = f"{_MODELS}.transcoder"
_CLT = f"{_MODELS}.clt"
_RELU_TC = _transcoding(_relu_to, _relu_from)
_TOPK_TC = _transcoding(_topk_to, _topk_from)
_JUMPRELU_TC = _transcoding(_jumprelu_to, _jumprelu_from)
_BATCHTOPK_TC = _transcoding(_batchtopk_to, _batchtopk_from)
FORMATS: dict[str, _Format] = {
    f.class_path: f
    for f in (
        # The plain ReLU base class is a standard SAE without a sparsity penalty.
        _Format(f"{_MODELS}.base.SparseAutoencoder", "standard", _relu_to, _relu_from),
        _Format(f"{_MODELS}.standard.StandardSAE", "standard", _relu_to, _relu_from),
        _Format(f"{_MODELS}.topk.TopKSAE", "topk", _topk_to, _topk_from),
        _Format(f"{_MODELS}.topk.BatchTopKSAE", "jumprelu", _batchtopk_to, _batchtopk_from),
        _Format(f"{_MODELS}.jumprelu.JumpReLUSAE", "jumprelu", _jumprelu_to, _jumprelu_from),
        _Format(f"{_MODELS}.gated.GatedSAE", "gated", _gated_to, _gated_from),
        # Transcoders: SAELens 6 loads the ReLU and JumpReLU ones, with or without skip
        # (BatchTopK exports as the JumpReLU it is at inference); TopK transcoders and
        # crosscoders have no SAELens architecture and are written in our own format (the same
        # files, an architecture name only lightning-sae's load() reads).
        _Format(f"{_TC}.Transcoder", "transcoder", *_RELU_TC),
        _Format(f"{_TC}.SkipTranscoder", "skip_transcoder", *_RELU_TC),
        _Format(f"{_TC}.JumpReLUTranscoder", "jumprelu_transcoder", *_JUMPRELU_TC),
        _Format(f"{_TC}.JumpReLUSkipTranscoder", "jumprelu_skip_transcoder", *_JUMPRELU_TC),
        _Format(f"{_TC}.BatchTopKTranscoder", "jumprelu_transcoder", *_BATCHTOPK_TC),
        _Format(f"{_TC}.BatchTopKSkipTranscoder", "jumprelu_skip_transcoder", *_BATCHTOPK_TC),
        _Format(f"{_TC}.TopKTranscoder", "lightning_sae_topk_transcoder", *_TOPK_TC),
        _Format(f"{_TC}.TopKSkipTranscoder", "lightning_sae_topk_skip_transcoder", *_TOPK_TC),
        _Format(f"{_TC}.CrossCoder", "lightning_sae_crosscoder", _relu_to, _relu_from),
        _Format(f"{_TC}.TopKCrossCoder", "lightning_sae_topk_crosscoder", _topk_to, _topk_from),
        _Format(
            f"{_TC}.BatchTopKCrossCoder",
            "lightning_sae_batchtopk_crosscoder",
            _batchtopk_to,
            _batchtopk_from,
        ),
        _Format(f"{_CLT}.CrossLayerTranscoder", "lightning_sae_clt", _clt_to, _clt_from),
        _Format(
            f"{_CLT}.JumpReLUCrossLayerTranscoder", "lightning_sae_jumprelu_clt", _clt_to, _clt_from
        ),
        _Format(f"{_CLT}.TopKCrossLayerTranscoder", "lightning_sae_topk_clt", _clt_to, _clt_from),
        _Format(
            f"{_CLT}.BatchTopKCrossLayerTranscoder",
            "lightning_sae_batchtopk_clt",
            _clt_to,
            _clt_from,
        ),
    )
}
# The class a SAELens folder without our metadata loads into, per architecture.
DEFAULT_CLASS: dict[str, type[SparseAutoencoder]] = {
    "standard": StandardSAE,
    "topk": TopKSAE,
    "jumprelu": JumpReLUSAE,
    "gated": GatedSAE,
    "transcoder": Transcoder,
    "skip_transcoder": SkipTranscoder,
    "jumprelu_transcoder": JumpReLUTranscoder,
    "jumprelu_skip_transcoder": JumpReLUSkipTranscoder,
}
# Architectures only lightning-sae reads: such a folder must carry metadata.lightning_sae.
OWN_ARCHITECTURES = {f.architecture for f in FORMATS.values()} - set(DEFAULT_CLASS)


def format_of(cls: type[SparseAutoencoder]) -> _Format:
    """The format of ``cls``: that of the nearest known class in its MRO (so subclasses such
    as MatryoshkaSAE export as what they are at inference, here BatchTopK)."""
    for base in cls.__mro__:
        found = FORMATS.get(f"{base.__module__}.{base.__qualname__}")
        if found is not None:
            return found
    raise ValueError(
        f"{cls.__name__} has no SAELens equivalent; export supports subclasses of "
        + ", ".join(sorted(FORMATS))
        + "."
    )


def _init_args(hparams: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments from saved hyperparameters (LightningCLI adds ``_``-prefixed keys)."""
    return {key: value for key, value in hparams.items() if not key.startswith("_")}


# ----------------------------------------------------------------------------- export
@torch.no_grad()
def saelens_state(sae: SparseAutoencoder) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """SAELens weights (input scale folded in) and the architecture's cfg keys."""
    fmt = format_of(type(sae))
    if getattr(sae, "n_layers", None) is not None:  # a cross-layer transcoder folds its own
        return fmt.to_saelens(sae)
    dtype = sae.W_enc.dtype
    # The input's factor scales W_enc's rows (one per input dimension for a crosscoder's
    # per-layer scales); the written site's factor (a transcoder's output scale), W_dec's columns.
    in_scale = sae.input_scale.double().reshape(-1, 1)
    out_scale = sae.target_scale().double()
    # Fold in float64 so that exporting an fp32 SAE rounds once, not twice.
    weights = {
        "W_enc": sae.W_enc.double() * in_scale,
        "W_dec": sae.W_dec.double() / out_scale,
        "b_dec": sae.b_dec.double() / out_scale,
    }
    extra_weights, extra_cfg = fmt.to_saelens(sae)
    weights |= extra_weights
    return {k: v.to(dtype).contiguous().cpu() for k, v in weights.items()}, extra_cfg


def export_sae(
    sae: SparseAutoencoder, out_dir: str | Path, metadata: dict[str, Any] | None = None
) -> Path:
    """Write ``cfg.json`` + ``sae_weights.safetensors`` for ``sae`` into ``out_dir``.

    ``metadata`` (e.g. ``model_name``, ``hook_name``, ``context_size``) goes into SAELens's
    ``metadata`` block, which SAELens uses to know where the SAE attaches.
    """
    if not bool(sae.input_scale_fitted):
        raise ValueError(
            "the SAE's input scale has not been fitted yet (normalize_activations=True and no "
            "training step ran); train it before exporting."
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights, extra_cfg = saelens_state(sae)
    sites: dict[str, Any] = {}  # where a transcoder or crosscoder reads and writes
    if getattr(sae, "n_layers", None) is not None:
        sites = {"hook_names": sae.input_hooks, "hook_names_out": sae.output_hooks}
    elif getattr(sae, "maps_sites", False):
        sites = {"hook_name": sae.input_hook, "hook_name_out": sae.output_hook}
    elif getattr(sae, "writes_layers", False):
        sites = {"hook_names": list(sae.hooks)}
    sites = {key: value for key, value in sites.items() if value}
    cfg = {
        "architecture": format_of(type(sae)).architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": str(sae.W_enc.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": bool(sae.hparams.apply_b_dec_to_input),
        "normalize_activations": "none",  # the input scale is folded into the weights
        "reshape_activations": "none",
        **extra_cfg,
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            **sites,
            **(metadata or {}),
            "lightning_sae": {
                "version": __version__,
                "written_by": f"lightning-sae {__version__}",
                "saelens_format": SAELENS_FORMAT_VERSION,
                "class_path": class_path_of(type(sae)),
                "init_args": _init_args(dict(sae.hparams)),
                **sae.scale_metadata(),
            },
        },
    }
    save_file(weights, str(out / WEIGHTS_FILENAME))
    (out / CONFIG_FILENAME).write_text(json.dumps(cfg, indent=2) + "\n")
    # safetensors writes owner-only (0600) files; give the weights the mode every other file of
    # the run gets from the umask, as cfg.json just did.
    (out / WEIGHTS_FILENAME).chmod((out / CONFIG_FILENAME).stat().st_mode & 0o777)
    return out


def _sae_from_checkpoint(
    checkpoint: dict[str, Any], class_path: str | None, ckpt_path: Path
) -> SparseAutoencoder:
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    source = "--class_path"
    if class_path is None and "_class_path" in hparams:
        class_path, source = hparams["_class_path"], "the checkpoint's _class_path"
    if class_path is None:
        raise ValueError(
            "the checkpoint does not record its SAE class (it was not trained through "
            "lightning-sae fit); pass --class_path, e.g. lightning_sae.models.topk.TopKSAE."
        )
    sae = variant_class(class_path, source)(**_init_args(hparams))
    _load_weights(sae, checkpoint, ckpt_path)
    return sae.eval()


def _metadata_from_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any]:
    data_hparams = checkpoint.get("datamodule_hyper_parameters") or {}
    metadata = {}
    for key, synonyms in _METADATA_SYNONYMS.items():
        for name in synonyms:
            value = data_hparams.get(name)
            if isinstance(value, (str, int, float, bool)):
                metadata[key] = value
                break
    if data_hparams.get("prepend_bos") and data_hparams.get("exclude_bos"):
        # Trained without the BOS position: SAELens's evals then skip it too.
        metadata["seqpos_slice"] = [1, None]
    return metadata


def export_checkpoint(
    ckpt_path: str | Path,
    out_dir: str | Path,
    class_path: str | None = None,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Export a Lightning checkpoint of any SAE variant (loaded with ``weights_only=True``).

    A checkpoint of an :class:`SAEGroup` gives one folder per member, ``out_dir/<member>``, each
    with the member's hook as ``metadata.hook_name``. A folder that already holds an SAE is
    refused, before anything is written, unless ``overwrite``.
    """
    _export_checkpoint(ckpt_path, out_dir, class_path, metadata, overwrite)
    return Path(out_dir)


def is_sae_folder(path: str | Path) -> bool:
    """Whether ``path`` names an SAE folder (a ``hf://`` path, or a folder with cfg.json)
    rather than a Lightning checkpoint."""
    return hub.is_hub_path(path) or (Path(path) / CONFIG_FILENAME).is_file()


def _is_group_checkpoint(hparams: dict[str, Any]) -> bool:
    saved = hparams.get("_class_path")
    return names_group(saved) if saved is not None else "members" in hparams


def _export_checkpoint(
    ckpt_path: str | Path,
    out_dir: str | Path,
    class_path: str | None,
    metadata: dict[str, Any] | None,
    overwrite: bool = False,
) -> list[Path]:
    """The folders written: ``[out_dir]``, or one per member of a group."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file; pass a folder (it is created if missing).")
    if is_sae_folder(ckpt_path):  # a SAELens or sparsify folder, or hf://: written anew
        if class_path is not None:
            raise ValueError(f"{ckpt_path} records its own class; leave out --class_path.")
        sae = load(ckpt_path)
        _check_export_folder(out_dir, overwrite)
        source = sae_metadata(ckpt_path)
        kept = {k: v for k, v in source.items() if k not in ("sae_lens_version", "lightning_sae")}
        return [export_sae(sae, out_dir, kept | (metadata or {}))]
    ckpt_path = Path(ckpt_path)
    checkpoint = _read_checkpoint(ckpt_path)
    common = _metadata_from_checkpoint(checkpoint)
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    if not _is_group_checkpoint(hparams):
        sae = _sae_from_checkpoint(checkpoint, class_path, ckpt_path)
        _check_export_folder(out_dir, overwrite)
        return [export_sae(sae, out_dir, common | (metadata or {}))]
    if class_path is not None:
        raise ValueError(
            f"{ckpt_path} holds an SAEGroup, whose members record their own classes; leave out "
            "--class_path."
        )
    # Members are built from the checkpoint's specs through the project's class table.
    group = SAEGroup(members=hparams["members"])
    _load_weights(group, checkpoint, ckpt_path)
    for name in group.named_saes():
        _check_export_folder(out_dir / name, overwrite)
    folders = []
    for name, sae in group.named_saes().items():
        hook = group.hooks[name]
        member = common | ({"hook_name": hook} if hook else {}) | (metadata or {})
        folders.append(export_sae(sae.eval(), out_dir / name, member))
    return folders


def _read_checkpoint(ckpt_path: Path) -> dict[str, Any]:
    # A latent-sharded run's checkpoint is a folder of shards: reassembled here, in one process.
    from lightning_sae.parallel.checkpoint import consolidate_checkpoint, is_sharded_checkpoint

    if is_sharded_checkpoint(ckpt_path):
        return consolidate_checkpoint(ckpt_path)
    if ckpt_path.is_dir():
        raise FileNotFoundError(
            f"--ckpt_path {ckpt_path} is a folder but holds no checkpoint (a latent-sharded "
            "run's checkpoint folder holds meta.pt and its shards); pass a .ckpt file from a "
            "run's checkpoints/ folder."
        )
    if not ckpt_path.exists():
        raise FileNotFoundError(
            f"--ckpt_path {ckpt_path} does not exist; pass a .ckpt file from a run's "
            "checkpoints/ folder (or the folder a latent-sharded run saved)."
        )
    checkpoint = load_torch_file(ckpt_path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(
            f"{ckpt_path} holds no state_dict of weights; pass a Lightning checkpoint (.ckpt) "
            "that lightning-sae fit wrote."
        )
    return checkpoint


def _check_export_folder(folder: Path, overwrite: bool) -> None:
    """Refuse a file where the folder goes, and (unless ``overwrite``) a folder that already
    holds an SAE, before anything is written."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file, where the export folder goes; pass another --out.")
    names = (CONFIG_FILENAME, *EXPORT_WEIGHTS_FILENAMES)
    held = [name for name in names if (folder / name).exists()]
    if held and not overwrite:
        raise ValueError(
            f"{folder} already holds an SAE ({', '.join(held)}); pass --overwrite to replace it, "
            "or another --out."
        )


def _load_weights(module: torch.nn.Module, checkpoint: dict[str, Any], ckpt_path: Path) -> None:
    """The checkpoint's weights into ``module``; missing, unexpected or misshapen ones are one
    error naming them."""
    try:
        missing, unexpected = module.load_state_dict(checkpoint["state_dict"], strict=False)
    except RuntimeError as error:  # a shape that does not match
        detail = " ".join(str(error).split("\n")[1:2]).strip() or str(error)
        raise ValueError(
            f"{ckpt_path} does not fit a {type(module).__name__} built from its own "
            f"hyperparameters ({detail}); the checkpoint is damaged or was edited."
        ) from None
    if missing or unexpected:
        raise ValueError(
            f"{ckpt_path} does not hold the weights of a {type(module).__name__}: missing "
            f"{list(missing)}, unexpected {list(unexpected)}; the checkpoint is incomplete or "
            "was written by another program."
        )


# ----------------------------------------------------------------------------- load
def _weights_file(folder: Path) -> Path:
    for name in (WEIGHTS_FILENAME, WEIGHTS_FALLBACK_FILENAME):
        if (folder / name).exists():
            return folder / name  # one that is not a regular file is refused when read
    raise FileNotFoundError(
        f"{folder} has no {WEIGHTS_FILENAME}; pass a folder written by `lightning-sae export` "
        "or SAELens's save_model / save_inference_model."
    )


def _check_supported(cfg: dict[str, Any], weights: dict[str, Tensor]) -> None:
    normalize = cfg.get("normalize_activations", "none")
    if normalize not in ("none", None):
        raise ValueError(
            f"cfg.json has normalize_activations={normalize!r}, a run-time normalisation our "
            "modules cannot represent; fold it into the weights in SAELens first "
            "(e.g. sae.fold_activation_norm_scaling_factor(factor)) and save again."
        )
    scaling = weights.get("scaling_factor", weights.get("finetuning_scaling_factor"))
    if scaling is not None and not torch.allclose(scaling, torch.ones_like(scaling)):
        raise ValueError("folders with a finetuning scaling factor are not supported.")


def _fold_topk_decoder_norm(ours: dict[str, Tensor], weights: dict[str, Tensor]) -> None:
    # SAELens option: pre-activations multiplied by ||W_dec_j|| and decoder rows normalised.
    # Moving the norms into W_enc, b_enc and W_dec gives the same activations and output.
    norms = weights["W_dec"].norm(dim=-1).clamp_min(1e-8)
    ours["W_enc"] = weights["W_enc"] * norms
    ours["b_enc"] = ours["b_enc"] * norms
    ours["W_dec"] = weights["W_dec"] / norms[:, None]


def read_config(path: Path) -> dict[str, Any]:
    """``cfg.json`` as a dict; a truncated or hand-broken file is named in the error."""
    try:
        cfg = json.loads(read_text_bounded(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}); the folder is incomplete or damaged: export or "
            "download it again."
        ) from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} holds a JSON {type(cfg).__name__}, not an object of settings.")
    return cfg


def read_sae_folder(
    folder: Path, with_weights: bool = True
) -> tuple[dict[str, Any], dict[str, Tensor] | None]:
    """A folder's ``cfg.json`` and weights in SAELens 6.x's layout, whichever program wrote it
    (lightning-sae, SAELens of any version, sparsify: see :mod:`lightning_sae.peers`)."""
    if not (folder / CONFIG_FILENAME).exists():
        raise FileNotFoundError(
            f"{folder / CONFIG_FILENAME} does not exist; pass the folder `lightning-sae export "
            "--out DIR` wrote, a SAELens or sparsify SAE folder, or hf://org/repo[/subfolder]."
        )
    cfg = read_config(folder / CONFIG_FILENAME)
    weights = load_safetensors_file(_weights_file(folder)) if with_weights else None
    run_config = None
    if peers.is_sparsify(cfg) and (folder.parent / RUN_CONFIG_FILENAME).is_file():
        run_config = read_config(folder.parent / RUN_CONFIG_FILENAME)
    return peers.current_layout(cfg, weights, folder, run_config)


def sae_metadata(path: str | Path) -> dict[str, Any]:
    """The ``metadata`` block (model, hook, dataset...) of an SAE folder or ``hf://`` path, in
    SAELens 6.x's names whichever program wrote it."""
    cfg, _ = read_sae_folder(hub.local_folder(path), with_weights=False)
    return dict(cfg.get("metadata") or {})


def load(path: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load an SAE folder, or ``hf://org/repo[/subfolder][@revision]``, into our module class,
    in eval mode.

    Our exports come back as the class and constructor arguments they were exported from;
    SAELens folders (any version) as StandardSAE / TopKSAE / JumpReLUSAE / GatedSAE or a
    transcoder; sparsify folders as TopKSAE or a TopK (skip) transcoder. The returned module has
    ``input_scale`` 1 (the scale is in the weights), so ``encode``/``decode``/``forward`` take
    and give activations in model units, as before export. A Hub path is fetched through
    ``huggingface_hub`` (its cache, ``HF_HUB_OFFLINE``; see :mod:`lightning_sae.hub`).
    """
    folder = hub.local_folder(path)
    cfg, weights = read_sae_folder(folder)
    assert weights is not None
    _check_supported(cfg, weights)
    name = cfg.get("architecture", "standard")
    if name not in DEFAULT_CLASS and name not in OWN_ARCHITECTURES:
        raise ValueError(
            f"architecture {name!r} in {folder / CONFIG_FILENAME} is not supported; "
            f"supported: {', '.join([*DEFAULT_CLASS, *sorted(OWN_ARCHITECTURES)])}."
        )
    ours = (cfg.get("metadata") or {}).get("lightning_sae")
    if not ours and name in OWN_ARCHITECTURES:
        raise ValueError(
            f"architecture {name!r} in {folder / CONFIG_FILENAME} is lightning-sae's own format, "
            "but metadata.lightning_sae (the class and its options) is missing; export the "
            "checkpoint again with `lightning-sae export`."
        )
    cls = (
        variant_class(ours["class_path"], f"{folder / CONFIG_FILENAME} (lightning_sae.class_path)")
        if ours
        else DEFAULT_CLASS[name]
    )
    fmt = format_of(cls)
    if fmt.architecture != name:
        raise ValueError(
            f"{folder / CONFIG_FILENAME} says architecture {name!r} but class {cls.__name__}, "
            f"which exports as {fmt.architecture!r}; the folder was edited by hand?"
        )
    params, arch_kwargs = fmt.from_saelens(weights, cfg)
    for key in ("W_enc", "W_dec", "b_dec"):  # a CLT's decoder is W_dec.<layer>, given above
        if not any(have == key or have.startswith(f"{key}.") for have in params):
            params[key] = weights[key]
    if name == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        _fold_topk_decoder_norm(params, weights)
    if ours:
        kwargs = dict(ours["init_args"])
    else:
        kwargs = {
            "d_in": int(cfg["d_in"]),
            "d_sae": int(cfg["d_sae"]),
            "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True)),
            **arch_kwargs,
        }
    sae = cls(**kwargs)
    state = sae.state_dict()
    for key, value in params.items():
        state[key] = value.to(state[key].dtype)
    for key in ("input_scale", "output_scale"):  # the scales are in the weights
        if key in state:
            state[key] = torch.ones_like(state[key])
    state["input_scale_fitted"] = torch.ones_like(state["input_scale_fitted"])
    sae.load_state_dict(state)
    return sae.to(device).eval()


# ----------------------------------------------------------------------------- command line
def _folded_scales(input_scale: float | list[float], output_scale: float | list[float]) -> str:
    """', input scale X folded in' (per layer, and the output's, where they differ from 1)."""
    parts = []
    for name, value in (("input", input_scale), ("output", output_scale)):
        scales = value if isinstance(value, list) else [value]
        if not all(math.isclose(s, 1.0) for s in scales):
            parts.append(f"{name} scale " + "/".join(f"{s:.6g}" for s in scales))
    return f", {' and '.join(parts)} folded in" if parts else ""


def export_main(argv: list[str]) -> None:
    """``lightning-sae export --ckpt_path X --out DIR``."""
    parser = export_parser()
    args = parser.parse_args(argv)
    overrides = {k: v for k in ("model_name", "hook_name") if (v := getattr(args, k)) is not None}
    try:
        folders = _export_checkpoint(
            args.ckpt_path, args.out, args.class_path, overrides, args.overwrite
        )
    except (FileNotFoundError, ValueError) as error:  # HubError and UnreadableFileError too
        raise SystemExit(f"error: {error}") from None
    for out in folders:
        cfg = read_config(out / CONFIG_FILENAME)
        ours = cfg["metadata"]["lightning_sae"]
        folded = _folded_scales(ours.get("input_scale", 1.0), ours.get("output_scale", 1.0))
        hook = cfg["metadata"].get("hook_name")
        at = f", {hook}" if hook and len(folders) > 1 else ""
        files = f"{out / WEIGHTS_FILENAME} and {out / CONFIG_FILENAME}"
        print(f"wrote {files} ({cfg['architecture']}{at}{folded})")

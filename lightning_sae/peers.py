"""SAE folders written by other programs, read as the SAELens 6.x layout :mod:`lightning_sae.io`
loads: SAELens before 6.0 and EleutherAI's sparsify. Only the parsed ``cfg.json`` (and a
sparsify run's ``config.json``) and the safetensors tensors come in; the class comes out of
:data:`lightning_sae.models.VARIANTS` through io, never from the files.

- **SAELens < 6** (most releases on the Hub): ``hook_point`` and ``activation_fn_str`` were
  renamed, TopK was ``activation_fn: topk`` with ``activation_fn_kwargs.k`` under the
  ``standard`` architecture, and the model and hook sat at the top level, not in ``metadata``.
- **sparsify** (``cfg.json`` with ``k``, ``num_latents`` / ``expansion_factor``, ``d_in``;
  weights ``encoder.weight`` [d_sae, d_in], ``encoder.bias``, ``W_dec`` [d_sae, d_in],
  ``b_dec``, optional ``W_skip`` [d_in, d_in]). Its encoder is
  ``topk(relu(W (x - b_dec) + b))`` (no ``- b_dec`` for a transcoder) and its decoder
  ``acts @ W_dec + b_dec (+ x @ W_skip^T)``: a TopKSAE, or a TopK (skip) transcoder whose
  output site has the input's width. The folder's name is the hookpoint (a module path).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

_MODELS = "lightning_sae.models"
# Top-level keys of an old SAELens cfg.json that describe the data, for metadata.
_OLD_METADATA_KEYS = (
    "model_name",
    "hook_name",
    "hook_head_index",
    "prepend_bos",
    "context_size",
    "dataset_path",
    "seqpos_slice",
    "model_from_pretrained_kwargs",
    "neuronpedia_id",
)


def is_sparsify(cfg: dict[str, Any]) -> bool:
    return (
        "architecture" not in cfg
        and "d_sae" not in cfg
        and "k" in cfg
        and ("num_latents" in cfg or "expansion_factor" in cfg)
    )


def is_old_saelens(cfg: dict[str, Any]) -> bool:
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    if not version:
        return True
    major = str(version).split(".", 1)[0]
    return major.isdigit() and int(major) < 6  # a version we cannot read: the current format


def current_layout(
    cfg: dict[str, Any],
    weights: dict[str, Tensor] | None,
    folder: Path,
    run_config: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor] | None]:
    """``cfg`` (and ``weights``, where given) in SAELens 6.x's layout; ``folder`` and a sparsify
    run's ``run_config`` give its hookpoint, model and dataset."""
    if is_sparsify(cfg):
        return _from_sparsify(cfg, weights, folder, run_config or {})
    if is_old_saelens(cfg):
        return _from_old_saelens(cfg, folder), weights
    return cfg, weights


def _from_old_saelens(cfg: dict[str, Any], folder: Path) -> dict[str, Any]:
    renamed = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index"}
    old = {renamed.get(key, key): value for key, value in cfg.items()}
    activation = old.get("activation_fn", old.get("activation_fn_str", "relu"))
    kwargs = old.get("activation_fn_kwargs") or {}
    new = {key: value for key, value in old.items() if key not in _OLD_METADATA_KEYS}
    architecture = old.get("architecture", "standard")
    if activation == "topk" and kwargs.get("k") is not None:
        architecture, new["k"] = "topk", int(kwargs["k"])
    elif architecture == "standard" and activation != "relu":
        raise ValueError(
            f"{folder / 'cfg.json'} has activation_fn {activation!r}; lightning-sae reads "
            "SAELens's relu and topk activations (and the jumprelu and gated architectures)."
        )
    normalize = old.get("normalize_activations")
    if isinstance(normalize, bool):  # SAELens < 3 wrote a flag
        normalize = "expected_average_only_in" if normalize else "none"
    new["normalize_activations"] = normalize or "none"
    new["architecture"] = architecture
    metadata = {key: old[key] for key in _OLD_METADATA_KEYS if old.get(key) is not None}
    new["metadata"] = {**metadata, **(old.get("metadata") or {})}
    return new


def _from_sparsify(
    cfg: dict[str, Any],
    weights: dict[str, Tensor] | None,
    folder: Path,
    run_config: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Tensor] | None]:
    where = folder / "cfg.json"
    activation = cfg.get("activation", "topk")
    if activation != "topk" or cfg.get("signed") or cfg.get("jumprelu"):
        raise ValueError(
            f"{where} is a sparsify coder with activation {activation!r}"
            f"{' (signed)' if cfg.get('signed') else ''}; lightning-sae reads sparsify's TopK "
            "coders only."
        )
    d_in, k = int(cfg["d_in"]), int(cfg["k"])
    d_sae = int(cfg.get("num_latents") or 0) or d_in * int(cfg.get("expansion_factor", 32))
    transcode, skip = bool(cfg.get("transcode")), bool(cfg.get("skip_connection"))
    # An autoencoder subtracts b_dec from its input; with a skip connection it is read as a skip
    # transcoder (which cannot), so b_dec moves into the encoder bias: W(x - b_dec) + b.
    fold_b_dec = skip and not transcode
    if transcode or skip:
        name = "TopKSkipTranscoder" if skip else "TopKTranscoder"
        class_path, architecture = (
            f"{_MODELS}.transcoder.{name}",
            ("lightning_sae_topk_skip_transcoder" if skip else "lightning_sae_topk_transcoder"),
        )
        init_args = {"d_in": d_in, "d_sae": d_sae, "d_out": d_in, "k": k}
    else:
        class_path, architecture = f"{_MODELS}.topk.TopKSAE", "topk"
        init_args = {"d_in": d_in, "d_sae": d_sae, "k": k, "apply_b_dec_to_input": True}
    metadata = {
        "hook_name": folder.name,  # sparsify names a folder by its hookpoint
        "model_name": run_config.get("model"),
        "dataset_path": run_config.get("dataset"),
        "context_size": run_config.get("ctx_len"),
    }
    new = {
        "architecture": architecture,
        "d_in": d_in,
        "d_sae": d_sae,
        "k": k,
        "apply_b_dec_to_input": not (transcode or fold_b_dec),
        "normalize_activations": "none",
        "metadata": {
            **{key: value for key, value in metadata.items() if value is not None},
            "converted_from": "sparsify",
            "lightning_sae": {"class_path": class_path, "init_args": init_args},
        },
    }
    if transcode or skip:
        new["d_out"] = d_in
    if weights is None:
        return new, None
    missing = [name for name in ("encoder.weight", "W_dec") if name not in weights]
    if missing:
        raise ValueError(
            f"{folder} holds a sparsify coder without {' or '.join(missing)} (saved with "
            "decoder=False?); lightning-sae needs the encoder and the decoder."
        )
    W_enc = weights["encoder.weight"].T.contiguous()
    b_enc = weights["encoder.bias"]
    if fold_b_dec:
        b_enc = (b_enc.double() - weights["b_dec"].double() @ W_enc.double()).to(b_enc.dtype)
    ours = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": weights["W_dec"], "b_dec": weights["b_dec"]}
    if skip:
        ours["W_skip"] = weights["W_skip"]
    return new, ours

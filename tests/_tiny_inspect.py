"""A tiny offline setup shared by the inspect tests and notebook test: a MiniLM activation
cache of ~5k tokens of ``pydoc_data.topics`` and a TopK SAE whose features are built from data.

The SAE is not trained (that would cost CI time): each decoder row is a centred activation
drawn from the cache and the encoder is its transpose, so each feature fires on tokens whose
activation resembles its source token. That is enough to have contexts worth looking at.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
import yaml

from lightning_sae.data.activations import ActivationDataModule
from lightning_sae.io import export_sae
from lightning_sae.models import TopKSAE

MINILM_CONFIG = Path(__file__).parents[1] / "configs" / "minilm" / "resid-l3-standard.yaml"
HOOK = "blocks.3.hook_resid_post"
D_IN, D_SAE = 384, 96


def tiny_config(folder: Path, **data: Any) -> Path:
    """The MiniLM config cut down to ~5k tokens, its cache in ``folder/cache``."""
    config = yaml.safe_load(MINILM_CONFIG.read_text())
    config["data"]["init_args"].update(
        hook=HOOK,
        cache_dir=str(folder / "cache"),
        context_size=64,
        n_tokens=4096,
        val_tokens=1024,
        shard_tokens=2048,
        batch_size=256,
        **data,
    )
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def sae_from_data(data: ActivationDataModule, d_sae: int = D_SAE, k: int = 8) -> TopKSAE:
    samples = data.sample(4 * d_sae, seed=1)
    mean = samples.mean(0)
    directions = samples[:d_sae] - mean
    directions /= directions.norm(dim=1, keepdim=True)
    sae = TopKSAE(d_in=data.d_in, d_sae=d_sae, k=k)
    with torch.no_grad():
        sae.W_dec.copy_(directions)
        sae.W_enc.copy_(directions.T)
        sae.b_dec.copy_(mean)
    return sae.eval()


@functools.cache
def tiny_run(folder: Path) -> tuple[Path, Path, Path]:
    """(config, Lightning-format checkpoint, export folder) of the tiny SAE; built once per
    folder and process."""
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_config(folder)
    data = ActivationDataModule(**yaml.safe_load(config.read_text())["data"]["init_args"])
    data.build_cache(progress=False)
    sae = sae_from_data(data)
    # What a Lightning checkpoint holds that export reads: weights and hyperparameters
    # (LightningCLI adds _class_path; a plain Trainer does not, hence --class_path).
    ckpt = folder / "sae.ckpt"
    torch.save({"state_dict": sae.state_dict(), "hyper_parameters": dict(sae.hparams)}, ckpt)
    return config, ckpt, export_sae(sae, folder / "export")


@functools.cache
def tiny_inspection(folder: Path) -> Path:
    """``inspect`` of the tiny SAE (the checkpoint) with default options, run once per folder."""
    from lightning_sae.analysis import inspect

    config, ckpt, _ = tiny_run(folder / "run")
    return inspect(ckpt, config, folder / "inspect", class_path="TopKSAE", progress=False)

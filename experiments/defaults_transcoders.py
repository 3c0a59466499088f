"""Candidate defaults for transcoders and crosscoders on MiniLM: held-out FVU of the target
(in the model's units), L0 and latents that never fire.

    python -m experiments.defaults_transcoders NAME [NAME ...] --seeds 0 1
    python -m experiments.defaults_transcoders --table    # docs/experiments/defaults/
    python -m experiments.defaults_transcoders --table --work W --table-name transcoders_btopk

The data are those of ``configs/minilm/transcoder-l3.yaml`` (all-MiniLM-L6-v2 from the PyPI
package, ~100k tokens of ``pydoc_data.topics``), with the residual stream after blocks 1, 3 and
5 cached in the same forward passes for the crosscoder. Every run sees the same batches in the
same order for its seed (200 steps of 512 rows, lr 1e-3, normalised sites, d_sae 1536,
``DecoderNormConstraint`` unless ``free``), as ``experiments/defaults_frontier.py`` does for SAEs.

A candidate is a form and settings, e.g. ``tc_topk32_old_clip``:

- forms: ``tc_l1C`` (:class:`Transcoder`, L1 coefficient C), ``tc_topkK``, ``stc_topkK`` (skip),
  ``tc_btopkK`` and ``stc_btopkK`` (BatchTopK, k per row on average), ``tc_jumpT`` (JumpReLU,
  target L0 T, ``threshold_init`` 0.75: the frontier's start, which 200 steps can reach),
  ``stc_l1C`` (:class:`SkipTranscoder`), ``cc_l1C``, ``cc_topkK`` and ``cc_btopkK``
  (crosscoders over the three residual streams);
- settings, applied left to right over the class's defaults (the form alone is what a user
  gets): ``old`` (encoder start 1, Adam (0.9, 0.999), no clipping: every variant before the
  measured defaults), ``sX`` (encoder start X), ``clip``/``clipN``/``noclip`` (gradient norm
  clipped at 1 / at N / not), ``b2.X`` (Adam beta2 0.X), ``wuN`` (N warm-up steps), ``sqrt``
  (encoder start sqrt(d_in/d_sae)), ``auxkN`` (AuxK's dead latents per sample: the TopK forms'
  tables up to 2026-12-06 ran with ``d_in / 2``, 192 for a transcoder and 576 for a crosscoder,
  before the default became k), ``free`` (decoder rows left free: no ``DecoderNormConstraint``,
  the L1 weighted by the rows' norms; without it every run holds the rows at unit norm).

A transcoder's encoder is drawn apart from its decoder (it reads another site), so its "start"
is the norm of its encoder columns; a crosscoder's is a multiple of the decoder's transpose.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections.abc import Iterator
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning import Callback, LightningDataModule
from torch import Tensor

from experiments._common import (
    DOCS,
    fvu_line,
    markdown_table,
    quiet_trainer,
    run_once,
    write,
    write_json,
)
from lightning_sae.callbacks.decoder_norm import DecoderNormConstraint
from lightning_sae.data.activations import ActivationDataModule
from lightning_sae.models.base import SparseAutoencoder
from lightning_sae.models.transcoder import (
    BatchTopKCrossCoder,
    BatchTopKSkipTranscoder,
    BatchTopKTranscoder,
    CrossCoder,
    CrossCoding,
    JumpReLUTranscoder,
    SkipTranscoder,
    TopKCrossCoder,
    TopKSkipTranscoder,
    TopKTranscoder,
    Transcoder,
)

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "minilm" / "transcoder-l3.yaml"
WORK = Path("/tmp/lightning-sae-defaults-transcoders")
MLP_IN, MLP_OUT = "blocks.3.hook_mlp_in", "blocks.3.hook_mlp_out"
LAYERS = [f"blocks.{layer}.hook_resid_post" for layer in (1, 3, 5)]
STEPS, BATCH, D_SAE, LR = 200, 512, 1536, 1e-3
OLD = {"encoder_init_scale": 1.0, "betas": (0.9, 0.999), "gradient_clip_norm": 0.0}
FORM = re.compile(r"^(tc|stc|cc)_(l1|topk|btopk|jump)([0-9.]+)$")


def parse(name: str) -> tuple[type[SparseAutoencoder], dict[str, Any]]:
    """The class and constructor options (beyond the shapes) a candidate name stands for."""
    head, *settings = name.split("_")
    form = FORM.match(f"{head}_{settings.pop(0)}" if settings else head)
    if form is None:
        raise SystemExit(f"error: {name!r} does not start with a form such as tc_topk32")
    kind, sparsity, value = form.groups()
    classes = {
        ("tc", "l1"): Transcoder,
        ("stc", "l1"): SkipTranscoder,
        ("tc", "topk"): TopKTranscoder,
        ("stc", "topk"): TopKSkipTranscoder,
        ("tc", "btopk"): BatchTopKTranscoder,
        ("stc", "btopk"): BatchTopKSkipTranscoder,
        ("tc", "jump"): JumpReLUTranscoder,
        ("cc", "l1"): CrossCoder,
        ("cc", "topk"): TopKCrossCoder,
        ("cc", "btopk"): BatchTopKCrossCoder,
    }
    if (kind, sparsity) not in classes:
        raise SystemExit(f"error: no form {kind}_{sparsity}: one of {sorted(classes)}")
    options: dict[str, Any] = {  # a function each: only this form's value is parsed
        "l1": lambda: {"l1_coefficient": float(value)},
        "topk": lambda: {"k": int(value)},
        "btopk": lambda: {"k": int(value)},
        "jump": lambda: {"l0_target": float(value), "threshold_init": 0.75},
    }[sparsity]()
    for setting in settings:
        if setting == "old":
            options |= OLD
        elif setting.startswith("clip"):
            options["gradient_clip_norm"] = float(setting[4:] or 1.0)
        elif setting == "noclip":
            options["gradient_clip_norm"] = 0.0
        elif setting == "sqrt":
            options["encoder_init_scale"] = "sqrt"
        elif setting.startswith("b2."):
            options["betas"] = (0.9, float("0." + setting[3:]))
        elif setting.startswith("wu"):
            options["lr_warmup_steps"] = int(setting[2:])
        elif setting == "free":  # the L1 would be dodged by growing rows without the weight
            options["weight_by_decoder_norm"] = True
        elif setting.startswith("auxk"):
            options["aux_k"] = int(setting[4:])
        elif setting.startswith("s"):
            options["encoder_init_scale"] = float(setting[1:])
        else:
            raise SystemExit(f"error: unknown setting {setting!r} in {name!r}")
    return classes[(kind, sparsity)], options


def callbacks(name: str) -> list[Callback]:
    """Rows held at unit norm, unless the candidate leaves them ``free``."""
    return [] if "free" in name.split("_")[2:] else [DecoderNormConstraint()]


def build(name: str, seed: int, d_sae: int = D_SAE) -> SparseAutoencoder:
    cls, options = parse(name)
    if issubclass(cls, CrossCoding):
        shapes: dict[str, Any] = {"d_in": 384 * len(LAYERS), "hooks": LAYERS}
    else:
        shapes = {"d_in": 384, "d_out": 384, "input_hook": MLP_IN, "output_hook": MLP_OUT}
    if options.get("encoder_init_scale") == "sqrt":
        options["encoder_init_scale"] = math.sqrt(shapes["d_in"] / d_sae)
    return cls(d_sae=d_sae, lr=LR, normalize_activations=True, init_seed=seed, **shapes, **options)


class Batches(LightningDataModule):
    """``{hook: train[hook][rows]}`` for every step's rows, once, in order."""

    def __init__(self, train: dict[str, Tensor], order: Tensor) -> None:
        super().__init__()
        self.train, self.order = train, order

    def train_dataloader(self) -> Iterator[dict[str, Tensor]]:
        return ({hook: x[rows] for hook, x in self.train.items()} for rows in self.order)


def batch_order(n_rows: int, seed: int, steps: int, batch: int) -> Tensor:
    """[steps, batch] row indices: shuffled epochs, the same for every candidate of a seed."""
    generator = torch.Generator().manual_seed(seed)
    epochs = math.ceil(steps * batch / n_rows)
    rows = torch.cat([torch.randperm(n_rows, generator=generator) for _ in range(epochs)])
    return rows[: steps * batch].reshape(steps, batch)


def load_sites(
    smoke: bool, hooks: list[str], cache_dir: str | None = None
) -> dict[str, dict[str, Tensor]]:
    """{split: {hook: [rows, 384]}} for ``hooks`` (the candidates' sites), read from the cache
    of the transcoder's two sites and the three layers (one cache serves every candidate)."""
    options = dict(yaml.safe_load(CONFIG.read_text())["data"]["init_args"])
    options |= {"hooks": [MLP_IN, MLP_OUT, *LAYERS], "batch_size": 128 if smoke else 4096}
    if smoke:
        options |= {"n_tokens": 512, "val_tokens": 128}
    if cache_dir is not None:
        options["cache_dir"] = cache_dir
    data = ActivationDataModule(**options)
    data.prepare_data()
    data.setup("fit")
    sites = {}
    for split, loader in (("train", data.train_dataloader()), ("val", data.val_dataloader())):
        parts: dict[str, list[Tensor]] = {hook: [] for hook in hooks}
        for batch in loader:  # only the sites asked for: the machine's memory is shared
            for hook in hooks:
                parts[hook].append(batch[hook].float())
        sites[split] = {hook: torch.cat(parts.pop(hook)) for hook in hooks}
    return sites


def sites_of(names: list[str]) -> list[str]:
    """The hooks the candidates read."""
    crosscoders = [name.startswith("cc_") for name in names]
    return [*([MLP_IN, MLP_OUT] if not all(crosscoders) else []),
            *(LAYERS if any(crosscoders) else [])]  # fmt: skip


@torch.no_grad()
def evaluate(sae: SparseAutoencoder, val: dict[str, Tensor], chunk: int = 4096) -> dict[str, Any]:
    """L0, FVU of the target in the model's units (per layer too, for a crosscoder), dead."""
    sae.eval()
    x, y = sae.input_and_target(val)
    fired = torch.zeros(sae.d_sae)
    active, err = 0.0, torch.zeros(y.shape[-1], dtype=torch.float64)
    for part_x, part_y in zip(x.split(chunk), y.split(chunk), strict=True):
        out = sae(part_x)
        fired += (out.acts > 0).sum(0).float()
        active += float((out.acts > 0).sum())
        err += (out.x_hat - part_y).double().pow(2).sum(0)
    variance = (y - y.mean(0)).double().pow(2).sum(0)
    row = {"l0": active / len(x), "fvu": float(err.sum() / variance.sum())}
    row |= {"dead": int((fired == 0).sum()), "n_tokens": len(x)}
    if y.shape[-1] > 384:  # a crosscoder: each layer's own FVU, and their mean
        per_layer = err.view(-1, 384).sum(-1) / variance.view(-1, 384).sum(-1)
        row |= {"fvu_layers": per_layer.tolist(), "fvu_layer_mean": float(per_layer.mean())}
    return row


def run(
    name: str, seed: int, sites: dict[str, dict[str, Tensor]], scale: tuple[int, int, int]
) -> dict:
    """Train candidate ``name`` for ``scale`` = (steps, batch, d_sae) and measure it."""
    steps, batch, d_sae = scale
    torch.manual_seed(seed)
    sae = build(name, seed, d_sae)
    train = sites["train"]
    order = batch_order(len(next(iter(train.values()))), seed, steps, batch)
    trainer = quiet_trainer(steps, callbacks(name))
    started = time.perf_counter()
    trainer.fit(sae, Batches(train, order))
    row = evaluate(sae, sites["val"])
    scales = sae.scale_metadata()
    return row | {"name": name, "seed": seed, "scales": scales,
                  "seconds": time.perf_counter() - started}  # fmt: skip


def _form(name: str) -> str:
    """The class a candidate trains, e.g. ``tc_l1`` for ``tc_l12_old``."""
    head, sparsity = name.split("_")[:2]
    return f"{head}_{sparsity.rstrip('0123456789.')}"


def table(work: Path, out: Path, stem: str = "transcoders") -> None:
    """Mean (min-max over seeds) of every candidate run in ``work``, by form, in the order
    first run: ``table_<stem>.md`` and ``results_<stem>.json`` in ``out``."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(work.glob("*_s[0-9].json"), key=lambda p: p.stat().st_mtime):
        row = json.loads(path.read_text())
        runs.setdefault(row["name"], []).append(row)
    rows = []
    forms = list(dict.fromkeys(_form(name) for name in runs))
    for name, mine in sorted(runs.items(), key=lambda item: forms.index(_form(item[0]))):
        mine.sort(key=lambda r: r["seed"])

        def cell(metric: str, digits: int, mine: list[dict[str, Any]] = mine) -> str:
            values = [r[metric] for r in mine if metric in r]
            if not values:
                return ""
            mean = sum(values) / len(values)
            if len(values) == 1:
                return f"{mean:.{digits}f}"
            return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

        seeds = ",".join(str(r["seed"]) for r in mine)
        rows.append([name, seeds, cell("l0", 1), cell("fvu", 4), cell("fvu_layer_mean", 4),
                     cell("dead", 0)])  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    header = ["candidate", "seeds", "L0", "FVU", "FVU per layer (mean)", f"dead (of {D_SAE})"]
    text = markdown_table(header, rows)
    print(text)
    write(out, f"table_{stem}.md", text)
    write_json(out, f"results_{stem}.json", runs)
    matched = free_against_held(runs)
    if matched:
        text = markdown_table(
            ["candidate", "seed", "L0", "FVU", "other arm's FVU at this L0", "free - held"],
            matched,
        )
        print(text)
        write(out, f"table_{stem}_matched.md", text)


def _arm(name: str) -> tuple[str, tuple[str, ...], bool]:
    """(form, settings other than ``free``, free): ``tc_l12_s1_free`` is ``tc_l1``, ``("s1",)``,
    free; runs of one arm differ in their sparsity value alone."""
    settings = name.split("_")[2:]
    return _form(name), tuple(s for s in settings if s != "free"), "free" in settings


def _interpolate(curve: list[tuple[float, float]], l0: float) -> float | None:
    """FVU at ``l0`` on a curve of (L0, FVU) points, linear between the two measured points
    around it; None outside the measured range (no extrapolation)."""
    for (l0_a, fvu_a), (l0_b, fvu_b) in pairwise(curve):
        if l0_a == l0 == l0_b:
            return fvu_a
        if l0_a <= l0 <= l0_b:
            return fvu_a + (fvu_b - fvu_a) * (l0 - l0_a) / (l0_b - l0_a)
    return None


def free_against_held(runs: dict[str, list[dict[str, Any]]]) -> list[list[Any]]:
    """Free decoder rows against rows held at unit norm at matched L0: every run of either arm
    beside the other arm's FVU at the same L0 (same form, settings and seed; interpolated
    between that arm's coefficients, only inside their L0 range)."""
    curves: dict[tuple[tuple[str, tuple[str, ...], bool], int], list[tuple[float, float]]] = {}
    for name, mine in runs.items():
        for r in mine:
            curves.setdefault((_arm(name), r["seed"]), []).append((r["l0"], r["fvu"]))
    for curve in curves.values():
        curve.sort()
    rows = []
    for name, mine in runs.items():
        form, settings, free = _arm(name)
        for r in sorted(mine, key=lambda r: r["seed"]):
            other = curves.get(((form, settings, not free), r["seed"]), [])
            at = _interpolate(other, r["l0"])
            if at is None:
                continue
            gap = r["fvu"] - at if free else at - r["fvu"]
            rows.append([name, r["seed"], f"{r['l0']:.1f}", f"{r['fvu']:.4f}", f"{at:.4f}",
                         f"{gap:+.4f}"])  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="candidates, e.g. tc_topk32 tc_topk32_old")
    p.add_argument("--table", action="store_true", help="tabulate the runs in --work")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--out", type=Path, default=DOCS / "defaults")
    p.add_argument(
        "--table-name", default="transcoders", help="table_<NAME>.md, results_<NAME>.json"
    )
    p.add_argument("--smoke", action="store_true", help="tiny data: checks the script runs")
    p.add_argument("--cache-dir", default=None, help="activation cache folder (default: ~/.cache)")
    p.add_argument(
        "--steps", type=int, default=STEPS, help="training steps (use its own --work folder)"
    )
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.table:
        table(args.work, args.out, args.table_name)
        return
    for name in args.names:
        parse(name)  # every name is checked before the data are read
    scale = (3, 64, 64) if args.smoke else (args.steps, BATCH, D_SAE)
    names = args.names or (["tc_topk32", "cc_l12"] if args.smoke else [])
    args.work.mkdir(parents=True, exist_ok=True)
    sites = load_sites(args.smoke, sites_of(names), args.cache_dir)
    for seed in args.seeds:
        for name in names:
            path = args.work / f"{name}_s{seed}.json"
            row = run_once(path, partial(run, name, seed, sites, scale))
            if row is not None:
                print(fvu_line(name, seed, row), flush=True)


if __name__ == "__main__":
    main()

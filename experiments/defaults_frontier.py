"""Candidate defaults on the frontier's data (experiments/frontier.py: MiniLM block 3, d_sae
768, 200 steps of batch 512, identical batches per seed): held-out FVU, L0 and dead latents.

    python -m experiments.defaults_frontier NAME [NAME ...] --seeds 0 1
    python -m experiments.defaults_frontier --table     # docs/experiments/defaults/

Each candidate states the options it changes from the class defaults of this tree; the rest
(and ``DecoderNormConstraint``, as the configs) is what a user gets.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from safetensors.torch import load_file

from experiments import _minilm
from experiments._common import (
    DOCS,
    fvu_line,
    markdown_table,
    quiet_trainer,
    run_once,
    write,
    write_json,
)
from experiments.frontier import SavedOrder, prepare_data
from experiments.frontier_data import DATA_FILE, training_batches
from lightning_sae.callbacks.decoder_norm import DecoderNormConstraint
from lightning_sae.models.approx_l0 import ApproxL0SAE
from lightning_sae.models.base import SparseAutoencoder
from lightning_sae.models.gated import GatedSAE
from lightning_sae.models.jumprelu import JumpReLUSAE
from lightning_sae.models.standard import StandardSAE
from lightning_sae.models.topk import BatchTopKSAE, TopKSAE

WORK = Path("/tmp/lightning-sae-defaults-frontier")
CLASSES = {"topk": TopKSAE, "batchtopk": BatchTopKSAE, "jumprelu": JumpReLUSAE,
           "standard": StandardSAE, "gated": GatedSAE, "approx_l0": ApproxL0SAE}  # fmt: skip
# The TopK family's settings before this measurement: the transpose, beta2 0.999, no clipping.
OLD = {"betas": (0.9, 0.999), "encoder_init_scale": 1.0, "gradient_clip_norm": 0.0}
CLIP = {"gradient_clip_norm": 1.0}


# The TopK family's AuxK settings before the dead-window change (docs/defaults.md), which the
# TopK candidates measured before it keep.
PREV_AUXK = {"dead_window_tokens": 10_000_000, "aux_coefficient": 1 / 32}


def _topk(variant: str, k: int, scale: float, clip: float = 0.0, **options: Any) -> tuple:
    settings = OLD | PREV_AUXK | {"encoder_init_scale": scale, "gradient_clip_norm": clip}
    settings |= options
    return (variant, {"k": k} | settings, {})


# name: (variant, model options, trainer options[, extras]); extras: "lr" (a factor of the
# shared lr) and "b_dec": "mean" (b_dec at the first batch's mean, as sparsify starts).
CANDIDATES: dict[str, tuple] = {}
for _k in (16, 32, 64):
    CANDIDATES |= {
        f"topk{_k}_old": _topk("topk", _k, 1.0),
        f"topk{_k}": ("topk", {"k": _k}, {}),  # this tree's defaults
        f"topk{_k}_prev": ("topk", {"k": _k} | PREV_AUXK, {}),  # before the dead-window change
        f"topk{_k}_old_clip": _topk("topk", _k, 1.0, 1.0),
        f"topk{_k}_old_b2.99": _topk("topk", _k, 1.0, betas=(0.9, 0.99)),
        f"topk{_k}_old_b2.95": _topk("topk", _k, 1.0, betas=(0.9, 0.95)),
        f"topk{_k}_old_wu20": _topk("topk", _k, 1.0, lr_warmup_steps=20),
        f"topk{_k}_old_s0.5": _topk("topk", _k, 0.5),
        f"topk{_k}_old_s0.5_clip": _topk("topk", _k, 0.5, 1.0),
        f"topk{_k}_old_s0.1_clip": _topk("topk", _k, 0.1, 1.0),
        f"topk{_k}_old_bmean": (*_topk("topk", _k, 1.0), {"b_dec": "mean"}),
        f"topk{_k}_old_bmean_clip": (*_topk("topk", _k, 1.0, 1.0), {"b_dec": "mean"}),
        f"topk{_k}_old_lr2": (*_topk("topk", _k, 1.0), {"lr": 2}),
        f"topk{_k}_old_lr3": (*_topk("topk", _k, 1.0), {"lr": 3}),
        f"topk{_k}_s0.5_b2.95": _topk("topk", _k, 0.5, betas=(0.9, 0.95)),
        f"topk{_k}_s0.25_b2.95": _topk("topk", _k, 0.25, betas=(0.9, 0.95)),
        f"topk{_k}_s0.5_b2.9": _topk("topk", _k, 0.5, betas=(0.9, 0.9)),
        f"topk{_k}_s0.25_clip": _topk("topk", _k, 0.25, 1.0),
        f"topk{_k}_s0.5_clip0.5": _topk("topk", _k, 0.5, 0.5),
        f"topk{_k}_s0.5_clip2": _topk("topk", _k, 0.5, 2.0),
        f"topk{_k}_s0.5_clip_b2.99": _topk("topk", _k, 0.5, 1.0, betas=(0.9, 0.99)),
        f"topk{_k}_s0.5_clip_bmean": (*_topk("topk", _k, 0.5, 1.0), {"b_dec": "mean"}),
        f"topk{_k}_old_clip_b2.99": _topk("topk", _k, 1.0, 1.0, betas=(0.9, 0.99)),
    }
# AuxK with a dead window that engages in this run (200 steps of 512 = 102k tokens; the class's
# 10M tokens never does): "dwNk" N thousand tokens, "a1" aux_coefficient 1 (else 1/32, the
# class's before; SAELens's is 1), "rv" the Gao-normalised form (residual_variance); the rest
# this tree's defaults.
for _k in (16, 32, 64):
    for _window in (2, 5, 10, 25, 50):
        _dw = {"k": _k} | PREV_AUXK | {"dead_window_tokens": _window * 1000}
        CANDIDATES |= {
            f"topk{_k}_dw{_window}k": ("topk", _dw, {}),
            f"topk{_k}_dw{_window}k_a1": ("topk", _dw | {"aux_coefficient": 1.0}, {}),
            f"topk{_k}_dw{_window}k_rv": (
                "topk",
                _dw | {"auxk_normalization": "residual_variance"},
                {},
            ),
            f"topk{_k}_dw{_window}k_rv_a1": (
                "topk",
                _dw | {"auxk_normalization": "residual_variance", "aux_coefficient": 1.0},
                {},
            ),
        }
# k 4: the low-k regime where experiments/auxk.py found AuxK costly (docs/experiments.md section 4)
CANDIDATES |= {
    "topk4": ("topk", {"k": 4}, {}),
    "topk4_prev": ("topk", {"k": 4} | PREV_AUXK, {}),
    "topk8": ("topk", {"k": 8}, {}),
    "topk8_prev": ("topk", {"k": 8} | PREV_AUXK, {}),
    # the default window with the earlier AuxK weight 1/32
    **{
        f"topk{k}_a0.03": ("topk", {"k": k, "aux_coefficient": 1 / 32}, {}) for k in (4, 16, 32, 64)
    },
    "topk4_noclip": ("topk", {"k": 4, "gradient_clip_norm": 0.0}, {}),
    "topk4_prev_noclip": ("topk", {"k": 4, "gradient_clip_norm": 0.0} | PREV_AUXK, {}),
    "topk4_a0.03_noclip": (
        "topk",
        {"k": 4, "aux_coefficient": 1 / 32, "gradient_clip_norm": 0.0},
        {},
    ),
}
# Why AuxK at weight 1 costs at k 4 (docs/defaults.md, "Dead latents of the TopK family"):
# "aX" AuxK weight X, "auxkN" N dead latents per sample in AuxK (d_in / 2 = 192 here, the
# class's default before it became k), "dwNk" a dead window of N thousand tokens (the default's
# 19.2k at k 4), "clipN" the gradient's norm clipped at N; the rest this tree's defaults.
for _k in (4, 8, 16, 32, 64):
    for _weight in (1 / 8, 1 / 4, 1 / 2):
        CANDIDATES[f"topk{_k}_a{_weight:g}"] = ("topk", {"k": _k, "aux_coefficient": _weight}, {})
    for _aux_k in (4, 8, 16, 32, 64, 128, 192, 384):
        CANDIDATES[f"topk{_k}_auxk{_aux_k}"] = ("topk", {"k": _k, "aux_k": _aux_k}, {})
    for _window in (5, 10, 50) if _k < 16 else ():  # k 16-64: the "dwNk_a1" rows above
        CANDIDATES[f"topk{_k}_dw{_window}k_a1"] = (
            "topk",
            {"k": _k, "dead_window_tokens": _window * 1000},
            {},
        )
    for _clip in (2.0, 4.0):
        CANDIDATES[f"topk{_k}_clip{_clip:g}"] = ("topk", {"k": _k, "gradient_clip_norm": _clip}, {})
CANDIDATES |= {
    "btopk32_old": _topk("batchtopk", 32, 1.0),
    "btopk32_old_clip": _topk("batchtopk", 32, 1.0, 1.0),
    "btopk32_s0.5_clip": _topk("batchtopk", 32, 0.5, 1.0),
}
# JumpReLU, Gated and ApproxL0 (their defaults before this measurement are OLD too). Each
# states its sparsity setting: JumpReLU's target L0 of 32, with a threshold start ("tX") near
# the pre-activations' scale so that 200 steps can reach it (a threshold moves about lr per
# step: 0.2 here, from the class's 0.001; docs/defaults.md) and a target-term weight ("cX";
# Adam divides most of it away), Gated's L1 and ApproxL0's lambda.
# The kernel width and epsilon are stated where they were the class's defaults when measured
# (bandwidth 0.001, epsilon 0.1), so that each name keeps meaning what it measured.
BW = {"bandwidth": 0.001}
SPARSITY = {
    "jump32": ("jumprelu", {"l0_target": 32.0} | BW),
    **{
        f"jump32_t{t:g}": ("jumprelu", {"l0_target": 32.0, "threshold_init": t} | BW)
        for t in (0.375, 0.5, 0.75, 1.0)
    },
    # bandwidth 0.05 (SAELens's default; the class's is 0.001): more pre-activations near
    # each threshold, so its gradient arrives at most steps instead of a few
    **{
        f"jump32_t{t:g}_bw0.05": (
            "jumprelu",
            {"l0_target": 32.0, "threshold_init": t, "bandwidth": 0.05},
        )
        for t in (0.75, 1.0)
    },
    # bandwidth relative to the thresholds' scale (about 0.75 here): 0.001 is the class's; a
    # second start per width gives each its own FVU-L0 curve to compare at matched L0
    **{
        f"jump32_t{t:g}{f'_bw{w:g}' if w != 0.001 else ''}": (
            "jumprelu",
            {"l0_target": 32.0, "threshold_init": t, "bandwidth": w},
        )
        for t, w in (
            (0.75, 0.01),
            (0.75, 0.1),
            (0.75, 0.3),
            (0.65, 0.001),
            (0.9, 0.001),
            (0.9, 0.05),
            (0.9, 0.1),
        )  # fmt: skip
    },
    # normalised inputs (normalize_activations: mean norm sqrt(d_in), about 1.5 times the raw
    # rows here): the threshold start a user of the library's configs gets, in those units
    **{
        f"jump32n_t{t:g}{f'_bw{w:g}' if w != 0.001 else ''}": (
            "jumprelu",
            {
                "l0_target": 32.0,
                "threshold_init": t,
                "bandwidth": w,
                "normalize_activations": True,
            },  # fmt: skip
        )
        for t in (0.001, 0.1, 0.5, 1.0, 2.0)
        for w in (0.001, 0.05, 0.1, 0.3)
    },
    "jump32_t1_c10": (
        "jumprelu",
        {"l0_target": 32.0, "threshold_init": 1.0, "l0_coefficient": 10.0} | BW,
    ),
    **{f"gated{c:g}": ("gated", {"l1_coefficient": c}) for c in (0.5, 1.0, 2.0, 4.0)},
    **{
        f"al0_{c:g}": ("approx_l0", {"approx_l0_coefficient": c, "epsilon": 0.1})
        for c in (0.3, 0.6, 1.0, 3.0, 10.0)
    },
    # ApproxL0's epsilon (the activation that counts as half a feature; the class's is 0.1)
    **{
        f"al0_{c:g}_eps{e:g}": ("approx_l0", {"approx_l0_coefficient": c, "epsilon": e})
        for c in (1.0, 2.0)
        for e in (0.03, 0.3, 1.0)
    },
}
for _name, (_variant, _sparsity) in SPARSITY.items():
    _old = _sparsity | OLD
    CANDIDATES |= {
        f"{_name}_old": (_variant, _old, {}),
        f"{_name}_old_clip": (_variant, _old | CLIP, {}),
        f"{_name}_s0.5": (_variant, _old | {"encoder_init_scale": 0.5}, {}),
        f"{_name}_s0.25": (_variant, _old | {"encoder_init_scale": 0.25}, {}),
        f"{_name}_s0.5_clip": (_variant, _old | CLIP | {"encoder_init_scale": 0.5}, {}),
        f"{_name}_s0.5_clip_b2.99": (
            _variant,
            _old | CLIP | {"encoder_init_scale": 0.5, "betas": (0.9, 0.99)},
            {},
        ),
        f"{_name}_old_b2.99": (_variant, _old | {"betas": (0.9, 0.99)}, {}),
        f"{_name}_old_clip_b2.99": (_variant, _old | CLIP | {"betas": (0.9, 0.99)}, {}),
        f"{_name}_old_wu20": (_variant, _old | {"lr_warmup_steps": 20}, {}),
        f"{_name}": (_variant, _sparsity, {}),  # the class defaults besides the settings named
        # learning-rate warm-up on top of the class defaults: a tenth and a quarter of the run
        f"{_name}_wu20": (_variant, _sparsity | {"lr_warmup_steps": 20}, {}),
        f"{_name}_wu50": (_variant, _sparsity | {"lr_warmup_steps": 50}, {}),
    }
for _c in (
    1.0,
    2.0,
    4.0,
):  # StandardSAE: its earlier defaults (s = d_in/d_sae, beta2 0.99) unclipped
    _l1 = {"l1_coefficient": _c}
    CANDIDATES |= {
        f"std{_c:g}": ("standard", _l1 | {"gradient_clip_norm": 0.0}, {}),
        f"std{_c:g}_clip": ("standard", _l1 | CLIP, {}),
        f"std{_c:g}_s0.1_clip": ("standard", _l1 | CLIP | {"encoder_init_scale": 0.1}, {}),
        f"std{_c:g}_s1_clip": ("standard", _l1 | CLIP | {"encoder_init_scale": 1.0}, {}),
        f"std{_c:g}_b2.999_clip": ("standard", _l1 | CLIP | {"betas": (0.9, 0.999)}, {}),
    }

# aux_k was d_in / 2 (192 here) until it became k (docs/defaults.md, "AuxK at low k"): every
# TopK candidate but the tree's defaults ("topkK") keeps the number it was measured with.
for _name, (_variant, _options, *_rest) in CANDIDATES.items():
    if _variant in ("topk", "batchtopk") and not re.fullmatch(r"topk\d+", _name):
        _options.setdefault("aux_k", 192)


def candidate_sae(
    name: str, d_in: int, d_sae: int, lr: float, seed: int, first: torch.Tensor
) -> SparseAutoencoder:
    variant, options, _, *rest = CANDIDATES[name]
    extras = rest[0] if rest else {}
    lr *= extras.get("lr", 1)
    sae = CLASSES[variant](d_in=d_in, d_sae=d_sae, lr=lr, init_seed=seed, **options)
    if extras.get("b_dec") == "mean":
        with torch.no_grad():
            sae.b_dec.copy_(first.mean(0))
    return sae


class TermGradients(Callback):
    """Every ``every`` steps, the gradient's norm of each loss term alone and of their sum, and
    the factor the step's clipping scales the summed gradient by: how much of the clipped
    step a term takes. An extra forward and backward per traced step, on the batch the step
    is about to take, with the same dead latents (the clock moves after the loss)."""

    def __init__(self, every: int = 10) -> None:
        self.every = every
        self.rows: list[dict[str, float]] = []

    def on_train_batch_start(
        self, trainer: Trainer, sae: LightningModule, batch: torch.Tensor, batch_idx: int
    ) -> None:
        if trainer.global_step % self.every:
            return
        x_n = sae.normalize(batch)
        terms = sae.loss_terms(x_n, sae.forward_normalized(x_n))
        params = [p for p in sae.parameters() if p.requires_grad]
        row = {"step": float(trainer.global_step), "dead": float(sae.dead_count())}
        summed = [torch.zeros_like(p) for p in params]
        for name, term in terms.items():
            grads = (  # AuxK is a constant 0 while no latent is dead
                torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
                if term.requires_grad
                else [None] * len(params)
            )
            grads = [
                torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)
            ]
            row[name] = float(term)
            row[f"grad_{name}"] = float(torch.nn.utils.get_total_norm(grads))
            summed = [s + g for s, g in zip(summed, grads, strict=True)]
        total = float(torch.nn.utils.get_total_norm(summed))
        clip = sae.gradient_clip_max_norm()
        row |= {"grad_total": total, "clip_factor": min(1.0, clip / total) if clip > 0 else 1.0}
        self.rows.append(row)


def run(name: str, seed: int, tensors: dict[str, torch.Tensor], args: Any) -> dict[str, Any]:
    torch.manual_seed(seed)
    train, val = tensors["train"], tensors["val"]
    order = training_batches(tensors, seed)
    sae = candidate_sae(name, train.shape[1], args.d_sae, args.lr, seed, train[order[0]])
    trace = [TermGradients()] if args.trace else []
    callbacks = [DecoderNormConstraint(), *trace]
    trainer = quiet_trainer(len(order), callbacks, **CANDIDATES[name][2])
    started = time.perf_counter()
    trainer.fit(sae, SavedOrder(train, order))
    measured = _minilm.evaluate(sae, val)
    row = {k: v for k, v in measured.items() if k != "frequency"}
    if isinstance(sae, JumpReLUSAE):  # how far the thresholds moved from threshold_init
        threshold = sae.threshold.detach()
        row |= {"threshold_" + k: float(f(threshold)) for k, f in
                (("min", torch.min), ("median", torch.median), ("max", torch.max))}  # fmt: skip
    row |= {"name": name, "seed": seed, "seconds": time.perf_counter() - started}
    return row | ({"trace": trace[0].rows} if trace else {})


def table(work: Path, out: Path, stem: str = "frontier") -> None:
    """Mean (min-max over seeds) of every candidate run in ``work``."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(work.glob("*_s[0-9].json")):
        row = json.loads(path.read_text())
        runs.setdefault(row["name"], []).append(row)
    rows = []
    for name in CANDIDATES:
        if name not in runs:
            continue
        mine = sorted(runs[name], key=lambda r: r["seed"])

        def cell(metric: str, digits: int, mine: list[dict[str, Any]] = mine) -> str:
            values = [r[metric] for r in mine]
            mean = sum(values) / len(values)
            if len(values) == 1:
                return f"{mean:.{digits}f}"
            return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

        seeds = ",".join(str(r["seed"]) for r in mine)
        rows.append([name, seeds, cell("l0", 1), cell("fvu", 4), cell("dead", 0)])
    out.mkdir(parents=True, exist_ok=True)
    text = markdown_table(["candidate", "seeds", "L0", "FVU", "dead (of 768)"], rows)
    print(text)
    write(out, f"table_{stem}.md", text)
    write_json(out, f"results_{stem}.json", runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help=f"candidates: {', '.join(CANDIDATES)}")
    p.add_argument("--table", action="store_true", help="tabulate the runs in --work")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--out", type=Path, default=DOCS / "defaults")
    p.add_argument("--stem", default="frontier", help="--table writes table_STEM.md")
    p.add_argument("--smoke", action="store_true", help="tiny data: checks the script runs")
    p.add_argument(
        "--trace",
        action="store_true",
        help="every 10 steps, each loss term's gradient norm and the clipping factor (in the "
        "run's JSON; an extra forward and backward per traced step)",
    )
    _minilm.add_data_options(p)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.table:
        table(args.work, args.out, args.stem)
        return
    # The frontier's scale, so that its data file (and its batch orders) serves both scripts.
    args.steps, args.batch_size, args.d_sae, args.lr = 200, 512, 768, 1e-3
    if args.smoke:
        args.steps, args.batch_size, args.d_sae, args.seeds = 3, 64, 64, [0]
        args.names = args.names or ["topk16"]
    args.work.mkdir(parents=True, exist_ok=True)
    path = args.work / DATA_FILE
    if not path.exists():  # every seed's batch order, as the frontier writes them
        seeds = sorted({0, 1, *args.seeds})
        prepare_data(argparse.Namespace(**(vars(args) | {"seeds": seeds})), args.work)
    tensors = load_file(str(path))
    for seed in args.seeds:
        if f"order_{seed}" not in tensors:
            raise SystemExit(f"error: {path} has no batch order for seed {seed}: delete it")
        for name in args.names:
            if name not in CANDIDATES:
                known = ", ".join(CANDIDATES)
                raise SystemExit(f"error: unknown candidate {name!r}: one of {known}")
            path = args.work / f"{name}_s{seed}.json"
            row = run_once(path, partial(run, name, seed, tensors, args))
            if row is not None:
                print(fvu_line(name, seed, row), flush=True)


if __name__ == "__main__":
    main()

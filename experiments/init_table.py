"""001: steps to ground-truth MMCS 0.95 / 0.98 / 0.99 per initialisation, in comparable units.

Two setups on the 128x512 toy (512 features in 128 dimensions, dictionary of 512):

- ``reference``: the public toy-model code the informed-initialisation post credits
  (HoagyC/sparse_coding, replicate_toy_models.py) at its published settings: per-batch
  correlated firing, its empty-sample rule, decay 0.99, batch 256, Adam lr 1e-3, no decoder
  bias, an encoder initialised independently of the decoder, L1 0.1 in its units (0.025 in
  ours, see docs/experiments.md), and, as the post's "steps" most likely were, a fixed training
  set (32 batches, 8192 samples) iterated in epochs;
- ``ours``: the setting of the earlier study in docs/init.md (fresh samples, decay 0.995,
  batch 1024, lr 1e-2, L1 0.1, b_dec and a tied initial encoder).

Each setup is run with plain Adam, with gradient clipping at norm 1, and with clipping plus Adam
beta2 0.99 (method ``none``), then every initialisation method with the optimizer chosen for the
toy configs. Thresholds are reported in batches, in samples seen and (reference) in epochs.

    python -m experiments.init_table            # docs/experiments/init_table/
    python -m experiments.init_table --smoke    # tiny, seconds
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer

from experiments._common import (
    Timer,
    markdown_table,
    parser,
    quiet_trainer,
    start,
    write,
    write_json,
)
from lightning_sae import plots
from lightning_sae.callbacks.decoder_norm import DecoderNormConstraint
from lightning_sae.callbacks.init import METHODS, DataInformedInit
from lightning_sae.data.toy import ToySuperpositionDataModule
from lightning_sae.metrics.similarity import mean_max_cosine_similarity
from lightning_sae.models.standard import StandardSAE

THRESHOLDS = (0.95, 0.98, 0.99)
KEYS = [f"{t:g}" for t in THRESHOLDS]


@dataclass(frozen=True)
class Setup:
    name: str
    data: dict[str, Any]
    model: dict[str, Any]
    init: dict[str, Any]  # DataInformedInit options besides method
    max_steps: int
    every: int  # MMCS measured every this many batches

    @property
    def batch_size(self) -> int:
        return self.data["batch_size"]


REFERENCE = Setup(
    "reference",
    data=dict(
        preset="128x512",
        decay=0.99,
        mean_active=5.0,
        correlation_mode="per_batch",
        empty_sample_rule="uniform_unit",
        fixed_train_set=True,
        batches_per_epoch=32,
        batch_size=256,
    ),
    model=dict(lr=1e-3, l1_coefficient=0.025, use_b_dec=False, encoder_init="independent"),
    init=dict(b_dec="keep", encoder="keep"),
    max_steps=4000,
    every=10,
)
OURS = Setup(
    "ours",
    data=dict(preset="128x512", decay=0.995, batch_size=1024, batches_per_epoch=10_000),
    model=dict(lr=1e-2, l1_coefficient=0.1),
    init=dict(b_dec="geometric_median", encoder="transpose"),
    max_steps=1000,
    every=10,
)
REFERENCE_FRESH = Setup(
    "reference_fresh",  # the reference setup on fresh samples, as replicate_toy_models.py runs
    data=REFERENCE.data | {"fixed_train_set": False, "batches_per_epoch": 10_000},
    model=REFERENCE.model,
    init=REFERENCE.init,
    max_steps=REFERENCE.max_steps,
    every=REFERENCE.every,
)
# The credited script's own default width: activation_dim 256 (512 features, dictionary 512),
# fresh samples, its published generator and optimiser; its L1 weight is swept (below).
_DATA_256 = {k: v for k, v in REFERENCE_FRESH.data.items() if k != "preset"}
REFERENCE_256 = Setup(
    "reference_256",
    data=_DATA_256 | {"n_features": 512, "d_in": 256},
    model=REFERENCE.model,
    init=REFERENCE.init,
    max_steps=5000,
    every=50,
)
SETUPS = {s.name: s for s in (REFERENCE, REFERENCE_FRESH, OURS, REFERENCE_256)}


def l1_sweep_setup(base: Setup, exponent: int, decay: float | None = None) -> Setup:
    """``base`` at the script's swept L1 weight l1_alpha = 10^(exponent/4), in our units
    (l1_alpha * d_in / d_sae: it averages the MSE over d_in and the L1 over d_sae)."""
    d_in = base.data.get("d_in", 128)
    coefficient = 10 ** (exponent / 4) * d_in / 512
    name = f"{base.name}_e{exponent}" + ("" if decay is None else f"_decay{decay:g}")
    data = base.data if decay is None else base.data | {"decay": decay}
    return Setup(
        name,
        data,
        base.model | {"l1_coefficient": coefficient},
        base.init,
        base.max_steps,
        base.every,
    )


def sweep_setup_named(name: str) -> Setup | None:
    """The L1-sweep setup a runs file names (``<setup>_e<exponent>[_decay<decay>]``), so that a
    table filled in parts covers the exponents of earlier parts too; None for any other name."""
    match = re.fullmatch(r"(.+)_e(-?\d+)(?:_decay([0-9.e+-]+))?", name)
    if match is None or match[1] not in SETUPS:
        return None
    decay = None if match[3] is None else float(match[3])
    return l1_sweep_setup(SETUPS[match[1]], int(match[2]), decay)


OPTIMIZERS = {  # name: (the SAE's gradient_clip_norm, 0 = off; betas)
    "adam": (0.0, (0.9, 0.999)),
    "clip1": (1.0, (0.9, 0.999)),
    "clip1+b2=0.99": (1.0, (0.9, 0.99)),
}


class GroundTruthRecovery(Callback):
    """Ground-truth MMCS every ``every`` batches; the first batch at each threshold; stops at
    the last threshold. (FeatureGeometryMonitor measures the same, but also draws a histogram
    figure each time, which would cost more than the training steps here.)"""

    def __init__(self, every: int) -> None:
        self.every = every
        self.curve: list[tuple[int, float]] = []
        self.first_step_at: dict[str, int] = {}

    def measure(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = trainer.global_step
        ground_truth = trainer.datamodule.ground_truth_features
        gt = float(mean_max_cosine_similarity(ground_truth, pl_module.W_dec.detach()))
        self.curve.append((step, gt))
        for key, threshold in zip(KEYS, THRESHOLDS, strict=True):
            if gt >= threshold:
                self.first_step_at.setdefault(key, step)
        if KEYS[-1] in self.first_step_at:
            trainer.should_stop = True

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.measure(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.every == 0 or trainer.global_step == trainer.max_steps:
            self.measure(trainer, pl_module)


def run(setup: Setup, method: str, optimizer: str, seed: int) -> dict[str, Any]:
    clip, betas = OPTIMIZERS[optimizer]
    data = ToySuperpositionDataModule(seed=0, **setup.data)
    d_in = setup.data.get("d_in", 128)
    model = StandardSAE(
        d_in=d_in, d_sae=512, betas=betas, gradient_clip_norm=clip, init_seed=seed, **setup.model
    )
    monitor = GroundTruthRecovery(setup.every)
    callbacks: list[Callback] = [DecoderNormConstraint(), monitor]
    if method != "none":
        callbacks.insert(
            0, DataInformedInit(method=method, n_samples=8192, seed=seed, **setup.init)
        )
    trainer = quiet_trainer(setup.max_steps, callbacks, deterministic=True)
    torch.manual_seed(seed)
    with Timer() as timer:
        trainer.fit(model, data)
    return {
        "setup": setup.name,
        "method": method,
        "optimizer": optimizer,
        "seed": seed,
        "batch_size": setup.batch_size,
        "cap": setup.max_steps,
        "steps_to": {k: monitor.first_step_at.get(k) for k in KEYS},
        "final_gt_mmcs": monitor.curve[-1][1],
        "steps": trainer.global_step,
        "curve": monitor.curve,
        "seconds": timer.seconds,
    }


def threshold_cells(runs: list[dict[str, Any]], setup: Setup) -> list[str]:
    """Mean batches / samples (/ epochs) to each threshold; '>' when a seed missed it."""
    cells = []
    for key in KEYS:
        values = [r["steps_to"][key] for r in runs]
        missed = sum(v is None for v in values)
        if missed == len(values):
            cells.append(f">{setup.max_steps}")
            continue
        mean = statistics.mean(setup.max_steps if v is None else v for v in values)
        text = f"{'>' if missed else ''}{mean:.0f} ({mean * setup.batch_size / 1e3:.0f}k"
        if setup.data.get("fixed_train_set"):
            text += f", {mean / setup.data['batches_per_epoch']:.0f} ep"
        cells.append(text + ")")
    return cells


CHECKPOINTS = (140, 1000)  # the reference's cap in "steps" at 128/512, and our cap


def mmcs_at(run: dict[str, Any], batch: int) -> float:
    """Ground-truth MMCS at ``batch`` (the last measurement before it if the run stopped)."""
    return [gt for step, gt in run["curve"] if step <= batch][-1]


def write_outputs(
    out: Path, tag: str, results: list[dict[str, Any]], setups: dict[str, Setup]
) -> None:
    """Table of means over seeds, one row per (setup, method, optimizer), and the raw runs."""
    header = ["setup", "method", "optimizer", "seeds"]
    header += [f"to {k}: batches (samples)" for k in KEYS]
    header += [f"MMCS @{b}" for b in CHECKPOINTS] + ["final MMCS", "batches run"]
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["setup"], r["method"], r["optimizer"]), []).append(r)
    rows = []
    for (name, method, optimizer), runs in groups.items():
        seeds = ",".join(str(r["seed"]) for r in runs)
        rows.append(
            [name, method, optimizer, seeds, *threshold_cells(runs, setups[name])]
            + [f"{statistics.mean(mmcs_at(r, b) for r in runs):.3f}" for b in CHECKPOINTS]
            + [
                f"{statistics.mean(r['final_gt_mmcs'] for r in runs):.3f}",
                "/".join(str(r["steps"]) for r in runs),
            ]
        )
    write(out, f"table_{tag}.md", markdown_table(header, rows))
    write_json(out, f"runs_{tag}.json", results)


def default_plan(setups: list[str], methods: list[str], chosen: str, seeds: list[int]) -> list:
    plan = [(s, "none", o) for s in setups for o in OPTIMIZERS]
    plan += [(s, m, chosen) for s in setups for m in methods if m != "none"]
    return [(*entry, seed) for entry in plan for seed in seeds]


def l1_sweep_plan(
    swept: list[Setup], methods: list[str], chosen: str, seeds: list[int]
) -> list[tuple[str, str, str, int]]:
    """Runs of an L1 sweep: random init (method ``none``) with the reference's own optimiser,
    plain Adam; an informed init with ``chosen`` (``adam`` compares both under the same one)."""
    return [
        (s.name, method, "adam" if method == "none" else chosen, seed)
        for s in swept
        for method in methods
        for seed in seeds
    ]


def main() -> None:
    p = parser(__doc__.splitlines()[0], "init_table")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="initialisations to compare (default: none and every method; with --l1-exponents, "
        "none only)",
    )
    p.add_argument("--chosen-optimizer", default="clip1", choices=sorted(OPTIMIZERS))
    p.add_argument("--setups", nargs="+", default=["reference", "ours"], choices=sorted(SETUPS))
    p.add_argument(
        "--runs",
        nargs="+",
        default=None,
        help="explicit runs SETUP:METHOD:OPTIMIZER:SEED instead of the default plan",
    )
    p.add_argument("--tag", default=None, help="name of the table/runs files (default: setups)")
    p.add_argument(
        "--l1-exponents",
        type=int,
        nargs="+",
        default=None,
        help="run each setup at the credited script's swept L1 weights 10^(e/4) instead",
    )
    p.add_argument("--decay", type=float, default=None, help="with --l1-exponents: data decay")
    args = p.parse_args()
    out = start(args)
    if args.runs:
        plan = [tuple(r.split(":")) for r in args.runs]
        plan = [(name, method, optimizer, int(seed)) for name, method, optimizer, seed in plan]
    else:
        methods = args.methods or ["none", *METHODS]
        plan = default_plan(args.setups, methods, args.chosen_optimizer, args.seeds)
    setups = dict(SETUPS)
    if args.l1_exponents is not None:
        swept = [
            l1_sweep_setup(SETUPS[name], e, args.decay)
            for name in args.setups
            for e in args.l1_exponents
        ]
        setups |= {s.name: s for s in swept}
        plan = l1_sweep_plan(swept, args.methods or ["none"], args.chosen_optimizer, args.seeds)
    if args.smoke:
        plan = default_plan(args.setups, ["none", "data"], args.chosen_optimizer, [0])
        for name, s in SETUPS.items():
            setups[name] = Setup(name, s.data | {"batch_size": 64}, s.model, s.init, 10, 5)
    tag = args.tag or "_".join(args.setups)
    runs_file = out / f"runs_{tag}.json"
    # Runs already in the file are kept and not repeated: a long table can be filled in parts.
    results = [] if args.smoke or not runs_file.exists() else json.loads(runs_file.read_text())
    for earlier in {r["setup"] for r in results} - setups.keys():
        setup = sweep_setup_named(earlier)
        if setup is not None:
            setups[earlier] = setup
    done = {(r["setup"], r["method"], r["optimizer"], r["seed"]) for r in results}
    for name, method, optimizer, seed in plan:
        if (name, method, optimizer, seed) in done:
            continue
        result = run(setups[name], method, optimizer, seed)
        results.append(result)
        print(
            f"{name} {method} {optimizer} seed {seed}: {result['steps_to']} "
            f"final {result['final_gt_mmcs']:.3f} ({result['seconds']:.0f} s)",
            flush=True,
        )
        write_outputs(out, tag, results, setups)
    if results:
        write_outputs(out, tag, results, setups)

    for name in sorted({r["setup"] for r in results}):
        series = {}
        for r in results:
            if r["setup"] == name and r["seed"] == 0:
                label = f"{r['method']} / {r['optimizer']}"
                series[label] = ([s for s, _ in r["curve"]], [g for _, g in r["curve"]])
        plots.curves(
            series,
            out / f"mmcs_{name}.png",
            xlabel="batch",
            ylabel="ground-truth MMCS",
            title=f"{name} setup, seed 0",
            hlines=THRESHOLDS,
        )
    if args.l1_exponents is not None and results:
        plots.curves(
            sweep_series(results),
            out / f"mmcs_{tag}.png",
            xlabel="batch",
            ylabel="ground-truth MMCS",
            title=f"{tag}, seed 0",
            hlines=THRESHOLDS,
        )


def sweep_series(results: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """Seed 0's MMCS curve of every run in an L1 sweep, labelled by exponent and init, in
    exponent order: one figure shows where along the sweep the ground truth is recovered."""
    series = {}
    for r in sorted(results, key=lambda r: sweep_exponent(r["setup"])):
        if r["seed"] == 0:
            label = f"e={sweep_exponent(r['setup'])} {r['method']}/{r['optimizer']}"
            series[label] = ([s for s, _ in r["curve"]], [g for _, g in r["curve"]])
    return series


def sweep_exponent(name: str) -> int:
    match = re.fullmatch(r".+_e(-?\d+)(?:_decay[0-9.e+-]+)?", name)
    if match is None:
        raise ValueError(f"{name!r} is not an L1-sweep setup name (<setup>_e<exponent>)")
    return int(match[1])


if __name__ == "__main__":
    main()

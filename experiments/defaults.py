"""Candidate defaults on the vs_saelens toy data (128x512, 1500 identical batches, lr 3e-3).

python -m experiments.defaults_sweep NAME [NAME ...] --seeds 0 1
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from experiments._common import (
    markdown_table,
    parser,
    publish,
    quiet_trainer,
    start,
    write,
    write_json,
)
from experiments.vs_saelens import SAELENS_VENV, Measure, SavedBatches, make_data
from lightning_sae.callbacks.decoder_norm import DecoderNormConstraint
from lightning_sae.models.approx_l0 import ApproxL0SAE
from lightning_sae.models.gated import GatedSAE
from lightning_sae.models.jumprelu import JumpReLUSAE
from lightning_sae.models.standard import StandardSAE
from lightning_sae.models.topk import TopKSAE

WORK = Path("/tmp/lightning-sae-defaults")
# Each variant's class and sparsity setting on this data: L1 0.1 as the side-by-side's standard
# SAE; k 8; JumpReLU, Gated and ApproxL0 with the sparsity settings of their toy configs
# (configs/toy/*.yaml: thresholds and kernel width in the toy's raw units) or, for ApproxL0,
# the coefficient its docstring measured on toy data.
VARIANTS = {
    "standard": (StandardSAE, {"l1_coefficient": 0.1, "weight_by_decoder_norm": True}),
    "topk": (TopKSAE, {"k": 8}),
    "jumprelu": (
        JumpReLUSAE,
        {"threshold_init": 0.1, "bandwidth": 0.05, "l0_coefficient": 0.003},
    ),
    "gated": (GatedSAE, {"l1_coefficient": 0.1}),
    "approx_l0": (
        ApproxL0SAE,
        {"approx_l0_coefficient": 0.03, "min_frequency": 1e-4, "epsilon": 0.1},
    ),
}
# The TopK family's AuxK settings before the dead-window change (docs/defaults.md): the TopK
# candidates measured before it keep them, so that they run as they were measured.
PREV_AUXK = {"dead_window_tokens": 10_000_000, "aux_coefficient": 1 / 32}
CLASS_DEFAULTS = {"encoder_init_scale": None, "betas": None, "gradient_clip_norm": None}
# SAELens 6.x's own training SAE and SAETrainer with its own defaults
# (experiments/saelens_side.py, run by the python of its venv) on the same data and batches,
# torch seeded with the seed before it builds its SAE (the start is all the seed changes).
SAELENS_ROWS = {"saelens_std": "standard", "saelens_topk": "topk"}
CANDIDATES = {
    # name: (variant, model kwargs, encoder scale, decoder norm (None: unit + constraint), clip);
    # a decoder norm N: rows start at norm N, free (no constraint), the encoder at the model's
    # encoder scale times the decoder's transpose
    "std_s1": ("standard", {}, 1.0, None, None),
    "std_s0.25": ("standard", {}, 0.25, None, None),
    "std_s0.1": ("standard", {}, 0.1, None, None),
    "std_s0.5": ("standard", {}, 0.5, None, None),
    "std_s1_clip": ("standard", {}, 1.0, None, 1.0),
    "std_s0.25_clip": ("standard", {}, 0.25, None, 1.0),
    "std_dec0.1_free": ("standard", {}, 1.0, 0.1, None),
    "std_s0.25_b2": ("standard", {"betas": (0.9, 0.99)}, 0.25, None, None),
    "std_s0.25_wu": ("standard", {"lr_warmup_steps": 100}, 0.25, None, None),
    "std_s1_wu": ("standard", {"lr_warmup_steps": 100}, 1.0, None, None),
    "std_dec0.1_free_clip": ("standard", {}, 1.0, 0.1, 1.0),
    "std_dec0.1_free_wu": ("standard", {"lr_warmup_steps": 100}, 1.0, 0.1, None),
    "std_s0.1_clip": ("standard", {}, 0.1, None, 1.0),
    "std_s0.25_nobdec": ("standard", {"apply_b_dec_to_input": False}, 0.25, None, None),
    "std_s0.5_b2": ("standard", {"betas": (0.9, 0.99)}, 0.5, None, None),
    "std_s0.1_b2": ("standard", {"betas": (0.9, 0.99)}, 0.1, None, None),
    "std_s1_b2": ("standard", {"betas": (0.9, 0.99)}, 1.0, None, None),
    "std_dec0.1_free_b2": ("standard", {"betas": (0.9, 0.99)}, 1.0, 0.1, None),
    # The class's defaults as a user gets them: every option left None resolves through the
    # default_*() hooks (these keys override the scale and clip slots below).
    "std_default": ("standard", CLASS_DEFAULTS, 1.0, None, None),
    # One knob on top of the class's defaults: the encoder's start, beta2 0.95, the L1
    # coefficient ramped in over the first 100 steps.
    "std_default_s0.125": (
        "standard",
        CLASS_DEFAULTS | {"encoder_init_scale": 0.125},
        1.0,
        None,
        None,
    ),
    "std_default_s0.5": ("standard", CLASS_DEFAULTS | {"encoder_init_scale": 0.5}, 1.0, None, None),
    "std_default_b2.95": ("standard", CLASS_DEFAULTS | {"betas": (0.9, 0.95)}, 1.0, None, None),
    "std_default_l1wu100": ("standard", CLASS_DEFAULTS | {"l1_warmup_steps": 100}, 1.0, None, None),
    # Which part of SAELens's start helps at beta2 0.99: the encoder's small start (decoder
    # norms held at 1) or the free decoder norms (from unit rows and the default encoder start)
    "std_default_s0.1": ("standard", CLASS_DEFAULTS | {"encoder_init_scale": 0.1}, 1.0, None, None),
    "std_s0.25_b2_free": ("standard", {"betas": (0.9, 0.99)}, 0.25, 1.0, None),
    "std_s1_b2_free": ("standard", {"betas": (0.9, 0.99)}, 1.0, 1.0, None),
    "std_default_free": ("standard", CLASS_DEFAULTS, 1.0, 1.0, None),
    # SAELens's start (clipping never engages from it on this data: std_dec0.1_free_clip)
    "std_dec0.1_free_b2.95": ("standard", {"betas": (0.9, 0.95)}, 1.0, 0.1, None),
    "topk_b2": ("topk", PREV_AUXK | {"betas": (0.9, 0.99)}, 1.0, None, None),
    "topk_s1": ("topk", PREV_AUXK, 1.0, None, None),
    "topk_s0.25": ("topk", PREV_AUXK, 0.25, None, None),
    "topk_s0.1": ("topk", PREV_AUXK, 0.1, None, None),
    "topk_s1_dw": ("topk", PREV_AUXK | {"dead_window_tokens": 256_000}, 1.0, None, None),
    "topk_s0.25_dw": ("topk", PREV_AUXK | {"dead_window_tokens": 256_000}, 0.25, None, None),
    "topk_s0.1_dw": ("topk", PREV_AUXK | {"dead_window_tokens": 256_000}, 0.1, None, None),
    "topk_s1_clip": ("topk", PREV_AUXK, 1.0, None, 1.0),
    "topk_s1_wu": ("topk", PREV_AUXK | {"lr_warmup_steps": 100}, 1.0, None, None),
    "topk_s0.5": ("topk", PREV_AUXK, 0.5, None, None),
    "topk_s0.5_clip": ("topk", PREV_AUXK, 0.5, None, 1.0),
}
# The TopK default before the dead-window change (= topk_s0.5_clip).
CANDIDATES["topk_prev"] = ("topk", PREV_AUXK, 0.5, None, 1.0)
# AuxK on the TopK default start (half the transpose, clipped): "dwN" a dead window of N steps of
# 256 tokens (10M tokens never engages in this run's 384k), "aN" aux_coefficient N (else 1/32,
# the class's before; SAELens's is 1), "rv" the Gao-normalised form (residual_variance). The new
# default (100 d_sae / k = 6,400 tokens, coefficient 1) is topk_dw25_a1.
for _steps in (10, 25, 50, 100, 250, 1000):
    _dw = {"dead_window_tokens": 256 * _steps, "aux_coefficient": 1 / 32}
    CANDIDATES |= {
        f"topk_dw{_steps}": ("topk", _dw, 0.5, None, 1.0),
        f"topk_dw{_steps}_a1": ("topk", _dw | {"aux_coefficient": 1.0}, 0.5, None, 1.0),
        f"topk_dw{_steps}_rv": (
            "topk",
            _dw | {"auxk_normalization": "residual_variance"},
            0.5,
            None,
            1.0,
        ),
        f"topk_dw{_steps}_rv_a0.125": (
            "topk",
            _dw | {"auxk_normalization": "residual_variance", "aux_coefficient": 0.125},
            0.5,
            None,
            1.0,
        ),
        f"topk_dw{_steps}_rv_a1": (
            "topk",
            _dw | {"auxk_normalization": "residual_variance", "aux_coefficient": 1.0},
            0.5,
            None,
            1.0,
        ),
    }
# AuxK's dead latents per sample ("auxkN"; d_in / 2 = 64 here, the class's default before it
# became k) on the TopK default (topk_dw25_a1): a number tied to k instead of d_in
# (docs/defaults.md, "AuxK at low k": at k 4 on MiniLM, fewer revive more).
for _aux_k in (4, 8, 16, 32):
    CANDIDATES[f"topk_dw25_a1_auxk{_aux_k}"] = (
        "topk",
        {"dead_window_tokens": 256 * 25, "aux_coefficient": 1.0, "aux_k": _aux_k},
        0.5,
        None,
        1.0,
    )
# aux_k was d_in / 2 (64 here) until it became k: the TopK candidates that do not name it keep
# the number they were measured with.
for _variant, _options, *_ in CANDIDATES.values():
    if _variant == "topk":
        _options.setdefault("aux_k", 64)
# JumpReLU, Gated and ApproxL0: the transpose, beta2 0.999 and no clipping were their defaults
# before this measurement ("s1"); "s0.25" is d_in/d_sae here.
for _variant, _short in (("jumprelu", "jump"), ("gated", "gated"), ("approx_l0", "al0")):
    CANDIDATES |= {
        f"{_short}_s1": (_variant, {}, 1.0, None, None),
        f"{_short}_s0.5": (_variant, {}, 0.5, None, None),
        f"{_short}_s0.25": (_variant, {}, 0.25, None, None),
        f"{_short}_s1_clip": (_variant, {}, 1.0, None, 1.0),
        f"{_short}_s0.5_clip": (_variant, {}, 0.5, None, 1.0),
        f"{_short}_s1_b2": (_variant, {"betas": (0.9, 0.99)}, 1.0, None, None),
        f"{_short}_s0.5_b2": (_variant, {"betas": (0.9, 0.99)}, 0.5, None, None),
        f"{_short}_s0.25_b2": (_variant, {"betas": (0.9, 0.99)}, 0.25, None, None),
        f"{_short}_s0.25_clip_b2": (_variant, {"betas": (0.9, 0.99)}, 0.25, None, 1.0),
        f"{_short}_s1_clip_b2": (_variant, {"betas": (0.9, 0.99)}, 1.0, None, 1.0),
        f"{_short}_s1_wu": (_variant, {"lr_warmup_steps": 100}, 1.0, None, None),
    }
# Their measured defaults of this tree (docs/defaults.md: JumpReLU and Gated at d_in/d_sae of
# the transpose, ApproxL0 at the transpose; all clipped at 1 with beta2 0.99) and one knob on
# top: learning-rate warm-up (a fifteenth and a fifth of the run), JumpReLU's kernel width
# (the toy config's 0.05 is a twentieth of the features' magnitudes, uniform(0, 1)) and
# threshold start, ApproxL0's epsilon (the class's 0.1).
_NOW = {"betas": (0.9, 0.99)}
for _variant, _short, _scale in (
    ("jumprelu", "jump", 0.25),
    ("gated", "gated", 0.25),
    ("approx_l0", "al0", 1.0),
):
    CANDIDATES |= {
        f"{_short}_now": (_variant, _NOW, _scale, None, 1.0),
        f"{_short}_now_wu100": (_variant, _NOW | {"lr_warmup_steps": 100}, _scale, None, 1.0),
        f"{_short}_now_wu300": (_variant, _NOW | {"lr_warmup_steps": 300}, _scale, None, 1.0),
    }
CANDIDATES |= {
    f"jump_now_bw{w:g}": ("jumprelu", _NOW | {"bandwidth": w}, 0.25, None, 1.0)
    for w in (0.005, 0.01, 0.1, 0.2)
}
CANDIDATES |= {
    f"jump_now_t{t:g}": ("jumprelu", _NOW | {"threshold_init": t}, 0.25, None, 1.0)
    for t in (0.001, 0.01, 0.03, 0.3, 1.0)
}
CANDIDATES |= {
    f"al0_now_eps{e:g}": ("approx_l0", _NOW | {"epsilon": e}, 1.0, None, 1.0) for e in (0.03, 0.3)
}
# JumpReLU on normalised inputs (normalize_activations: the toy's rows, of mean norm 1.21, scaled
# 9.36-fold to sqrt(128)): the toy config's threshold start and L0 weight in those units
# (0.1 x 9.36; 0.003 x 9.36^2, as the MSE grows by that square), kernel widths in those units
CANDIDATES |= {
    f"jump_norm_bw{w:g}": (
        "jumprelu",
        _NOW
        | {
            "normalize_activations": True,
            "threshold_init": 0.94,
            "l0_coefficient": 0.26,
            "bandwidth": w,
        },
        0.25,
        None,
        1.0,
    )  # fmt: skip
    for w in (0.1, 0.3, 0.47)
}
# epsilon 0.3 at a coefficient that brings L0 back to epsilon 0.1's
CANDIDATES |= {
    f"al0_now_eps0.3_c{c:g}": (
        "approx_l0",
        _NOW | {"epsilon": 0.3, "approx_l0_coefficient": c},
        1.0,
        None,
        1.0,
    )
    for c in (0.06, 0.1)
}


def run(name: str, seed: int, data: dict, every: int) -> dict:
    variant, kwargs, scale, dec_norm, clip = CANDIDATES[name]
    torch.manual_seed(seed)
    # Every candidate states its scale and betas: the library's defaults are what this decides.
    # The SAE's own clipping (gradient_clip_norm) carries the candidate's clip, 0 = off.
    common = dict(d_in=128, d_sae=512, lr=3e-3, init_seed=seed, encoder_init_scale=scale,
                  gradient_clip_norm=clip or 0.0)  # fmt: skip
    common = common | {"betas": (0.9, 0.999)} | kwargs
    cls, sparsity = VARIANTS[variant]
    sae = cls(**(sparsity | common))  # a candidate may change the sparsity setting too
    with torch.no_grad():
        if dec_norm is not None:
            sae.W_dec.mul_(dec_norm)
            sae.W_enc.copy_(sae.W_dec.T * sae.encoder_init_factor())
    measure = Measure(data, every)
    callbacks = [measure] if dec_norm is not None else [DecoderNormConstraint(), measure]
    trainer = quiet_trainer(len(data["train"]), callbacks)
    start = time.perf_counter()
    trainer.fit(sae, SavedBatches(data["train"], data["features"]))
    return {
        "name": name,
        "seed": seed,
        "seconds": time.perf_counter() - start,
        "curve": measure.curve,
    }


def run_saelens(name: str, seed: int, work: Path, steps: int, every: int) -> dict:
    variant = SAELENS_ROWS[name]
    options = {"d_sae": 512, "lr": 3e-3, "seed": seed}
    options |= {"l1_coefficient": VARIANTS["standard"][1]["l1_coefficient"]}
    options |= {"k": VARIANTS["topk"][1]["k"]}
    python = SAELENS_VENV / "bin" / "python"
    if not python.exists():
        raise SystemExit(
            f"error: SAELens venv not found at {SAELENS_VENV}: set LIGHTNING_SAE_SAELENS_VENV."
        )
    curve_path = work / f"{name}_s{seed}.curve.json"
    side = Path(__file__).with_name("saelens_side.py")
    command = [str(python), str(side), str(work), variant, str(steps), str(every)]
    start = time.perf_counter()
    subprocess.run([*command, json.dumps(options), str(curve_path)], check=True)
    seconds = time.perf_counter() - start
    curve = json.loads(curve_path.read_text())
    curve_path.unlink()
    return {"name": name, "seed": seed, "seconds": seconds, "curve": curve}


def table(work: Path, out: Path, stem: str = "") -> None:
    """Mean (min-max over seeds) of every candidate's final metrics, and the raw runs."""
    runs: dict[str, list[dict]] = {}
    for path in sorted(work.glob("*_s[0-9].json")):
        run = json.loads(path.read_text())
        runs.setdefault(run["name"], []).append(run)
    rows = []
    for name in [*CANDIDATES, *SAELENS_ROWS]:
        if name not in runs:
            continue
        finals = [r["curve"][-1] for r in sorted(runs[name], key=lambda r: r["seed"])]

        def cell(metric: str, digits: int, finals: list[dict] = finals) -> str:
            values = [f[metric] for f in finals]
            mean = sum(values) / len(values)
            spread = (
                f" ({min(values):.{digits}f}-{max(values):.{digits}f})" if len(values) > 1 else ""
            )
            return f"{mean:.{digits}f}{spread}"

        seeds = ",".join(str(r["seed"]) for r in sorted(runs[name], key=lambda r: r["seed"]))
        rows.append(
            [name, seeds, cell("gt_mmcs", 3), cell("l0", 2), cell("fvu", 3), cell("dead", 1)]
        )
    header = ["candidate", "seeds", "GT MMCS", "L0", "FVU", "dead (of 512)"]
    out.mkdir(parents=True, exist_ok=True)
    text = markdown_table(header, rows)
    if stem:  # another table beside the first one
        print(text)
        write(out, f"table_{stem}.md", text)
        write_json(out, f"results_{stem}.json", runs)
    else:
        publish(out, text, runs)


def main() -> None:
    p = parser(__doc__.splitlines()[0], "defaults")
    p.add_argument(
        "names", nargs="*", help=f"candidates: {', '.join([*CANDIDATES, *SAELENS_ROWS])}"
    )
    p.add_argument("--table", action="store_true", help="tabulate the runs in --work")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--stem", default="", help="--table writes table_STEM.md, not table.md")
    p.add_argument("--work", type=Path, default=WORK, help="data and one JSON per run")
    args = p.parse_args()
    start(args)
    if args.smoke:  # tiny data, three candidates, then the table
        args.names, args.seeds, args.every = ["std_s1", "std_s0.25_b2", "std_default_free"], [0], 3
    if not args.smoke and args.table:
        table(args.work, args.out, args.stem)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    path = args.work / "data.safetensors"
    if not path.exists():
        steps, batch, eval_size = (6, 32, 512) if args.smoke else (1500, 256, 8192)
        make_data(path, steps, batch, eval_size=eval_size)
    data = load_file(str(path))
    for seed in args.seeds:
        for name in args.names:
            out = args.work / f"{name}_s{seed}.json"
            if out.exists():
                continue
            if name in SAELENS_ROWS:
                result = run_saelens(name, seed, args.work, len(data["train"]), args.every)
            else:
                result = run(name, seed, data, args.every)
            out.write_text(json.dumps(result))
            f = result["curve"][-1]
            print(
                f"{name} seed {seed}: gt {f['gt_mmcs']:.3f} l0 {f['l0']:.2f} fvu {f['fvu']:.3f} "
                f"dead {f['dead']} ({result['seconds']:.0f}s)",
                flush=True,
            )
    if args.smoke:
        table(args.work, args.out)


if __name__ == "__main__":
    main()

"""Candidate defaults on MiniLM block-3 residuals (configs/minilm/resid-l3-standard.yaml).

python -m experiments.defaults_minilm_sweep NAME [NAME ...] --seeds 0
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from experiments import _minilm
from experiments._common import markdown_table, write, write_json
from lightning_sae.models.standard import StandardSAE
from lightning_sae.models.topk import TopKSAE

WORK = Path("/tmp/lightning-sae-defaults-minilm")
STEPS = 300
# The class's defaults as a user gets them (None resolves through the default_*() hooks).
CLASS_DEFAULTS = {"encoder_init_scale": None, "betas": None, "gradient_clip_norm": None}
CANDIDATES = {  # name: (variant, options, encoder scale); options override the shared ones
    **{
        f"std_l1={c}_s{s}": ("standard", {"l1_coefficient": c}, s)
        for c in (1.0, 2.0, 4.0)
        for s in (1.0, 0.25)
    },
    **{
        f"std_l1={c}_s0.25_b2": ("standard", {"l1_coefficient": c, "betas": (0.9, 0.99)}, 0.25)
        for c in (1.0, 2.0, 4.0)
    },
    # "_free": decoder rows not held at unit norm (no DecoderNormConstraint), the L1 weighted
    # by their norms, as SAELens trains (the toy side-by-side's std_default_free)
    **{
        f"std_l1={c}_default{free}": (
            "standard",
            CLASS_DEFAULTS | {"l1_coefficient": c, "weight_by_decoder_norm": bool(free)},
            1.0,
        )
        for c in (1.0, 1.75, 2.0, 2.25, 4.0)
        for free in ("", "_free")
    },
    # SAELens's start: decoder rows at norm 0.1, free, the encoder their transpose
    **{
        f"std_l1={c}_b2_dec0.1_free": (
            "standard",
            CLASS_DEFAULTS | {"l1_coefficient": c, "weight_by_decoder_norm": True},
            1.0,
        )
        for c in (1.0, 2.0, 4.0)
    },
    **{f"topk_k={k}_s{s}": ("topk", {"k": k}, s) for k in (16, 32) for s in (1.0, 0.25)},
    **{f"topk_k={k}_b2": ("topk", {"k": k, "betas": (0.9, 0.99)}, 1.0) for k in (16, 32)},
}


def table() -> None:
    rows, runs = [], {}
    for name in CANDIDATES:
        for path in sorted(WORK.glob(f"{name}_s[0-9].json")):
            run = json.loads(path.read_text())
            runs[path.stem] = run
            rows.append([name, run["seed"], f"{run['l0']:.2f}", f"{run['fvu']:.4f}", run["dead"]])
    out = Path(__file__).resolve().parent.parent / "docs" / "experiments" / "defaults"
    out.mkdir(parents=True, exist_ok=True)
    text = markdown_table(["candidate", "seed", "L0", "FVU", "dead (of 1536)"], rows)
    print(text)
    write(out, "table_minilm.md", text)
    write_json(out, "results_minilm.json", runs)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("names", nargs="*")
    p.add_argument("--table", action="store_true", help="tabulate the runs in the work folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--smoke", action="store_true")
    _minilm.add_data_options(p)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.table:
        table()
        return
    WORK.mkdir(exist_ok=True)
    data = _minilm.datamodule(args, batch_size=1024)
    val = _minilm.all_activations(data, "val")
    for seed in args.seeds:
        for name in args.names:
            out = WORK / f"{name}_s{seed}.json"
            if out.exists():
                continue
            variant, options, scale = CANDIDATES[name]
            torch.manual_seed(seed)
            common = dict(
                d_in=384,
                d_sae=1536,
                lr=2e-3,
                lr_warmup_steps=50,
                normalize_activations=True,
                init_seed=seed,
                encoder_init_scale=scale,
                gradient_clip_norm=0.0,  # the table was measured without clipping
            )
            cls = StandardSAE if variant == "standard" else TopKSAE
            sae = cls(**(common | {"betas": (0.9, 0.999)} | options))
            if "_dec0.1" in name:
                with torch.no_grad():
                    sae.W_dec.mul_(0.1)
                    sae.W_enc.copy_(sae.W_dec.T)
            start = time.perf_counter()
            _minilm.train(sae, data, STEPS, decoder_norm_constraint=not name.endswith("_free"))
            measured = _minilm.evaluate(sae, val)
            row = {k: v for k, v in measured.items() if k != "frequency"}
            row |= {"name": name, "seed": seed, "seconds": time.perf_counter() - start}
            out.write_text(json.dumps(row))
            print(
                f"{name} seed {seed}: l0 {row['l0']:.2f} fvu {row['fvu']:.4f} "
                f"dead {row['dead']} ({row['seconds']:.0f}s)",
                flush=True,
            )


if __name__ == "__main__":
    main()

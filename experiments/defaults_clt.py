"""Candidate defaults for the cross-layer transcoders (lightning_sae/models/clt.py): encoder
start, gradient clipping, Adam beta2 and learning-rate warm-up, on two kinds of data.

    python -m experiments.defaults_clt --data toy topk_old topk_new --seeds 0 1
    python -m experiments.defaults_clt --data minilm topk_old topk_new --seeds 0
    python -m experiments.defaults_clt --table       # docs/experiments/defaults/

``toy``: a ground-truth CLT (:class:`ToyCrossLayer`): sparse features of each layer written
into that layer's input (and, along other known directions, into every later layer's input)
and into the outputs of that layer and of later ones; ground-truth MMCS compares the learned
decoder slabs (model units) with the true ones. ``minilm``: the data of
``configs/minilm/clt.yaml`` (all-MiniLM-L6-v2, every block's MLP input and output, offline).
Both measure the held-out FVU (overall and per layer, normalised units, as ``val/fvu``), L0
(features firing per token over all layers) and the features that never fire on held-out rows.
Seeds change the initialisation only: every candidate trains on the same batches in the same
order.

A candidate is named ``<variant>_<setting>``: variant ``relu``, ``jump``, ``topk`` or
``btopk``; setting ``new`` (this tree's class defaults, nothing passed) or ``old`` (the CLTs'
defaults before this measurement: the encoder at unit-norm columns, Adam (0.9, 0.999), no
clipping, no warm-up) followed by changes: ``sX`` encoder start X times the old one,
``sd`` d_in/d_sae of it, ``clip`` the gradient's norm clipped at 1, ``b2.99`` Adam beta2 0.99,
``wuN`` N warm-up steps; e.g. ``topk_old_s0.5_clip``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning import LightningDataModule
from torch import Tensor

from experiments._common import (
    DOCS,
    markdown_table,
    quiet_trainer,
    run_once,
    write,
    write_json,
)
from lightning_sae.callbacks.decoder_norm import DecoderNormConstraint
from lightning_sae.data.activations import ActivationDataModule
from lightning_sae.data.toy import ToySuperposition
from lightning_sae.metrics.similarity import max_cosine_similarity
from lightning_sae.models.clt import (
    BatchTopKCrossLayerTranscoder,
    CrossLayerTranscoder,
    JumpReLUCrossLayerTranscoder,
    TopKCrossLayerTranscoder,
)

ROOT = Path(__file__).resolve().parent.parent
WORK = Path("/tmp/lightning-sae-defaults-clt")
CLASSES: dict[str, type[CrossLayerTranscoder]] = {
    "relu": CrossLayerTranscoder,
    "jump": JumpReLUCrossLayerTranscoder,
    "topk": TopKCrossLayerTranscoder,
    "btopk": BatchTopKCrossLayerTranscoder,
}
# The CLTs' settings before this measurement.
OLD = {
    "encoder_init_scale": 1.0,
    "betas": (0.9, 0.999),
    "gradient_clip_norm": 0.0,
    "lr_warmup_steps": 0,
}
# Each data's shape, schedule and sparsity settings. TopK keeps k per layer; JumpReLU's tanh
# coefficient and threshold start put its L0 near TopK's within the run (a threshold moves
# about lr per step, docs/defaults.md).
SETUPS: dict[str, dict[str, Any]] = {
    "toy": {
        "d_sae": 256,
        "steps": 1000,
        "batch_size": 256,
        "lr": 3e-3,
        "sparsity": {
            "relu": {},
            "jump": {"sparsity_coefficient": 0.1, "threshold_init": 0.1, "bandwidth": 0.1},
            "topk": {"k": 4},
            "btopk": {"k": 4},
        },
    },
    "minilm": {
        "d_sae": 512,
        "steps": 200,
        "batch_size": 256,
        "lr": 2e-3,
        "sparsity": {
            "relu": {},
            "jump": {"sparsity_coefficient": 0.3, "threshold_init": 1.0, "bandwidth": 0.1},
            "topk": {"k": 16},
            "btopk": {"k": 16},
        },
    },
}
SMOKE = {"d_sae": 32, "steps": 6, "batch_size": 32}


def candidate_options(name: str, d_in: int, d_sae: int) -> tuple[str, dict[str, Any]]:
    """(variant, the options the candidate passes) of a candidate's name (module docstring)."""
    variant, _, setting = name.partition("_")
    tokens = setting.split("_")
    if variant not in CLASSES or not tokens or tokens[0] not in ("old", "new"):
        raise ValueError(
            f"unknown candidate {name!r}: name it <variant>_old[_change...] or <variant>_new, "
            f"variant one of {', '.join(CLASSES)}"
        )
    if tokens == ["new"]:
        return variant, {}
    options = dict(OLD)
    for token in tokens[1:]:
        if token == "clip":
            options["gradient_clip_norm"] = 1.0
        elif token == "sd":
            options["encoder_init_scale"] = d_in / d_sae
        elif token.startswith("s") and _is_number(token[1:]):
            options["encoder_init_scale"] = float(token[1:])
        elif token.startswith("b2") and _is_number(token[2:]):
            options["betas"] = (0.9, float(token[2:]))
        elif token.startswith("wu") and token[2:].isdigit():
            options["lr_warmup_steps"] = int(token[2:])
        else:
            raise ValueError(f"unknown change {token!r} in candidate {name!r}: see the docstring")
    return variant, options


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


# ----------------------------------------------------------------------------- toy data
class ToyCrossLayer:
    """A ground-truth cross-layer map.

    Each of ``n_layers`` layers has ``n_features`` sparse features (firing probability
    proportional to ``decay**i``, ``mean_active`` per layer and row on average, magnitudes
    uniform(0, 1), as :class:`~lightning_sae.data.toy.ToySuperposition`). Feature f of layer s
    is written into layer s's input along a unit direction, into every later layer's input along
    another (``carry`` times a unit direction: a residual stream carries it on), and into the
    output of layer s (unit direction) and of each later layer with probability
    ``write_later`` (a direction of norm uniform(0.5, 1)). Its true decoder slab is its output
    directions, every target layer concatenated. No noise.
    """

    def __init__(
        self,
        n_layers: int = 3,
        d: int = 64,
        n_features: int = 256,
        mean_active: float = 4.0,
        decay: float = 0.99,
        carry: float = 0.5,
        write_later: float = 0.5,
        seed: int = 0,
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.n_layers, self.d, self.n_features = n_layers, d, n_features

        def unit(*shape: int) -> Tensor:
            v = torch.randn(*shape, d, generator=g)
            return v / v.norm(dim=-1, keepdim=True)

        self.reads = unit(n_layers, n_features)  # [s, f, d]: into layer s's input
        self.carried = carry * unit(n_layers, n_layers, n_features)  # [s, t, f, d], t > s used
        self.slabs = []  # [f, n_layers - s, d]: what layer s's features write
        for s in range(n_layers):
            gains = torch.rand(n_features, n_layers - s, generator=g) * 0.5 + 0.5
            writes = torch.rand(n_features, n_layers - s, generator=g) < write_later
            gains = torch.where(writes, gains, 0.0)
            gains[:, 0] = 1.0
            self.slabs.append(unit(n_features, n_layers - s) * gains[..., None])
        self.probabilities = ToySuperposition._probabilities(n_features, mean_active, decay)

    def codes(self, n: int, generator: torch.Generator) -> Tensor:
        """Every feature's activation, [n, n_layers, n_features]."""
        p = self.probabilities.expand(n, self.n_layers, -1)
        fires = torch.bernoulli(p, generator=generator)
        return fires * torch.rand(p.shape, generator=generator)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(inputs, outputs), each [n, n_layers, d]."""
        return self.observe(self.codes(n, generator))

    def observe(self, codes: Tensor) -> tuple[Tensor, Tensor]:
        """The (inputs, outputs) that ``codes`` [n, n_layers, n_features] write."""
        n = len(codes)
        x = torch.einsum("nsf,sfd->nsd", codes, self.reads)
        y = torch.zeros(n, self.n_layers, self.d)
        for s in range(self.n_layers):
            y[:, s:] += torch.einsum("nf,ftd->ntd", codes[:, s], self.slabs[s])
            for t in range(s + 1, self.n_layers):
                x[:, t] += codes[:, s] @ self.carried[s, t]
        return x, y

    def ground_truth_mmcs(self, clt: CrossLayerTranscoder) -> list[float]:
        """Per source layer: the mean over true features of the largest cosine between the
        true slab and a learned one of the same layer (model units)."""
        per_layer = []
        for s in range(self.n_layers):
            learned = clt.decoder_directions(s).detach().flatten(1).float()
            best, _ = max_cosine_similarity(self.slabs[s].flatten(1), learned, backend="torch")
            per_layer.append(float(best.mean()))
        return per_layer


class Batches(LightningDataModule):
    """A fixed list of (x, y) batches, each step's once, in order."""

    def __init__(self, make_batch: Any, steps: int) -> None:
        super().__init__()
        self.make_batch, self.steps = make_batch, steps

    def train_dataloader(self) -> Iterator[tuple[Tensor, Tensor]]:
        return (self.make_batch(step) for step in range(self.steps))


def toy_data(setup: dict[str, Any]) -> dict[str, Any]:
    toy = ToyCrossLayer()
    val = toy.sample(8192, torch.Generator().manual_seed(1_000_003))

    def batch(step: int) -> tuple[Tensor, Tensor]:
        return toy.sample(setup["batch_size"], torch.Generator().manual_seed(step))

    return {"toy": toy, "batch": batch, "val": val, "d_in": toy.d, "n_layers": toy.n_layers}


# ----------------------------------------------------------------------------- MiniLM data
def minilm_data(setup: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Every training and held-out row of configs/minilm/clt.yaml's cache (built once),
    stacked as [rows, n_layers, width]; the training batches in one fixed order."""
    config = yaml.safe_load((ROOT / "configs" / "minilm" / "clt.yaml").read_text())
    options = dict(config["data"]["init_args"]) | {"batch_size": 4096}
    inputs = config["model"]["init_args"]["input_hooks"]
    outputs = config["model"]["init_args"]["output_hooks"]
    if args.cache_dir is not None:
        options["cache_dir"] = args.cache_dir
    if args.smoke:
        options |= {"n_tokens": 1024, "val_tokens": 256, "batch_size": 256}
    data = ActivationDataModule(**options)
    data.prepare_data()
    data.setup("fit")

    def stacked(loader: Any) -> tuple[Tensor, Tensor]:
        # Filled in place, batch by batch: the training rows alone are ~1 GB in float32.
        # One pass only (a second one is another epoch's order); whole batches only.
        rows = len(loader) * options["batch_size"] if len(loader) else 0
        x = torch.empty(rows, len(inputs), data.d_ins[inputs[0]])
        y = torch.empty(rows, len(outputs), data.d_ins[outputs[0]])
        start = 0
        for b in loader:
            end = start + len(b[inputs[0]])
            for layer, (hook_in, hook_out) in enumerate(zip(inputs, outputs, strict=True)):
                x[start:end, layer] = b[hook_in]
                y[start:end, layer] = b[hook_out]
            start = end
        if start != rows:
            raise SystemExit(f"error: the cache served {start} rows of {rows}")
        return x, y

    train_x, train_y = stacked(data.train_dataloader())
    val = stacked(data.val_dataloader())
    rows = setup["steps"] * setup["batch_size"]
    order = torch.cat(
        [
            torch.randperm(len(train_x), generator=torch.Generator().manual_seed(epoch))
            for epoch in range(-(-rows // len(train_x)))
        ]
    )[:rows].reshape(setup["steps"], setup["batch_size"])

    def batch(step: int) -> tuple[Tensor, Tensor]:
        return train_x[order[step]], train_y[order[step]]

    return {"batch": batch, "val": val, "d_in": train_x.shape[-1], "n_layers": len(inputs)}


# ----------------------------------------------------------------------------- runs
@torch.no_grad()
def measure(clt: CrossLayerTranscoder, x: Tensor, y: Tensor, chunk: int = 2048) -> dict:
    """Held-out FVU (overall and per layer, normalised units), L0 over all layers and per layer,
    and the features that never fire, as eval mode (the BatchTopK's learned threshold) runs."""
    clt.eval()
    L = clt.n_layers
    sq_err, sum_sq, sum_y = torch.zeros(L), torch.zeros(L), torch.zeros(L, clt.d_out)
    fired = torch.zeros(clt.n_features)
    active = torch.zeros(L)
    for xs, ys in zip(x.split(chunk), y.split(chunk), strict=True):
        out = clt.forward_normalized(clt.normalize(xs))
        y_n = clt.normalize_target(ys)
        sq_err += (out.x_hat - y_n).pow(2).sum((0, 2))
        sum_sq += y_n.pow(2).sum((0, 2))
        sum_y += y_n.sum(0)
        on = out.acts != 0
        fired += on.reshape(len(xs), -1).sum(0)
        active += on.sum((0, 2))
    n = len(x)
    variance = sum_sq - sum_y.pow(2).sum(-1) / n
    return {
        "fvu": float(sq_err.sum() / variance.sum()),
        "fvu_layers": (sq_err / variance).tolist(),
        "l0": float(active.sum() / n),
        "l0_layers": (active / n).tolist(),
        "dead": int((fired == 0).sum()),
        "n_features": clt.n_features,
    }


def run(name: str, seed: int, data: dict[str, Any], setup: dict[str, Any]) -> dict[str, Any]:
    variant, options = candidate_options(name, data["d_in"], setup["d_sae"])
    torch.manual_seed(seed)
    clt = CLASSES[variant](
        d_in=data["d_in"],
        d_sae=setup["d_sae"],
        n_layers=data["n_layers"],
        lr=setup["lr"],
        normalize_activations=True,
        init_seed=seed,
        **setup["sparsity"][variant],
        **options,
    )
    trainer = quiet_trainer(setup["steps"], [DecoderNormConstraint()])
    started = time.perf_counter()
    trainer.fit(clt, Batches(data["batch"], setup["steps"]))
    row = measure(clt, *data["val"])
    if "toy" in data:
        row["gt_mmcs_layers"] = data["toy"].ground_truth_mmcs(clt)
        row["gt_mmcs"] = sum(row["gt_mmcs_layers"]) / len(row["gt_mmcs_layers"])
    resolved = {
        "encoder_init_scale": clt.encoder_init_factor(),
        "betas": list(clt.adam_betas()),
        "gradient_clip_norm": clt.gradient_clip_max_norm(),
        "lr_warmup_steps": clt.hparams.lr_warmup_steps,
    }
    seconds = time.perf_counter() - started
    return row | {"name": name, "seed": seed, "settings": resolved, "seconds": seconds}


# ----------------------------------------------------------------------------- tables
def _cell(rows: list[dict[str, Any]], metric: str, digits: int) -> str:
    values = [r[metric] for r in rows]
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def _layer_cell(rows: list[dict[str, Any]], metric: str) -> str:
    layers = zip(*(r[metric] for r in rows), strict=True)
    return " / ".join(f"{sum(v) / len(v):.3f}" for v in layers)


def table(work: Path, out: Path) -> None:
    """Mean (min-max over seeds) of every candidate run in ``work``, per data."""
    texts, results = [], {}
    for kind in SETUPS:
        runs: dict[str, list[dict[str, Any]]] = {}
        for path in sorted((work / kind).glob("*_s[0-9].json")):
            row = json.loads(path.read_text())
            runs.setdefault(row["name"], []).append(row)
        if not runs:
            continue
        results[kind] = runs
        header = ["candidate", "seeds", "L0", "FVU", "FVU per layer"]
        header += ["GT MMCS"] if kind == "toy" else []
        header += ["dead (of {})".format(next(iter(runs.values()))[0]["n_features"])]
        rows = []
        for name, mine in runs.items():
            mine = sorted(mine, key=lambda r: r["seed"])
            seeds = ",".join(str(r["seed"]) for r in mine)
            row = [name, seeds, _cell(mine, "l0", 1), _cell(mine, "fvu", 4)]
            row += [_layer_cell(mine, "fvu_layers")]
            row += [_cell(mine, "gt_mmcs", 3)] if kind == "toy" else []
            rows.append([*row, _cell(mine, "dead", 0)])
        texts.append(f"{kind}\n\n" + markdown_table(header, rows))
    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(texts)
    print(text)
    write(out, "table_clt.md", text)
    write_json(out, "results_clt.json", results)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="candidates (see the module docstring)")
    p.add_argument("--data", choices=list(SETUPS), default="toy")
    p.add_argument("--table", action="store_true", help="tabulate the runs in --work")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--out", type=Path, default=DOCS / "defaults")
    p.add_argument("--cache-dir", default=None, help="activation cache folder (MiniLM)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.table:
        table(args.work, args.out)
        return
    setup = SETUPS[args.data] | (SMOKE if args.smoke else {})
    names = args.names or ["topk_old", "topk_new"]
    for name in names:
        try:
            candidate_options(name, 1, 1)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
    data = toy_data(setup) if args.data == "toy" else minilm_data(setup, args)
    work = args.work / args.data
    work.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for name in names:
            row = run_once(work / f"{name}_s{seed}.json", partial(run, name, seed, data, setup))
            if row is None:
                continue
            layers = " ".join(f"{v:.3f}" for v in row["fvu_layers"])
            gt = f" gt {row['gt_mmcs']:.3f}" if "gt_mmcs" in row else ""
            summary = f"l0 {row['l0']:.1f} fvu {row['fvu']:.4f} [{layers}]{gt} dead {row['dead']}"
            print(f"{args.data} {name} seed {seed}: {summary} ({row['seconds']:.0f}s)", flush=True)


if __name__ == "__main__":
    main()

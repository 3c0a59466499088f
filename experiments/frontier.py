"""The FVU-L0 frontier on MiniLM: lightning-sae vs SAELens 6.x vs sparsify 1.3, identical data.

One cached activation set (configs/minilm/resid-l3-standard.yaml: all-MiniLM-L6-v2 block 3
residual stream, text of pydoc_data.topics) is written once to ``WORK/data.safetensors``: the
training rows, the held-out rows, and per seed the row indices of every training batch in
order (experiments/frontier_data.py). Every library trains on exactly those batches with its
own trainer step and defaults; shared are only the width, the number of steps, the batch, the
learning rate (the project and SAELens; sparsify picks its own for its default optimizer) and
each run's sparsity setting:

- lightning-sae: TopK (k 16/32/64), BatchTopK (k 32), JumpReLU (target L0 32) and standard
  (3 L1 coefficients), through ``Trainer.fit`` as the configs run them: ``DecoderNormConstraint``
  for all but the standard SAE, whose decoder rows are free (its L1 weighted by their norms);
- SAELens: the same families through its ``SAETrainer`` in its own venv
  (experiments/saelens_frontier_side.py; its own L1 coefficients, since its L1 has other units);
- sparsify: TopK (k 16/32/64) through its ``Trainer.fit`` in its own venv
  (experiments/sparsify_side.py).

Each trained SAE, as its library hands it to a user (eval mode, inference model, saved
checkpoint), reconstructs the held-out rows; the same code then measures every library:
held-out FVU and L0, latents that never fire on the held-out rows, and the final hidden state
of MiniLM with the reconstruction spliced in at block 3 for ``--eval-windows`` held-out windows
(lightning_sae.metrics.downstream: relative MSE and cosine to the clean run). Every setting
runs with ``--seeds``; the table gives the mean and the seed-to-seed range.

    python -m experiments.frontier            # docs/experiments/frontier/ + docs/experiments.md
    python -m experiments.frontier --smoke    # seconds; skips a peer whose venv is absent
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from lightning import LightningDataModule  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import Tensor  # noqa: E402

from experiments import _minilm  # noqa: E402
from experiments._common import (  # noqa: E402
    DOCS,
    Timer,
    markdown_table,
    norm_constraint,
    parser,
    quiet_trainer,
    start,
)
from experiments.frontier_data import (  # noqa: E402
    DATA_FILE,
    batch_order,
    training_batches,
    write_reconstructions,
)
from lightning_sae.data import lm  # noqa: E402
from lightning_sae.metrics.downstream import downstream_metrics  # noqa: E402
from lightning_sae.models.base import SparseAutoencoder  # noqa: E402
from lightning_sae.models.jumprelu import JumpReLUSAE  # noqa: E402
from lightning_sae.models.standard import StandardSAE  # noqa: E402
from lightning_sae.models.topk import BatchTopKSAE, TopKSAE  # noqa: E402

HERE = Path(__file__).resolve().parent
OURS, SAELENS, SPARSIFY = "lightning-sae", "SAELens", "sparsify"
VENVS = {
    SAELENS: Path(
        os.environ.get(
            "LIGHTNING_SAE_SAELENS_VENV", Path.home() / ".cache" / "lightning-sae" / "saelens-venv"
        )
    ),
    SPARSIFY: Path(
        os.environ.get(
            "LIGHTNING_SAE_SPARSIFY_VENV",
            Path.home() / ".cache" / "lightning-sae" / "sparsify-venv",
        )
    ),
}
SIDES = {SAELENS: HERE / "saelens_frontier_side.py", SPARSIFY: HERE / "sparsify_side.py"}
DOC_PAGE = DOCS.parent / "experiments.md"
DOC_BEGIN, DOC_END = "<!-- frontier:begin -->", "<!-- frontier:end -->"


@dataclass(frozen=True)
class Setting:
    """One point of a library's frontier: a variant and its sparsity setting."""

    library: str
    variant: str  # standard, topk, batchtopk, jumprelu
    options: dict[str, float] = field(hash=False)

    @property
    def label(self) -> str:
        return ", ".join(f"{k} {v:g}" for k, v in self.options.items())

    def run_name(self, seed: int) -> str:
        text = f"{self.library}_{self.variant}_{self.label}_seed{seed}"
        return re.sub(r"[^A-Za-z0-9.-]+", "_", text)


def settings(args: Any) -> list[Setting]:
    runs: list[Setting] = []
    # JumpReLU from each library's class default threshold, or from each start asked for
    target = {"target_l0": args.target_l0}
    starts = args.jumprelu_threshold_init or [None]
    jumprelu = [target if t is None else {**target, "threshold_init": t} for t in starts]
    for library, l1s in ((OURS, args.l1), (SAELENS, args.saelens_l1)):
        runs += [Setting(library, "topk", {"k": k}) for k in args.k]
        runs.append(Setting(library, "batchtopk", {"k": args.batch_k}))
        runs += [Setting(library, "jumprelu", options) for options in jumprelu]
        runs += [Setting(library, "standard", {"l1_coefficient": c}) for c in l1s]
    runs += [Setting(SPARSIFY, "topk", {"k": k}) for k in args.k]
    return [run for run in runs if run.variant in args.variants]


# --------------------------------------------------------------------------- data


def prepare_data(args: Any, work: Path) -> dict[str, Any]:
    """The MiniLM cache's rows, in storage order, with each seed's batch order, once."""
    data = _minilm.datamodule(args, batch_size=args.batch_size)
    layout = data.layout
    store = data._open()  # the cache's rows in storage order (the loaders shuffle them)
    rows = store.to_torch(store.gather(np.arange(layout.n_rows))).float()
    train, val = rows[: layout.n_train_rows], rows[layout.n_train_rows :]
    tensors = {"train": train.contiguous(), "val": val.contiguous()}
    for seed in args.seeds:
        tensors[f"order_{seed}"] = batch_order(len(train), args.steps, args.batch_size, seed)
    work.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(work / DATA_FILE))
    windows = np.load(data.cache_root / "tokens.npy", mmap_mode="r")
    held_out = np.asarray(windows[layout.n_train_windows :], dtype=np.int64)
    return {
        "tensors": tensors,
        "tokens": torch.from_numpy(held_out),
        "first_position": int(layout.first_position),
        "hook": data.hparams.hook,
        "model": data.hparams.model,
        "d_in": int(train.shape[1]),
    }


class SavedOrder(LightningDataModule):
    """``train[order[step]]`` for every step, once, in order."""

    def __init__(self, train: Tensor, order: Tensor) -> None:
        super().__init__()
        self.train, self.order = train, order

    def train_dataloader(self) -> Iterator[Tensor]:
        return (self.train[rows] for rows in self.order)


# --------------------------------------------------------------------------- training


def build_ours(setting: Setting, d_in: int, args: Any, seed: int) -> SparseAutoencoder:
    common = {"d_in": d_in, "d_sae": args.d_sae, "lr": args.lr, "init_seed": seed}
    o = setting.options
    if setting.variant == "topk":
        return TopKSAE(k=int(o["k"]), **common)
    if setting.variant == "batchtopk":
        return BatchTopKSAE(k=int(o["k"]), **common)
    if setting.variant == "jumprelu":
        start = {"threshold_init": o["threshold_init"]} if "threshold_init" in o else {}
        return JumpReLUSAE(l0_target=o["target_l0"], **start, **common)
    return StandardSAE(l1_coefficient=o["l1_coefficient"], **common)


def train_ours(setting: Setting, data: dict[str, Any], args: Any, seed: int, work: Path) -> None:
    torch.manual_seed(seed)
    tensors = data["tensors"]
    sae = build_ours(setting, data["d_in"], args, seed)
    order = training_batches(tensors, seed)
    clip = {} if args.gradient_clip is None else {"gradient_clip_val": args.gradient_clip}
    trainer = quiet_trainer(len(order), norm_constraint(sae), **clip)
    trainer.fit(sae, SavedOrder(tensors["train"], order))
    sae.eval()

    def encode_decode(x: Tensor) -> tuple[Tensor, Tensor]:
        out = sae(x)
        return out.acts, out.x_hat

    write_reconstructions(work, setting.run_name(seed), tensors["val"], encode_decode, args.d_sae)


def start_peer(
    library: str, runs: list[tuple[Setting, int]], args: Any, part: int
) -> subprocess.Popen:
    """Every run of one peer library, in one process of its own venv's python (the imports
    take longer than a small run), started in the background; its output goes to a log."""
    options = [
        {"run": setting.run_name(seed), "variant": setting.variant, "seed": seed,
         "d_sae": args.d_sae, "lr": args.lr, "threads": args.threads, **setting.options}
        for setting, seed in runs
    ]  # fmt: skip
    python = VENVS[library] / "bin" / "python"
    command = [str(python), str(SIDES[library]), str(args.work), json.dumps(options)]
    log = (args.work / f"{library}_{part}.log").open("w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def check_peer(library: str, part: int, process: subprocess.Popen, work: Path) -> None:
    if process.wait() != 0:
        log = work / f"{library}_{part}.log"
        print(log.read_text()[-6000:], file=sys.stderr)
        raise RuntimeError(f"the {library} side failed: its output above, in {log}")


# --------------------------------------------------------------------------- measuring


def lookup_splice(held_out: Tensor, x_hat: Tensor, n_windows: int) -> Any:
    """An "SAE" for downstream_metrics that returns the saved reconstructions of the held-out
    windows in order, after checking that the model's activations are the cached ones."""
    positions = len(held_out) // n_windows
    cached = held_out.reshape(n_windows, positions, -1)
    recon = x_hat.reshape(n_windows, positions, -1)
    cursor = 0

    def splice(h: Tensor) -> Tensor:
        nonlocal cursor
        window = slice(cursor, cursor + len(h))
        if not torch.allclose(h.float(), cached[window], rtol=1e-3, atol=1e-3):
            raise RuntimeError("the model's activations differ from the cached held-out rows")
        cursor += len(h)
        return recon[window]

    return splice


def measure(
    path: Path, val: Tensor, data: dict[str, Any], model: Any, eval_windows: int
) -> dict[str, float]:
    saved = load_file(str(path))
    x_hat, active, fired = saved["x_hat"], saved["active"], saved["fired"]
    variance = float((val - val.mean(0)).pow(2).sum())
    n_windows = len(data["tokens"])
    splice = lookup_splice(val, x_hat, n_windows)
    downstream = downstream_metrics(
        model,
        data["hook"],
        splice,
        data["tokens"][:eval_windows],
        first_position=data["first_position"],
    )
    return {
        "fvu": float((x_hat - val).pow(2).sum()) / variance,
        "l0": float(active.float().mean()),
        "dead": int((fired == 0).sum()),
        "final_hidden_rel_mse": downstream.final_hidden_rel_mse,
        "final_hidden_cosine": downstream.final_hidden_cosine,
    }


# --------------------------------------------------------------------------- reporting

METRICS = ("l0", "fvu", "final_hidden_rel_mse", "final_hidden_cosine", "dead")


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and seed-to-seed range (max - min) of every metric per setting."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["library"], r["variant"], r["setting"]), []).append(r)
    points = []
    for (library, variant, label), runs in groups.items():
        point = {"library": library, "variant": variant, "setting": label, "seeds": len(runs)}
        for m in METRICS:
            values = [float(r[m]) for r in runs]
            point[m] = statistics.mean(values)
            point[f"{m}_range"] = max(values) - min(values)
        points.append(point)
    return points


def peer_fvu_at(points: list[dict[str, Any]], library: str, l0: float) -> tuple[float, float]:
    """(FVU, seed range) of ``library``'s frontier at ``l0``: the best of its points at this L0
    (within 2%) and of every pair of its points around ``l0`` (any variants), linear in log
    L0 between the pair; NaN outside its L0 range. A point at L0 0 (an SAE that never fires)
    has no place on a log L0 axis and bounds no chord."""
    mine = [p for p in points if p["library"] == library]
    candidates = [(p["fvu"], p["fvu_range"]) for p in mine if abs(p["l0"] - l0) <= 0.02 * l0]
    for lo in mine:
        for hi in mine:
            if 0 < lo["l0"] < l0 < hi["l0"]:
                t = math.log(l0 / lo["l0"]) / math.log(hi["l0"] / lo["l0"])
                fvu = (1 - t) * lo["fvu"] + t * hi["fvu"]
                candidates.append((fvu, max(lo["fvu_range"], hi["fvu_range"])))
    return min(candidates, default=(math.nan, math.nan))


def compare_with_peers(
    ours: dict[str, Any], points: list[dict[str, Any]], peers: list[str]
) -> list[str]:
    """[best peer and its FVU at our L0, our FVU minus it (and the spread), verdict]."""
    found = [(peer, *peer_fvu_at(points, peer, ours["l0"])) for peer in peers]
    found = [f for f in found if not math.isnan(f[1])]
    if not found:
        return ["-", "-", "no peer point around this L0"]
    peer, fvu, peer_range = min(found, key=lambda f: f[1])
    gap = ours["fvu"] - fvu
    spread = max(ours["fvu_range"], peer_range)
    if gap <= 0:
        verdict = "at or below"
    elif gap <= spread:
        verdict = "above, within seed spread"
    else:
        verdict = f"above: {peer} wins"
    return [f"{peer} {fvu:.4f}", f"{gap:+.4f} (spread {spread:.4f})", verdict]


def verdicts(points: list[dict[str, Any]], peers: list[str]) -> list[list[Any]]:
    """Per point of ours: against the best peer point of any SAE, then of the same SAE."""
    rows = []
    for p in sorted((p for p in points if p["library"] == OURS), key=lambda p: p["l0"]):
        same = [q for q in points if q["variant"] == p["variant"]]
        rows.append(
            [p["variant"], p["setting"], f"{p['l0']:.1f}", f"{p['fvu']:.4f}"]
            + compare_with_peers(p, points, peers)
            + compare_with_peers(p, same, peers)
        )
    return rows


def frontier_against_frontier(points: list[dict[str, Any]], peers: list[str]) -> list[list[str]]:
    """At the L0 of every point, the library's frontier (the best of all its SAEs: a point
    there, or the chord, linear in log L0, between any two of its points around it) against
    the best peer's, where both reach that L0."""
    rows = []
    for l0 in sorted({round(p["l0"], 1) for p in points}):
        ours, ours_range = peer_fvu_at(points, OURS, l0)
        found = [(peer, *peer_fvu_at(points, peer, l0)) for peer in peers]
        found = [f for f in found if not math.isnan(f[1])]
        if math.isnan(ours) or not found:
            continue
        peer, fvu, peer_range = min(found, key=lambda f: f[1])
        gap, spread = ours - fvu, max(ours_range, peer_range)
        if gap <= 0:
            verdict = "at or below"
        elif gap <= spread:
            verdict = "above, within seed spread"
        else:
            verdict = f"above: {peer} wins"
        rows.append([f"{l0:.1f}", f"{ours:.4f}", f"{peer} {fvu:.4f}",
                     f"{gap:+.4f} (spread {spread:.4f})", verdict])  # fmt: skip
    return rows


def plot(points: list[dict[str, Any]], path: Path, title: str) -> None:
    colours = {OURS: "tab:blue", SAELENS: "tab:orange", SPARSIFY: "tab:green"}
    markers = {"topk": "o", "batchtopk": "s", "jumprelu": "^", "standard": "D"}
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, metric, label in (
        (axes[0], "fvu", "held-out FVU"),
        (axes[1], "final_hidden_rel_mse", "final hidden rel. MSE (spliced)"),
    ):
        for library, colour in colours.items():
            # an SAE that never fires (L0 0) has no place on the log axis: the table has it
            mine = [p for p in points if p["library"] == library and p["l0"] > 0]
            for variant, marker in markers.items():
                line = sorted((p for p in mine if p["variant"] == variant), key=lambda p: p["l0"])
                if not line:
                    continue
                axis.errorbar([p["l0"] for p in line], [p[metric] for p in line],
                              xerr=[p["l0_range"] / 2 for p in line],
                              yerr=[p[f"{metric}_range"] / 2 for p in line], color=colour,
                              marker=marker, capsize=2, alpha=0.8)  # fmt: skip
            if mine:
                axis.plot([], [], color=colour, label=library)
        axis.set(xscale="log", xlabel="L0 (held out)", ylabel=label)
    for variant, marker in markers.items():
        axes[0].plot([], [], "k" + marker, linestyle="none", label=variant)
    axes[0].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def update_doc_page(text: str) -> None:
    """Replace the frontier section's generated part of docs/experiments.md."""
    page = DOC_PAGE.read_text()
    if DOC_BEGIN not in page or DOC_END not in page:
        print(f"{DOC_PAGE} has no {DOC_BEGIN} ... {DOC_END} block: not updated")
        return
    head, rest = page.split(DOC_BEGIN, 1)
    _, tail = rest.split(DOC_END, 1)
    DOC_PAGE.write_text(f"{head}{DOC_BEGIN}\n{text}{DOC_END}{tail}")
    print(f"updated {DOC_PAGE}")


# --------------------------------------------------------------------------- main

SCALE_KEYS = ("d_sae", "steps", "batch_size", "n_train", "lr", "seeds")


def read_results(path: Path) -> dict[str, Any]:
    """A results.json written by this script (its runs and their settings), or one error line."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SystemExit(f"error: cannot read {path}: {error}") from None
    if not isinstance(saved, dict) or not {"meta", "runs"} <= saved.keys():
        raise SystemExit(f"error: {path} is not a results.json written by experiments.frontier")
    return saved


def runs_at_this_scale(path: Path, args: Any, n_train: int) -> list[dict[str, Any]]:
    """The runs of a results.json, after checking it was run at this scale."""
    saved = read_results(path)
    now = {"d_sae": args.d_sae, "steps": args.steps, "batch_size": args.batch_size,
           "n_train": n_train, "lr": args.lr, "seeds": args.seeds}  # fmt: skip
    differ = [k for k in SCALE_KEYS if saved["meta"][k] != now[k]]
    if differ:
        theirs = ", ".join(f"{k} {saved['meta'][k]}" for k in differ)
        raise SystemExit(
            f"error: {path} was run with other settings ({theirs}): rerun its runs, or pass "
            "the same options."
        )
    return saved["runs"]


def reuse_peer_runs(args: Any, n_train: int) -> list[dict[str, Any]]:
    return [r for r in runs_at_this_scale(args.peers_from, args, n_train) if r["library"] != OURS]


def keep_runs_not_rerun(
    args: Any, n_train: int, rerun: list[tuple[Setting, int]]
) -> list[dict[str, Any]]:
    """The stored runs of every (library, SAE) pair that is not trained now: a rerun of one
    kind of SAE replaces all of its stored points, whatever their settings."""
    replaced = {(setting.library, setting.variant) for setting, _ in rerun}
    saved = runs_at_this_scale(args.keep_from, args, n_train)
    return [r for r in saved if (r["library"], r["variant"]) not in replaced]


def main() -> None:
    p = parser(__doc__.splitlines()[0], "frontier")
    _minilm.add_data_options(p)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--d-sae", type=int, default=768)
    p.add_argument("--lr", type=float, default=1e-3, help="lightning-sae and SAELens")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--k", type=int, nargs="+", default=[16, 32, 64], help="TopK k")
    p.add_argument("--batch-k", type=int, default=32, help="BatchTopK k")
    p.add_argument("--target-l0", type=float, default=32.0, help="JumpReLU target L0")
    p.add_argument(
        "--jumprelu-threshold-init",
        type=float,
        nargs="+",
        default=None,
        help="JumpReLU's threshold starts, one point each, the same on both sides (ours "
        "threshold_init, SAELens's jumprelu_init_threshold; both in raw activation units "
        "here); default: each class's own",
    )
    p.add_argument("--l1", type=float, nargs="+", default=[1.0, 2.0, 4.0], help="ours")
    p.add_argument("--saelens-l1", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    p.add_argument("--eval-windows", type=int, default=4, help="held-out windows spliced")
    p.add_argument("--work", type=Path, default=Path("/tmp/lightning-sae-frontier"))
    every = [OURS, SAELENS, SPARSIFY]
    p.add_argument("--libraries", nargs="+", choices=every, default=every)
    kinds = ["topk", "batchtopk", "jumprelu", "standard"]
    p.add_argument("--variants", nargs="+", choices=kinds, default=kinds, help="SAEs trained")
    p.add_argument("--processes-per-peer", type=int, default=2, help="peer runs split over")
    p.add_argument(
        "--gradient-clip",
        type=float,
        default=None,
        help="trainer.gradient_clip_val for our side (replaces the classes' own clipping)",
    )
    p.add_argument(
        "--peers-from", type=Path, help="a results.json at the same scale: reuse its peer runs"
    )
    p.add_argument(
        "--keep-from",
        type=Path,
        help="a results.json at the same scale: keep its runs of every library and SAE not "
        "trained now (e.g. with --variants jumprelu, rerun only JumpReLU on both sides)",
    )
    p.add_argument(
        "--report-from", type=Path, help="a results.json: only redo its table and figure"
    )
    args = p.parse_args()
    out = start(args)
    if args.report_from is not None:
        saved = read_results(args.report_from)
        report(out, saved["runs"], saved["meta"], update_docs=args.out == DOCS / "frontier")
        return
    if args.smoke:
        args.steps, args.batch_size, args.d_sae, args.seeds = 3, 64, 64, [0]
        args.k, args.batch_k, args.target_l0 = [4], 4, 4.0
        args.keep_from = None
        args.l1 = args.saelens_l1 = [1.0]
        args.eval_windows = 1
    peers = []
    for peer in (SAELENS, SPARSIFY):
        if peer not in args.libraries:
            continue
        if (VENVS[peer] / "bin" / "python").exists():
            peers.append(peer)
        else:
            print(f"{peer} venv not found at {VENVS[peer]}: skipping {peer}")
    libraries = [OURS, *peers] if OURS in args.libraries else peers
    data = prepare_data(args, args.work)
    val = data["tensors"]["val"]
    reused: list[dict[str, Any]] = []
    if args.peers_from is not None:  # the peers' runs of an earlier run at the same scale
        reused = reuse_peer_runs(args, len(data["tensors"]["train"]))
        peers = sorted({r["library"] for r in reused})
        libraries = [OURS]
    model = lm.load_model(data["model"])

    runs = [(s, seed) for s in settings(args) if s.library in libraries for seed in args.seeds]
    if args.keep_from is not None:  # the stored runs of the SAEs not trained now
        reused += keep_runs_not_rerun(args, len(data["tensors"]["train"]), runs)
        peers = sorted({*peers, *(r["library"] for r in reused)} - {OURS})
    # The peers train in their own processes while ours trains here; every finished run is
    # measured as soon as its reconstructions are written.
    results: list[dict[str, Any]] = []
    pending = list(runs)
    for setting, seed in runs:  # a stopped earlier run may have left some: never measure those
        (args.work / f"{setting.run_name(seed)}.safetensors").unlink(missing_ok=True)

    def measure_finished() -> None:
        for setting, seed in list(pending):
            path = args.work / f"{setting.run_name(seed)}.safetensors"
            if not path.exists():
                continue
            row = measure(path, val, data, model, args.eval_windows)
            row |= {"library": setting.library, "variant": setting.variant, "seed": seed,
                    "setting": setting.label, "run": setting.run_name(seed)}  # fmt: skip
            results.append(row)
            pending.remove((setting, seed))
            path.unlink()
            print(json.dumps(row), flush=True)

    results += reused
    started: list[tuple[str, int, subprocess.Popen]] = []
    try:
        with Timer() as timer:
            for library in peers:
                mine = [r for r in runs if r[0].library == library]
                for part in range(args.processes_per_peer):
                    share = mine[part :: args.processes_per_peer]
                    if share:
                        started.append((library, part, start_peer(library, share, args, part)))
            for setting, seed in runs:
                if setting.library == OURS:
                    train_ours(setting, data, args, seed, args.work)
                    measure_finished()
            while any(process.poll() is None for *_, process in started):
                measure_finished()
                time.sleep(5)
            for library, part, process in started:
                check_peer(library, part, process, args.work)
            measure_finished()
    finally:  # stopped or failed: the peers' processes stop too
        for *_, process in started:
            if process.poll() is None:
                process.kill()
    print(f"{len(runs)} runs trained and measured in {timer.seconds:.0f} s", flush=True)
    names = [setting.run_name(seed) for setting, seed in runs]
    results.sort(key=lambda r: names.index(r["run"]) if r["run"] in names else -1)

    meta = {
        "hook": data["hook"], "d_in": data["d_in"], "d_sae": args.d_sae, "steps": args.steps,
        "batch_size": args.batch_size, "n_train": len(data["tensors"]["train"]),
        "n_val": len(val), "lr": args.lr, "seeds": args.seeds, "peers": peers,
        "eval_windows": min(args.eval_windows, len(data["tokens"])),
        "seconds": round(timer.seconds), "gradient_clip": args.gradient_clip,
        "peers_from": None if args.peers_from is None else str(args.peers_from),
        "kept_from": None if args.keep_from is None else str(args.keep_from),
        "rerun": sorted({f"{s.library} {s.variant}" for s, _ in runs}),
    }  # fmt: skip
    report(out, results, meta, update_docs=not args.smoke and args.out == DOCS / "frontier")


def report(
    out: Path, results: list[dict[str, Any]], meta: dict[str, Any], update_docs: bool
) -> None:
    """The table (``table.md``, and the generated block of docs/experiments.md when asked),
    the figure and ``results.json`` (every run and the run's settings) from measured runs."""
    points = summarise(results)
    tokens = meta["steps"] * meta["batch_size"]
    scale = (
        f"MiniLM `{meta['hook']}`, d_in {meta['d_in']}, d_sae {meta['d_sae']}; {meta['steps']} "
        f"steps of batch {meta['batch_size']} ({tokens:,} tokens, "
        f"{tokens / meta['n_train']:.1f} epochs of {meta['n_train']:,} training tokens, "
        f"identical batches and order for every library); lr {meta['lr']:g} (lightning-sae, "
        f"SAELens; sparsify its own); seeds {meta['seeds']}. Measured on {meta['n_val']:,} "
        f"held-out tokens; the splice on {meta['eval_windows']} held-out windows."
    )
    if meta.get("gradient_clip") is not None:
        scale += f" lightning-sae trained with gradient_clip_val {meta['gradient_clip']:g}."
    if meta.get("peers_from"):
        scale += f" The peers' runs are those of {meta['peers_from']} (same data and scale)."
    if meta.get("kept_from"):
        scale += (
            f" Rerun here: {', '.join(meta['rerun'])}; every other run is kept from "
            f"{meta['kept_from']} (same data and scale)."
        )
    header = ["library", "SAE", "setting", "L0", "FVU", "FVU range", "final hidden rel MSE",
              "final hidden cos", "dead (held out)"]  # fmt: skip
    order = {name: i for i, name in enumerate((OURS, SAELENS, SPARSIFY))}
    rows = [
        [p["library"], p["variant"], p["setting"], f"{p['l0']:.1f}", f"{p['fvu']:.4f}",
         f"{p['fvu_range']:.4f}", f"{p['final_hidden_rel_mse']:.4f}",
         f"{p['final_hidden_cosine']:.4f}", f"{p['dead']:.0f}"]
        for p in sorted(points, key=lambda p: (order[p["library"]], p["variant"], p["l0"]))
    ]  # fmt: skip
    text = scale + "\n\n" + markdown_table(header, rows)
    if meta["peers"]:
        compare = ["SAE", "setting", "L0", "FVU (ours)", "best peer at this L0",
                   "ours - peer", "verdict", "same SAE: best peer", "ours - peer",
                   "verdict"]  # fmt: skip
        text += (
            "\nAgainst the best peer at the same L0 (its points' frontier, linear in log L0; "
            "'spread' is the larger seed-to-seed FVU range of the two), from any of its SAEs "
            "and from the same kind of SAE:\n\n"
            + markdown_table(compare, verdicts(points, meta["peers"]))
            + "\nFrontier against frontier: at the L0 of every point, lightning-sae's best FVU "
            "from any of its SAEs (a point there, or the chord between any two of its points "
            "around it, linear in log L0) against the best peer's by the same rule, where both "
            "libraries have points around that L0:\n\n"
            + markdown_table(
                ["L0", "lightning-sae frontier", "best peer frontier", "ours - peer", "verdict"],
                frontier_against_frontier(points, meta["peers"]),
            )
        )
    else:
        text += "\nNo peer venv found: the project's side only.\n"
    title = f"MiniLM block 3, d_sae {meta['d_sae']}, {meta['steps']} steps"
    plot(points, out / "frontier.png", title)
    print(text)
    (out / "table.md").write_text(text)
    payload = {"meta": meta, "runs": results, "points": points}
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    print(f"wrote {out / 'table.md'}, {out / 'results.json'}, {out / 'frontier.png'}")
    if update_docs:
        update_doc_page(text)


if __name__ == "__main__":
    main()

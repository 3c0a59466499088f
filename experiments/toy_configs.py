"""The toy configs' table in docs/variants.md: each config run as a user runs it.

Every config runs through ``lightning-sae fit --config configs/toy/<name>.yaml`` in its own
process, with nothing changed but the run folder and one added callback that measures the
ground-truth MMCS every ``--every`` steps (it reads the weights and changes nothing). The final
FVU, L0, dead fraction and ground-truth MMCS are the ones the command prints and keeps with
the run (the validation split in eval mode).

    python -m experiments.toy_configs                      # docs/experiments/toy_configs/
    python -m experiments.toy_configs --configs topk gated # some of them
    python -m experiments.toy_configs --smoke              # 20 steps of one config
    python -m experiments.toy_configs --configs gated --set model.init_args.gradient_clip_norm=0
                                                           # one setting changed, as a user would

A run with ``--set KEY=VALUE`` passes ``--KEY VALUE`` to the command and is kept under the
config's name followed by its changes (``gated gradient_clip_norm=0``), next to the plain runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from lightning import Callback, LightningModule, Trainer

from experiments._common import Timer, markdown_table, parser, start, write, write_json
from lightning_sae.commands import FINAL_METRICS_FILENAME
from lightning_sae.metrics.similarity import mean_max_cosine_similarity

ROOT = Path(__file__).resolve().parent.parent
# The command a user runs, from the environment that runs this script.
LIGHTNING_SAE = str(Path(sys.executable).with_name("lightning-sae"))
CONFIGS = ROOT / "configs" / "toy"
# The configs of the table, in its order.
TABLE = ("topk", "batchtopk", "matryoshka", "jumprelu", "gated", "approx_l0", "tanh", "standard")
CHECKPOINTS = (400, 800)
THRESHOLD = 0.9
FINAL_ROWS = {"FVU": "fvu", "L0": "l0", "dead fraction": "dead", "ground-truth MMCS": "gt_mmcs"}


class GroundTruthProbe(Callback):
    """Ground-truth MMCS every ``every`` optimizer steps, appended to the JSON file ``path``."""

    def __init__(self, path: str, every: int = 100) -> None:
        self.path = Path(path)
        self.every = every
        self.curve: list[tuple[int, float]] = []

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step % self.every == 0 and (not self.curve or self.curve[-1][0] != step):
            features = trainer.datamodule.ground_truth_features
            gt = float(mean_max_cosine_similarity(features, pl_module.W_dec.detach()))
            self.curve.append((step, gt))
            self.path.write_text(json.dumps(self.curve))


def final_metrics(text: str) -> dict[str, float]:
    """The numbers of the command's final-metrics table."""
    found = {}
    for label, key in FINAL_ROWS.items():
        match = re.search(rf"^{re.escape(label)}\s+(-?[0-9.]+)", text, re.MULTILINE)
        if match:
            found[key] = float(match[1])
    return found


def label(name: str, settings: list[str], half_width: bool = False) -> str:
    """The config's name and the settings changed from it (the last dotted part of each key)."""
    return " ".join([name, *(["half-width"] if half_width else []), *map(short, settings)])


def half_width_settings(config: dict[str, Any]) -> list[str]:
    """Every size of the config halved, as tests/test_variants_training.py runs it."""
    sizes = ("d_in", "d_sae", "n_features", "batch_size")
    settings = []
    for part in ("model", "data"):
        for key, value in config[part]["init_args"].items():
            if key in sizes:
                settings.append(f"{part}.init_args.{key}={value // 2}")
            elif key == "group_sizes":
                settings.append(f"{part}.init_args.{key}={json.dumps([g // 2 for g in value])}")
    return settings


def short(setting: str) -> str:
    key, _, value = setting.partition("=")
    return f"{key.rpartition('.')[2]}={value}"


def run_config(
    name: str,
    runs: Path,
    every: int,
    max_steps: int | None,
    settings: list[str],
    half_width: bool = False,
) -> dict[str, Any]:
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    run_name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", label(name, settings, half_width))
    run_dir = runs / run_name
    curve_file = runs / f"{run_name}_curve.json"
    probe = {
        "class_path": "experiments.toy_configs.GroundTruthProbe",
        "init_args": {"path": str(curve_file), "every": every},
    }
    command = [
        *(LIGHTNING_SAE, "fit"),
        *("--config", str(CONFIGS / f"{name}.yaml")),
        *("--trainer.default_root_dir", str(run_dir)),
        f"--trainer.callbacks+={json.dumps(probe)}",
    ]
    for setting in (half_width_settings(config) if half_width else []) + settings:
        key, _, value = setting.partition("=")
        command += [f"--{key}", value]
    if max_steps is not None:
        command += ["--trainer.max_steps", str(max_steps), "--trainer.val_check_interval", "10"]
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    }
    with Timer() as timer:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name}: lightning-sae fit failed:\n{done.stderr[-3000:]}")
    final_files = sorted(run_dir.rglob(FINAL_METRICS_FILENAME))
    final = final_metrics(final_files[-1].read_text() if final_files else done.stdout)
    curve = json.loads(curve_file.read_text())
    return {
        "config": name,
        "settings": settings,
        "half_width": half_width,
        "variant": config["model"]["class_path"].rpartition(".")[2],
        "d_sae": config["model"]["init_args"]["d_sae"] // (2 if half_width else 1),
        "steps": curve[-1][0] if max_steps is None else max_steps,
        "final": final,
        "curve": curve,
        "seconds": round(timer.seconds),
    }


def row(result: dict[str, Any]) -> list[Any]:
    curve = dict(result["curve"])
    at = " / ".join(f"{curve[s]:.3f}" if s in curve else "-" for s in CHECKPOINTS)
    first = next(((s, gt) for s, gt in result["curve"] if gt >= THRESHOLD), None)
    final = result["final"]
    changed = label("", result.get("settings", []), result.get("half_width", False)).strip()
    return [
        f"`{result['config']}.yaml`" + (f" {changed}" if changed else ""),
        result["variant"],
        result["d_sae"],
        result["steps"],
        f"{final['gt_mmcs']:.3f}",
        f"{final['fvu']:.3f}",
        f"{final['l0']:.2f}",
        f"{final['dead']:.3f}",
        at,
        "-" if first is None else f"{first[0]} ({first[1]:.3f})",
    ]


def main() -> None:
    p = parser(__doc__.splitlines()[0], "toy_configs")
    p.add_argument("--configs", nargs="+", default=list(TABLE), choices=TABLE)
    p.add_argument(
        "--set",
        dest="settings",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="settings changed from the config, e.g. model.init_args.betas=[0.9,0.999]",
    )
    p.add_argument(
        "--half-width",
        action="store_true",
        help="every size halved (widths, dictionary, features, batch), as the tests run them",
    )
    p.add_argument("--every", type=int, default=100, help="steps between MMCS probes")
    p.add_argument("--runs", type=Path, default=Path("runs/experiments/toy_configs"))
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        help="results.json files of runs made in parts: the table of them all, nothing run",
    )
    args = p.parse_args()
    out = start(args)
    if args.merge:
        merged = {}
        for path in args.merge:
            merged |= json.loads(path.read_text())
        write_json(out, "results.json", merged)
        write_table(out, merged)
        return
    max_steps = None
    if args.smoke:
        args.configs, args.every, max_steps = args.configs[:1], 10, 20
        args.runs = args.runs / "smoke"
    args.runs.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = (
        {} if args.smoke or not results_file.exists() else json.loads(results_file.read_text())
    )
    for name in args.configs:
        key = label(name, args.settings, args.half_width)
        results[key] = run_config(
            name, args.runs, args.every, max_steps, args.settings, args.half_width
        )
        print(key, results[key]["final"], f"({results[key]['seconds']} s)", flush=True)
        if not args.smoke:
            write_json(out, "results.json", results)
    write_table(out, results)


def write_table(out: Path, results: dict[str, Any]) -> None:
    header = ["config", "variant", "d_sae", "steps", "GT MMCS", "FVU", "L0", "dead"]
    header += [f"MMCS at {' / '.join(map(str, CHECKPOINTS))} steps", "first probe >= 0.9"]
    # The plain runs in the table's order, each followed by its runs with settings changed.
    ordered = sorted(
        results.values(),
        key=lambda r: (TABLE.index(r["config"]), r.get("half_width", False), r.get("settings", [])),
    )
    write(out, "table.md", markdown_table(header, [row(r) for r in ordered]))


if __name__ == "__main__":
    main()

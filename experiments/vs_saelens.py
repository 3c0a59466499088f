"""Side by side with SAELens 6.x on identical toy data and batch order (standard and TopK SAEs).

The toy activation vectors are drawn once with ToySuperpositionDataModule (512 ground-truth features
in 128 dimensions, decay 0.99, 5 active on average) and saved to one safetensors file with a
held-out evaluation set and the ground-truth features. Both libraries then train on those batches in
the saved order, with the same objective weights (learning rate, L1 coefficient or k, dictionary
size) and each library's own defaults otherwise: ours through a Lightning ``Trainer.fit`` as the
configs run it (TopK with the DecoderNormConstraint callback; the standard SAE's decoder rows free,
its L1 weighted by their norms), SAELens through its ``SAETrainer`` in its own virtualenv (SAELens
pins TransformerLens 3.x; see tests/test_io.py). Every ``--every`` steps both sides are measured
with the same code (experiments/toy_eval.py): ground-truth MMCS, L0, FVU and dead latents (never
firing on the 8192 evaluation samples).

    python -m experiments.vs_saelens            # docs/experiments/vs_saelens/
    python -m experiments.vs_saelens --smoke    # (skips SAELens when its venv is absent)
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningDataModule, LightningModule, Trainer
from safetensors.torch import load_file, save_file

from experiments._common import (
    markdown_table,
    norm_constraint,
    parser,
    publish,
    quiet_trainer,
    start,
)
from experiments.toy_eval import toy_metrics
from lightning_sae import plots
from lightning_sae.data.toy import ToySuperpositionDataModule
from lightning_sae.models.standard import StandardSAE
from lightning_sae.models.topk import TopKSAE

SAELENS_VENV = Path(
    os.environ.get(
        "LIGHTNING_SAE_SAELENS_VENV", Path.home() / ".cache" / "lightning-sae" / "saelens-venv"
    )
)
METRICS = ("gt_mmcs", "l0", "fvu", "dead")


class SavedBatches(LightningDataModule):
    """The saved training batches, in their saved order, once."""

    def __init__(self, batches: torch.Tensor, features: torch.Tensor) -> None:
        super().__init__()
        self.batches, self.ground_truth_features = batches, features
        self.d_in = batches.shape[-1]

    def train_dataloader(self) -> Iterator[torch.Tensor]:
        return iter(self.batches)


class Measure(Callback):
    def __init__(self, data: dict[str, torch.Tensor], every: int) -> None:
        self.data, self.every = data, every
        self.curve: list[dict[str, float]] = []

    def measure(self, trainer: Trainer, sae: LightningModule) -> None:
        with sae.measuring():
            row = toy_metrics(
                sae.encode, sae.decode, sae.W_dec, self.data["eval"], self.data["features"]
            )
        self.curve.append({"step": trainer.global_step, **row})

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.measure(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *_: Any) -> None:
        if trainer.global_step % self.every == 0 or trainer.global_step == trainer.max_steps:
            self.measure(trainer, pl_module)


def make_data(path: Path, steps: int, batch_size: int, eval_size: int) -> None:
    toy = ToySuperpositionDataModule(
        preset="128x512", batch_size=batch_size, batches_per_epoch=steps, seed=0
    )
    loader = toy.train_dataloader()
    train = torch.stack([b for _, b in zip(range(steps), loader, strict=False)])
    save_file(
        {
            "train": train.contiguous(),
            "eval": toy.sample(eval_size, seed=12345).contiguous(),
            "features": toy.ground_truth_features.contiguous(),
        },
        str(path),
    )


def run_ours(data: dict[str, torch.Tensor], variant: str, options: dict, every: int) -> list:
    torch.manual_seed(options["seed"])
    common = dict(d_in=128, d_sae=options["d_sae"], lr=options["lr"], init_seed=options["seed"])
    if variant == "standard":
        sae = StandardSAE(l1_coefficient=options["l1_coefficient"], **common)
    else:
        sae = TopKSAE(k=options["k"], **common)
    measure = Measure(data, every)
    steps = len(data["train"])
    trainer = quiet_trainer(steps, [*norm_constraint(sae), measure])
    trainer.fit(sae, SavedBatches(data["train"], data["features"]))
    return measure.curve


def run_saelens(
    work: Path, variant: str, options: dict, every: int, steps: int, reuse: bool = False
) -> list | None:
    saved = work / f"saelens_{variant}.json"
    if reuse and saved.exists():  # SAELens's side of an earlier run on the same data
        print(f"reusing {saved}")
        return json.loads(saved.read_text())
    python = SAELENS_VENV / "bin" / "python"
    if not python.exists():
        print(f"SAELens venv not found at {SAELENS_VENV}: skipping the SAELens side")
        return None
    side = Path(__file__).with_name("saelens_side.py")
    command = [str(python), str(side), str(work), variant, str(steps), str(every)]
    subprocess.run([*command, json.dumps(options)], check=True)
    return json.loads((work / f"saelens_{variant}.json").read_text())


def main() -> None:
    p = parser(__doc__.splitlines()[0], "vs_saelens")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--work", type=Path, default=Path("/tmp/lightning-sae-vs-saelens"))
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--l1", type=float, default=0.1)
    p.add_argument("--k", type=int, default=8)
    p.add_argument(
        "--reuse-saelens",
        action="store_true",
        help="take SAELens's curves from WORK/saelens_<variant>.json of an earlier run",
    )
    args = p.parse_args()
    out = start(args)
    if args.smoke:
        args.steps, args.batch_size, args.every = 6, 32, 3
    args.work.mkdir(parents=True, exist_ok=True)
    data_path = args.work / "data.safetensors"
    make_data(data_path, args.steps, args.batch_size, eval_size=512 if args.smoke else 8192)
    data = load_file(str(data_path))
    options = {"d_sae": 512, "lr": args.lr, "l1_coefficient": args.l1, "k": args.k, "seed": 0}

    rows, results = [], {}
    for variant in ("standard", "topk"):
        curves = {"lightning-sae": run_ours(data, variant, options, args.every)}
        theirs = run_saelens(
            args.work, variant, options, args.every, args.steps, args.reuse_saelens
        )
        if theirs is not None:
            curves["SAELens"] = theirs
        results[variant] = curves
        for library, curve in curves.items():
            final = curve[-1]
            rows.append([variant, library, *(f"{final[m]:.3f}" for m in METRICS[:3])])
            rows[-1].append(final["dead"])
        for metric in METRICS:
            plots.curves(
                {
                    library: ([r["step"] for r in c], [r[metric] for r in c])
                    for library, c in curves.items()
                },
                out / f"{variant}_{metric}.png",
                xlabel="step",
                ylabel=metric,
                title=f"{variant} SAE, 128x512 toy, identical batches",
            )
    header = ["SAE", "library", "GT MMCS", "L0", "FVU", "dead (of 512)"]
    text = (
        f"Toy 128x512 (decay 0.99, 5 active on average), d_sae 512, {args.steps} steps of batch "
        f"{args.batch_size} (identical batches and order on both sides), lr {args.lr}, "
        f"L1 {args.l1} (standard), k {args.k} (TopK). Measured on {len(data['eval'])} held-out "
        "samples at the end of training:\n\n" + markdown_table(header, rows)
    )
    publish(out, text, results, "curves.json")


if __name__ == "__main__":
    main()

"""The SAELens half of experiments/vs_saelens.py, run by the python of SAELens's own venv.

Usage: python saelens_side.py WORK_DIR VARIANT STEPS EVERY JSON_OPTIONS [OUT]

Trains SAELens's own TrainingSAE (standard or topk) with its own SAETrainer on the batches of
WORK_DIR/data.safetensors in their saved order, measures it every EVERY steps with
experiments/toy_eval.py, and writes the curve to OUT (default WORK_DIR/saelens_<VARIANT>.json).
The options' seed seeds torch before SAELens builds its SAE: it changes the start only.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_eval import toy_metrics  # noqa: E402


def main() -> None:
    work, variant = Path(sys.argv[1]), sys.argv[2]
    steps, every = int(sys.argv[3]), int(sys.argv[4])
    options = json.loads(sys.argv[5])
    out = Path(sys.argv[6]) if len(sys.argv) > 6 else work / f"saelens_{variant}.json"
    torch.manual_seed(options["seed"])
    data = load_file(work / "data.safetensors")
    batches = data["train"]  # [steps, batch, d_in], in training order
    shapes = {"d_in": batches.shape[-1], "d_sae": options["d_sae"], "device": "cpu"}
    if variant == "standard":
        sae = StandardTrainingSAE(
            StandardTrainingSAEConfig(l1_coefficient=options["l1_coefficient"], **shapes)
        )
    else:
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=options["k"], **shapes))
    curve: list[dict[str, float]] = []

    def measure(step: int) -> None:
        sae.eval()
        row = toy_metrics(sae.encode, sae.decode, sae.W_dec, data["eval"], data["features"])
        curve.append({"step": step, **row})
        sae.train()

    def provider() -> Iterator[torch.Tensor]:
        for step in range(steps):
            if step % every == 0:
                measure(step)  # after `step` optimizer steps
            yield batches[step]
        while True:  # SAETrainer may ask for one more batch than it trains on
            yield batches[-1]

    config = SAETrainerConfig(
        total_training_samples=steps * batches.shape[1],
        train_batch_size_samples=batches.shape[1],
        lr=options["lr"],
        lr_end=options["lr"],
        device="cpu",
    )
    SAETrainer(config, sae, data_provider=provider()).fit()
    measure(steps)
    out.write_text(json.dumps(curve))


if __name__ == "__main__":
    main()

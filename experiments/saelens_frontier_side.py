"""The SAELens side of experiments/frontier.py, run by the python of SAELens's own venv.

Usage: python saelens_frontier_side.py WORK_DIR JSON_LIST_OF_RUN_OPTIONS

Builds SAELens's own training SAE for ``options["variant"]`` (standard, topk, batchtopk,
jumprelu) with SAELens's defaults except the shared width, learning rate and sparsity setting,
trains it with SAELens's ``SAETrainer`` on ``train[order_<seed>[step]]`` in the saved order,
then saves the inference model SAELens hands its users (``save_inference_model``; a BatchTopK
SAE becomes a JumpReLU SAE with the learned threshold), loads it back and writes its
reconstructions of the held-out rows (experiments/frontier_data.py).
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from sae_lens import SAE
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frontier_data import serve_runs, training_batches, write_reconstructions  # noqa: E402


def training_sae(options: dict, d_in: int) -> torch.nn.Module:
    shapes = {"d_in": d_in, "d_sae": options["d_sae"], "device": "cpu"}
    variant = options["variant"]
    if variant == "standard":
        config = StandardTrainingSAEConfig(l1_coefficient=options["l1_coefficient"], **shapes)
        return StandardTrainingSAE(config)
    if variant == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(k=options["k"], **shapes))
    if variant == "batchtopk":
        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=options["k"], **shapes))
    if variant == "jumprelu":
        # SAELens's target-L0 mode (Gemma Scope 2's quadratic penalty around the target); the
        # threshold start, when given, in raw activation units as ours (neither normalises).
        start = (
            {"jumprelu_init_threshold": options["threshold_init"]}
            if "threshold_init" in options
            else {}
        )
        config = JumpReLUTrainingSAEConfig(
            jumprelu_sparsity_loss_mode="quadratic",
            target_l0=options["target_l0"],
            **start,
            **shapes,
        )
        return JumpReLUTrainingSAE(config)
    raise ValueError(f"unknown variant {variant!r}")


def train_and_reconstruct(work: Path, data: dict[str, torch.Tensor], options: dict) -> None:
    torch.set_num_threads(options.get("threads", 1))
    torch.manual_seed(options["seed"])
    train, order = data["train"], training_batches(data, options["seed"])
    steps, batch_size = order.shape
    sae = training_sae(options, train.shape[1])

    def provider() -> Iterator[torch.Tensor]:
        for step in range(steps):
            yield train[order[step]]
        while True:  # SAETrainer may ask for one more batch than it trains on
            yield train[order[-1]]

    config = SAETrainerConfig(
        total_training_samples=steps * batch_size,
        train_batch_size_samples=batch_size,
        lr=options["lr"],
        lr_end=options["lr"] / 10,  # what SAELens's runner config fills in (cosine only)
        device="cpu",
    )
    SAETrainer(config, sae, data_provider=provider()).fit()

    with tempfile.TemporaryDirectory() as folder:
        sae.save_inference_model(folder)
        inference = SAE.load_from_disk(folder, device="cpu")
    inference.eval()

    def encode_decode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        acts = inference.encode(x)
        return acts, inference.decode(acts)

    write_reconstructions(work, options["run"], data["val"], encode_decode, options["d_sae"])


if __name__ == "__main__":
    serve_runs(train_and_reconstruct)

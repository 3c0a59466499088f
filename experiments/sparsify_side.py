"""The sparsify side of experiments/frontier.py, run by the python of sparsify's own venv.

Usage: python sparsify_side.py WORK_DIR JSON_LIST_OF_RUN_OPTIONS

sparsify's ``Trainer`` trains on activations captured by a forward hook on a Hugging Face
model; its training step (b_dec set to the first batch's mean, decoder kept at unit norm,
gradient parallel to the decoder rows removed, its default optimizer: schedule-free signum at
its width-scaled learning rate) runs inside that hook. To feed it the saved rows in the saved
order, the model here is a stand-in whose input ids are row indices and whose one "layer" (an
``nn.Identity``, the hook point) outputs those rows: one sequence per step holding the step's
batch, so ``Trainer.fit`` sees ``train[order_<seed>[step]]`` at ``step``. Everything else is
sparsify's defaults except the shared width and k. After ``fit`` the SAE is loaded from the
checkpoint ``fit`` saves (the schedule-free averaged weights, what a sparsify user gets) and
its reconstructions of the held-out rows are written (experiments/frontier_data.py).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from sparsify import SaeConfig, SparseCoder, TrainConfig, Trainer
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frontier_data import serve_runs, training_batches, write_reconstructions  # noqa: E402

HOOK = "layers.0"


class SavedRows(nn.Module):
    """Stands in for the language model: ``input_ids`` index the saved rows."""

    def __init__(self, rows: Tensor) -> None:
        super().__init__()
        self.register_buffer("rows", rows, persistent=False)
        self.layers = nn.ModuleList([nn.Identity()])
        self.config = SimpleNamespace(num_hidden_layers=1)
        self.dummy_inputs = {"input_ids": torch.zeros(1, 1, dtype=torch.long)}

    @property
    def base_model(self) -> nn.Module:
        return self

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.layers[0](self.rows[input_ids])


class Batches(torch.utils.data.Dataset):
    """One sequence per training step: that step's row indices."""

    def __init__(self, order: Tensor) -> None:
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, step: int) -> dict[str, Tensor]:
        return {"input_ids": self.order[step]}


def train_and_reconstruct(work: Path, data: dict[str, torch.Tensor], options: dict) -> None:
    torch.set_num_threads(options.get("threads", 1))
    torch.manual_seed(options["seed"])
    order = training_batches(data, options["seed"])
    with tempfile.TemporaryDirectory() as folder:
        config = TrainConfig(
            SaeConfig(num_latents=options["d_sae"], k=options["k"]),
            batch_size=1,  # sequences; each holds one whole training batch
            hookpoints=[HOOK],
            init_seeds=[options["seed"]],
            log_to_wandb=False,
            save_dir=folder,
            save_every=len(order) + 1,  # only the checkpoint at the end of fit
            run_name="frontier",
        )
        Trainer(config, Batches(order), SavedRows(data["train"])).fit()
        sae = SparseCoder.load_from_disk(Path(folder) / "frontier" / HOOK, device="cpu")

    def encode_decode(x: Tensor) -> tuple[Tensor, Tensor]:
        top_acts, top_indices, _ = sae.encode(x)
        acts = torch.zeros(len(x), sae.num_latents).scatter_(1, top_indices, top_acts)
        return acts, sae.decode(top_acts, top_indices)

    write_reconstructions(work, options["run"], data["val"], encode_decode, options["d_sae"])


if __name__ == "__main__":
    serve_runs(train_and_reconstruct)

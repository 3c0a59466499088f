"""Nothing read from a file (cfg.json, a checkpoint) may choose code to import or run.

Each test plants a module that writes a marker file when imported, next to an SAE folder or
checkpoint that names it, on the import path, and checks that loading never imports it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lightning_sae.io import CONFIG_FILENAME, export_checkpoint, export_sae, load
from lightning_sae.models.standard import StandardSAE


def _plant_payload(folder: Path) -> Path:
    """A ``payload.py`` in ``folder`` that leaves ``marker`` behind when imported."""
    marker = folder / "imported"
    (folder / "payload.py").write_text(
        textwrap.dedent(
            f"""
            from pathlib import Path
            from lightning_sae.models.standard import StandardSAE

            Path({str(marker)!r}).write_text("payload ran")

            class Evil(StandardSAE):
                "The class a malicious cfg.json or checkpoint names."
            """
        )
    )
    return marker


def _trained_sae() -> StandardSAE:
    sae = StandardSAE(d_in=6, d_sae=12)
    sae.fit_input_scale(torch.randn(32, 6))
    return sae.eval()


def test_load_never_imports_a_module_named_by_cfg_json(tmp_path: Path) -> None:
    folder = tmp_path / "downloaded_sae"
    export_sae(_trained_sae(), folder)
    marker = _plant_payload(folder)
    (folder / "__init__.py").write_text("")
    cfg = json.loads((folder / CONFIG_FILENAME).read_text())
    cfg["metadata"]["lightning_sae"]["class_path"] = "downloaded_sae.payload.Evil"
    (folder / CONFIG_FILENAME).write_text(json.dumps(cfg))
    # As in a notebook or `python -c`: the folder's parent is the working directory, on sys.path.
    script = f"from lightning_sae.io import load; load({str(folder)!r})"
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert not marker.exists(), "loading the folder ran its payload.py"
    assert result.returncode != 0
    assert "downloaded_sae.payload.Evil" in result.stderr
    assert "not one of lightning-sae's SAE classes" in result.stderr


def test_load_resolves_the_class_from_the_project_table(tmp_path: Path) -> None:
    export_sae(_trained_sae(), tmp_path)
    assert type(load(tmp_path)) is StandardSAE


def test_export_never_imports_a_class_named_by_a_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = _plant_payload(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sae = _trained_sae()
    checkpoint = {
        "state_dict": sae.state_dict(),
        "hyper_parameters": {**dict(sae.hparams), "_class_path": "payload.Evil"},
    }
    torch.save(checkpoint, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="not one of lightning-sae's SAE classes"):
        export_checkpoint(tmp_path / "evil.ckpt", tmp_path / "out")
    assert not marker.exists()
    assert "payload" not in sys.modules


def test_a_checkpoint_cannot_choose_the_class_lightning_cli_imports(tmp_path: Path) -> None:
    """LightningCLI reads ``_class_path`` from a --ckpt_path checkpoint and parses it as the
    model's class_path, which imports it; the CLI must refuse a class outside the project."""
    marker = _plant_payload(tmp_path)
    sae = _trained_sae()
    checkpoint = {
        "state_dict": sae.state_dict(),
        "hyper_parameters": {**dict(sae.hparams), "_class_path": "payload.Evil"},
    }
    torch.save(checkpoint, tmp_path / "evil.ckpt")
    config = Path(__file__).parents[1] / "configs" / "toy" / "standard.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "lightning_sae.cli", "validate", "--config", str(config)]
        + ["--ckpt_path", "evil.ckpt"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert not marker.exists(), "the checkpoint's _class_path was imported"
    assert result.returncode != 0
    assert "payload.Evil" in result.stderr and "Traceback" not in result.stderr


def test_pkg_model_spec_is_resolved_without_running_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_sae.data.lm import resolve_model_path

    package = tmp_path / "shipped_model"
    (package / "model").mkdir(parents=True)
    marker = tmp_path / "imported"
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert Path(resolve_model_path("pkg:shipped_model")) == package / "model"
    assert not marker.exists()
    with pytest.raises(ValueError, match="top-level package name"):
        resolve_model_path("pkg:shipped_model.sub")


class _Payload:
    """Unpickles into a call that writes a marker file: what a hostile pickle could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_a_sharded_checkpoint_folder_cannot_run_code_through_its_dcp_metadata(
    tmp_path: Path,
) -> None:
    """torch's distributed checkpoint reads a folder's ``.metadata`` with plain pickle: a
    downloaded sharded folder must be refused before that, by export and by resume alike."""
    import pickle

    from lightning_sae.parallel import consolidate_checkpoint

    folder, marker = tmp_path / "sharded", tmp_path / "ran"
    folder.mkdir()
    torch.save({"state_dict": {}, "hyper_parameters": {}}, folder / "meta.pt")
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match="refused"):
        export_checkpoint(folder, tmp_path / "out")
    with pytest.raises(ValueError, match="refused"):
        consolidate_checkpoint(folder)
    assert not marker.exists()

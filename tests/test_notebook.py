"""notebooks/analysis.ipynb runs top to bottom (training a small SAE) and writes its figures."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "analysis.ipynb"
FIGURES = ("training_l0.png", "training_fvu.png", "feature_density.png", "max_cosine.png")


@pytest.mark.slow
def test_analysis_notebook_runs_and_writes_its_figures(tmp_path: Path, monkeypatch) -> None:
    figures = tmp_path / "figures"
    monkeypatch.setenv("LIGHTNING_SAE_FIGURES", str(figures))
    monkeypatch.delenv("LIGHTNING_SAE_RUN_DIR", raising=False)
    # A shorter run than the notebook's default (200 steps on 16k tokens), to keep CI quick.
    monkeypatch.setenv("LIGHTNING_SAE_TRAIN_STEPS", "60")
    monkeypatch.setenv("LIGHTNING_SAE_TRAIN_TOKENS", "8192")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()

    for name in FIGURES:
        path = figures / name
        assert path.is_file() and path.read_bytes().startswith(b"\x89PNG"), name
    contexts = (figures / "top_contexts.md").read_text()
    assert contexts.count("### feature") >= 1 and "[[" in contexts
    outputs = "".join(
        output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])
    )
    assert "not available for encoder-only" in outputs  # MiniLM: the downstream note
    assert "downstream/final_hidden_cosine" in outputs


FEATURES_NOTEBOOK = NOTEBOOK.parent / "features.ipynb"


def test_features_notebook_shows_features_inline(tmp_path_factory, monkeypatch) -> None:
    """notebooks/features.ipynb on the saved data of a tiny inspect run (cheap: no training)."""
    from tests._tiny_inspect import tiny_inspection

    result = tiny_inspection(tmp_path_factory.getbasetemp() / "tiny-inspect")
    monkeypatch.setenv("LIGHTNING_SAE_INSPECT_DIR", str(result))
    notebook = nbformat.read(FEATURES_NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(FEATURES_NOTEBOOK.parent)}},
    )
    client.execute()
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert html.count("<h3>feature ") == 3 and "outline:2px solid" in html
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3  # the histograms

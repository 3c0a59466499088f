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

"""The README's Python example runs as written (with fewer training steps)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


def _python_api_snippet() -> str:
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, "the Python API section should hold one python block"
    return blocks[0]


def test_readme_python_api_snippet_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = _python_api_snippet()
    assert "max_steps=200" in code
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code.replace("max_steps=200", "max_steps=20"), "README.md", "exec"), namespace)
    assert (tmp_path / "my-sae" / "cfg.json").is_file()
    assert namespace["acts"].shape == (4, 512)
    assert namespace["x_hat"].shape == (4, 256)
    assert type(namespace["loaded"]).__name__ == "TopKSAE"

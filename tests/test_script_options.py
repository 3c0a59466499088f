"""The benchmark and experiment scripts' command lines, as a new user meets them: ``--help``
says what the script does in whole sentences, and a wrong path is one line, not a traceback.
Read from the sources (no script is imported: most import torch and Lightning at the top)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SCRIPTS = sorted([*ROOT.glob("benchmarks/*.py"), *ROOT.glob("experiments/*.py")])


def _help_descriptions(path: Path) -> list[str]:
    """The descriptions a script's parsers get from its docstring: ``ArgumentParser(
    description=...)`` and ``experiments._common.parser(...)``'s first argument."""
    tree = ast.parse(path.read_text())
    doc = ast.get_docstring(tree, clean=False)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, (ast.Name, ast.Attribute)):
            continue
        name = node.func.id if isinstance(node.func, ast.Name) else node.func.attr
        if name == "ArgumentParser":
            exprs = [k.value for k in node.keywords if k.arg == "description"]
        elif name == "parser" and node.args:
            exprs = [node.args[0]]
        else:
            continue
        for expr in exprs:
            if "__doc__" in ast.unparse(expr):
                code = compile(ast.Expression(expr), str(path), "eval")
                found.append(eval(code, {"__doc__": doc}))
    return found


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_help_describes_the_script_in_whole_sentences(path: Path) -> None:
    for description in _help_descriptions(path):
        assert description.rstrip().endswith((".", "?", ":")), (
            f"{path.name}: --help stops mid-sentence: {description!r}"
        )


def test_vs_sparsify_names_a_missing_interpreter_in_one_line() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "vs_sparsify.py"),
         "--sparsify-python", "/nonexistent/bin/python"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "error: --sparsify-python /nonexistent/bin/python: no such interpreter; give the python of"
        " a venv with eai-sparsify==1.3.3, or leave the option out to create one"
    ], done.stderr[-2000:]

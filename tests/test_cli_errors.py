"""Every command fails with one clear line (what, which file, the fix) and a non-zero exit.

Also: short class names, `--help` listing the variants and answering fast, a checkpoint of one
variant validated with a config of another, and export folders wherever an SAE is taken.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import run_cli

from lightning_sae.io import export_sae
from lightning_sae.models.topk import TopKSAE

CONFIGS = Path(__file__).parents[1] / "configs"
STANDARD = CONFIGS / "toy" / "standard.yaml"
TOPK = CONFIGS / "toy" / "topk.yaml"


def assert_one_clear_line(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for text in expected:
        assert text in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize("command", ["fit", "cache", "validate"])
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("a: [1, 2\n", "is not valid YAML"),
        ("- 1\n- 2\n", "is not a mapping"),
    ],
    ids=["missing", "malformed", "list"],
)
def test_bad_config_files_give_one_line(
    tmp_path: Path, command: str, content: str | None, message: str
) -> None:
    config = tmp_path / "config.yaml"
    if content is not None:
        config.write_text(content)
    result = run_cli(tmp_path, command, "--config", str(config))
    assert_one_clear_line(result, str(config), message)


def test_the_projects_message_naming_the_file_survives_unwrapping(tmp_path: Path) -> None:
    activations = tmp_path / "acts"
    activations.mkdir()
    np.save(activations / "train.npy", np.array([{"not": "numbers"}], dtype=object))
    result = run_cli(
        tmp_path,
        "fit",
        "--config",
        str(STANDARD),
        "--data",
        "lightning_sae.data.activations.ActivationDataModule",
        "--data.init_args.activations_dir",
        str(activations),
        "--trainer.max_steps",
        "1",
    )
    assert_one_clear_line(result, str(activations / "train.npy"), "object (pickled) arrays")


def test_truncated_cfg_json_is_named(tmp_path: Path) -> None:
    from lightning_sae.io import load

    sae = TopKSAE(d_in=4, d_sae=8, k=2)
    sae.fit_input_scale(torch.randn(16, 4))
    export_sae(sae, tmp_path)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(cfg.read_text()[:40])
    with pytest.raises(ValueError, match=f"{cfg} is not valid JSON"):
        load(tmp_path)


@pytest.fixture(scope="module")
def topk_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(working folder, last.ckpt) of a 4-step TopK fit, shared by the tests that read it."""
    folder = tmp_path_factory.mktemp("topk-run")
    args = ["--trainer.max_steps", "4", "--trainer.val_check_interval", "4"]
    result = run_cli(folder, "fit", "--config", str(TOPK), *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, next((folder / "runs").rglob("last.ckpt"))


def test_validate_refuses_a_checkpoint_of_another_variant(topk_run: tuple[Path, Path]) -> None:
    tmp_path, ckpt = topk_run
    result = run_cli(tmp_path, "validate", "--config", str(STANDARD), "--ckpt_path", str(ckpt))
    assert_one_clear_line(result, "TopKSAE", "StandardSAE", "--model.class_path")


def test_validate_and_compare_take_an_export_folder(topk_run: tuple[Path, Path]) -> None:
    tmp_path, ckpt = topk_run
    exported = run_cli(tmp_path, "export", "--ckpt_path", str(ckpt), "--out", "exported")
    assert exported.returncode == 0, exported.stderr[-3000:]
    validated = run_cli(tmp_path, "validate", "--config", str(TOPK), "--ckpt_path", "exported")
    assert validated.returncode == 0, validated.stderr[-3000:]
    from_ckpt = run_cli(tmp_path, "validate", "--config", str(TOPK), "--ckpt_path", str(ckpt))
    fvu = [
        next(line for line in out.stdout.splitlines() if line.startswith("FVU"))
        for out in (validated, from_ckpt)
    ]
    assert fvu[0] == fvu[1]  # the export folds the input scale exactly

    compared = run_cli(tmp_path, "compare", "exported", str(ckpt))
    assert compared.returncode == 0, compared.stderr[-3000:]
    assert "1.000" in compared.stdout  # the same features on both sides

    refused = run_cli(tmp_path, "fit", "--config", str(TOPK), "--ckpt_path", "exported")
    assert_one_clear_line(refused, "exported", "Lightning checkpoint")


def _cli_stdout(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """``lightning-sae ARGS`` in this process (parse-only commands exit after printing)."""
    from lightning_sae.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    assert exit_.value.code in (0, None)
    return capsys.readouterr().out


def _class_path_under(config: str, key: str) -> str:
    lines = config.splitlines()
    return lines[lines.index(f"{key}:") + 1].split(": ")[1]


def test_short_class_names_resolve_for_every_variant(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_sae.models import VARIANTS

    for cls in VARIANTS.values():
        name = cls.__name__
        config = _cli_stdout(capsys, "fit", "--config", str(STANDARD), "--model", name,
                             "--print_config")  # fmt: skip
        assert _class_path_under(config, "model") in (
            f"lightning_sae.{name}",
            f"lightning_sae.models.{name}",
        )
    assert "d_sae" in _cli_stdout(capsys, "fit", "--model.help", "TopKSAE")


def test_short_names_for_data_and_callbacks(capsys: pytest.CaptureFixture[str]) -> None:
    config = _cli_stdout(capsys, "fit", "--config", str(STANDARD),
                         "--data", "ToySuperpositionDataModule",
                         "--trainer.callbacks+=DeadFeatureResampler", "--print_config")  # fmt: skip
    assert "class_path: lightning_sae.DeadFeatureResampler" in config
    assert _class_path_under(config, "data").endswith(".ToySuperpositionDataModule")


def test_fit_help_lists_the_variants(capsys: pytest.CaptureFixture[str]) -> None:
    helped = _cli_stdout(capsys, "fit", "--help")
    for name in ("StandardSAE", "TopKSAE", "BatchTopKSAE", "MatryoshkaSAE", "GatedSAE"):
        assert name in helped


@pytest.mark.parametrize(
    "args", [["--help"], ["export", "--help"], ["compare", "--help"], ["push", "--help"]]
)
def test_help_does_not_import_torch_or_lightning(tmp_path: Path, args: list[str]) -> None:
    """``--help`` answers without the heavy imports (the 3 s CPU budget is in benchmarks)."""
    script = (
        "import sys\n"
        "from lightning_sae.cli import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
        "heavy = sorted({'torch', 'lightning'} & set(sys.modules))\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert "HEAVY []" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
    assert "usage" in result.stdout.lower() or "subcommands" in result.stdout


def test_export_weights_have_the_run_folders_permissions(tmp_path: Path) -> None:
    sae = TopKSAE(d_in=4, d_sae=8, k=2)
    sae.fit_input_scale(torch.randn(16, 4))
    old = os.umask(0o022)
    try:
        export_sae(sae, tmp_path / "out")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert modes == {"cfg.json": 0o644, "sae_weights.safetensors": 0o644}
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    ours = cfg["metadata"]["lightning_sae"]
    assert ours["saelens_format"] == cfg["metadata"]["sae_lens_version"] == "6.0.0"
    assert ours["written_by"].startswith("lightning-sae ")


@pytest.mark.parametrize("command", ["fit", "cache"])
def test_a_hub_model_offline_is_one_line(tmp_path: Path, command: str) -> None:
    config = CONFIGS / "pythia-70m" / "resid-l3-standard.yaml"
    result = run_cli(tmp_path, command, "--config", str(config))
    # conftest sets HF_HUB_OFFLINE=1: the run must say so at once, not retry downloads.
    assert_one_clear_line(result, "EleutherAI/pythia-70m", "HF_HUB_OFFLINE", "pkg:")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr


def test_a_hub_dataset_offline_is_one_line(tmp_path: Path) -> None:
    config = CONFIGS / "minilm" / "resid-l3-standard.yaml"
    result = run_cli(
        tmp_path, "cache", "--config", str(config), "--data.init_args.dataset", "owner/no-such-set"
    )
    assert_one_clear_line(result, "dataset 'owner/no-such-set'", "HF_HUB_OFFLINE")


# --------------------------------------------------------- typos, abbreviations, unknown commands
def _error_of(*argv: str) -> str:
    """The one error line ``lightning-sae ARGV`` exits with, run in this process."""
    from lightning_sae.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    message = str(exit_.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def test_the_full_parser_names_the_closest_option_and_refuses_abbreviations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the option table (a fresh cache) the full parser answers, in one line."""
    import lightning_sae.cli

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    # No early check: the full parser answers.
    monkeypatch.setattr(lightning_sae.cli, "read_table", lambda: None, raising=False)
    fit = ["fit", "--config", str(STANDARD)]
    # argparse would expand this to --trainer.max_steps and train 10 steps
    assert "Did you mean `--trainer.max_steps`?" in _error_of(*fit, "--trainer.max_step", "10")
    typo = _error_of(*fit, "--model.init_args.l1_coeficient", "0.1")
    assert "Did you mean `--model.init_args.l1_coefficient`?" in typo
    wrong_class = _error_of(*fit, "--model", "TopKSEA")
    assert "Did you mean `TopKSAE`?" in wrong_class
    assert all(name in wrong_class for name in ("StandardSAE", "JumpReLUSAE", "SAEGroup"))
    config = tmp_path / "typo.yaml"
    config.write_text("trainer:\n  max_stepz: 3\n")
    assert "`trainer.max_steps`" in _error_of(*fit, "--config", str(config))


def test_a_typo_is_answered_before_torch_is_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run leaves the option table in the cache; the next typo is checked against it first."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    _error_of("fit", "--config", str(STANDARD), "--trainer.max_stepz", "1")  # writes the table
    script = (
        "import sys\n"
        "from lightning_sae.cli import main\n"
        f"for argv in {_TYPOS!r}:\n"
        "    try:\n        main(argv)\n    except SystemExit as error:\n        print(error)\n"
        "print('HEAVY', sorted({'torch', 'lightning', 'jsonargparse'} & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    lines = result.stdout.splitlines()
    assert lines[-1] == "HEAVY []", result.stdout + result.stderr[-2000:]
    expected = ["`fit`", "`--trainer.max_steps`", "`--model.init_args.l1_coefficient`", "`TopKSAE`"]
    assert len(lines) == len(expected) + 1, result.stdout
    for line, suggestion in zip(lines, expected, strict=False):
        assert line.startswith("error: ") and f"Did you mean {suggestion}?" in line, line
    # every command, not only the trainer's
    assert all(f" {name}," in lines[0] for name in ("cache", "export", "compare", "inspect"))
    assert " attribute (" in lines[0]


_TYPOS = [
    ["fitt"],
    ["fit", "--config", str(STANDARD), "--trainer.max_step", "10"],
    ["fit", "--config", str(STANDARD), "--model.init_args.l1_coeficient", "0.1"],
    ["fit", "--config", str(STANDARD), "--model", "TopKSEA"],
]


def test_option_check_leaves_what_it_cannot_judge_to_the_full_parser() -> None:
    from lightning_sae.options import OptionError, check_options

    table = {
        "commands": {"fit": ["--trainer.max_steps", "--trainer.callbacks", "--model", "--data"]},
        "model": {"lightning_sae.models.topk.TopKSAE": ["k", "d_in"]},
        "data": {},
    }
    fine = [
        "--trainer.max_steps=5",
        "--trainer.callbacks+=X",
        "--trainer.callbacks.init_args.every_n_train_steps",  # any callback's own options
        "--model.init_args.k",
        "--model.k",
        "--model.help",
    ]
    check_options("fit", fine, {"model": "TopKSAE"}, table)
    check_options("fit", ["--model.init_args.anything"], {"model": "my.own.SAE"}, table)
    for wrong in (["--trainer.max_step"], ["--max_steps"], ["--model.init_args.kk"]):
        with pytest.raises(OptionError, match="Did you mean"):
            check_options("fit", wrong, {"model": "TopKSAE"}, table)
    with pytest.raises(OptionError, match="TopKSAE"):
        check_options("fit", [], {"model": "TopK"}, table)


def test_tool_commands_refuse_abbreviations_in_one_line_naming_the_option(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from lightning_sae.commands import compare_parser, export_parser, inspect_parser

    for parser, argv, meant in (
        (export_parser(), ["--ckpt", "a.ckpt", "--out", "x"], "--ckpt_path"),
        (compare_parser(), ["a", "b", "--hungarian", "3"], "--hungarian-limit"),
        (
            inspect_parser(),
            ["--ckpt_path", "a", "--config", "c", "--out", "o", "--n_to", "3"],
            "--n_top",
        ),
    ):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(argv)
        message = str(exit_.value.code)
        # One line, the closest option named, no usage block printed before it.
        assert message.startswith(f"error: {parser.prog}: ") and "\n" not in message, message
        assert f"Did you mean `{meant}`?" in message, message
        assert capsys.readouterr().err == ""


def test_a_missing_activations_dir_is_named(tmp_path: Path) -> None:
    from lightning_sae.data.activations import ActivationDataModule

    data = ActivationDataModule(activations_dir=str(tmp_path / "missing"), batch_size=4)
    with pytest.raises(ValueError, match=r"data.init_args.activations_dir .*missing is not a"):
        data.setup("fit")


# ----------------------------------------------------------------------------- damaged files
def _cli_error(*args: str) -> str:
    """The first line of what ``lightning-sae ARGS`` (run in this process) exits with."""
    from lightning_sae.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    message = str(exit_.value.code)
    assert message.startswith("error: "), message
    assert "Traceback" not in message and "weights_only=False" not in message, message
    return message.splitlines()[0]


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A good checkpoint and export folder, and damaged copies of each."""
    import argparse

    folder = tmp_path_factory.mktemp("damaged")
    sae = TopKSAE(d_in=4, d_sae=8, k=2)
    sae.fit_input_scale(torch.randn(16, 4))
    hparams = {**dict(sae.hparams), "_class_path": "lightning_sae.models.topk.TopKSAE"}
    torch.save({"state_dict": sae.state_dict(), "hyper_parameters": hparams}, folder / "good.ckpt")
    content = (folder / "good.ckpt").read_bytes()
    (folder / "truncated.ckpt").write_bytes(content[: len(content) // 2])
    (folder / "empty.ckpt").write_bytes(b"")
    torch.save({"state_dict": {}, "options": argparse.Namespace(lr=1)}, folder / "pickled.ckpt")
    export = export_sae(sae, folder / "truncated-export")
    weights = export / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return {p.stem: p for p in folder.iterdir()}


def _commands(target: Path, files: dict[str, Path]) -> dict[str, list[str]]:
    out = str(files["good"].parent / "out")
    return {
        "export": ["export", "--ckpt_path", str(target), "--out", out],
        "compare": ["compare", str(target), str(files["good"])],
        "inspect": ["inspect", "--ckpt_path", str(target), "--config", str(TOPK), "--out", out],
        "validate": ["validate", "--config", str(TOPK), "--ckpt_path", str(target)],
        "fit": ["fit", "--config", str(TOPK), "--ckpt_path", str(target)],
    }


PROBLEMS = {
    "empty": "is empty",
    "truncated": "is truncated or damaged",
    "pickled": "holds the Python object argparse.Namespace, which lightning-sae never unpickles",
}


# Every damage through export, every command with one damage: all read through one function.
@pytest.mark.parametrize(
    ("command", "damage"),
    [
        *(("export", damage) for damage in PROBLEMS),
        ("fit", "truncated"),
        ("validate", "pickled"),
        ("compare", "empty"),
        ("inspect", "truncated"),
    ],
)
def test_a_damaged_checkpoint_is_one_line_naming_it(
    damaged: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    damage: str,
) -> None:
    monkeypatch.chdir(damaged["good"].parent)  # fit's run folder, were it to start
    target = damaged[damage]
    line = _cli_error(*_commands(target, damaged)[command])
    assert f"{target} {PROBLEMS[damage]}" in line, line


@pytest.mark.parametrize("command", ["validate", "compare", "inspect"])
def test_a_truncated_safetensors_file_is_one_line_naming_it(
    damaged: dict[str, Path], command: str
) -> None:
    folder = damaged["truncated-export"]
    line = _cli_error(*_commands(folder, damaged)[command])
    assert f"{folder / 'sae_weights.safetensors'} is not a complete safetensors file" in line


def test_a_checkpoint_weights_only_refuses_is_one_line_from_the_command(
    damaged: dict[str, Path],
) -> None:
    """The same through a real ``lightning-sae`` process: no traceback, no advice to unpickle."""
    target = damaged["pickled"]
    result = run_cli(target.parent, "validate", "--config", str(TOPK), "--ckpt_path", str(target))
    assert_one_clear_line(result, str(target), "argparse.Namespace")
    assert "weights_only" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")]


# ----------------------------------------------------------------------------- export targets
def test_export_refuses_to_overwrite_an_sae_unless_asked(
    damaged: dict[str, Path], tmp_path: Path
) -> None:
    from lightning_sae.cli import main

    good, out = str(damaged["good"]), tmp_path / "sae"
    main(["export", "--ckpt_path", good, "--out", str(out)])
    (out / "cfg.json").write_text((out / "cfg.json").read_text().replace('"topk"', '"mine"'))
    line = _cli_error("export", "--ckpt_path", good, "--out", str(out))
    assert f"{out} already holds an SAE" in line and "--overwrite" in line
    assert '"mine"' in (out / "cfg.json").read_text()  # untouched
    main(["export", "--ckpt_path", good, "--out", str(out), "--overwrite"])
    assert '"mine"' not in (out / "cfg.json").read_text()


def test_export_names_an_out_file_and_an_empty_checkpoint_folder(
    damaged: dict[str, Path], tmp_path: Path
) -> None:
    good = str(damaged["good"])
    (tmp_path / "file").write_text("")
    line = _cli_error("export", "--ckpt_path", good, "--out", str(tmp_path / "file"))
    assert f"--out {tmp_path / 'file'} is a file" in line
    (tmp_path / "empty").mkdir()
    line = _cli_error("export", "--ckpt_path", str(tmp_path / "empty"), "--out", "x")
    assert f"{tmp_path / 'empty'} is a folder" in line and "holds no checkpoint" in line
    assert "does not exist" not in line


def test_an_sae_too_large_for_memory_is_refused_before_it_is_allocated(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["--model.init_args.d_sae", "20000000000", "--trainer.max_steps", "1"]
    line = _cli_error("fit", "--config", str(TOPK), *args)
    assert "model.init_args.d_sae" in line and "bytes" in line and "Adam" in line, line
    assert "DefaultCPUAllocator" not in line

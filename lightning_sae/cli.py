"""The ``lightning-sae`` command: LightningCLI's fit / validate / test plus tool subcommands.

Trainer subcommands go to :class:`SAECLI`. Tool subcommands that are not trainer methods
(``cache``, ``export``, ``push``, ``compare``, ``inspect``, ``attribute``) are registered in
``TOOL_COMMANDS`` and dispatched before LightningCLI parses anything.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from lightning_sae.options import OptionError, check_options, did_you_mean, read_table

# name -> (one-line help, entry point taking argv). Later modules add cache / export / compare.
TOOL_COMMANDS: dict[str, tuple[str, Callable[[list[str]], None]]] = {}


def _default_environment() -> None:
    # Without an account, wandb would prompt for a login; offline runs sync later with `wandb sync`.
    if not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")


TRAINER_COMMANDS = {
    "fit": "train an SAE (prints the final metrics and the checkpoint path)",
    "validate": "validation metrics of a checkpoint or export folder",
    "test": "test metrics of a checkpoint or export folder",
}
# Modules whose classes are named by short name in configs and on the command line
# (``--model TopKSAE``): jsonargparse resolves a short name among the imported subclasses.
CLASS_MODULES = (
    "lightning_sae.models",
    "lightning_sae.models.group",
    "lightning_sae.data.toy",
    "lightning_sae.data.activations",
    "lightning_sae.data.stream",
    "lightning_sae.callbacks.decoder_norm",
    "lightning_sae.callbacks.density",
    "lightning_sae.callbacks.downstream",
    "lightning_sae.callbacks.geometry",
    "lightning_sae.callbacks.init",
    "lightning_sae.callbacks.resampling",
)


class CommandError(Exception):
    """A command-line failure whose message is the whole story (printed as one error line)."""


def main(argv: list[str] | None = None) -> None:
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    _default_environment()
    _register_tools()
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_level_help())
        return
    try:
        check_command(argv[0])
        check_config_files(argv)
        if argv[0] in TOOL_COMMANDS:
            TOOL_COMMANDS[argv[0]][1](argv[1:])
            return
        check_trainer_options(argv)
        check_class_paths(argv)
        _run_trainer_command(argv if not from_command_line else None)
    except (CommandError, OptionError) as error:
        if os.environ.get("LIGHTNING_SAE_DEBUG"):
            raise
        raise SystemExit(f"error: {error}") from None
    except (ValueError, OSError) as error:
        if os.environ.get("LIGHTNING_SAE_DEBUG"):
            raise
        raise SystemExit(
            f"error: {_project_error(error)}\n(set LIGHTNING_SAE_DEBUG=1 for the traceback)"
        ) from None


def _commands() -> dict[str, str]:
    """Every command and its one-line help."""
    return {**TRAINER_COMMANDS, **{name: help_ for name, (help_, _) in TOOL_COMMANDS.items()}}


def check_command(name: str) -> None:
    if name not in _commands():
        raise CommandError(
            f"unknown command {name!r}.{did_you_mean(name, _commands())} The commands: "
            f"{', '.join(_commands())} (lightning-sae --help says what each does)."
        )


def _top_level_help() -> str:
    rows = _commands()
    commands = "".join(f"\n  {name:<10}{help_}" for name, help_ in rows.items())
    return (
        "usage: lightning-sae COMMAND [options]   (lightning-sae COMMAND --help for its options)\n"
        f"\ncommands:{commands}\n"
        "\nexample: lightning-sae fit --config configs/toy/standard.yaml"
    )


def _run_trainer_command(args: list[str] | None) -> None:
    for module in CLASS_MODULES:
        importlib.import_module(module)
    from lightning import LightningDataModule, LightningModule

    from lightning_sae.trainer_cli import SAECLI

    # The model is an SAE variant or an SAEGroup of them; a checkpoint's class is still
    # checked against the project's classes (SAECLI._parse_ckpt_path).
    SAECLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        auto_configure_optimizers=False,
    )


def _project_error(error: BaseException) -> BaseException:
    """The outermost error raised by lightning-sae's own code in ``error``'s chain.

    jsonargparse and Lightning wrap our messages in their own; the innermost cause is often a
    bare library error (a JSONDecodeError, an OSError) that our message explains and names the
    file of. Fall back to the innermost error when no frame of ours raised one.
    """
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or (
            None if current.__suppress_context__ else current.__context__
        )
    for candidate in chain:
        if _raised_in_project(candidate):
            return candidate
    return chain[-1]


def _raised_in_project(error: BaseException) -> bool:
    frame = error.__traceback__
    if frame is None:
        return False
    while frame.tb_next is not None:
        frame = frame.tb_next
    package = str(Path(__file__).parent)
    return frame.tb_frame.f_code.co_filename.startswith(package)


def _config_paths(argv: list[str]) -> list[str]:
    paths = [value for flag, value in zip(argv, argv[1:], strict=False) if flag == "--config"]
    return paths + [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]


def read_config_file(path: str) -> dict:
    """A YAML config as a mapping, or a :class:`CommandError` naming the file and the fix."""
    from lightning_sae.files import UnreadableFileError, read_text_bounded

    if not Path(path).exists():
        raise CommandError(
            f"the config file {path} does not exist; pass the path of a YAML config, "
            "e.g. --config configs/toy/standard.yaml."
        )
    try:
        config = yaml.safe_load(read_text_bounded(path))
    except UnreadableFileError as error:
        raise CommandError(str(error)) from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        detail = " ".join(str(error).split())
        raise CommandError(f"the config file {path} is not valid YAML ({detail}).") from None
    if not isinstance(config, dict):
        raise CommandError(
            f"the config file {path} is not a mapping (it holds a {type(config).__name__}); "
            "a config has top-level keys such as trainer:, model: and data:."
        )
    return config


def check_config_files(argv: list[str]) -> None:
    for path in _config_paths(argv):
        read_config_file(path)


def _options_in(argv: list[str]) -> list[str]:
    """The ``--name`` tokens of a command line (a value is never one: none starts with --)."""
    return [arg for arg in argv if arg.startswith("--") and arg != "--"]


def check_trainer_options(argv: list[str]) -> None:
    """Refuse a mistyped option or class name before torch is imported, when the option
    table of an earlier run is at hand (see :mod:`lightning_sae.options`)."""
    table = read_table()
    if table is None or argv[0] not in table["commands"]:
        return
    check_options(argv[0], _options_in(argv[1:]), _class_paths_in(argv), table)


def _class_paths_in(argv: list[str]) -> dict[str, str]:
    """model/data class_path values from --config files and command-line overrides."""
    found: dict[str, str] = {}
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "--config":
            config = read_config_file(value)
            for key in ("model", "data"):
                entry = config.get(key)
                if isinstance(entry, dict) and "class_path" in entry:
                    found[key] = entry["class_path"]
        for key in ("model", "data"):
            if flag in (f"--{key}", f"--{key}.class_path") and not value.startswith("{"):
                found[key] = value
    return found


def check_class_paths(argv: list[str]) -> None:
    """Fail early, naming the option and the choices, when a class_path cannot be imported."""
    for key, class_path in _class_paths_in(argv).items():
        module_name, _, class_name = class_path.rpartition(".")
        if "." not in class_path:
            continue  # a bare class name: jsonargparse resolves it among known subclasses
        try:
            getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as error:
            known = _known_subclasses(key)
            raise CommandError(
                f"{key}.class_path {class_path!r} cannot be imported ({error})."
                f"{did_you_mean(class_path, known)} Set {key}.class_path to one of: "
                f"{', '.join(known)}."
            ) from None


def _known_subclasses(key: str) -> list[str]:
    from lightning import LightningDataModule

    from lightning_sae.models.base import SparseAutoencoder

    base = SparseAutoencoder if key == "model" else LightningDataModule
    package = "lightning_sae.models" if key == "model" else "lightning_sae.data"
    for module in pkgutil.iter_modules(importlib.import_module(package).__path__):
        with contextlib.suppress(ImportError):
            importlib.import_module(f"{package}.{module.name}")
    stack, names = [base], set()
    while stack:
        for sub in stack.pop().__subclasses__():
            stack.append(sub)
            if sub.__module__.startswith("lightning_sae"):
                names.add(f"{sub.__module__}.{sub.__qualname__}")
    return sorted(names)


def _lazy(
    module: str,
    function: str,
    parser: Callable[[], argparse.ArgumentParser] | None = None,
    parse_first: bool = False,
) -> Callable[[list[str]], None]:
    """Import the command's module only when it runs: some pull in heavy imports. With a light
    ``parser``, ``--help`` is answered before that import; with ``parse_first`` (a command that
    takes nothing beyond its parser's options) so is any mistake on the command line."""

    def run(argv: list[str]) -> None:
        if parser is not None and (parse_first or {"-h", "--help"} & set(argv)):
            parser().parse_args(argv)  # prints the help or the error and exits
        getattr(importlib.import_module(module), function)(argv)

    return run


def _register_tools() -> None:
    from lightning_sae import commands

    TOOL_COMMANDS.update(
        {
            "cache": (
                "build an activation cache alone",
                _lazy("lightning_sae.data.activations", "cache_main"),
            ),
            "export": (
                "write sae_weights.safetensors + cfg.json (SAELens layout)",
                _lazy("lightning_sae.io", "export_main", commands.export_parser),
            ),
            "push": (
                "publish an SAE on the Hugging Face Hub (SAELens layout + model card)",
                _lazy("lightning_sae.publish", "push_main", commands.push_parser),
            ),
            "compare": (
                "match the features of two SAEs (checkpoints or export folders)",
                _lazy("lightning_sae.metrics.similarity", "compare_main", commands.compare_parser),
            ),
            "inspect": (
                "per-feature top contexts, histograms, logit effects + static HTML browser",
                _lazy("lightning_sae.analysis.inspector", "inspect_main", commands.inspect_parser),
            ),
            "attribute": (
                "attribution graph of a prompt through a cross-layer transcoder (JSON + HTML)",
                _lazy(
                    "lightning_sae.analysis.attribution",
                    "attribute_main",
                    commands.attribute_parser,
                    parse_first=True,
                ),
            ),
        }
    )


if __name__ == "__main__":
    main()

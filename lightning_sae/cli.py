"""The ``lightning-sae`` command: LightningCLI's fit / validate / test plus tool subcommands.

Trainer subcommands go to :class:`SAECLI`. Tool subcommands that are not trainer methods
(``cache``, ``export``, ``compare``) are registered in ``TOOL_COMMANDS`` and dispatched before
LightningCLI parses anything.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pkgutil
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

# name -> (one-line help, entry point taking argv). Later modules add cache / export / compare.
TOOL_COMMANDS: dict[str, tuple[str, Callable[[list[str]], None]]] = {}


def _default_environment() -> None:
    # Without an account, wandb would prompt for a login; offline runs sync later with `wandb sync`.
    if not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")


def main(argv: list[str] | None = None) -> None:
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    _default_environment()
    _register_tools()
    if argv and argv[0] in TOOL_COMMANDS:
        TOOL_COMMANDS[argv[0]][1](argv[1:])
        return
    if not argv or argv[0] in ("-h", "--help"):
        tools = "".join(f"\n  {name:<10}{help_}" for name, (help_, _) in TOOL_COMMANDS.items())
        if tools:
            print(f"tool subcommands (lightning-sae NAME --help):{tools}\n")
    check_class_paths(argv)
    from lightning import LightningDataModule

    from lightning_sae.models.base import SparseAutoencoder
    from lightning_sae.trainer_cli import SAECLI

    try:
        SAECLI(
            SparseAutoencoder,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=None if from_command_line else argv,
            auto_configure_optimizers=False,
        )
    except (ValueError, FileNotFoundError) as error:
        if os.environ.get("LIGHTNING_SAE_DEBUG"):
            raise
        root = error
        while root.__cause__ is not None:  # jsonargparse wraps our messages in its own
            root = root.__cause__
        raise SystemExit(f"error: {root}\n(set LIGHTNING_SAE_DEBUG=1 for the traceback)") from None


def _class_paths_in(argv: list[str]) -> dict[str, str]:
    """model/data class_path values from --config files and command-line overrides."""
    found: dict[str, str] = {}
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "--config" and Path(value).is_file():
            config = yaml.safe_load(Path(value).read_text()) or {}
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
            choices = "\n  ".join(_known_subclasses(key))
            raise SystemExit(
                f"error: {key}.class_path {class_path!r} cannot be imported ({error}).\n"
                f"Set {key}.class_path to one of:\n  {choices}"
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


def _lazy(module: str, function: str) -> Callable[[list[str]], None]:
    """Import the command's module only when it runs: some pull in heavy imports."""

    def run(argv: list[str]) -> None:
        getattr(importlib.import_module(module), function)(argv)

    return run


def _register_tools() -> None:
    TOOL_COMMANDS.update(
        {
            "cache": (
                "build an activation cache alone",
                _lazy("lightning_sae.data.activations", "cache_main"),
            ),
            "export": (
                "write sae_weights.safetensors + cfg.json (SAELens layout)",
                _lazy("lightning_sae.io", "export_main"),
            ),
            "compare": (
                "match the features of two SAEs",
                _lazy("lightning_sae.metrics.similarity", "compare_main"),
            ),
        }
    )


if __name__ == "__main__":
    main()

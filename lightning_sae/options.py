"""The option names of ``fit`` / ``validate`` / ``test``, known before torch is imported.

Building LightningCLI's parser needs torch and Lightning (about 8 s of CPU), so a mistyped option
would be answered only after that. Each full parse writes the names it accepts (the commands'
options and the init arguments of every project class) to a small table in the user's cache,
keyed by a fingerprint of this package's sources and of the libraries that shape the parser; the
next run checks its options against the table first and answers a typo at once. No table, or a
stale one, only means the check waits for the full parser, which says the same in one line.

Nothing here imports torch or Lightning.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.metadata
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

# Libraries whose versions change the options the trainer commands accept.
PARSER_LIBRARIES = ("lightning", "jsonargparse", "torch")
CLASS_GROUPS = ("model", "data")


class OptionError(ValueError):
    """An option or class the command does not take; the message is the one line to print."""


def did_you_mean(given: str, choices: Iterable[str]) -> str:
    """`` Did you mean `X`?`` for the closest choice, or nothing when none is close."""
    close = difflib.get_close_matches(given, list(choices), n=1, cutoff=0.6)
    return f" Did you mean `{close[0]}`?" if close else ""


def unknown_option(option: str, choices: Iterable[str], command: str, where: str = "") -> str:
    return (
        f"{command} has no option {option}{where}.{did_you_mean(option, choices)} "
        f"(lightning-sae {command} --help lists them)"
    )


def unknown_class(group: str, given: str, classes: Iterable[str]) -> str:
    names = sorted({name.rpartition(".")[2] for name in classes})
    return (
        f"--{group} {given} is not a class lightning-sae knows.{did_you_mean(given, names)} "
        f"The {group} classes: {', '.join(names)} (or the full import path of your own class)."
    )


# --------------------------------------------------------------------------- the cached table
def _fingerprint() -> str:
    digest = hashlib.sha1(sys.version.encode())
    for library in PARSER_LIBRARIES:
        try:
            digest.update(f"{library}=={importlib.metadata.version(library)}".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(library.encode())
    for source in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def table_path() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "lightning-sae" / f"options-{_fingerprint()}.json"


def read_table() -> dict[str, Any] | None:
    try:
        return json.loads(table_path().read_text())
    except (OSError, ValueError):
        return None


def write_table(build: Callable[[], Mapping[str, Any]]) -> None:
    """The table ``build`` returns, written atomically; where the cache cannot be written,
    nothing is built (the check just waits for the full parser)."""
    path = table_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        table = build()
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as file:
            json.dump(table, file)
        os.replace(file.name, path)
    except OSError:
        pass


# --------------------------------------------------------------------------- the check
def init_arg_options(group: str, keys: Iterable[str]) -> list[str]:
    return [f"--{group}.init_args.{key}" for key in keys]


def _class_of(group: str, given: str | None, table: Mapping[str, Any]) -> str | None:
    """The table's full class path for ``given`` (a full path or a bare class name), None for a
    class the table does not hold; an unknown bare name is an :class:`OptionError`."""
    if given is None:
        return None
    classes: dict[str, Any] = table[group]
    if given in classes:
        return given
    if "." in given or given.endswith((".yaml", ".yml", ".json")):
        return None  # the user's own class (or a config file): the full parser checks it
    by_name = [path for path in classes if path.rpartition(".")[2] == given]
    if not by_name:
        raise OptionError(unknown_class(group, given, classes))
    return by_name[0]


def check_options(
    command: str, options: list[str], classes: Mapping[str, str | None], table: Mapping[str, Any]
) -> None:
    """Refuse, naming the closest valid one, an option ``command`` does not take.

    ``options`` are the ``--name`` tokens of the command line, ``classes`` the model and data
    class each resolves to (from the configs and the command line). An option under a class the
    table does not know (the user's own), or nested under an option that takes any class
    (``--trainer.callbacks.init_args.*``), is left to the full parser.
    """
    known = set(table["commands"][command])
    keys = {}
    for group in CLASS_GROUPS:
        path = _class_of(group, classes.get(group), table)
        keys[group] = None if path is None else table[group][path]
    candidates = known | {
        option for group in CLASS_GROUPS for option in init_arg_options(group, keys[group] or [])
    }
    for option in options:
        name = option.split("=", 1)[0].rstrip("+")
        if name in known:
            continue
        group, _, rest = name[2:].partition(".")
        if group in CLASS_GROUPS and rest:
            key = rest.removeprefix("init_args.").split(".")[0]
            if rest in ("class_path", "help") or rest.startswith("dict_kwargs"):
                continue
            if keys[group] is None or key in keys[group]:
                continue
            raise OptionError(unknown_option(name, candidates, command))
        parents = [name.rsplit(".", depth)[0] for depth in range(1, name.count("."))]
        if any(parent in known for parent in parents):
            continue
        raise OptionError(unknown_option(name, candidates, command))


# --------------------------------------------------------------- the full parser's errors
_BOILERPLATE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Given value:",
    "Expected a <class 'NoneType'>",
    "Problem with given class_path",
    "Parser key",
)


def parser_error_line(
    message: str,
    command: str,
    options: Iterable[str],
    classes: Mapping[str, Iterable[str]],
    init_args: Mapping[str, Iterable[str]],
) -> str:
    """jsonargparse's error ``message`` (often a page of union alternatives) as one line.

    ``options`` are the command's ``--`` options, ``classes`` the project's classes by group
    (model, data) and ``init_args`` the init argument names by class path.
    """
    options = list(options)
    group = re.search(r'Parser key "(\w+)"', message)
    group_name = group.group(1) if group else None
    if found := re.search(r"unrecognized arguments: (\S+)", message):
        return unknown_option(found.group(1).split("=", 1)[0], options, command)
    if found := re.search(r"does not accept option '([^']+)'", message):
        keys = [option[2:] for option in options]
        return unknown_option(found.group(1), keys, command, where=" (in a config file)")
    if found := re.search(r"Option '([^']+)' is not accepted", message):
        path = re.search(r"class_path '([^']+)'", message)
        keys = init_args.get(path.group(1), []) if path else []
        option = f"--{group_name or 'model'}.init_args.{found.group(1)}"
        return unknown_option(option, init_arg_options(group_name or "model", keys), command)
    not_a_class = ("Expected a dot import path", "not accessible or invalid", "does not exist")
    given = re.search(r"Given value: (\S+)", message)
    if group_name in classes and given and any(text in message for text in not_a_class):
        return unknown_class(group_name, given.group(1), classes[group_name])
    lines = [line.strip(" -") for line in message.splitlines()]
    kept = "; ".join(line for line in lines if line and not line.startswith(_BOILERPLATE))
    keys = re.findall(r'Parser key "([^"]+)"', message)
    if keys and kept:  # e.g. model.init_args.l1_coefficient: Expected a <class 'float'>...
        nested = ".init_args." if keys[0] in CLASS_GROUPS and len(keys) > 1 else "."
        return f"{keys[0]}{nested if len(keys) > 1 else ''}{'.'.join(keys[1:])}: {kept}"
    return kept or " ".join(message.split())

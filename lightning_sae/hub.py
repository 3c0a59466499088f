"""SAEs on the Hugging Face Hub: ``hf://org/repo[/subfolder][@revision]`` paths.

A Hub path names a folder of a model repo that holds one SAE: ``cfg.json`` and its weights,
``sae_weights.safetensors`` (SAELens's layout, one SAE per folder) or ``sae.safetensors``
(EleutherAI sparsify's, one folder per hookpoint). :func:`sae_folder` fetches only those files
(and a sparsify run's ``config.json``, for its model and dataset) through ``huggingface_hub``,
into its cache, and returns the local folder; everything after that reads a folder, as for a
local path. The cache, ``HF_HUB_OFFLINE``, ``HF_TOKEN`` and ``HF_ENDPOINT`` work as they do for
every Hugging Face library; nothing else of a repo is downloaded, and only JSON and safetensors
are read from it (by :mod:`lightning_sae.io`), so a repo cannot choose code to run.

Both spellings of a revision are accepted: ``hf://org/repo/sub@v1`` (subfolder first) and
``huggingface_hub``'s own ``hf://org/repo@v1/sub``.

This module is on the lowest floor, like :mod:`lightning_sae.files`: it imports nothing of the
project, so ``io``, the metrics' ``compare`` and every command resolve Hub paths through it.
Publishing (``lightning-sae push``) lives in :mod:`lightning_sae.publish`.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

HUB_PREFIX = "hf://"
CONFIG_FILENAME = "cfg.json"
# What an SAE folder's weights file is called: SAELens's name, then sparsify's.
WEIGHTS_FILENAMES = ("sae_weights.safetensors", "sae.safetensors")
# A sparsify run saves its training config (model, dataset, ctx_len) beside the hookpoints.
RUN_CONFIG_FILENAME = "config.json"
_LISTED = 12  # folders named in the one line that lists a repo's SAEs


class HubError(ValueError):
    """A Hub path that cannot be served: the message is the one line to print."""


def is_hub_path(path: object) -> bool:
    """Whether ``path`` is a ``hf://`` string (a ``Path`` never is: it would fold the ``//``)."""
    return isinstance(path, str) and path.startswith(HUB_PREFIX)


def parse(path: str):  # -> huggingface_hub.HfUri
    """The repo, revision and subfolder of a ``hf://`` path, or a :class:`HubError`."""
    from huggingface_hub import HfUri, parse_hf_uri
    from huggingface_hub.errors import HfUriError

    body = path[len(HUB_PREFIX) :]
    head, at, revision = body.partition("@")
    parts = head.split("/")
    try:
        if at and len(parts) > 2:  # hf://org/repo/sub@rev: the revision may hold '/' (refs/pr/1)
            uri = HfUri(
                type="model",
                id="/".join(parts[:2]),
                revision=revision,
                path_in_repo="/".join(parts[2:]).strip("/"),
                _raw=path,
            )
        else:
            uri = parse_hf_uri(path)
    except HfUriError as error:
        raise HubError(
            f"{path} is not a Hub path ({error}); write hf://org/repo[/subfolder][@revision], "
            "e.g. hf://EleutherAI/sae-pythia-70m-32k/layers.3."
        ) from None
    if uri.type != "model":
        raise HubError(
            f"{path} names a {uri.type}; SAEs are read from model repos: hf://org/repo[/subfolder]."
        )
    if ".." in uri.path_in_repo.split("/"):
        raise HubError(f"{path}: a subfolder cannot contain '..'; name a folder of the repo.")
    return uri


def local_folder(path: str | Path) -> Path:
    """A local path as it is; a ``hf://`` path as the cached folder of its SAE (fetched first
    where needed)."""
    return sae_folder(path) if is_hub_path(path) else Path(path)


def sae_folder(path: str) -> Path:
    """The local folder holding the SAE that the ``hf://`` ``path`` names.

    Only ``cfg.json`` and the weights file of that folder are fetched (a repo may hold hundreds
    of SAEs). A path without a subfolder serves the repo's root SAE, or its only one; a repo with
    several SAEs is a :class:`HubError` listing them and how to pick one.
    """
    uri = parse(path)
    sub = uri.path_in_repo
    parent = posixpath.dirname(sub)
    patterns = [posixpath.join(sub, name) for name in (CONFIG_FILENAME, *WEIGHTS_FILENAMES)]
    patterns.append(posixpath.join(parent, RUN_CONFIG_FILENAME))
    snapshot = _download(path, uri, patterns)
    folder = snapshot / sub
    if (folder / CONFIG_FILENAME).is_file():
        _check_weights(path, uri, folder)
        return folder
    saes = list_saes(uri, snapshot)
    if not sub and len(saes) == 1:  # the repo's only SAE, in a folder of its own
        return sae_folder(_with_subfolder(uri, saes[0]))
    raise HubError(_no_sae_here(path, uri, saes))


def list_saes(uri, snapshot: Path) -> list[str]:  # uri: huggingface_hub.HfUri
    """The folders of the repo that hold a ``cfg.json`` (``""`` for the root), sorted.

    From the repo's file list that ``huggingface_hub`` caches with every snapshot download (so
    offline too, once the repo was reached); else from the files in the cached snapshot.
    """
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        files = [entry.path for entry in get_cached_repo_tree(uri.id, revision=uri.revision)]
    except CachedRepoTreeNotFoundError:
        files = [str(p.relative_to(snapshot).as_posix()) for p in snapshot.rglob(CONFIG_FILENAME)]
    return sorted(
        posixpath.dirname(name)
        for name in files
        if posixpath.basename(name) == CONFIG_FILENAME
        and posixpath.basename(posixpath.dirname(name)) != ".cache"
    )


# --------------------------------------------------------------------------- helpers
def _with_subfolder(uri, sub: str) -> str:
    at = f"@{uri.revision}" if uri.revision else ""
    return f"{HUB_PREFIX}{uri.id}/{sub}{at}" if sub else f"{HUB_PREFIX}{uri.id}{at}"


def _no_sae_here(path: str, uri, saes: list[str]) -> str:
    if not saes:
        return (
            f"{path} holds no {CONFIG_FILENAME}, so no SAE in SAELens's or sparsify's layout; "
            "pass the repo (or subfolder) of an SAE release."
        )
    shown = ", ".join(name or "(root)" for name in saes[:_LISTED])
    more = f" and {len(saes) - _LISTED} more" if len(saes) > _LISTED else ""
    where = f"{path} is not an SAE folder" if uri.path_in_repo else f"{path} holds {len(saes)} SAEs"
    return (
        f"{where}; the repo's SAEs, one per folder: {shown}{more}. Pick one: "
        f"{_with_subfolder(uri, saes[0])}."
    )


def _offline_alternatives(uri, offline: bool) -> str:
    include = f" --include '{uri.path_in_repo}/*'" if uri.path_in_repo else ""
    fetch = "unset HF_HUB_OFFLINE to fetch it" if offline else "fetch it once online"
    return (
        f"pass a local folder instead (e.g. one `hf download {uri.id}{include} --local-dir DIR` "
        f"wrote), or {fetch}"
    )


def _download(path: str, uri, patterns: list[str]) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(uri.id, revision=uri.revision, allow_patterns=patterns))
    except RevisionNotFoundError:
        raise HubError(
            f"{path}: the repo {uri.id} has no revision {uri.revision!r}; name a branch, tag or "
            "commit it has (its page's 'Files' tab lists them), or leave out @revision."
        ) from None
    except GatedRepoError:
        raise HubError(
            f"{path}: {uri.id} is gated; accept its terms on huggingface.co/{uri.id} and log in "
            "(`hf auth login`, or set HF_TOKEN)."
        ) from None
    except RepositoryNotFoundError:
        raise HubError(
            f"{path}: no model repo {uri.id} on the Hub (or it is private: log in with "
            "`hf auth login` or set HF_TOKEN); check the name."
        ) from None
    except (LocalEntryNotFoundError, IncompleteSnapshotError):
        offline = bool(constants.HF_HUB_OFFLINE)
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached from here"
        cached = "has no cached copy" if uri.revision is None else f"has no cached {uri.revision!r}"
        alternatives = _offline_alternatives(uri, offline)
        raise HubError(
            f"{path} {cached} in {constants.HF_HUB_CACHE} and {why}: {alternatives}."
        ) from None
    except HFValidationError as error:
        raise HubError(f"{path}: {error}") from None
    except HfHubHTTPError as error:
        first = str(error).split("\n", 1)[0]
        raise HubError(f"{path}: the Hub answered {first}; try again later.") from None


def _check_weights(path: str, uri, folder: Path) -> None:
    """A cached folder holding cfg.json but not its weights (fetched offline earlier, or cut
    short) is named here, rather than as a missing file later."""
    from huggingface_hub import constants

    if any((folder / name).exists() for name in WEIGHTS_FILENAMES):
        return
    if constants.HF_HUB_OFFLINE:
        raise HubError(
            f"{path}: the cached copy in {constants.HF_HUB_CACHE} has {CONFIG_FILENAME} but no "
            f"weights, and HF_HUB_OFFLINE is set: {_offline_alternatives(uri, True)}."
        )
    raise HubError(
        f"{path} has {CONFIG_FILENAME} but neither {' nor '.join(WEIGHTS_FILENAMES)}; it is not an "
        "SAE folder in SAELens's or sparsify's layout."
    )

"""``lightning-sae push``: publish an SAE on the Hugging Face Hub, with a model card.

The SAE is written in SAELens's layout (``cfg.json`` + ``sae_weights.safetensors``, input
normalisation folded in; an SAEGroup gives one folder per member), so SAELens and
``lightning_sae.load("hf://org/name[/subfolder]")`` both read it. Beside it goes ``README.md``:
the variant, hook, model, dataset, tokens trained, the final metrics table the run printed and
the run's resolved config, each where the run recorded it. ``huggingface_hub`` creates the repo
and uploads the folder in one commit; ``--dry-run`` writes the same folder and stops.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_sae import hub, peers
from lightning_sae.commands import FINAL_METRICS_FILENAME, push_parser
from lightning_sae.files import UnreadableFileError, load_torch_file, read_text_bounded
from lightning_sae.io import (
    CONFIG_FILENAME,
    OWN_ARCHITECTURES,
    WEIGHTS_FILENAME,
    _check_export_folder,
    _export_checkpoint,
    export_sae,
    is_sae_folder,
    load,
    read_config,
    sae_metadata,
)

CARD_FILENAME = "README.md"
CARD_TAGS = ["sparse-autoencoder", "interpretability", "saelens", "lightning-sae"]
RUN_CONFIG_NAME = "config.yaml"  # what LightningCLI saves beside a run's logs
_CONFIG_LIMIT = 1 << 20  # a resolved run config is a few KiB


@dataclass
class RunFacts:
    """What the card says beyond the SAE folders' cfg.json: from the checkpoint and its run."""

    tokens: int | None = None
    steps: int | None = None
    dataset: str | None = None
    metrics_table: str | None = None
    config: str | None = None
    sources: list[str] = field(default_factory=list)  # files the facts were read from


# ----------------------------------------------------------------------------- staging
def stage(
    ckpt_path: str | Path, root: Path, repo: str, subfolder: str | None, overwrite: bool = False
) -> list[Path]:
    """Write the SAE folder(s) and the card under ``root`` (``root/subfolder`` when given) as
    they will be in the repo; the files written, card last."""
    if hub.is_hub_path(ckpt_path):
        raise ValueError(
            f"--ckpt_path {ckpt_path} is already on the Hub; push takes a local checkpoint or "
            "export folder (copy a Hub SAE with `lightning-sae export --ckpt_path hf://... --out "
            "DIR` first)."
        )
    source = Path(ckpt_path)
    if not source.exists():
        raise FileNotFoundError(
            f"--ckpt_path {source} does not exist; pass a .ckpt file from a run's checkpoints/ "
            "folder or a folder `lightning-sae export` wrote."
        )
    target = root / subfolder if subfolder else root
    if _is_export(source):
        folders, facts = _stage_export(source, target, overwrite), RunFacts()
    else:
        folders = _export_checkpoint(source, target, None, None, overwrite)
        facts = _run_facts(source)
    files = [path for folder in folders for path in sorted(folder.iterdir()) if path.is_file()]
    card = target / CARD_FILENAME
    card.write_text(model_card(folders, target, repo, subfolder, facts))
    return [path for path in files if path != card] + [card]


def _is_export(source: Path) -> bool:
    """An export folder: one SAE, or an SAEGroup's member folders."""
    if is_sae_folder(source):
        return True
    return source.is_dir() and any((p / CONFIG_FILENAME).is_file() for p in source.iterdir())


def _stage_export(source: Path, target: Path, overwrite: bool) -> list[Path]:
    members = (
        [source]
        if is_sae_folder(source)
        else sorted(p for p in source.iterdir() if (p / CONFIG_FILENAME).is_file())
    )
    placed = [target if member == source else target / member.name for member in members]
    for folder in placed:
        _check_export_folder(folder, overwrite)
    for member, folder in zip(members, placed, strict=True):
        sae = load(member)  # refuses, in one line, what is not a loadable SAE
        cfg = read_config(member / CONFIG_FILENAME)
        current = not peers.is_sparsify(cfg) and not peers.is_old_saelens(cfg)
        if current and (member / WEIGHTS_FILENAME).is_file():  # already SAELens 6: the same bytes
            folder.mkdir(parents=True, exist_ok=True)
            for name in (CONFIG_FILENAME, WEIGHTS_FILENAME):
                shutil.copyfile(member / name, folder / name)
        else:  # sparsify's or an older SAELens's layout: written anew in SAELens 6's
            source_meta = sae_metadata(member)
            kept = {k: v for k, v in source_meta.items() if k not in ("lightning_sae",)}
            kept.pop("sae_lens_version", None)
            export_sae(sae, folder, kept)
    return placed


def _run_facts(ckpt_path: Path) -> RunFacts:
    """Tokens, steps and dataset from the checkpoint; the final metrics table and resolved
    config from its run folder (where ``fit`` wrote them), when they are there."""
    checkpoint = load_torch_file(
        ckpt_path / "meta.pt" if ckpt_path.is_dir() else ckpt_path, mmap=True
    )
    callbacks = checkpoint.get("callbacks") or {}
    throughput = callbacks.get("TokenThroughput") or {}
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    facts = RunFacts(tokens=throughput.get("tokens"), steps=checkpoint.get("global_step"))
    dataset = data.get("dataset") or data.get("dataset_path") or data.get("dataset_name")
    if dataset is None and data.get("_class_path"):
        dataset = data["_class_path"].rpartition(".")[2]  # e.g. the toy data module
    facts.dataset = None if dataset is None else str(dataset)
    for run in _run_folders(checkpoint, ckpt_path):
        metrics = run / FINAL_METRICS_FILENAME
        if facts.metrics_table is None and metrics.is_file():
            facts.metrics_table = _read_text(metrics)
            facts.sources.append(str(metrics))
        config = _run_config(run, (checkpoint.get("run") or {}).get("log_version"))
        if facts.config is None and config is not None:
            facts.config = _read_text(config)
            facts.sources.append(str(config))
    return facts


def _run_folders(checkpoint: dict[str, Any], ckpt_path: Path) -> list[Path]:
    """Where the run's files may be: the folder the checkpoint records, and (a run copied
    elsewhere) the folder above its checkpoints/."""
    recorded = (checkpoint.get("run") or {}).get("run_dir")
    candidates = [Path(recorded)] if recorded else []
    candidates.append(ckpt_path.resolve().parent.parent)
    return [folder for folder in dict.fromkeys(candidates) if folder.is_dir()]


def _run_config(run: Path, version: Any) -> Path | None:
    """The config LightningCLI saved for the run's log version (``<logger>/version_N/``), or
    at the run's root when it had no logger."""
    found = [run / RUN_CONFIG_NAME] if (run / RUN_CONFIG_NAME).is_file() else []
    if version is not None:
        found += sorted(run.glob(f"*/version_{version}/{RUN_CONFIG_NAME}"))
    return found[0] if found else None


def _read_text(path: Path) -> str | None:
    try:
        return read_text_bounded(path, _CONFIG_LIMIT).strip("\n")
    except (UnreadableFileError, UnicodeDecodeError):
        return None  # the card goes without it rather than carrying a damaged file


# ----------------------------------------------------------------------------- the card
def model_card(
    folders: list[Path], root: Path, repo: str, subfolder: str | None, facts: RunFacts
) -> str:
    """README.md for the SAE folders under ``root``: YAML front matter the Hub reads, what the
    SAE is and was trained on, how to load it, the final metrics and the config."""
    from huggingface_hub import ModelCardData

    cfgs = [read_config(folder / CONFIG_FILENAME) for folder in folders]
    metas = [cfg.get("metadata") or {} for cfg in cfgs]
    paths = [folder.relative_to(root).as_posix() for folder in folders]
    prefix = f"{subfolder}/" if subfolder else ""
    repo_paths = [f"{prefix}{p}" if p != "." else subfolder or "" for p in paths]
    first = metas[0]
    model = first.get("model_name")
    variant = _variant(cfgs[0])
    on = ", ".join(str(x) for x in (model, first.get("hook_name")) if x)
    title = (
        f"# {variant}{f' on {on}' if on else ''}"
        if len(folders) == 1
        else (f"# {len(folders)} SAEs{f' on {model}' if model else ''}")
    )
    header = ModelCardData(library_name="lightning-sae", tags=CARD_TAGS).to_yaml()
    lines = [f"---\n{header}\n---", "", title, ""]
    lines += [
        "Trained with lightning-sae and saved in SAELens's folder layout (`cfg.json` + "
        "`sae_weights.safetensors`). The weights are in the model's units: any input "
        "normalisation used in training is folded in.",
        "",
    ]
    facts_rows = [
        ("model", model),
        ("dataset", first.get("dataset_path") or facts.dataset),
        ("context size", first.get("context_size")),
        ("tokens trained", None if facts.tokens is None else f"{int(facts.tokens):,}"),
        ("training steps", None if facts.steps is None else f"{int(facts.steps):,}"),
    ]
    if len(folders) == 1:
        cfg = cfgs[0]
        facts_rows[1:1] = [
            ("variant", variant),
            ("hook", first.get("hook_name") or first.get("hook_names")),
            ("d_in x d_sae", f"{cfg['d_in']} x {cfg['d_sae']}"),
        ]
    lines += ["| | |", "|---|---|"]
    lines += [f"| {name} | {_cell(value)} |" for name, value in facts_rows if value is not None]
    if len(folders) > 1:
        lines += ["", "| folder | variant | hook | d_in | d_sae |", "|---|---|---|---|---|"]
        for path, cfg, meta in zip(repo_paths, cfgs, metas, strict=True):
            hook = meta.get("hook_name") or ""
            lines.append(
                f"| `{path}` | {_variant(cfg)} | {_cell(hook)} | {cfg['d_in']} | {cfg['d_sae']} |"
            )
    lines += ["", "## Load", "", "```python", "import lightning_sae", ""]
    lines += [f'sae = lightning_sae.load("{_hub_path(repo, path)}")' for path in repo_paths]
    lines += ["```"]
    if all(cfg.get("architecture") not in OWN_ARCHITECTURES for cfg in cfgs) and repo_paths[0]:
        # SAELens reads any Hub repo tagged `saelens`, by repo id and folder.
        lines += [
            "",
            "With SAELens:",
            "",
            "```python",
            "from sae_lens import SAE",
            "",
            f'sae = SAE.from_pretrained(release="{repo}", sae_id="{repo_paths[0]}")',
            "```",
        ]
    if facts.metrics_table:
        lines += ["", "## Final metrics", "", "As the run printed them:", "", "```"]
        lines += [facts.metrics_table, "```"]
    if facts.config:
        lines += ["", "## Training config", "", "```yaml", facts.config, "```"]
    return "\n".join(lines) + "\n"


def _variant(cfg: dict[str, Any]) -> str:
    ours = (cfg.get("metadata") or {}).get("lightning_sae") or {}
    name = str(ours.get("class_path", "")).rpartition(".")[2] or cfg.get("architecture", "?")
    k = f", k={cfg['k']}" if cfg.get("k") is not None else ""
    return f"{name} (`{cfg.get('architecture')}`{k})"


def _cell(value: Any) -> str:
    text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
    return text.replace("|", "\\|")


def _hub_path(repo: str, path: str) -> str:
    return f"{hub.HUB_PREFIX}{repo}/{path}" if path else f"{hub.HUB_PREFIX}{repo}"


# ----------------------------------------------------------------------------- upload
def upload(
    root: Path,
    repo: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    api: Any = None,
) -> str:
    """Create ``repo`` (if missing) and the ``revision`` branch, and upload ``root`` in one
    commit; the commit's URL. ``api`` is a ``huggingface_hub.HfApi`` (one is made if None)."""
    from huggingface_hub import HfApi

    api = api or HfApi()
    api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
    if revision:
        api.create_branch(repo, branch=revision, repo_type="model", exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo,
        folder_path=root,
        repo_type="model",
        revision=revision,
        commit_message=commit_message or "Upload SAE with lightning-sae push",
    )
    return str(getattr(commit, "commit_url", commit))


def _upload_error(error: Exception, repo: str) -> str | None:
    """One line for a failed upload, or None for an error that is not the Hub's."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):
        return (
            "HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it, or pass --dry-run "
            "--out DIR to write the folder only."
        )
    if isinstance(error, HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        first = str(error).split("\n", 1)[0]
        if status in (401, 403):
            return (
                f"the Hub refused the upload to {repo} ({first}); log in with `hf auth login` "
                "(or set HF_TOKEN) with a token that may write to that namespace."
            )
        return f"the Hub refused the upload to {repo} ({first})."
    if type(error).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "httpcore2"):
        return (
            f"cannot reach the Hub ({type(error).__name__}: {error}); check the connection, or "
            "pass --dry-run --out DIR to write the folder only."
        )
    return None


# ----------------------------------------------------------------------------- command line
def push_main(argv: list[str], api: Any = None) -> None:
    """``lightning-sae push --ckpt_path X --repo org/name [--subfolder S] [--dry-run --out D]``;
    ``api`` stands in for ``huggingface_hub.HfApi()`` (tests)."""
    args = push_parser().parse_args(argv)
    if args.dry_run and args.out is None:
        raise SystemExit("error: --dry-run writes the folder to --out DIR; pass --out.")
    if args.repo.count("/") != 1 or not all(args.repo.split("/")):
        raise SystemExit(f"error: --repo {args.repo!r} is not org/name; e.g. --repo my-org/my-sae.")
    subfolder = (args.subfolder or "").strip("/") or None
    if subfolder and ".." in subfolder.split("/"):
        raise SystemExit(f"error: --subfolder {args.subfolder!r} cannot contain '..'.")
    with tempfile.TemporaryDirectory(prefix="lightning-sae-push-") as scratch:
        root = Path(args.out) if args.out else Path(scratch)
        if root.exists() and not root.is_dir():
            raise SystemExit(f"error: --out {root} is a file; pass a folder.")
        try:
            files = stage(args.ckpt_path, root, args.repo, subfolder, args.overwrite)
        except (FileNotFoundError, ValueError) as error:  # UnreadableFileError, HubError too
            raise SystemExit(f"error: {error}") from None
        listed = ", ".join(path.relative_to(root).as_posix() for path in files)
        if args.dry_run:
            print(f"wrote {root}: {listed}; nothing uploaded (--dry-run)")
            return
        try:
            url = upload(root, args.repo, args.private, args.revision, args.commit_message, api)
        except Exception as error:
            message = _upload_error(error, args.repo)
            if message is None:
                raise
            raise SystemExit(f"error: {message}") from None
    load_path = _hub_path(args.repo, subfolder or "")
    at = f"@{args.revision}" if args.revision else ""
    print(f"uploaded {listed} to {url}; load it with lightning_sae.load({load_path + at!r})")

"""Argument parsers of the tool subcommands, kept free of heavy imports.

``lightning-sae export --help`` must answer without importing torch or Lightning, so each tool's
parser lives here and the tool's module (which needs torch) parses with it.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml

# What an export folder's weights file is called: SAELens's name first, our old name after.
EXPORT_WEIGHTS_FILENAMES = ("sae_weights.safetensors", "sae.safetensors")
# The final metrics table a fit prints, also written into its run folder (for push's card).
FINAL_METRICS_FILENAME = "final_metrics.txt"
# Exact matching (scipy's Hungarian) up to this many features per side; greedy beyond.
HUNGARIAN_LIMIT = 16384
NEAREST_NEIGHBOUR_BACKENDS = ("auto", "torch", "faiss")


class ToolParser(argparse.ArgumentParser):
    """A tool command's parser: an abbreviation (``--ckpt`` for ``--ckpt_path``) is refused, not
    expanded, and any mistake is one line naming the closest option, not argparse's usage block.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_abbrev=False, **kwargs)
        self._given: list[str] = []

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        known = [option for option in self._option_string_actions if option.startswith("--")]
        unknown = [
            arg.split("=", 1)[0]
            for arg in self._given
            if arg.startswith("--") and arg.split("=", 1)[0] not in known
        ]
        hint = ""
        for arg in unknown:
            close = difflib.get_close_matches(arg, known, n=1, cutoff=0.6)
            if close:
                hint = f" Did you mean `{close[0]}`? (given: {arg})"
                break
        raise SystemExit(f"error: {self.prog}: {message}.{hint} ({self.prog} --help lists them)")


def export_parser() -> argparse.ArgumentParser:
    parser = ToolParser(
        prog="lightning-sae export",
        description="Write a checkpoint's SAE as cfg.json + sae_weights.safetensors, in the "
        "layout SAELens's SAE.load_from_disk reads, with input normalisation folded in.",
    )
    parser.add_argument(
        "--ckpt_path",
        required=True,
        help="Lightning checkpoint (.ckpt), the folder a latent-sharded run saved, or an SAE "
        "folder / hf://org/repo[/subfolder] (a SAELens or sparsify SAE, written anew)",
    )
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the SAE that --out already holds (refused without this)",
    )
    parser.add_argument(
        "--class_path",
        default=None,
        help="SAE class (e.g. TopKSAE), when the checkpoint does not record it",
    )
    parser.add_argument("--model_name", default=None, help="metadata.model_name override")
    parser.add_argument("--hook_name", default=None, help="metadata.hook_name override")
    return parser


def push_parser() -> argparse.ArgumentParser:
    parser = ToolParser(
        prog="lightning-sae push",
        description="Publish an SAE on the Hugging Face Hub: export it in SAELens's layout "
        "(cfg.json + sae_weights.safetensors), write a model card (README.md: variant, hook, "
        "model, dataset, tokens trained, the run's final metrics and config) and upload the "
        "folder. Log in first (`hf auth login`, or set HF_TOKEN); --dry-run writes the folder "
        "only. Load it back with lightning_sae.load('hf://ORG/NAME[/SUBFOLDER]').",
    )
    parser.add_argument(
        "--ckpt_path",
        required=True,
        help="Lightning checkpoint (.ckpt, or a latent-sharded run's folder) or export folder",
    )
    parser.add_argument("--repo", required=True, help="model repo to upload to, org/name")
    parser.add_argument(
        "--subfolder",
        default=None,
        help="folder of the repo for this SAE (several SAEs share a repo this way); its card "
        "goes there too",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="write the folder and card to --out and upload nothing (no network)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="folder the upload is written to (kept); required with --dry-run, else temporary",
    )
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument(
        "--revision", default=None, help="branch to upload to (created if missing); default main"
    )
    parser.add_argument("--commit-message", default=None, help="the upload's commit message")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an SAE that --out already holds"
    )
    return parser


def compare_parser() -> argparse.ArgumentParser:
    parser = ToolParser(
        prog="lightning-sae compare",
        description="Match the features of two SAEs (Lightning .ckpt files or export folders): "
        "max cosine similarity A->B and B->A, and a one-to-one matching, for decoder and "
        "encoder directions.",
    )
    parser.add_argument(
        "sae_a", help="checkpoint (.ckpt), SAE folder, hf://org/repo[/subfolder] or .safetensors"
    )
    parser.add_argument("sae_b", help="the same for the second SAE")
    parser.add_argument("--backend", choices=NEAREST_NEIGHBOUR_BACKENDS, default="auto")
    parser.add_argument(
        "--hungarian-limit",
        type=int,
        default=HUNGARIAN_LIMIT,
        help="exact matching up to this many features per side; greedy rounds beyond",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    return parser


INSPECT_SPLITS = ("all", "train", "val")


def inspect_parser() -> argparse.ArgumentParser:
    parser = ToolParser(
        prog="lightning-sae inspect",
        description="Run an SAE (or an SAEGroup's members) over the token windows of a config's "
        "activation cache and record "
        "per feature: top-activating contexts, samples across its activation range, firing "
        "frequency, an activation histogram, logit effects and nearest features. Writes Parquet "
        "+ JSON data and a static HTML browser (OUT/index.html). Override data options with "
        "--data.init_args.NAME VALUE.",
    )
    parser.add_argument(
        "--ckpt_path",
        required=True,
        help="Lightning checkpoint, SAE folder or hf://org/repo[/subfolder][@revision]",
    )
    parser.add_argument(
        "--config",
        required=True,
        help="YAML whose data: built the cache (a streamed run's config: a cache of its text "
        "is built)",
    )
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument(
        "--member",
        default=None,
        help="an SAEGroup's member to inspect, by name (written to OUT), or 'all' (each to "
        "OUT/<member>/); default: all",
    )
    parser.add_argument("--class_path", default=None, help="SAE class, if the .ckpt lacks it")
    parser.add_argument("--split", choices=INSPECT_SPLITS, default="all", help="windows to read")
    parser.add_argument("--n_tokens", type=int, default=None, help="at most this many tokens")
    parser.add_argument("--features", default=None, help="only these ids, e.g. 0-99,120")
    parser.add_argument("--n_top", type=int, default=20, help="top contexts per feature")
    parser.add_argument("--n_intervals", type=int, default=5, help="activation intervals sampled")
    parser.add_argument("--per_interval", type=int, default=4, help="contexts per interval")
    parser.add_argument("--context_left", type=int, default=16, help="tokens before the max")
    parser.add_argument("--context_right", type=int, default=8, help="tokens after the max")
    parser.add_argument("--n_neighbours", type=int, default=8, help="nearest features shown")
    parser.add_argument("--n_logits", type=int, default=10, help="tokens raised/lowered (0: none)")
    parser.add_argument("--compare", default=None, help="second SAE: its best match per feature")
    parser.add_argument("--batch_windows", type=int, default=128, help="windows encoded together")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--seed", type=int, default=0, help="seed of the interval samples")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    parser.add_argument("--no_html", action="store_true", help="data files only")
    return parser


def attribute_parser() -> argparse.ArgumentParser:
    parser = ToolParser(
        prog="lightning-sae attribute",
        description="The attribution graph of a prompt through a cross-layer transcoder: the "
        "local replacement model (attention patterns and norm scales frozen, MLPs replaced by "
        "the CLT plus error nodes), the direct effects between active features, error nodes, "
        "token embeddings and the top logits, pruned by influence. Writes OUT/graph.json and "
        "OUT/graph.html (static, opens from disk).",
    )
    parser.add_argument("--ckpt_path", required=True, help="CLT checkpoint or export folder")
    parser.add_argument("--prompt", required=True, help="the text to trace")
    parser.add_argument("--out", default="attribution", help="output folder (created if missing)")
    parser.add_argument(
        "--config",
        default=None,
        help="the CLT's training YAML, whose data: names the model (default: the model the "
        "export's cfg.json records, or --model)",
    )
    parser.add_argument("--model", default=None, help="model name or folder (overrides both)")
    parser.add_argument(
        "--target",
        action="append",
        default=None,
        help="explain this next token's logit (one token of text; repeat for several); "
        "default: the most probable tokens",
    )
    parser.add_argument(
        "--position",
        type=int,
        default=-1,
        help="the position whose logits are explained (default -1: the last, the next token; "
        "for a masked LM, the [MASK]'s)",
    )
    parser.add_argument(
        "--readout",
        choices=("model", "tied"),
        default="model",
        help="logits: the model's own, or the last block's output times the input embedding "
        "matrix (for a model without a linear LM head, e.g. MiniLM)",
    )
    parser.add_argument("--max_logits", type=int, default=10, help="at most this many logits")
    parser.add_argument(
        "--logit_probability",
        type=float,
        default=0.95,
        help="the top logits explained cover this much probability",
    )
    parser.add_argument(
        "--max_nodes", type=int, default=2000, help="features traced at most (by influence)"
    )
    parser.add_argument(
        "--node_threshold", type=float, default=0.8, help="feature influence kept by pruning"
    )
    parser.add_argument(
        "--edge_threshold", type=float, default=0.98, help="edge influence kept by pruning"
    )
    parser.add_argument("--batch_size", type=int, default=64, help="targets per backward pass")
    parser.add_argument(
        "--browser", default=None, help="the CLT's feature browser folder (inspect's OUT): link"
    )
    parser.add_argument(
        "--no_special_tokens", action="store_true", help="tokenize without BOS/CLS/SEP tokens"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT/graph.json")
    return parser


def data_overrides(rest: list[str], command: str) -> dict[str, Any]:
    """``--data.init_args.NAME VALUE`` / ``--data.init_args.NAME=VALUE`` pairs (YAML values)
    left over by a tool's parser; anything else is a ValueError naming the argument."""
    prefix, values, i = "--data.init_args.", {}, 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith(prefix):
            raise ValueError(
                f"unknown argument {arg!r}; {command} takes --data.init_args.NAME VALUE besides "
                f"its options (lightning-sae {command} --help)."
            )
        if "=" in arg:
            key, value = arg[len(prefix) :].split("=", 1)
            i += 1
        elif i + 1 < len(rest):
            key, value = arg[len(prefix) :], rest[i + 1]
            i += 2
        else:
            raise ValueError(f"{arg} needs a value.")
        values[key] = yaml.safe_load(value)
    return values

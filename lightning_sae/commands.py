"""Argument parsers of the tool subcommands, kept free of heavy imports.

``lightning-sae export --help`` must answer without importing torch or Lightning, so each tool's
parser lives here and the tool's module (which needs torch) parses with it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# What an export folder's weights file is called: SAELens's name first, our old name after.
EXPORT_WEIGHTS_FILENAMES = ("sae_weights.safetensors", "sae.safetensors")
# Exact matching (scipy's Hungarian) up to this many features per side; greedy beyond.
HUNGARIAN_LIMIT = 16384
NEAREST_NEIGHBOUR_BACKENDS = ("auto", "torch", "faiss")


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-sae export",
        description="Write a checkpoint's SAE as cfg.json + sae_weights.safetensors, in the "
        "layout SAELens's SAE.load_from_disk reads, with input normalisation folded in.",
    )
    parser.add_argument("--ckpt_path", required=True, help="Lightning checkpoint (.ckpt)")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument(
        "--class_path",
        default=None,
        help="SAE class (e.g. TopKSAE), when the checkpoint does not record it",
    )
    parser.add_argument("--model_name", default=None, help="metadata.model_name override")
    parser.add_argument("--hook_name", default=None, help="metadata.hook_name override")
    return parser


def compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-sae compare",
        description="Match the features of two SAEs (Lightning .ckpt files or export folders): "
        "max cosine similarity A->B and B->A, and a one-to-one matching, for decoder and "
        "encoder directions.",
    )
    parser.add_argument("sae_a", help="checkpoint (.ckpt), export folder or .safetensors file")
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

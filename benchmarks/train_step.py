"""Tokens per second of one full training step per SAE variant, against a matmul roofline.

A step is what Lightning runs for every batch: ``training_step`` (forward, losses, logging),
backward, the Adam step and zeroing the gradients, timed from ``on_train_batch_start`` to
``on_train_batch_end`` inside a real ``Trainer``. Beside it the same run times the bare matrix
products of an SAE of the same shapes: encoder and decoder forward plus, for each, the products
of its backward (gradient of the input and of the weight), six products in all, three times the
forward FLOPs. That time is the "roofline" a step cannot beat without sparse kernels; the table
prints each variant's step time as a fraction of it (roofline time / step time). The last
column is the step time as a multiple of ONE dense encoder product [batch, d_in] x [d_in, d_sae]
(timed right after each variant): a TopK step cannot cost less, since selecting needs every
pre-activation, and with the sparse encoder backward it should cost little more. The TopK
family's transcoders (``transcoder, ...``: d_out = d_in, trained on pairs (x, y)) and
crosscoders (``crosscoder, ...``: two layers of d_in / 2, so d_in is the layers' total width
and the encoder product is the SAE's) have the same encoder product and are timed beside the
SAEs. A skip transcoder also needs its skip's products (forward and weight gradient, each
d_out / d_sae of the encoder's): the "x own floor" column divides by the GEMM plus those.

``--decode-sweep`` also times decoding k active latents per sample from (indices, values) with
``embedding_bag`` against the dense product (both forward + backward), the measurement behind
``lightning_sae.models.sparse.SPARSE_DECODE_MAX_DENSITY``.

    python benchmarks/train_step.py                      # CPU: d_in 512, d_sae 8192, batch 4096
    python benchmarks/train_step.py --decode-sweep
    python benchmarks/train_step.py --device cuda --d_in 768 --d_sae 24576
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from _common import quiet_trainer
from _sparsity import shift_bias_to_l0  # benchmarks/, on sys.path when run as a script
from torch import Tensor

from lightning_sae.models.approx_l0 import ApproxL0SAE
from lightning_sae.models.base import SparseAutoencoder
from lightning_sae.models.gated import GatedSAE
from lightning_sae.models.jumprelu import JumpReLUSAE
from lightning_sae.models.matryoshka import MatryoshkaSAE
from lightning_sae.models.standard import StandardSAE
from lightning_sae.models.topk import BatchTopKSAE, TopKSAE
from lightning_sae.models.transcoder import (
    BatchTopKCrossCoder,
    BatchTopKSkipTranscoder,
    BatchTopKTranscoder,
    TopKCrossCoder,
    TopKSkipTranscoder,
    TopKTranscoder,
)


def variants(
    k: int, x: Tensor, l0: float | None
) -> dict[str, Callable[[int, int], SparseAutoencoder]]:
    """Each variant with default losses; dead_window_tokens is small so AuxK really runs.
    With ``l0``, the standard SAE is also timed at that (a trained SAE's) sparsity."""
    dead = {"dead_window_tokens": 1}
    topk = {"k": k, **dead}
    crosscoder = {**topk, "hooks": ["layer 0", "layer 1"]}

    def standard_at_l0(d_in: int, d_sae: int) -> StandardSAE:
        sae = StandardSAE(d_in=d_in, d_sae=d_sae)
        shift_bias_to_l0(sae.W_enc, sae.b_enc, x, l0)
        return sae

    trained = {f"standard (L1, L0 {l0:g})": standard_at_l0} if l0 else {}
    return {
        "standard (L1)": lambda d_in, d_sae: StandardSAE(d_in=d_in, d_sae=d_sae),
        **trained,
        "topk (auto)": lambda d_in, d_sae: TopKSAE(d_in=d_in, d_sae=d_sae, k=k, **dead),
        "topk (auto, no dead)": lambda d_in, d_sae: TopKSAE(d_in=d_in, d_sae=d_sae, k=k),
        "topk (dense decode)": lambda d_in, d_sae: TopKSAE(
            d_in=d_in, d_sae=d_sae, k=k, decode_impl="dense", **dead
        ),
        "batchtopk (auto)": lambda d_in, d_sae: BatchTopKSAE(d_in=d_in, d_sae=d_sae, k=k, **dead),
        "matryoshka (auto)": lambda d_in, d_sae: MatryoshkaSAE(d_in=d_in, d_sae=d_sae, k=k, **dead),
        "transcoder, topk": lambda d_in, d_sae: TopKTranscoder(d_in=d_in, d_sae=d_sae, **topk),
        "transcoder, topk skip": lambda d_in, d_sae: TopKSkipTranscoder(
            d_in=d_in, d_sae=d_sae, **topk
        ),
        "transcoder, batchtopk": lambda d_in, d_sae: BatchTopKTranscoder(
            d_in=d_in, d_sae=d_sae, **topk
        ),
        "transcoder, batchtopk skip": lambda d_in, d_sae: BatchTopKSkipTranscoder(
            d_in=d_in, d_sae=d_sae, **topk
        ),
        "crosscoder, topk": lambda d_in, d_sae: TopKCrossCoder(
            d_in=d_in, d_sae=d_sae, **crosscoder
        ),
        "crosscoder, batchtopk": lambda d_in, d_sae: BatchTopKCrossCoder(
            d_in=d_in, d_sae=d_sae, **crosscoder
        ),
        "jumprelu": lambda d_in, d_sae: JumpReLUSAE(d_in=d_in, d_sae=d_sae),
        "gated": lambda d_in, d_sae: GatedSAE(d_in=d_in, d_sae=d_sae),
        "approx_l0": lambda d_in, d_sae: ApproxL0SAE(d_in=d_in, d_sae=d_sae),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(L.Callback):
    """Wall time of each training step, from batch start to batch end."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times, self._start = device, [], 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        synchronize(self.device)
        self.times.append(time.perf_counter() - self._start)


class RepeatBatch:
    """The same batch ``n`` times; data loading is not what is measured."""

    def __init__(self, batch: Tensor | tuple[Tensor, Tensor], n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        return (self.batch for _ in range(self.n))


def time_training_step(
    make: Callable[[int, int], SparseAutoencoder], x: Tensor, args: argparse.Namespace
) -> float:
    """Median seconds per training step after ``args.warmup`` untimed steps. A transcoder
    trains on pairs: ``x`` and a target drawn beside it."""
    device = torch.device(args.device)
    module = make(args.d_in, args.d_sae)
    batch: Tensor | tuple[Tensor, Tensor] = x
    if getattr(module, "maps_sites", False):
        batch = (
            x,
            torch.randn(x.shape[0], module.d_out, generator=torch.Generator().manual_seed(1)),
        )
    module.hparams.compile = args.compile  # setup() compiles forward_normalized
    timer = StepTimer(device)
    trainer = quiet_trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_steps=args.warmup + args.steps,
        callbacks=[timer],
        precision="bf16-mixed" if args.bf16 else "32-true",
    )
    trainer.fit(module, train_dataloaders=RepeatBatch(batch, args.warmup + args.steps))
    return statistics.median(timer.times[args.warmup :])


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_roofline(args: argparse.Namespace) -> float:
    """Seconds for the six products of an SAE's forward and backward at these shapes."""
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.batch, args.d_in, device=device, generator=gen)
    W_enc = torch.randn(args.d_in, args.d_sae, device=device, generator=gen)
    W_dec = torch.randn(args.d_sae, args.d_in, device=device, generator=gen)
    grad_out = torch.randn(args.batch, args.d_in, device=device, generator=gen)

    def products() -> None:
        h = x @ W_enc
        h @ W_dec  # decoder forward
        grad_h = grad_out @ W_dec.T  # decoder backward: input, then weight
        h.T @ grad_out
        grad_h @ W_enc.T  # encoder backward: input, then weight
        x.T @ grad_h

    def timed() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            products()

    return time_fn(timed, device, warmup=1, repeats=max(3, args.steps))


def time_encoder_gemm(args: argparse.Namespace) -> float:
    """Seconds for one dense encoder product [batch, d_in] x [d_in, d_sae] (with its bias): the
    least a TopK step can cost, since selecting needs every pre-activation."""
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.batch, args.d_in, device=device, generator=gen)
    W_enc = torch.randn(args.d_in, args.d_sae, device=device, generator=gen)
    b_enc = torch.randn(args.d_sae, device=device, generator=gen)

    def timed() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            F.linear(x, W_enc.T, b_enc)

    return time_fn(timed, device, warmup=1, repeats=max(3, args.steps))


def time_skip_products(args: argparse.Namespace) -> float:
    """Seconds for a skip transcoder's own products beside its encoder's (d_out = d_in here):
    the skip's forward ``x W_skip^T`` [batch, d_in] x [d_in, d_out] and its weight gradient
    ``grad^T x``, each d_out / d_sae of an encoder product. The least a skip transcoder's step
    can cost is one encoder GEMM plus these (its "own floor")."""
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.batch, args.d_in, device=device, generator=gen)
    W_skip = torch.randn(args.d_in, args.d_in, device=device, generator=gen)
    grad = torch.randn(args.batch, args.d_in, device=device, generator=gen)

    def timed() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            F.linear(x, W_skip)
            grad.T @ x

    return time_fn(timed, device, warmup=1, repeats=max(3, args.steps))


def decode_sweep(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    W_dec = torch.randn(args.d_sae, args.d_in, device=device, generator=gen, requires_grad=True)
    grad_out = torch.randn(args.batch, args.d_in, device=device, generator=gen)
    pre = torch.randn(args.batch, args.d_sae, device=device, generator=gen)
    print(f"\ndecode, forward + backward, batch {args.batch}, d_in {args.d_in}, d_sae {args.d_sae}")
    print(f"{'k':>6}{'density':>10}{'dense ms':>11}{'sparse ms':>11}{'sparse/dense':>14}")
    k = 8
    while k <= args.d_sae // 4:
        values, indices = pre.topk(k, dim=1)
        values = values.relu().requires_grad_()

        def dense(values: Tensor = values, indices: Tensor = indices) -> None:
            acts = torch.zeros_like(pre).scatter(1, indices, values)
            (acts @ W_dec).backward(grad_out)

        def sparse(values: Tensor = values, indices: Tensor = indices) -> None:
            out = F.embedding_bag(indices, W_dec, mode="sum", per_sample_weights=values)
            out.backward(grad_out)

        t_dense = time_fn(dense, device, 1, 3)
        t_sparse = time_fn(sparse, device, 1, 3)
        print(
            f"{k:>6}{k / args.d_sae:>10.4f}{t_dense * 1e3:>11.1f}{t_sparse * 1e3:>11.1f}"
            f"{t_sparse / t_dense:>14.2f}"
        )
        k *= 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--d_in", type=int, default=512)
    parser.add_argument("--d_sae", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32, help="k of the TopK-family variants")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--only", nargs="*", help="variant names (prefixes) to run")
    parser.add_argument("--l0", type=float, default=64.0, help="also time standard at this L0")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (steps and roofline)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every variant")
    parser.add_argument("--decode-sweep", action="store_true")
    parser.add_argument("--skip-steps", action="store_true", help="only the decode sweep")
    args = parser.parse_args()

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device {name}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"batch {args.batch}, d_in {args.d_in}, d_sae {args.d_sae}, k {args.k}, "
        f"{'bf16 autocast' if args.bf16 else 'float32'}{', compiled' if args.compile else ''}"
    )
    if not args.skip_steps:
        roofline = time_roofline(args)
        flops = 6 * 2 * args.batch * args.d_in * args.d_sae
        print(
            f"roofline (6 bare products): {roofline * 1e3:.1f} ms = "
            f"{args.batch / roofline:,.0f} tokens/s ({flops / roofline / 1e9:,.0f} GFLOP/s)"
        )
        gemm = time_encoder_gemm(args)
        print(f"one encoder GEMM [batch, d_in] x [d_in, d_sae]: {gemm * 1e3:.1f} ms")
        print(
            f"{'variant':<28}{'ms/step':>10}{'tokens/s':>12}{'of roofline':>13}{'x GEMM':>9}"
            f"{'x own floor':>13}"
        )
        x = torch.randn(args.batch, args.d_in, generator=torch.Generator().manual_seed(0))
        for label, make in variants(args.k, x, args.l0).items():
            if args.only and not any(label.startswith(prefix) for prefix in args.only):
                continue
            seconds = time_training_step(make, x, args)
            # The GEMM is timed again beside each variant: on a shared machine the load drifts.
            gemm = time_encoder_gemm(args)
            # A crosscoder's d_in is all its layers together, so its encoder GEMM is this one.
            floor = gemm + (time_skip_products(args) if "skip" in label else 0.0)
            print(
                f"{label:<28}{seconds * 1e3:>10.1f}{args.batch / seconds:>12,.0f}"
                f"{roofline / seconds:>13.2f}{seconds / gemm:>9.2f}{seconds / floor:>13.2f}",
                flush=True,
            )
    if args.decode_sweep:
        decode_sweep(args)


if __name__ == "__main__":
    main()

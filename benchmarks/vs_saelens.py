"""Training tokens/s of lightning-sae against SAELens 6.x on the same shapes and machine.

Both sides train on one pre-generated batch that sits on the device, so the data path is out of
the picture and what is timed is each library's own training loop: forward, losses, backward,
optimiser step and the bookkeeping each does per step (dead-feature tracking, schedules). Our
side runs through a real Lightning ``Trainer.fit``; SAELens's through ``SAETrainer.fit``.

At initialisation half of a ReLU SAE's latents fire; after the sparsity penalty has warmed up,
a few dozen do, for the rest of the run. ``--l0`` times the standard variant in that regime: on
both sides the encoder bias is shifted so that ``l0`` latents per sample fire on the batch (each
side's own initial weights, the same rule) and the learning rate is 1e-6 on both sides, so the
L0 stays put (the work of a step does not depend on the learning rate); the table prints each
side's L0 after the timed steps, so the two ran at the same sparsity.

SAELens pins TransformerLens 3.x, which conflicts with this project's 4.x, so it runs in its
own virtual environment: pass ``--saelens-python`` (a python with ``sae-lens`` installed), or
let the script create ``~/.cache/lightning-sae/saelens-bench`` with ``pip install sae-lens``.

    python benchmarks/vs_saelens.py --device cpu --d_in 512 --d_sae 8192 --batch 4096
    python benchmarks/vs_saelens.py --device cpu --variants standard --l0 64   # trained sparsity
    python benchmarks/vs_saelens.py --device cuda --d_in 768 --d_sae 24576 --batch 4096
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from _sparsity import shift_bias_to_l0  # benchmarks/, on sys.path when run as a script

VARIANTS = ("standard", "topk")
DEFAULT_VENV = Path.home() / ".cache" / "lightning-sae" / "saelens-bench"


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _l0(pre_acts) -> float:  # noqa: ANN001
    return (pre_acts > 0).float().sum(-1).mean().item()


def _batch(args: argparse.Namespace):  # noqa: ANN202 (torch imported lazily in workers)
    import torch

    generator = torch.Generator().manual_seed(0)
    return torch.randn(args.batch, args.d_in, generator=generator).to(args.device)


class _Clock:
    """Start timing when the warm-up steps have been consumed, stop at the end."""

    def __init__(self, device: str, warmup: int) -> None:
        self.device, self.warmup, self.calls, self.start = device, warmup, 0, 0.0

    def tick(self) -> None:
        if self.calls == self.warmup:
            _sync(self.device)
            self.start = time.perf_counter()
        self.calls += 1

    def elapsed(self) -> float:
        _sync(self.device)
        return time.perf_counter() - self.start


def run_ours(args: argparse.Namespace) -> tuple[float, float]:
    import torch
    from _common import quiet_trainer  # lightning: not in the peer's venv

    from lightning_sae.models.standard import StandardSAE
    from lightning_sae.models.topk import TopKSAE

    x = _batch(args)
    clock = _Clock(args.device, args.warmup)
    total = args.warmup + args.steps

    class SameBatch:
        def __len__(self) -> int:
            return total

        def __iter__(self) -> Iterator[torch.Tensor]:
            for _ in range(total):
                clock.tick()
                yield x

    if args.variant == "standard":
        sae = StandardSAE(
            d_in=args.d_in, d_sae=args.d_sae, weight_by_decoder_norm=True, lr=args.lr or 4e-4
        )
        if args.l0 is not None:
            shift_bias_to_l0(sae.W_enc, sae.b_enc, x, args.l0)
    else:
        sae = TopKSAE(d_in=args.d_in, d_sae=args.d_sae, k=args.k)
    trainer = quiet_trainer(
        accelerator="gpu" if args.device.startswith("cuda") else "cpu",
        devices=1,
        max_steps=total,
        precision="bf16-mixed" if args.bf16 else "32-true",
    )
    trainer.fit(sae, train_dataloaders=SameBatch())
    tokens_per_s = args.steps * args.batch / clock.elapsed()
    with torch.no_grad():
        return tokens_per_s, _l0(sae.pre_activation(x))


def run_saelens(args: argparse.Namespace) -> tuple[float, float]:
    import torch
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    x = _batch(args)
    clock = _Clock(args.device, args.warmup)
    total = args.warmup + args.steps

    def provider() -> Iterator:
        while True:
            clock.tick()
            yield x

    shapes = {"d_in": args.d_in, "d_sae": args.d_sae, "device": args.device}
    if args.variant == "standard":
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(**shapes))
        if args.l0 is not None:
            shift_bias_to_l0(sae.W_enc, sae.b_enc, x, args.l0)
    else:
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=args.k, **shapes))
    config = SAETrainerConfig(
        total_training_samples=total * args.batch,
        train_batch_size_samples=args.batch,
        device=args.device,
        autocast=args.bf16,
        lr=args.lr or 3e-4,
        lr_end=args.lr or 3e-4,  # constant schedule; SAETrainer asserts it is set
    )
    SAETrainer(config, sae, data_provider=provider()).fit()
    tokens_per_s = args.steps * args.batch / clock.elapsed()
    with torch.no_grad():
        return tokens_per_s, _l0((x - sae.b_dec) @ sae.W_enc + sae.b_enc)


def saelens_python(requested: str | None) -> str:
    if requested:
        return requested
    python = DEFAULT_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {DEFAULT_VENV} with sae-lens (once)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(DEFAULT_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "sae-lens"], check=True)
    return str(python)


def worker_command(python: str, args: argparse.Namespace, side: str, variant: str) -> list[str]:
    flags = [
        f"--{name}={getattr(args, name)}"
        for name in ("device", "d_in", "d_sae", "batch", "k", "steps", "warmup")
    ]
    flags += [f"--lr={args.lr}"] if args.lr is not None else []
    flags += ["--bf16"] if args.bf16 else []
    flags += [f"--l0={args.l0}"] if args.l0 is not None and variant == "standard" else []
    return [python, __file__, "--worker", side, "--variant", variant, *flags]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--d_in", type=int, default=512)
    parser.add_argument("--d_sae", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="autocast to bf16 on both sides")
    parser.add_argument(
        "--l0", type=float, default=None, help="standard: time at this L0 (a trained SAE's)"
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="both sides (default: each library's; 1e-6 with --l0, so the L0 stays put)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per side; best is kept")
    parser.add_argument("--saelens-python", default=None)
    parser.add_argument("--worker", choices=("ours", "saelens"), help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.l0 is not None and args.lr is None:
        args.lr = 1e-6
    if args.worker:
        run = run_ours if args.worker == "ours" else run_saelens
        tokens_per_s, l0 = run(args)
        print(json.dumps({"tokens_per_s": tokens_per_s, "l0_after": l0}))
        return

    other = saelens_python(args.saelens_python)
    print(
        f"device={args.device} d_in={args.d_in} d_sae={args.d_sae} batch={args.batch} "
        f"k={args.k} steps={args.steps} bf16={args.bf16} l0={args.l0} lr={args.lr} "
        f"(best of {args.repeats} runs per side, alternated)"
    )
    print(f"{'variant':<10}{'ours tok/s':>14}{'SAELens tok/s':>16}{'ratio':>8}{'L0 after':>14}")
    for variant in args.variants:
        runs: dict[str, list[dict[str, float]]] = {"ours": [], "saelens": []}
        for _ in range(args.repeats):  # alternated, so drifting machine load hits both sides
            for side, python in (("ours", sys.executable), ("saelens", other)):
                done = subprocess.run(
                    worker_command(python, args, side, variant), capture_output=True, text=True
                )
                if done.returncode != 0:
                    raise SystemExit(f"{side} {variant} failed:\n{done.stderr[-3000:]}")
                runs[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
        results = {
            side: max(found, key=lambda run: run["tokens_per_s"]) for side, found in runs.items()
        }
        ours, theirs = results["ours"], results["saelens"]
        ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
        # TopK's L0 is k by construction; a ReLU SAE's is what the bias and training made it.
        l0s = f"{ours['l0_after']:.0f} / {theirs['l0_after']:.0f}" if variant == "standard" else "k"
        print(
            f"{variant:<10}{ours['tokens_per_s']:>14.0f}{theirs['tokens_per_s']:>16.0f}"
            f"{ratio:>8.2f}{l0s:>14}"
        )


if __name__ == "__main__":
    main()

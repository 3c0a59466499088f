"""Training tokens/s of lightning-sae's TopKSAE against EleutherAI sparsify's trainer, alternated.

Both sides train a TopK SAE (k latents per token, AuxK coefficient 1/32, no latent dead yet) on
one pre-generated batch that sits on the device, so what is timed is each library's own
training step. sparsify runs its real ``Trainer.fit`` (``eai-sparsify``, 1.3.3 here): its
forward hook on a stand-in model whose one module outputs the batch, its FVU loss, the decoder
renormalisation and the projection of the decoder gradient, ``torch.optim.Adam`` with its
warm-up schedule and its dead-latent bookkeeping. Our side runs a Lightning ``Trainer.fit`` of
``TopKSAE`` with ``DecoderNormConstraint`` (the same renormalisation and projection).

A step is timed from the moment its batch is fetched to the moment the next one is, so both
sides are timed at the same point of their loops; the first ``--warmup`` steps are not timed.
Each side runs in its own process (sparsify in its own virtual environment); the two sides
alternate ``--rounds`` times so that drifting load on a shared machine hits both, and every
round's ratio is printed with the median.

On a GPU pass ``--bf16``: our side trains with ``precision="bf16-mixed"``, sparsify's
``Trainer.fit`` runs inside ``torch.autocast(..., torch.bfloat16)`` (sparsify has no precision
option; its Triton sparse decoder is used when Triton is installed, as on any CUDA machine).

    python benchmarks/vs_sparsify.py                                  # CPU: 512 x 8192, k 32
    python benchmarks/vs_sparsify.py --d_in 768 --d_sae 24576
    python benchmarks/vs_sparsify.py --device cuda --d_in 768 --d_sae 24576 --bf16 --steps 30
    python benchmarks/vs_sparsify.py --sparsify-python /path/to/venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

SPARSIFY_VERSION = "1.3.3"
VENVS = [
    Path.home() / ".cache" / "lightning-sae" / name for name in ("sparsify-venv", "sparsify-bench")
]
SEQUENCE = 512  # tokens per sparsify "sequence": the batch is batch / SEQUENCE sequences


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _batch(args: argparse.Namespace):  # noqa: ANN202 (torch imported lazily in workers)
    import torch

    generator = torch.Generator().manual_seed(0)
    return torch.randn(args.batch, args.d_in, generator=generator).to(args.device)


class _Clock:
    """The time each batch is fetched; a step runs from its fetch to the next one's."""

    def __init__(self, device: str) -> None:
        self.device, self.times = device, []

    def tick(self) -> None:
        _sync(self.device)
        self.times.append(time.perf_counter())

    def tokens_per_s(self, args: argparse.Namespace) -> float:
        # Fetches warmup .. warmup + steps bound the timed steps (one batch more is served).
        start, stop = self.times[args.warmup], self.times[args.warmup + args.steps]
        return args.steps * args.batch / (stop - start)


def run_ours(args: argparse.Namespace) -> float:
    import torch
    from _common import quiet_trainer  # lightning: not in the peer's venv

    from lightning_sae.callbacks.decoder_norm import DecoderNormConstraint
    from lightning_sae.models.topk import TopKSAE

    x = _batch(args)
    clock = _Clock(args.device)
    total = args.warmup + args.steps + 1

    class SameBatch:
        def __len__(self) -> int:
            return total

        def __iter__(self) -> Iterator[torch.Tensor]:
            for _ in range(total):
                clock.tick()
                yield x

    # sparsify's 10M-token dead window on our side too (the class's default is sized to the
    # dictionary and would start AuxK within the run): no latent dead on either side, as timed
    window = 10_000_000
    sae = TopKSAE(d_in=args.d_in, d_sae=args.d_sae, k=args.k, dead_window_tokens=window)
    trainer = quiet_trainer(
        accelerator="gpu" if args.device.startswith("cuda") else "cpu",
        devices=1,
        max_steps=total,
        callbacks=[DecoderNormConstraint()],
        precision="bf16-mixed" if args.bf16 else "32-true",
    )
    trainer.fit(sae, train_dataloaders=SameBatch())
    return clock.tokens_per_s(args)


def run_sparsify(args: argparse.Namespace) -> float:
    import torch
    from sparsify import SaeConfig, TrainConfig, Trainer
    from torch import nn

    x = _batch(args)
    clock = _Clock(args.device)
    total = args.warmup + args.steps + 1
    sequences = max(args.batch // SEQUENCE, 1)
    activations = x.reshape(sequences, -1, args.d_in)

    class Layer(nn.Module):
        """The hooked module: its output is the batch of activations."""

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return activations

    class Model(nn.Module):
        """What sparsify's trainer needs of a transformer: a module to hook, a device, inputs."""

        def __init__(self) -> None:
            super().__init__()
            self.layer = Layer()
            self.device = torch.device(args.device)
            self.dummy_inputs = {"input_ids": torch.zeros(1, SEQUENCE, dtype=torch.long)}

        @property
        def base_model(self) -> nn.Module:
            return self

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.layer(input_ids)

    class Tokens:
        """``total`` batches of ``sequences`` token rows; fetching a batch's first row ticks."""

        def __len__(self) -> int:
            return total * sequences

        def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
            if index % sequences == 0:
                clock.tick()
            return {"input_ids": torch.zeros(activations.shape[1], dtype=torch.long)}

    with tempfile.TemporaryDirectory() as save_dir:
        config = TrainConfig(
            SaeConfig(num_latents=args.d_sae, k=args.k),
            batch_size=sequences,
            loss_fn="fvu",
            optimizer="adam",
            auxk_alpha=1 / 32,
            hookpoints=["layer"],
            save_every=10**9,
            log_to_wandb=False,
            save_dir=save_dir,
        )
        trainer = Trainer(config, Tokens(), Model())
        with torch.autocast(args.device.split(":")[0], torch.bfloat16, enabled=args.bf16):
            trainer.fit()
    return clock.tokens_per_s(args)


def sparsify_python(requested: str | None) -> str:
    if requested:
        if not Path(requested).is_file():
            raise SystemExit(
                f"error: --sparsify-python {requested}: no such interpreter; give the python of"
                f" a venv with eai-sparsify=={SPARSIFY_VERSION}, or leave the option out to"
                " create one"
            )
        return requested
    for venv in VENVS:
        if (venv / "bin" / "python").exists():
            return str(venv / "bin" / "python")
    venv = VENVS[-1]
    print(f"creating {venv} with eai-sparsify=={SPARSIFY_VERSION} (once)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"eai-sparsify=={SPARSIFY_VERSION}"], check=True)
    return str(venv / "bin" / "python")


def worker_command(python: str, args: argparse.Namespace, side: str) -> list[str]:
    flags = [
        f"--{name}={getattr(args, name)}"
        for name in ("device", "d_in", "d_sae", "batch", "k", "steps", "warmup")
    ]
    flags += ["--bf16"] if args.bf16 else []
    return [python, __file__, "--worker", side, *flags]


def run_side(python: str, args: argparse.Namespace, side: str) -> float:
    done = subprocess.run(worker_command(python, args, side), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{side} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--d_in", type=int, default=512)
    parser.add_argument("--d_sae", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="alternated runs per side")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides")
    parser.add_argument("--sparsify-python", default=None)
    parser.add_argument("--worker", choices=("ours", "sparsify"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        import warnings

        warnings.filterwarnings("ignore")
        run = run_ours if args.worker == "ours" else run_sparsify
        print(json.dumps({"tokens_per_s": run(args)}))
        return

    other = sparsify_python(args.sparsify_python)
    print(
        f"device={args.device} d_in={args.d_in} d_sae={args.d_sae} batch={args.batch} k={args.k} "
        f"steps={args.steps} (after {args.warmup}) bf16={args.bf16}, sparsify "
        f"{SPARSIFY_VERSION} trainer; {args.rounds} rounds, sides alternated"
    )
    print(f"{'round':<8}{'ours tok/s':>14}{'sparsify tok/s':>17}{'ours / sparsify':>17}")
    ratios, ours_all, theirs_all = [], [], []
    for round_ in range(args.rounds):
        ours = run_side(sys.executable, args, "ours")
        theirs = run_side(other, args, "sparsify")
        ours_all.append(ours)
        theirs_all.append(theirs)
        ratios.append(ours / theirs)
        print(f"{round_ + 1:<8}{ours:>14,.0f}{theirs:>17,.0f}{ours / theirs:>17.2f}", flush=True)
    print(
        f"{'median':<8}{statistics.median(ours_all):>14,.0f}"
        f"{statistics.median(theirs_all):>17,.0f}{statistics.median(ratios):>17.2f}"
    )


if __name__ == "__main__":
    main()

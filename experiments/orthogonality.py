"""000: the orthogonality regulariser on MiniLM: decoder max-cos-sim histograms, FVU and L0.

StandardSAE (the options of configs/minilm/resid-l3-standard.yaml but d_sae 768: its learning
rate, warm-up and normalised inputs, ``--data-config``; L1 2) trained with
``orthogonality_coefficient`` 0, positive and negative (sigmoid shape on each active feature's
nearest decoder neighbour). For each: the histogram of every decoder row's max cosine with
another row, next to random unit vectors of the same shape, and L0, FVU, dead and dense counts
on the 100k training tokens. Also the random baseline at the reference's 500 x 2k.

    python -m experiments.orthogonality            # docs/experiments/orthogonality/
    python -m experiments.orthogonality --smoke
"""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from experiments import _minilm  # noqa: E402
from experiments._common import markdown_table, parser, start, write, write_json  # noqa: E402
from lightning_sae.metrics.similarity import (  # noqa: E402
    random_directions_mmcs,
    self_max_cosine_similarity,
)
from lightning_sae.models.standard import StandardSAE  # noqa: E402


def random_max_cos(n: int, d: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return self_max_cosine_similarity(torch.randn(n, d, generator=generator))


def main() -> None:
    p = parser(__doc__.splitlines()[0], "orthogonality")
    _minilm.add_data_options(p)
    p.add_argument("--coefficients", type=float, nargs="+", default=[0.0, 30.0, -30.0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--d-sae", type=int, default=768)
    args = p.parse_args()
    out = start(args)
    if args.smoke:
        args.steps, args.d_sae = 4, 64
    data = _minilm.datamodule(args, batch_size=128 if args.smoke else 1024)
    x = _minilm.all_activations(data)

    rows: list[list[Any]] = []
    results: dict[str, Any] = {}
    figure, axes = plt.subplots(figsize=(7, 4.5))
    bins = torch.linspace(-0.1, 1.0, 56).numpy()
    for coefficient in args.coefficients:
        torch.manual_seed(0)
        sae = StandardSAE(
            d_in=data.d_in,
            d_sae=args.d_sae,
            l1_coefficient=2.0,
            orthogonality_coefficient=coefficient,
            **_minilm.model_options(args, StandardSAE),
        )
        _minilm.train(sae, data, args.steps)
        measured = _minilm.evaluate(sae, x)
        max_cos = self_max_cosine_similarity(sae.W_dec.detach())
        axes.hist(max_cos.numpy(), bins=bins, histtype="step", label=f"coefficient {coefficient:g}")
        rows.append(
            [
                f"{coefficient:g}",
                f"{float(max_cos.mean()):.3f}",
                f"{float((max_cos > 0.9).float().mean()):.3f}",
                f"{measured['l0']:.1f}",
                f"{measured['fvu']:.3f}",
                measured["dead"],
                measured["dense"],
            ]
        )
        results[f"{coefficient:g}"] = {k: v for k, v in measured.items() if k != "frequency"}
        results[f"{coefficient:g}"]["decoder_mmcs"] = float(max_cos.mean())
        print(rows[-1], flush=True)
    baseline = random_max_cos(args.d_sae, data.d_in)
    axes.hist(baseline.numpy(), bins=bins, histtype="stepfilled", alpha=0.3, label="random")
    axes.set_xlabel("max cosine similarity with another decoder row")
    axes.set_ylabel("features")
    axes.set_title(f"MiniLM block 3 resid, d_sae {args.d_sae}, {args.steps} steps")
    axes.legend()
    figure.tight_layout()
    figure.savefig(out / "max_cos_hist.png", dpi=100)
    plt.close(figure)

    reference_shape = random_directions_mmcs(2000, 500)
    header = ["coefficient", "decoder MMCS", "frac max-cos > 0.9", "L0", "FVU", "dead", "dense"]
    text = (
        f"MiniLM `blocks.3.hook_resid_post`, {len(x)} training tokens, d_in {data.d_in}, "
        f"d_sae {args.d_sae}, {args.steps} steps of batch {data.hparams.batch_size}, "
        f"{_minilm.schedule_text(sae)}. "
        "L0 / FVU / dead (never fires) / dense (fires on > 10% of tokens) on the training "
        "tokens.\n\n"
        + markdown_table(header, rows)
        + f"\nRandom unit vectors, same shape ({args.d_sae} x {data.d_in}): MMCS "
        f"{float(baseline.mean()):.3f}. Reference shape (2000 x 500): MMCS {reference_shape:.3f}.\n"
    )
    print(text)
    write(out, "table.md", text)
    results["random_same_shape_mmcs"] = float(baseline.mean())
    results["random_2000x500_mmcs"] = reference_shape
    write_json(out, "results.json", results)


if __name__ == "__main__":
    main()

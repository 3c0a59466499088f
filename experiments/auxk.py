"""003: dead latents of a TopK SAE on MiniLM, without AuxK, with AuxK, and Gao-normalised AuxK.

TopKSAE (k 4, d_sae 1536) on the block-3 residual stream of MiniLM, with the learning rate,
warm-up and input normalisation of configs/minilm/resid-l3-standard.yaml (``--data-config``).
A latent counts as dead once it has not fired for ``--dead-window`` tokens (the library's
``dead_window_tokens``, here a fifth of an epoch of the 100k cached tokens, so that a short run
can show the effect); the fraction is logged every step.
Four runs: ``aux_coefficient`` 0, 1/32 on the raw squared error (the class's default before
docs/defaults.md's dead-window change), 1/32 divided by the residual's variance as in Gao et
al. / EleutherAI (``residual_variance``), all three with ``--dead-window``, and the class's
defaults (coefficient 1 on the raw error, as SAELens; window ``100 d_sae / k`` tokens). At the
end: dead (never fires on the training tokens), L0 and FVU.

    python -m experiments.auxk            # docs/experiments/auxk/
    python -m experiments.auxk --smoke
"""

from __future__ import annotations

from typing import Any

import torch

from experiments import _minilm
from experiments._common import markdown_table, parser, publish, start
from lightning_sae import plots
from lightning_sae.models.topk import TopKSAE

RUNS: dict[str, dict[str, Any]] = {  # name: options (``--dead-window`` where "window")
    "no AuxK": {"aux_coefficient": 0.0, "window": True},
    "AuxK 1/32": {"aux_coefficient": 1 / 32, "auxk_normalization": "none", "window": True},
    "AuxK, Gao-normalised": {
        "aux_coefficient": 1 / 32,
        "auxk_normalization": "residual_variance",
        "window": True,
    },
    "AuxK, the class's defaults": {"window": False},
}


def main() -> None:
    p = parser(__doc__.splitlines()[0], "auxk")
    _minilm.add_data_options(p)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--d-sae", type=int, default=1536)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--dead-window", type=int, default=20_000, help="tokens without firing")
    args = p.parse_args()
    out = start(args)
    if args.smoke:
        args.steps, args.d_sae, args.k, args.dead_window = 4, 64, 4, 256
    data = _minilm.datamodule(args, batch_size=128 if args.smoke else 1024)
    x = _minilm.all_activations(data)

    rows: list[list[Any]] = []
    results: dict[str, Any] = {}
    curves = {}
    for name, options in RUNS.items():
        options = dict(options)
        if options.pop("window"):
            options["dead_window_tokens"] = args.dead_window
        torch.manual_seed(0)
        sae = TopKSAE(
            d_in=data.d_in,
            d_sae=args.d_sae,
            k=args.k,
            **_minilm.model_options(args, TopKSAE),
            **options,
        )
        recorder = _minilm.train(sae, data, args.steps, every=1 if args.smoke else 5)
        curves[name] = recorder.series("train/dead_fraction")
        measured = _minilm.evaluate(sae, x)
        dead_during = curves[name][1]
        rows.append(
            [
                name,
                f"{max(dead_during):.3f}" if dead_during else "-",
                f"{dead_during[-1]:.3f}" if dead_during else "-",
                measured["dead"],
                f"{measured['l0']:.1f}",
                f"{measured['fvu']:.3f}",
            ]
        )
        results[name] = {k: v for k, v in measured.items() if k != "frequency"}
        results[name]["dead_fraction_curve"] = curves[name]
        print(rows[-1], flush=True)
    plots.curves(
        curves,
        out / "dead_fraction.png",
        xlabel="step",
        ylabel=f"dead fraction (no firing in {args.dead_window} tokens)",
        title=f"TopK k={args.k}, d_sae {args.d_sae}, MiniLM block 3",
    )
    default_window = TopKSAE(d_in=data.d_in, d_sae=args.d_sae, k=args.k).dead_window()
    header = ["run", "max dead fraction", "final dead fraction", "never fires", "L0", "FVU"]
    text = (
        f"MiniLM `{data.hparams.hook}`, {len(x)} training tokens, d_in {data.d_in}, "
        f"d_sae {args.d_sae}, k {args.k}, {args.steps} steps of batch "
        f"{data.hparams.batch_size}, {_minilm.schedule_text(sae)}; dead window "
        f"{args.dead_window} tokens (the class's "
        f"defaults: {default_window}). 'never fires': "
        "latents with no activation over all training tokens after training.\n\n"
        + markdown_table(header, rows)
    )
    publish(out, text, results)


if __name__ == "__main__":
    main()

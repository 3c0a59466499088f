"""TopK transcoder vs TopK skip transcoder on MiniLM layer 3, trained the same way.

Reads configs/minilm/transcoder-l3.yaml (model, data, steps, learning rate), trains the
transcoder and the skip transcoder from Python on the same cached activations, seed and steps
(callbacks: the decoder-norm constraint only), and then, for each, measures on the held-out
split:

- the output site's FVU (``val/fvu``, blocks.3.hook_mlp_out);
- hidden-state fidelity with the prediction spliced in place of the MLP's output, over the first
  ``--eval_tokens`` held-out tokens: the final hidden state's cosine to the clean one, its
  relative MSE, and ``final_hidden_recovered`` = 1 - rel MSE / rel MSE of zero-ablating the MLP
  output (the CE-recovered-style score; MiniLM has no next-token head).

    python benchmarks/transcoder_minilm.py                 # the table in docs/variants.md
    python benchmarks/transcoder_minilm.py --steps 50      # a quick look

Prints one markdown row per model and the skip/plain FVU ratio, all from this run.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from _common import quiet_trainer
from lightning import Trainer, seed_everything

from lightning_sae.callbacks.decoder_norm import DecoderNormConstraint
from lightning_sae.data import lm
from lightning_sae.data.activations import ActivationDataModule
from lightning_sae.metrics.downstream import downstream_metrics
from lightning_sae.models.transcoder import TopKSkipTranscoder, TopKTranscoder

CONFIG = Path(__file__).parents[1] / "configs" / "minilm" / "transcoder-l3.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--steps", type=int, default=None, help="default: the config's")
    parser.add_argument("--eval_tokens", type=int, default=8192)
    args = parser.parse_args()
    config = yaml.safe_load(args.config.read_text())
    steps = args.steps or config["trainer"]["max_steps"]
    model_args = config["model"]["init_args"]
    data = ActivationDataModule(**config["data"]["init_args"])
    data.prepare_data()

    windows = np.load(data.cache_root / "tokens.npy", mmap_mode="r")[data.layout.n_train_windows :]
    n_windows = math.ceil(args.eval_tokens / windows.shape[1])
    tokens = torch.from_numpy(np.asarray(windows[:n_windows], dtype=np.int64))
    bridge = lm.load_model(data.hparams.model, device="cpu")

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads; {steps} steps")
    print("| model | val FVU (mlp_out) | L0 | final hidden cos | rel MSE | hidden recovered |")
    print("|---|---|---|---|---|---|")
    fvu = {}
    for cls in (TopKTranscoder, TopKSkipTranscoder):
        seed_everything(config.get("seed_everything", 0))
        model = cls(**model_args)
        trainer = quiet_trainer(
            max_steps=steps,
            callbacks=[DecoderNormConstraint()],
        )
        start = time.monotonic()
        trainer.fit(model, data)
        train_s = time.monotonic() - start
        (val,) = Trainer(logger=False, enable_progress_bar=False).validate(
            model, data, verbose=False
        )
        model.eval()
        hidden = downstream_metrics(
            bridge,
            model.output_hook,
            lambda x, model=model: model(x).x_hat,
            tokens,
            first_position=int(data.layout.first_position),
            input_hook=model.input_hook,
        )
        fvu[cls.__name__] = val["val/fvu"]
        print(
            f"| {cls.__name__} | {val['val/fvu']:.4f} | {val['val/l0']:.1f} | "
            f"{hidden.final_hidden_cosine:.4f} | {hidden.final_hidden_rel_mse:.4f} | "
            f"{hidden.final_hidden_recovered:.4f} |  (trained in {train_s:.0f} s)",
            flush=True,
        )
    print(f"zero-ablated MLP output: final hidden rel MSE {hidden.final_hidden_rel_mse_zero:.4f}")
    ratio = fvu["TopKSkipTranscoder"] / fvu["TopKTranscoder"]
    print(f"skip / plain output FVU: {ratio:.3f}")


if __name__ == "__main__":
    main()

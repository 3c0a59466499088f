"""Latent-sharded fits on N CPU processes (gloo), for tests/test_sharded.py.

Lightning's launcher re-executes this script once per extra rank, so it is a standalone
program; the test also imports :func:`fit` to train the one-process reference in-process.
One launch runs every mesh of its world size (``--latent_parallel 2 1``: meshes 1x2 and 2x1 on
two processes) times every run of ``--runs`` (a JSON object, name -> ``{"model":
"<module>.<Class>", "kwargs": {...}, "callbacks": bool, "checkpoint": bool}``; callbacks: every
training-dynamics callback, else the decoder-norm constraint alone; init: the data-informed
init method of those callbacks, default kmeans (None: no data-informed init); silence: the
features the callbacks silence for the resampler; init_only: a data-informed init method, its
callback added to the constraint alone; checkpoint: save every
``--checkpoint_every`` steps and at the end; sparse_check: compare the last step's sparse
encoder backward with dense autograd, :class:`SparseBackwardCheck`; sites: ``pairs``,
``layers`` or ``clt``, toy rows served as a transcoder's, a crosscoder's or a cross-layer
transcoder's hooks; init_check: every
data-informed init method's weights for the member's latents, :class:`InitSlices`), then
every resume of ``--resumes`` (``[source latent_parallel, target latent_parallel, name]``:
the run restarted from its step-``--checkpoint_every`` checkpoint on the target mesh). A fit
writes ``rank<R>.pt`` (the rank's state dict, latent rank, the density monitor's last
densities, sparse check and init slices), CSV
metrics from rank 0 under ``csv`` and its checkpoints under ``ckpt``, in
``lp<latent_parallel>/<name>`` (a resume: ``<name>-resumed-from-lp<S>``).
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_sae.callbacks.decoder_norm import DecoderNormConstraint
from lightning_sae.callbacks.density import FeatureDensityMonitor
from lightning_sae.callbacks.figures import TrainingFigures
from lightning_sae.callbacks.geometry import FeatureGeometryMonitor
from lightning_sae.callbacks.init import METHODS, DataInformedInit
from lightning_sae.callbacks.resampling import DeadFeatureResampler
from lightning_sae.data.toy import ToyBatches, ToySuperpositionDataModule
from lightning_sae.models import topk
from lightning_sae.models.sparse import SparseCode
from lightning_sae.parallel import LatentParallelStrategy, shard_of

D_IN, D_SAE, BATCH = 16, 64, 64
STEPS, EVERY = 8, 4  # steps per fit; a checkpoint every EVERY steps
# Transcoders read IN and write OUT (another width and scale); crosscoders read LAYERS.
IN, OUT, D_OUT = "blocks.0.hook_mlp_in", "blocks.0.hook_mlp_out", 12
LAYERS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]

# Cross-layer transcoders read two layers' MLP inputs and write their MLP outputs.
CLT_IN = ["blocks.0.hook_mlp_in", "blocks.1.hook_mlp_in"]
CLT_OUT = ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]


def sites(x: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """Toy rows as the hooks a transcoder (``pairs``), a crosscoder (``layers``) or a
    cross-layer transcoder (``clt``) reads, row
    by row, so that a rank's slice of the global batch maps to the same slice of the sites.
    Each site has its own scale, so the per-site factors differ."""
    if kind == "layers":
        return {LAYERS[0]: x[:, : D_IN // 2], LAYERS[1]: 4 * x[:, D_IN // 2 :]}
    if kind == "clt":  # layer 1 reads a mix of x and layer 0's output, at another scale
        pair = sites(x, "pairs")
        x1 = 2 * x.roll(1, dims=1)
        y1 = sites(x1, "pairs")[OUT] / 2 + pair[OUT]
        return {CLT_IN[0]: x, CLT_OUT[0]: pair[OUT], CLT_IN[1]: x1, CLT_OUT[1]: y1}
    g = torch.Generator().manual_seed(1234)  # the map itself is fixed
    linear, detect = torch.randn(D_IN, D_OUT, generator=g), torch.randn(D_IN, 24, generator=g)
    write = torch.randn(24, D_OUT, generator=g)
    return {IN: x, OUT: 3 * (x @ linear + torch.relu(x @ detect - 0.5) @ write)}


class SiteBatches(ToyBatches):
    def __init__(self, batches: ToyBatches, kind: str) -> None:
        self.__dict__.update(batches.__dict__)
        self.kind = kind

    def __iter__(self):  # noqa: ANN204
        return (sites(x, self.kind) for x in super().__iter__())


class SiteToyData(ToySuperpositionDataModule):
    """Toy data served as ``{hook: rows}`` (``kind``: ``pairs`` or ``layers``)."""

    def __init__(self, kind: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kind = kind
        self.train_batches = SiteBatches(self.train_batches, kind)
        self.val_data = SiteBatches(self.val_data, kind)

    def sample(self, n: int, seed: int | None = None) -> dict[str, torch.Tensor]:
        return sites(super().sample(n, seed), self.kind)


class Silence(L.Callback):
    """Kills chosen features (global indices: a cross-layer transcoder's ``layer * d_sae + f``)
    at the start of the fit (after any init), so that the resampler has work at its first call;
    each member silences the ones it holds."""

    def __init__(self, features: list[int]) -> None:
        self.features = torch.tensor(features)

    @torch.no_grad()
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        shard = shard_of(pl_module)
        features = (
            self.features if shard is None else pl_module.local_feature_indices(self.features)
        )
        pl_module.b_enc.view(-1)[features] = -1e3  # a CLT's b_enc is [n_layers, d_sae]


def dense_encoder_values(
    code: SparseCode, pre_acts: torch.Tensor, x: torch.Tensor, W_enc: torch.Tensor,
    bias: torch.Tensor, source: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """The reference of ``models.sparse.sparse_encoder_values``: dense autograd through the same
    entries (the pre-activations recomputed with a graph, bit for bit the ones given; the input
    offset folded into the bias as ``SparseAutoencoder.encoder_bias`` folds it)."""
    if source is not None:
        bias = bias + -(source @ W_enc)
    dense = torch.nn.functional.linear(x, W_enc.T, bias)
    assert torch.equal(dense.detach(), pre_acts)
    return dense.gather(1, code.indices) if code.rows is None else dense[code.rows, code.indices]


def sparse_and_dense(
    sae: L.LightningModule, x: torch.Tensor, y: torch.Tensor
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One training-mode forward, loss terms and gradients of ``sae`` on (input, target) rows,
    with the sparse encoder backward and with dense autograd; the module's buffers (BatchTopK's
    threshold) are left as they were."""
    buffers = {name: value.clone() for name, value in sae.named_buffers()}
    params = {name: p for name, p in sae.named_parameters() if p.requires_grad}
    runs = []
    for values_fn in (topk.sparse_encoder_values, dense_encoder_values):
        saved, topk.sparse_encoder_values = topk.sparse_encoder_values, values_fn
        try:
            sae.train()
            out = sae.forward_normalized(x)
            terms = sae.loss_terms(y, out)
            grads = torch.autograd.grad(
                sum(terms.values()), list(params.values()), allow_unused=True
            )
        finally:
            topk.sparse_encoder_values = saved
        with torch.no_grad():
            for name, value in sae.named_buffers():
                value.copy_(buffers[name])
        runs.append(
            {
                "x_hat": out.x_hat.detach(),
                "acts": out.acts.detach(),
                "pre_acts": out.pre_acts.detach(),
                "terms": {name: value.detach() for name, value in terms.items()},
                "grads": {n: g for n, g in zip(params, grads, strict=True) if g is not None},
            }
        )
    return runs[0], runs[1]


class SparseBackwardCheck(L.Callback):
    """At the last step, the step's gradients with the sparse encoder backward and with dense
    autograd on the same batch (every member of a latent group joins both passes); the largest
    difference relative to the largest gradient, per parameter, lands in ``self.report``."""

    def __init__(self, step: int) -> None:
        self.step, self.report = step, {}

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step != self.step:
            return
        shard = shard_of(pl_module)
        x, y = pl_module.input_and_target(batch) if shard is None else pl_module._rows(batch)
        x_n = pl_module.normalize(x)
        y_n = x_n if y is x else pl_module.normalize_target(y)
        with torch.enable_grad():
            sparse_run, dense_run = sparse_and_dense(pl_module, x_n, y_n)
        self.report = {
            "dead": int(pl_module.dead_mask().sum()),
            "equal_x_hat": bool(torch.equal(sparse_run["x_hat"], dense_run["x_hat"])),
            **{
                name: float((sparse_run["grads"][name] - grad).abs().max() / grad.abs().max())
                for name, grad in dense_run["grads"].items()
            },
        }


class InitSlices(L.Callback):
    """At fit start, every data-informed init method's weights for this member's latents
    (``DataInformedInit.initial_weights`` with the shard; every rank joins), and the normalised
    sample they came from, in ``self.report``."""

    def __init__(self) -> None:
        self.report = {}

    @torch.no_grad()
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        shard = shard_of(pl_module)
        x, y = pl_module.input_and_target(trainer.datamodule.sample(D_SAE * 2, seed=5))
        x_n = pl_module.normalize(x)
        y_n = None if y is x else pl_module.normalize_target(y)
        self.report = {"x_n": x_n, "y_n": y_n}
        for method in METHODS:
            init = DataInformedInit(method=method, n_samples=D_SAE * 2, rare_fraction=0.1)
            self.report[method] = init.initial_weights(x_n, pl_module, y_n, shard)


def callbacks(
    steps: int, init: str | None = "kmeans", silence: list[int] = (1, 5, 40, 63)
) -> list[L.Callback]:
    """Every training-dynamics callback (``init`` None: no data-informed init)."""
    return [
        DecoderNormConstraint(),
        *([] if init is None else [DataInformedInit(method=init, n_samples=D_SAE * 2)]),
        Silence(list(silence)),
        DeadFeatureResampler(at_steps=[steps // 2], strategy="cluster", n_batches=1, batch_size=64),
        FeatureDensityMonitor(every_n_steps=steps // 2, window_tokens=BATCH * 2, save_png=False),
        FeatureGeometryMonitor(every_n_steps=steps // 2, save_png=False),
    ]


def fit(
    run: dict[str, Any], out: Path, devices: int, latent_parallel: int | None, steps: int,
    every: int, ckpt_path: str | None = None,
) -> L.LightningModule:  # fmt: skip
    """One fit; ``latent_parallel=None`` is the plain one-process reference."""
    L.seed_everything(0)
    module, _, cls = run["model"].rpartition(".")
    model_cls = getattr(__import__(module, fromlist=[cls]), cls)
    model = model_cls(d_in=D_IN, d_sae=D_SAE, lr=3e-3, dead_window_tokens=128, **run["kwargs"])
    toy = dict(n_features=48, d_in=D_IN, batch_size=BATCH, batches_per_epoch=steps, val_batches=1)
    kind = run.get("sites")
    data = ToySuperpositionDataModule(**toy) if kind is None else SiteToyData(kind, **toy)
    checkpoints = [
        ModelCheckpoint(
            dirpath=out / "ckpt",
            filename="{step}",
            every_n_train_steps=every,
            save_last=True,
            save_top_k=-1,
        )
    ]
    check = SparseBackwardCheck(steps - 1) if run.get("sparse_check") else None
    slices = InitSlices() if run.get("init_check") else None
    dynamics = [DecoderNormConstraint()]
    if run.get("callbacks"):
        dynamics = callbacks(steps, run.get("init", "kmeans"), run.get("silence", (1, 5, 40, 63)))
    if run.get("init_only"):  # the data-informed init alone, by the method named
        dynamics.append(DataInformedInit(method=run["init_only"], n_samples=D_SAE * 2))
    figures = TrainingFigures(save_png=False) if run.get("figures") else None
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="auto" if latent_parallel is None else LatentParallelStrategy(latent_parallel),
        max_steps=steps,
        val_check_interval=steps,
        check_val_every_n_epoch=None,
        log_every_n_steps=1,
        logger=CSVLogger(out, name="csv", version=0),
        callbacks=[
            *dynamics,
            *(checkpoints if run.get("checkpoint") else []),
            *([check] if check else []),
            *([slices] if slices else []),
            *([figures] if figures else []),
        ],
        enable_checkpointing=bool(run.get("checkpoint")),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    trainer.fit(model, data, ckpt_path=ckpt_path)
    shard = shard_of(model)
    density = next((c for c in dynamics if isinstance(c, FeatureDensityMonitor)), None)
    torch.save(
        {
            "state": model.state_dict(),
            "latent_rank": 0 if shard is None else shard.latent_rank,
            "density": None if density is None else density.last_density,
            "sparse_check": check.report if check else None,
            "init_slices": slices.report if slices else None,
            "val_counts": None if figures is None else figures.val_counts,
        },
        out / f"rank{trainer.global_rank}.pt",
    )
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--latent_parallel", type=int, nargs="+", required=True)
    parser.add_argument("--runs", type=json.loads, required=True)
    parser.add_argument("--resumes", type=json.loads, default=[])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--checkpoint_every", type=int, default=EVERY)
    args = parser.parse_args()
    for lp in args.latent_parallel:
        for name, run in args.runs.items():
            out = args.out / f"lp{lp}" / name
            fit(run, out, args.devices, lp, args.steps, args.checkpoint_every)
    for source, target, name in args.resumes:
        ckpt = args.out / f"lp{source}" / name / "ckpt" / f"step={args.checkpoint_every}.ckpt"
        out = args.out / f"lp{target}" / f"{name}-resumed-from-lp{source}"
        run = args.runs[name]
        fit(run, out, args.devices, target, args.steps, args.checkpoint_every, str(ckpt))


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())

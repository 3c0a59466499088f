"""Downstream evaluation: the SAE spliced into its language model at every validation end."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_sae.callbacks._reporting import measures_here, saes, scoped
from lightning_sae.metrics.downstream import downstream_metrics
from lightning_sae.parallel.members import gather_objects, placement_of


class DownstreamEval(Callback):
    """Log ``downstream/ce_loss_recovered`` and ``downstream/kl`` at the end of validation.

    The SAE's reconstruction replaces the activation at the data's hook in the data's own
    language model (see :mod:`lightning_sae.metrics.downstream`), over a fixed set of held-out
    token windows: the first ``ceil(n_tokens / context_size)`` windows of the activation cache's
    validation split, the same every time. Encoder-only models (BERT/MiniLM) have no next-token
    loss; for them it logs ``downstream/final_hidden_cosine`` and
    ``downstream/final_hidden_rel_mse`` (logged for causal models too) and says so once.

    When the data excludes the BOS position from training (``exclude_bos``), the SAE leaves
    that position's activation alone. The model is loaded once, on rank 0 and on the SAE's
    device; the other ranks wait for the numbers. Under ``latent_parallel`` every rank loads it
    and measures, since the sharded SAE's forward needs every member of its latent group.

    Needs an :class:`~lightning_sae.data.activations.ActivationDataModule` reading a model
    (not ``activations_dir``). In an ``SAEGroup`` each member is spliced in at its own hook
    (one at a time) and logged under ``<member>/downstream/...``. A transcoder's prediction from
    its input hook replaces its output hook (the MLP it stands in for).

    Args:
        n_tokens: token budget of each evaluation (rounded up to whole windows).
        batch_size: windows per forward pass.
        every_n_validations: evaluate at every n-th validation (1 = each one).
        skip_sanity_check: do not evaluate during Lightning's sanity-check validation.
    """

    def __init__(
        self,
        n_tokens: int = 8192,
        batch_size: int = 8,
        every_n_validations: int = 1,
        skip_sanity_check: bool = True,
    ) -> None:
        for name, value in (
            ("n_tokens", n_tokens),
            ("batch_size", batch_size),
            ("every_n_validations", every_n_validations),
        ):
            if value < 1:
                raise ValueError(f"DownstreamEval {name} must be >= 1, got {value}.")
        self.n_tokens, self.batch_size = n_tokens, batch_size
        self.every_n_validations, self.skip_sanity_check = every_n_validations, skip_sanity_check
        self.validations = 0
        self._model: Any = None
        self._tokens: Tensor | None = None
        self._noted = False

    # ----------------------------------------------------------------- what to evaluate on
    @staticmethod
    def _datamodule(trainer: Trainer) -> Any:
        data = trainer.datamodule
        hparams = getattr(data, "hparams", {})
        if getattr(data, "hook", None) is None or hparams.get("model") is None:
            raise ValueError(
                "DownstreamEval splices the SAE into the language model its activations came "
                "from, so it needs data: ActivationDataModule with data.init_args.model and "
                "hook set; remove the callback for toy data or activations_dir."
            )
        return data

    def _eval_tokens(self, data: Any) -> Tensor:
        """The first held-out windows of the cache (windows past ``n_train_windows``)."""
        windows = np.load(data.cache_root / "tokens.npy", mmap_mode="r")
        held_out = windows[data.layout.n_train_windows :]
        wanted = math.ceil(self.n_tokens / windows.shape[1])
        if len(held_out) < wanted:
            rank_zero_warn(
                f"DownstreamEval: n_tokens={self.n_tokens} needs {wanted} windows but the "
                f"cache holds {len(held_out)} held-out windows; using those "
                f"({len(held_out) * windows.shape[1]} tokens). Raise data.init_args.val_tokens "
                "for a larger budget."
            )
        return torch.from_numpy(np.asarray(held_out[:wanted], dtype=np.int64))

    def _load(self, data: Any, device: torch.device) -> None:
        self._model = data.language_model.load(str(device))
        self._tokens = self._eval_tokens(data)

    # ----------------------------------------------------------------- hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._datamodule(trainer)  # fail at the start, not at the first validation
        for name, sae in saes(pl_module).items():
            if getattr(sae, "writes_layers", False):
                raise ValueError(
                    f"DownstreamEval splices one site; {scoped(name, type(sae).__name__)} is a "
                    "crosscoder or cross-layer transcoder, which writes several layers at once. "
                    "Remove the callback (val/fvu covers every layer; for a cross-layer "
                    "transcoder, ReplacementEval splices every layer)."
                )

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking and self.skip_sanity_check:
            return
        self.validations += 1
        if (self.validations - 1) % self.every_n_validations:
            return
        data = self._datamodule(trainer)
        values: dict[str, float] | None = None
        # A latent-sharded SAE's forward is collective over its latent group, so there every
        # rank runs the language model on the same windows and joins it; rank 0's numbers are
        # then everyone's, as under DDP where rank 0 alone measures.
        # Under member placement each rank measures its own members and every rank logs all.
        placed = placement_of(pl_module) is not None
        if measures_here(trainer, pl_module) and saes(pl_module):
            values = self._measure(data, pl_module)
        if placed:
            values = {k: v for part in gather_objects(values or {}) for k, v in part.items()}
        else:
            values = trainer.strategy.broadcast(values, src=0)
        for name, value in values.items():
            pl_module.log(name, value, sync_dist=False)

    def _measure(self, data: Any, pl_module: LightningModule) -> dict[str, float]:
        if self._model is None:
            self._load(data, pl_module.device)
        values: dict[str, float] = {}
        for name, sae in saes(pl_module).items():
            hook = (pl_module.hooks[name] if name else None) or data.hook
            input_hook = None
            if getattr(sae, "maps_sites", False):  # a transcoder replaces its output site
                input_hook, hook = sae.input_hook, sae.output_hook
            result = downstream_metrics(
                self._model,
                hook,
                lambda x, sae=sae: sae(x).x_hat,
                self._tokens,
                batch_size=self.batch_size,
                first_position=int(data.layout.first_position),
                input_hook=input_hook,
            )
            if result.note and not self._noted:
                rank_zero_info(f"DownstreamEval: {result.note}")
                self._noted = True
            values |= {scoped(name, key): value for key, value in result.to_log_dict().items()}
        return values

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = state_dict["validations"]

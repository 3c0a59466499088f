"""Replacement-model evaluation: a cross-layer transcoder in place of every MLP, at validation."""

from __future__ import annotations

from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from lightning_sae.callbacks._reporting import saes, scoped
from lightning_sae.callbacks.downstream import DownstreamEval
from lightning_sae.metrics.replacement import replacement_metrics


class ReplacementEval(DownstreamEval):
    """Log the replacement model's fidelity (``replacement/...``) at the end of validation.

    Every MLP output of the data's language model is replaced by the cross-layer transcoder's
    (:mod:`lightning_sae.metrics.replacement`), over the same fixed held-out windows as
    :class:`~lightning_sae.callbacks.downstream.DownstreamEval` uses, loaded the same way.
    Logged: ``replacement/top1_agreement``, ``replacement/kl``,
    ``replacement/ce_loss_recovered`` (causal models), ``replacement/final_hidden_cosine``,
    ``replacement/final_hidden_rel_mse``, ``replacement/final_hidden_recovered`` and
    ``replacement/fvu/layer<l>``. With ``with_errors`` the same run with each layer's error
    added back is logged under ``replacement_with_errors/``: it reproduces the original model
    (KL ~ 0, agreement 1), a check of the splice rather than a result.

    Args:
        n_tokens, batch_size, every_n_validations, skip_sanity_check: as for DownstreamEval.
        with_errors: also log the run with error terms.
    """

    def __init__(self, *args: Any, with_errors: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.with_errors = with_errors

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._datamodule(trainer)  # fail at the start, not at the first validation
        for name, sae in saes(pl_module).items():
            if getattr(sae, "n_layers", None) is None:
                raise ValueError(
                    f"ReplacementEval replaces every MLP with a cross-layer transcoder; "
                    f"{scoped(name, type(sae).__name__)} is not one. Use DownstreamEval for an "
                    "SAE or a transcoder."
                )
            if not sae.replaces_layer_by_layer:
                sae.layer_activation(0, sae.b_enc[0])  # raises, saying why and what to use

    def _measure(self, data: Any, pl_module: LightningModule) -> dict[str, float]:
        if self._model is None:
            self._load(data, pl_module.device)
        values: dict[str, float] = {}
        modes = [(False, "replacement/")] + (
            [(True, "replacement_with_errors/")] * self.with_errors
        )
        for name, clt in saes(pl_module).items():
            with clt.measuring():
                for with_errors, prefix in modes:
                    result = replacement_metrics(
                        self._model,
                        clt,
                        self._tokens,
                        batch_size=self.batch_size,
                        first_position=int(data.layout.first_position),
                        with_errors=with_errors,
                    )
                    if result.note and not self._noted:
                        rank_zero_info(f"ReplacementEval: {result.note}")
                        self._noted = True
                    logged = result.to_log_dict(prefix)
                    values |= {scoped(name, key): value for key, value in logged.items()}
        return values

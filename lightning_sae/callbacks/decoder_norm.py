"""Keep decoder rows at unit norm."""

from __future__ import annotations

from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from torch.optim import Optimizer

from lightning_sae.callbacks._reporting import decoder_parameters, saes


class DecoderNormConstraint(Callback):
    """Project out the gradient parallel to each decoder row, then renormalise rows after the step.

    With unit-norm rows a penalty on the activations alone cannot be lowered by shrinking
    activations and growing the decoder. Removing the parallel gradient component first means Adam
    spends its step only on changing directions, not on norm changes that the renormalisation
    would undo. The configs add it for every variant but the standard SAE, whose penalty is
    weighted by the rows' norms (``weight_by_decoder_norm``, its default) and whose rows train
    free: measured better on toy data and MiniLM (docs/defaults.md). Under this callback that
    weighting changes nothing (the norms are 1; the gradient it adds is along each row, which is
    projected out here). In an
    ``SAEGroup`` every member's decoder is constrained. A cross-layer transcoder's feature row is
    everything the feature writes, every target layer together.
    """

    def __init__(self, remove_parallel_gradient: bool = True) -> None:
        self.remove_parallel_gradient = remove_parallel_gradient

    @torch.no_grad()
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # On resume the rows are unit-norm already; renormalising would perturb the low bits.
        if trainer.ckpt_path is None:
            self._normalise(pl_module)

    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer
    ) -> None:
        if not self.remove_parallel_gradient:
            return
        for sae in saes(pl_module).values():
            for W in decoder_parameters(sae):
                if W.grad is None:
                    continue
                W_dec, grad = W.flatten(1), W.grad.view(W.shape[0], -1)  # grad: a view, in place
                directions = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
                grad -= (grad * directions).sum(1, keepdim=True) * directions

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._normalise(pl_module)

    @staticmethod
    def _normalise(pl_module: LightningModule) -> None:
        for sae in saes(pl_module).values():
            for W in decoder_parameters(sae):
                norms = W.flatten(1).norm(dim=1).clamp_min(1e-12)
                W /= norms.view(-1, *[1] * (W.dim() - 1))

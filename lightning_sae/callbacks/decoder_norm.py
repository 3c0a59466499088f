"""Keep decoder rows at unit norm."""

from __future__ import annotations

from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from torch.optim import Optimizer

from lightning_sae.callbacks._reporting import decoder_parameters, saes
from lightning_sae.models.base import SparseAutoencoder


class DecoderNormConstraint(Callback):
    """Project out the gradient parallel to each decoder row, then renormalise rows after the step.

    With unit-norm rows a penalty on the activations alone cannot be lowered by shrinking
    activations and growing the decoder. Removing the parallel gradient component first means Adam
    spends its step only on changing directions, not on norm changes that the renormalisation
    would undo. The configs add it for every variant but the standard SAE, whose penalty is
    weighted by the rows' norms (``weight_by_decoder_norm``, its default) and whose rows train
    free: measured better on toy data and MiniLM (docs/defaults.md). Under this callback that
    weighting changes nothing (the norms are 1; the gradient it adds is along each row, which is
    projected out here). In an ``SAEGroup`` every member's decoder is constrained, or only those
    named in ``members`` (a sweep's standard SAE then trains free beside constrained TopK
    members). A cross-layer transcoder's feature row is everything the feature writes, every
    target layer together.
    """

    def __init__(
        self, remove_parallel_gradient: bool = True, members: list[str] | None = None
    ) -> None:
        self.remove_parallel_gradient = remove_parallel_gradient
        self.members = None if members is None else list(members)

    def _constrained(self, pl_module: LightningModule) -> list[SparseAutoencoder]:
        named = saes(pl_module)
        if self.members is None:
            return list(named.values())
        unknown = [name for name in self.members if name not in named]
        if unknown or "" in named:
            raise ValueError(
                f"DecoderNormConstraint members {unknown or self.members} name no member of "
                f"this run (its SAEs: {sorted(n for n in named if n) or 'one SAE, not a group'}); "
                "give the group's member names, or leave members out to constrain every SAE"
            )
        return [named[name] for name in self.members]

    @torch.no_grad()
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # On resume the rows are unit-norm already; renormalising would perturb the low bits.
        saes_to_constrain = self._constrained(pl_module)  # a wrong name fails before training
        if trainer.ckpt_path is None:
            self._normalise(saes_to_constrain)

    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer
    ) -> None:
        if not self.remove_parallel_gradient:
            return
        for sae in self._constrained(pl_module):
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
        self._normalise(self._constrained(pl_module))

    @staticmethod
    def _normalise(constrained: list[SparseAutoencoder]) -> None:
        for sae in constrained:
            for W in decoder_parameters(sae):
                norms = W.flatten(1).norm(dim=1).clamp_min(1e-12)
                W /= norms.view(-1, *[1] * (W.dim() - 1))

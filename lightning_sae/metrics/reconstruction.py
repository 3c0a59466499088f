"""Reconstruction and sparsity metrics as torchmetrics ``Metric``s.

Every state is a sum, so torchmetrics' own ``dist_reduce_fx="sum"`` makes them exact under DDP:
the synchronised value equals the single-process value on the union of the ranks' inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class L0(Metric):
    """Mean number of active (non-zero) features per input."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("active", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, acts: Tensor) -> None:
        self.active += (acts != 0).sum(dtype=torch.float64)
        self.n += acts.shape[0]

    def compute(self) -> Tensor:
        return (self.active / self.n.clamp(min=1)).float()


class MSE(Metric):
    """Mean over inputs of the squared reconstruction error summed over dimensions."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("sq_err", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, x_hat: Tensor, x: Tensor) -> None:
        self.sq_err += (x_hat.double() - x.double()).pow(2).sum()
        self.n += x.shape[0]

    def compute(self) -> Tensor:
        return (self.sq_err / self.n.clamp(min=1)).float()


class FVU(Metric):
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2.

    The mean is per dimension over all evaluated inputs, so the denominator is the total
    variance of the data actually seen. Explained variance is ``1 - FVU``. Sums are kept in
    float64 so that the one-pass variance does not cancel catastrophically.
    """

    full_state_update = False

    def __init__(self, d_in: int) -> None:
        super().__init__()
        for name in ("sq_err", "sum_sq"):
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_x", torch.zeros(d_in, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, x_hat: Tensor, x: Tensor) -> None:
        x64 = x.double()
        self.sq_err += (x_hat.double() - x64).pow(2).sum()
        self.sum_sq += x64.pow(2).sum()
        self.sum_x += x64.sum(0)
        self.n += x.shape[0]

    def compute(self) -> Tensor:
        n = self.n.clamp(min=1)
        total_variance = self.sum_sq - self.sum_x.pow(2).sum() / n
        return (self.sq_err / total_variance).float()


class FiringCounts(Metric):
    """Per-feature count of inputs on which each feature fired, and the number of inputs."""

    full_state_update = False

    def __init__(self, d_sae: int) -> None:
        super().__init__()
        self.add_state("counts", torch.zeros(d_sae, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("n", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, acts: Tensor) -> None:
        self.counts += (acts != 0).sum(0)
        self.n += acts.shape[0]

    def compute(self) -> Tensor:
        """Firing frequency of each feature (fraction of inputs on which it fired)."""
        return self.counts.double() / self.n.clamp(min=1)


class DeadFraction(FiringCounts):
    """Fraction of features that never fired on the evaluated inputs."""

    def compute(self) -> Tensor:
        return (self.counts == 0).float().mean()

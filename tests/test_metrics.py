"""Each reconstruction metric against a hand computation."""

import torch

from lightning_sae.metrics.reconstruction import FVU, L0, MSE, DeadFraction, FiringCounts


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0], [-1.0, 4.0]])
    x_hat = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 4.0]])
    acts = torch.tensor([[0.0, 1.5, 0.0], [2.0, 0.5, 0.0], [0.0, 0.0, 0.0]])
    return x, x_hat, acts


def test_l0_counts_nonzero_per_input() -> None:
    _, _, acts = _data()
    metric = L0()
    metric.update(acts[:2])
    metric.update(acts[2:])
    assert metric.compute().item() == (1 + 2 + 0) / 3


def test_mse_is_mean_over_inputs_of_summed_squared_error() -> None:
    x, x_hat, _ = _data()
    metric = MSE()
    metric.update(x_hat, x)
    # squared errors per input: 1, 1, 1
    assert torch.isclose(metric.compute(), torch.tensor(1.0))


def test_fvu_against_per_dimension_variance_over_all_batches() -> None:
    x, x_hat, _ = _data()
    metric = FVU(d_in=2)
    metric.update(x_hat[:1], x[:1])
    metric.update(x_hat[1:], x[1:])
    # per-dimension means: (1, 2); squared deviations: dim0 0+4+4, dim1 0+4+4 -> 16
    assert torch.isclose(metric.compute(), torch.tensor(3.0 / 16.0))
    expected = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert torch.isclose(metric.compute(), expected)


def test_firing_counts_and_dead_fraction() -> None:
    _, _, acts = _data()
    counts = FiringCounts(d_sae=3)
    counts.update(acts)
    assert counts.counts.tolist() == [1, 2, 0]
    assert torch.allclose(counts.compute(), torch.tensor([1 / 3, 2 / 3, 0.0], dtype=torch.float64))
    dead = DeadFraction(d_sae=3)
    dead.update(acts)
    assert torch.isclose(dead.compute(), torch.tensor(1 / 3))

import pytest
import torch

from lightning_sae.data.toy import ToySuperpositionDataModule


def test_presets_and_ground_truth_are_unit_rows() -> None:
    data = ToySuperpositionDataModule(preset="128x1024")
    assert data.ground_truth_features.shape == (1024, 128)
    assert torch.allclose(data.ground_truth_features.norm(dim=1), torch.ones(1024), atol=1e-5)


def test_sparsity_statistics() -> None:
    data = ToySuperpositionDataModule(n_features=512, d_in=256, batch_size=4096)
    toy = data.toy
    assert torch.isclose(toy.firing_probability.sum(), torch.tensor(5.0), atol=1e-3)
    # firing probability decays geometrically with the feature index
    assert (toy.firing_probability[1:] <= toy.firing_probability[:-1]).all()
    x = next(iter(data.train_dataloader()))
    assert x.shape == (4096, 256)
    # magnitudes are positive almost surely, so a zero sample would mean no active feature
    assert (x.norm(dim=1) > 0).all()


def test_active_count_is_about_five_and_at_least_one() -> None:
    data = ToySuperpositionDataModule(n_features=512, d_in=256)
    generator = torch.Generator().manual_seed(1)
    p = data.toy.firing_probability
    noise = torch.randn(20000, 512, generator=generator)
    active = noise < torch.special.ndtri(p)
    assert abs(active.sum(1).float().mean().item() - 5.0) < 0.1


def test_deterministic_and_resumable_order() -> None:
    first = ToySuperpositionDataModule(batches_per_epoch=4, seed=3).train_dataloader()
    batches = list(first)
    second = ToySuperpositionDataModule(batches_per_epoch=4, seed=3).train_dataloader()
    iterator = iter(second)
    next(iterator)
    next(iterator)
    state = second.state_dict()
    resumed = ToySuperpositionDataModule(batches_per_epoch=4, seed=3).train_dataloader()
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(batches[2:], resumed, strict=True))
    # the next epoch draws fresh samples
    assert not torch.equal(next(iter(resumed)), batches[0])


def test_correlation_keeps_marginals() -> None:
    data = ToySuperpositionDataModule(n_features=64, d_in=32, correlation=0.8, mean_active=5)
    toy = data.toy
    generator = torch.Generator().manual_seed(0)
    n = 40000
    noise = torch.randn(n, 64, generator=generator)
    shared = torch.randn(n, toy.n_blocks, generator=generator)[:, toy.block_of_feature]
    latent = 0.2**0.5 * noise + 0.8**0.5 * shared
    active = (latent < torch.special.ndtri(toy.firing_probability)).float()
    assert torch.allclose(active.mean(0), toy.firing_probability, atol=0.02)
    same_block = toy.block_of_feature[0] == toy.block_of_feature
    corr = torch.corrcoef(active.T)[0]
    assert corr[same_block][1:].mean() > 0.1 > corr[~same_block].abs().mean()


def test_bad_preset_is_named() -> None:
    with pytest.raises(ValueError, match="preset must be one of"):
        ToySuperpositionDataModule(preset="64x64")  # type: ignore[arg-type]


def test_every_validation_pass_starts_at_the_first_batch() -> None:
    """A pass cut short (Lightning's sanity check reads 2 batches) must not shift the next."""
    val = ToySuperpositionDataModule(val_batches=4, batch_size=8).val_dataloader()
    whole = list(val)
    partial = iter(val)
    next(partial)
    next(partial)
    again = list(val)
    assert len(again) == 4 and all(torch.equal(a, b) for a, b in zip(whole, again, strict=True))

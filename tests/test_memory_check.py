"""A model whose weights exceed the machine's memory is refused before it is allocated, counted
by its own layout: a cross-layer transcoder has an encoder per layer and a decoder from each
layer to every later one, n_layers x d_in x d_sae + n_layers (n_layers + 1) / 2 x d_sae x d_out
weights, far more than an SAE's 2 x d_in x d_sae of the same width. The machine's memory is
faked through ``os.sysconf``, which the check reads."""

import os

import pytest

from lightning_sae.models.clt import CROSS_LAYER_TRANSCODERS, CrossLayerTranscoder
from lightning_sae.models.topk import TopKSAE
from lightning_sae.models.transcoder import TopKSkipTranscoder

PAGE = 4096
CLT = {"d_in": 64, "d_sae": 64, "n_layers": 8, "d_out": 48}


def machine_with(monkeypatch: pytest.MonkeyPatch, memory: int) -> None:
    real = os.sysconf

    def sysconf(name: str) -> int:
        if name == "SC_PAGE_SIZE":
            return PAGE
        if name == "SC_PHYS_PAGES":
            return memory // PAGE
        return real(name)

    monkeypatch.setattr(os, "sysconf", sysconf)


def weight_bytes(module: CrossLayerTranscoder | TopKSAE) -> int:
    """What the module holds: its float32 parameters and the int64 dead clock."""
    parameters = sum(p.numel() for p in module.parameters())
    return 4 * parameters + 8 * module.tokens_since_fired.numel()


@pytest.mark.parametrize("cls", CROSS_LAYER_TRANSCODERS, ids=lambda cls: cls.__name__)
def test_each_clt_counts_the_parameters_it_allocates(cls: type[CrossLayerTranscoder]) -> None:
    clt = cls(**CLT)
    assert cls.parameter_count(**CLT) == sum(p.numel() for p in clt.parameters())


def test_a_clt_too_large_for_memory_is_refused_naming_its_options(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    needed = weight_bytes(CrossLayerTranscoder(**CLT))
    sae_of_its_width = weight_bytes(TopKSAE(d_in=64, d_sae=8 * 64))
    assert needed > 2 * sae_of_its_width  # what the check counted before: it let this through
    machine_with(monkeypatch, needed - PAGE)
    with pytest.raises(ValueError) as refused:
        CrossLayerTranscoder(**CLT)
    line = str(refused.value)
    assert "\n" not in line and f"{needed:,} bytes" in line and "Adam" in line, line
    assert "n_layers=8" in line and "model.init_args.d_sae" in line, line
    assert "model.init_args.n_layers" in line, line
    machine_with(monkeypatch, needed + PAGE)  # enough for the weights: allocated
    assert weight_bytes(CrossLayerTranscoder(**CLT)) == needed


def test_an_sae_is_still_counted_by_its_own_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    needed = weight_bytes(TopKSAE(d_in=64, d_sae=512))
    machine_with(monkeypatch, needed - PAGE)
    with pytest.raises(ValueError, match=r"^d_sae=512 with d_in=64: .*model\.init_args\.d_sae"):
        TopKSAE(d_in=64, d_sae=512)
    machine_with(monkeypatch, needed + PAGE)
    TopKSAE(d_in=64, d_sae=512)


def test_a_transcoder_is_counted_by_its_output_width_and_skip(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A transcoder's decoder writes d_out columns and its skip is d_out x d_in: with d_out far
    above d_in it needs many times an SAE of its input width, which the check once counted."""
    shape = {"d_in": 16, "d_sae": 64, "d_out": 256, "k": 4}
    needed = weight_bytes(TopKSkipTranscoder(**shape))
    assert needed > 8 * weight_bytes(TopKSAE(d_in=16, d_sae=64, k=4))
    machine_with(monkeypatch, needed - PAGE)
    with pytest.raises(ValueError) as refused:
        TopKSkipTranscoder(**shape)
    line = str(refused.value)
    assert "\n" not in line and f"{needed:,} bytes" in line, line
    assert "d_out=256" in line and "model.init_args.d_sae" in line, line
    machine_with(monkeypatch, needed + PAGE)
    assert weight_bytes(TopKSkipTranscoder(**shape)) == needed

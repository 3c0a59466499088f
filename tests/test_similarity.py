"""Nearest-neighbour search (torch and faiss), MMCS, SAE matching, and `lightning-sae compare`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning import Trainer
from safetensors.torch import save_file

from lightning_sae.cli import main as cli_main
from lightning_sae.data.toy import ToySuperpositionDataModule
from lightning_sae.metrics.similarity import (
    compare_saes,
    load_sae_weights,
    match_directions,
    max_cosine_similarity,
    mean_max_cosine_similarity,
    nearest_neighbours,
    random_directions_mmcs,
    self_max_cosine_similarity,
)
from lightning_sae.models.standard import StandardSAE


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def test_torch_and_faiss_find_the_same_neighbours_on_16k_by_512() -> None:
    x = torch.randn(16384, 512, generator=torch.Generator().manual_seed(1))
    values_t, index_t = max_cosine_similarity(x, x, exclude_self=True, backend="torch")
    values_f, index_f = max_cosine_similarity(x, x, exclude_self=True, backend="faiss")
    assert torch.allclose(values_t, values_f, atol=1e-5)
    assert (index_t == index_f).all()
    assert (index_t != torch.arange(len(x))).all()  # nobody is its own neighbour


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_k_neighbours_match_brute_force_across_blocks(backend: str) -> None:
    q, keys = torch.randn(300, 16), torch.randn(2500, 16)
    values, indices = nearest_neighbours(q, keys, k=4, backend=backend, block_size=64)
    expected = (unit(q) @ unit(keys).T).topk(4, dim=1)
    assert torch.equal(indices, expected.indices)
    assert torch.allclose(values, expected.values, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_exclude_self_still_finds_an_exact_duplicate(backend: str) -> None:
    x = torch.randn(50, 8)
    x[7] = x[3]
    values, indices = max_cosine_similarity(x, x, exclude_self=True, backend=backend)
    assert indices[3] == 7 and indices[7] == 3
    assert values[3] == pytest.approx(1.0, abs=1e-6)


def test_missing_faiss_gives_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ImportError, match=r"lightning-sae\[faiss\]"):
        max_cosine_similarity(torch.randn(4, 3), torch.randn(5, 3), backend="faiss")


def test_bad_backend_and_shapes_are_named() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        max_cosine_similarity(torch.randn(4, 3), torch.randn(5, 3), backend="annoy")
    with pytest.raises(ValueError, match="same d"):
        max_cosine_similarity(torch.randn(4, 3), torch.randn(5, 4))


def test_mmcs_of_identical_saes_is_one() -> None:
    W = torch.randn(200, 32)
    assert mean_max_cosine_similarity(W, W).item() == pytest.approx(1.0, abs=1e-6)
    result = compare_saes({"W_dec": W, "W_enc": W.T}, {"W_dec": W.clone(), "W_enc": W.T.clone()})
    for part in (result.decoder, result.encoder):
        assert part.matching.similarity.min().item() == pytest.approx(1.0, abs=1e-5)
        assert part.summary()["max b->a"]["frac_above_0.9"] == 1.0


def test_random_directions_match_the_random_baseline() -> None:
    baseline = random_directions_mmcs(2048, 64, seed=0)
    other = self_max_cosine_similarity(torch.randn(2048, 64)).mean().item()
    assert other == pytest.approx(baseline, abs=0.01)
    # Far from the structured extremes: an SAE that learned nothing looks like this.
    assert 0.3 < baseline < 0.7


@pytest.mark.parametrize("limit", [16384, 64], ids=["hungarian", "greedy-then-hungarian"])
def test_a_permuted_copy_matches_one_to_one_with_similarity_one(limit: int) -> None:
    W_dec = torch.randn(300, 24)
    W_enc = torch.randn(24, 300)
    perm = torch.randperm(300)
    a = {"W_dec": W_dec, "W_enc": W_enc}
    b = {"W_dec": W_dec[perm] * 3.0, "W_enc": W_enc[:, perm] * 0.5}  # scale does not matter
    result = compare_saes(a, b, hungarian_limit=limit)
    for part in (result.decoder, result.encoder):
        matching = part.matching
        assert len(matching.index_a) == 300
        assert torch.equal(perm[matching.index_b], matching.index_a)
        assert torch.allclose(matching.similarity, torch.ones(300), atol=1e-5)
    assert ("greedy" in result.decoder.matching.method) == (limit < 300)


def test_max_similarity_is_asymmetric_when_features_crowd_one_feature() -> None:
    # B has four orthogonal features; all four of A's features sit near B's first one.
    b = torch.eye(4, 16)
    a = unit(b[0] + 0.1 * torch.eye(16)[4:8])
    result = compare_saes({"W_dec": a}, {"W_dec": b})
    a_to_b = result.decoder.summary()["max a->b"]["mean"]
    b_to_a = result.decoder.summary()["max b->a"]["mean"]
    assert a_to_b == pytest.approx(1 / 1.01**0.5, abs=1e-5)
    assert b_to_a == pytest.approx(a_to_b / 4, abs=1e-5)  # only B's first feature has a partner
    # One-to-one: just one of A's features can take B's first feature.
    assert (result.decoder.matching.similarity > 0.9).sum() == 1
    assert result.encoder is None


def test_rectangular_matching_pairs_the_smaller_side() -> None:
    b = torch.randn(40, 8)
    a = b[[5, 9, 30]] + 0.01 * torch.randn(3, 8)
    matching = match_directions(a, b)
    assert matching.index_b.tolist() == [5, 9, 30]


def test_compare_refuses_different_widths() -> None:
    with pytest.raises(ValueError, match="different widths"):
        compare_saes({"W_dec": torch.randn(4, 8)}, {"W_dec": torch.randn(4, 9)})


def _train_checkpoint(path: Path, seed: int) -> Path:
    data = ToySuperpositionDataModule(n_features=16, d_in=8, batch_size=32, batches_per_epoch=4)
    model = StandardSAE(d_in=8, d_sae=16, init_seed=seed)
    trainer = Trainer(
        max_steps=2,
        default_root_dir=path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, data)
    ckpt = path / f"sae{seed}.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt


def test_compare_cli_reads_checkpoints_and_export_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _train_checkpoint(tmp_path, seed=0)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    export = tmp_path / "export"
    export.mkdir()
    perm = torch.randperm(16)
    save_file(
        {"W_dec": state["W_dec"][perm].contiguous(), "W_enc": state["W_enc"][:, perm].contiguous()},
        export / "sae.safetensors",
    )
    summary = tmp_path / "summary.json"
    cli_main(["compare", str(ckpt), str(export), "--json", str(summary)])
    out = capsys.readouterr().out
    for label in ("decoder", "encoder", "max a->b", "max b->a", "one-to-one", "hungarian"):
        assert label in out
    numbers = json.loads(summary.read_text())
    assert numbers["decoder"]["one-to-one"]["mean"] == pytest.approx(1.0, abs=1e-5)
    assert numbers["encoder"]["one-to-one"]["frac_above_0.9"] == 1.0


def test_compare_console_script_on_two_seeds(tmp_path: Path) -> None:
    a, b = _train_checkpoint(tmp_path, seed=0), _train_checkpoint(tmp_path, seed=1)
    result = subprocess.run(
        [sys.executable, "-m", "lightning_sae.cli", "compare", str(a), str(b)],
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_MODE": "offline"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    decoder_row = next(line for line in result.stdout.splitlines() if "one-to-one" in line)
    mean = float(decoder_row.split()[2])
    assert mean < 0.9  # two seeds after two steps: different features


def test_loading_errors_say_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="without sae_weights.safetensors or"):
        load_sae_weights(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sae_weights(tmp_path / "missing.ckpt")
    torch.save({"state_dict": {"weight": torch.zeros(2)}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="holds no W_dec"):
        load_sae_weights(tmp_path / "other.ckpt")

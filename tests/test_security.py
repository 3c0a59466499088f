"""Nothing read from a file (cfg.json, a checkpoint) may choose code to import or run.

Each test plants a module that writes a marker file when imported, next to an SAE folder or
checkpoint that names it, on the import path, and checks that loading never imports it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from lightning_sae.io import CONFIG_FILENAME, export_checkpoint, export_sae, load
from lightning_sae.models.standard import StandardSAE


def _plant_payload(folder: Path) -> Path:
    """A ``payload.py`` in ``folder`` that leaves ``marker`` behind when imported."""
    marker = folder / "imported"
    (folder / "payload.py").write_text(
        textwrap.dedent(
            f"""
            from pathlib import Path
            from lightning_sae.models.standard import StandardSAE

            Path({str(marker)!r}).write_text("payload ran")

            class Evil(StandardSAE):
                "The class a malicious cfg.json or checkpoint names."
            """
        )
    )
    return marker


def _trained_sae() -> StandardSAE:
    sae = StandardSAE(d_in=6, d_sae=12)
    sae.fit_input_scale(torch.randn(32, 6))
    return sae.eval()


def test_load_never_imports_a_module_named_by_cfg_json(tmp_path: Path) -> None:
    folder = tmp_path / "downloaded_sae"
    export_sae(_trained_sae(), folder)
    marker = _plant_payload(folder)
    (folder / "__init__.py").write_text("")
    cfg = json.loads((folder / CONFIG_FILENAME).read_text())
    cfg["metadata"]["lightning_sae"]["class_path"] = "downloaded_sae.payload.Evil"
    (folder / CONFIG_FILENAME).write_text(json.dumps(cfg))
    # As in a notebook or `python -c`: the folder's parent is the working directory, on sys.path.
    script = f"from lightning_sae.io import load; load({str(folder)!r})"
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert not marker.exists(), "loading the folder ran its payload.py"
    assert result.returncode != 0
    assert "downloaded_sae.payload.Evil" in result.stderr
    assert "not one of lightning-sae's SAE classes" in result.stderr


def test_load_resolves_the_class_from_the_project_table(tmp_path: Path) -> None:
    export_sae(_trained_sae(), tmp_path)
    assert type(load(tmp_path)) is StandardSAE


def test_export_never_imports_a_class_named_by_a_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = _plant_payload(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sae = _trained_sae()
    checkpoint = {
        "state_dict": sae.state_dict(),
        "hyper_parameters": {**dict(sae.hparams), "_class_path": "payload.Evil"},
    }
    torch.save(checkpoint, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="not one of lightning-sae's SAE classes"):
        export_checkpoint(tmp_path / "evil.ckpt", tmp_path / "out")
    assert not marker.exists()
    assert "payload" not in sys.modules


def test_a_checkpoint_cannot_choose_the_class_lightning_cli_imports(tmp_path: Path) -> None:
    """LightningCLI reads ``_class_path`` from a --ckpt_path checkpoint and parses it as the
    model's class_path, which imports it; the CLI must refuse a class outside the project."""
    marker = _plant_payload(tmp_path)
    sae = _trained_sae()
    checkpoint = {
        "state_dict": sae.state_dict(),
        "hyper_parameters": {**dict(sae.hparams), "_class_path": "payload.Evil"},
    }
    torch.save(checkpoint, tmp_path / "evil.ckpt")
    config = Path(__file__).parents[1] / "configs" / "toy" / "standard.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "lightning_sae.cli", "validate", "--config", str(config)]
        + ["--ckpt_path", "evil.ckpt"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert not marker.exists(), "the checkpoint's _class_path was imported"
    assert result.returncode != 0
    assert "payload.Evil" in result.stderr and "Traceback" not in result.stderr


def test_pkg_model_spec_is_resolved_without_running_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_sae.data.lm import resolve_model_path

    package = tmp_path / "shipped_model"
    (package / "model").mkdir(parents=True)
    marker = tmp_path / "imported"
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert Path(resolve_model_path("pkg:shipped_model")) == package / "model"
    assert not marker.exists()
    with pytest.raises(ValueError, match="top-level package name"):
        resolve_model_path("pkg:shipped_model.sub")


class _Payload:
    """Unpickles into a call that writes a marker file: what a hostile pickle could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_a_sharded_checkpoint_folder_cannot_run_code_through_its_dcp_metadata(
    tmp_path: Path,
) -> None:
    """torch's distributed checkpoint reads a folder's ``.metadata`` with plain pickle: a
    downloaded sharded folder must be refused before that, by export and by resume alike."""
    import pickle

    from lightning_sae.parallel import consolidate_checkpoint

    folder, marker = tmp_path / "sharded", tmp_path / "ran"
    folder.mkdir()
    torch.save({"state_dict": {}, "hyper_parameters": {}}, folder / "meta.pt")
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match="refused"):
        export_checkpoint(folder, tmp_path / "out")
    with pytest.raises(ValueError, match="refused"):
        consolidate_checkpoint(folder)
    assert not marker.exists()


# ----------------------------------------------------------------------------- sharded folders
def _dcp_save(folder: Path, entries: dict) -> Path:
    """A distributed-checkpoint folder of ``entries`` written by this one process; a value
    that is not a tensor is stored as bytes (torch's ``BytesStorageMetadata``), pickled."""
    import torch.distributed.checkpoint as dcp

    dcp.save(entries, checkpoint_id=folder, no_dist=True)
    return folder


def test_a_sharded_folder_with_a_bytes_entry_cannot_run_code_on_export(tmp_path: Path) -> None:
    """The index can be clean and still point at a bytes entry, which torch's planner
    unpickles with weights_only=False: ``export`` must refuse the folder first."""
    from lightning_sae.cli import main
    from lightning_sae.models import class_path_of
    from lightning_sae.parallel import consolidate_checkpoint

    marker, sae = tmp_path / "ran", _trained_sae()
    folder = _dcp_save(
        tmp_path / "sharded", {"state_dict": sae.state_dict(), "x": _Payload(marker)}
    )
    hparams = {**dict(sae.hparams), "_class_path": class_path_of(StandardSAE)}
    torch.save({"hyper_parameters": hparams}, folder / "meta.pt")
    with pytest.raises(SystemExit) as refused:
        main(["export", "--ckpt_path", str(folder), "--out", str(tmp_path / "out")])
    first_line = str(refused.value.code).splitlines()[0]
    assert first_line.startswith("error: ") and str(folder) in first_line
    assert "'x'" in first_line and "bytes" in first_line
    with pytest.raises(ValueError, match="stored as bytes"):
        consolidate_checkpoint(folder)
    assert not marker.exists(), "the folder's bytes entry was unpickled"
    assert not (tmp_path / "out").exists()


def _rewritten(source: Path, folder: Path, change: Callable[[dict], None]) -> Path:
    """A copy of the sharded checkpoint ``source`` with ``change`` applied to its entries."""
    import shutil

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(source, folder.with_suffix(".pt"))
    entries = torch.load(folder.with_suffix(".pt"), weights_only=True)
    change(entries)
    _dcp_save(folder, entries)
    shutil.copy(source / "meta.pt", folder / "meta.pt")
    return folder


@contextlib.contextmanager
def _process_group_of_this_test() -> Iterator[None]:
    """A one-process latent-parallel fit initialises torch.distributed and exports its
    environment variables; both are undone so that later tests start clean."""
    import torch.distributed as dist

    environment = dict(os.environ)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(environment)


def test_a_sharded_resume_refuses_bytes_entries_and_missing_tensors(tmp_path: Path) -> None:
    """A sharded resume loads through ``dcp.load``: a bytes entry in place of W_dec ran its
    payload and left the live W_dec untouched (the run went on silently); a folder without
    W_dec must be refused too, naming the tensor."""
    sys.path.insert(0, str(Path(__file__).parent))
    import sharded_run

    run = {"model": "lightning_sae.models.topk.TopKSAE", "kwargs": {"k": 4}, "checkpoint": True}
    marker = tmp_path / "ran"

    def replace_w_dec(entries: dict) -> None:
        entries["state_dict"]["W_dec"] = _Payload(marker)

    def drop_w_dec(entries: dict) -> None:
        del entries["state_dict"]["W_dec"]

    with _process_group_of_this_test():
        sharded_run.fit(run, tmp_path / "run", 1, 1, 2, 2)
        checkpoint = tmp_path / "run" / "ckpt" / "last.ckpt"
        sharded_run.fit(run, tmp_path / "resumed", 1, 1, 3, 2, str(checkpoint))  # a clean one
        hostile = _rewritten(checkpoint, tmp_path / "bytes", replace_w_dec)
        with pytest.raises(ValueError, match=r"'state_dict\.W_dec'\] are stored as bytes"):
            sharded_run.fit(run, tmp_path / "resumed-bytes", 1, 1, 3, 2, str(hostile))
        assert not marker.exists(), "the resume unpickled the folder's bytes entry"
        missing = _rewritten(checkpoint, tmp_path / "missing", drop_w_dec)
        with pytest.raises(ValueError, match=r"lacks .*state_dict\.W_dec"):
            sharded_run.fit(run, tmp_path / "resumed-missing", 1, 1, 3, 2, str(missing))


# ----------------------------------------------------------------------------- bounded reads
def _link_to_dev_zero(path: Path) -> Path:
    path.unlink(missing_ok=True)
    path.symlink_to("/dev/zero")
    return path


def _cache_root(tmp_path: Path) -> Path:
    from lightning_sae.data.cache import hook_folder

    root = tmp_path / "cache"
    hook_folder(root, "blocks.0.hook_resid_post").mkdir(parents=True)
    return root


def _export_folder(tmp_path: Path) -> Path:
    return export_sae(_trained_sae(), tmp_path / "sae")


def _read_tokens_json(tmp_path: Path) -> tuple[Path, Callable[[], object]]:
    from lightning_sae.data.cache import CacheBuilder, CacheLayout

    root = _cache_root(tmp_path)
    layout = CacheLayout(n_windows=2, n_train_windows=1, context_size=4, first_position=0,
                         shard_contexts=1)  # fmt: skip
    builder = CacheBuilder(root, {"model": "m"}, layout, ["blocks.0.hook_resid_post"], "float32", 1)
    return _link_to_dev_zero(root / "tokens.json"), builder.check_existing


def _read_manifest(tmp_path: Path) -> tuple[Path, Callable[[], object]]:
    from lightning_sae.data.cache import hook_folder, open_hook_cache

    root, hook = _cache_root(tmp_path), "blocks.0.hook_resid_post"
    path = _link_to_dev_zero(hook_folder(root, hook) / "manifest.json")
    return path, lambda: open_hook_cache(root, hook, None)


def _read_cfg_json(tmp_path: Path) -> tuple[Path, Callable[[], object]]:
    folder = _export_folder(tmp_path)
    return _link_to_dev_zero(folder / CONFIG_FILENAME), lambda: load(folder)


def _read_weights(tmp_path: Path) -> tuple[Path, Callable[[], object]]:
    from lightning_sae.io import WEIGHTS_FILENAME

    folder = _export_folder(tmp_path)
    return _link_to_dev_zero(folder / WEIGHTS_FILENAME), lambda: load(folder)


def _read_checkpoint(tmp_path: Path) -> tuple[Path, Callable[[], object]]:
    path = _link_to_dev_zero(tmp_path / "model.ckpt")
    return path, lambda: export_checkpoint(path, tmp_path / "out")


def _read_inspection(tmp_path: Path) -> tuple[Path, Callable[[], object]]:
    from lightning_sae.analysis.results import META_FILENAME, load_inspection

    return _link_to_dev_zero(tmp_path / META_FILENAME), lambda: load_inspection(tmp_path)


@pytest.mark.parametrize(
    "attack",
    [
        _read_tokens_json,
        _read_manifest,
        _read_cfg_json,
        _read_weights,
        _read_checkpoint,
        _read_inspection,
    ],  # fmt: skip
    ids=["tokens.json", "manifest.json", "cfg.json", "weights", "checkpoint", "inspect.json"],
)
def test_a_file_linked_to_dev_zero_is_refused_by_name(
    tmp_path: Path, attack: Callable[[Path], tuple[Path, Callable[[], object]]]
) -> None:
    """Read whole, a file that is a link to /dev/zero grows memory until the machine kills the
    process: every file of a cache, export or checkpoint is read only if it is a regular file."""
    path, read = attack(tmp_path)
    with pytest.raises(ValueError, match="not a regular file") as refused:
        read()
    assert str(path) in str(refused.value)


def test_an_oversized_cfg_json_is_refused_before_it_is_read(tmp_path: Path) -> None:
    from lightning_sae.files import JSON_LIMIT

    folder = _export_folder(tmp_path)
    with open(folder / CONFIG_FILENAME, "r+b") as file:
        file.truncate(JSON_LIMIT + 1)  # sparse: no disk used
    with pytest.raises(ValueError, match=f"{folder / CONFIG_FILENAME} is .* larger than"):
        load(folder)


def test_read_bounded_reads_regular_files_only_and_up_to_its_limit(tmp_path: Path) -> None:
    from lightning_sae.files import UnreadableFileError, read_bounded

    (tmp_path / "small").write_bytes(b"12345")
    assert read_bounded(tmp_path / "small", limit=5) == b"12345"
    with pytest.raises(UnreadableFileError, match=f"{tmp_path / 'small'} is 5 bytes"):
        read_bounded(tmp_path / "small", limit=4)
    os.mkfifo(tmp_path / "fifo")  # opening it for reading would wait for a writer
    with pytest.raises(UnreadableFileError, match="not a regular file .*a FIFO"):
        read_bounded(tmp_path / "fifo")
    with pytest.raises(UnreadableFileError, match="not a regular file .*a folder"):
        read_bounded(tmp_path)


def test_a_sharded_folder_with_a_short_or_linked_shard_file_is_refused(tmp_path: Path) -> None:
    """torch reads the byte ranges its index names: a shard file cut short, or a link to
    /dev/zero, is refused by name first."""
    from lightning_sae.parallel import consolidate_checkpoint

    folder = _dcp_save(tmp_path / "sharded", {"state_dict": _trained_sae().state_dict()})
    torch.save({"hyper_parameters": {}}, folder / "meta.pt")
    (shard,) = folder.glob("*.distcp")
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(ValueError, match=f"{shard} is truncated"):
        consolidate_checkpoint(folder)
    _link_to_dev_zero(shard)
    with pytest.raises(ValueError, match=f"{shard} is not a regular file"):
        consolidate_checkpoint(folder)

"""SAEs on the Hugging Face Hub, without a network: ``hf://`` paths and ``lightning-sae push``.

Each repo is placed in a temporary ``huggingface_hub`` cache in the library's real layout
(``models--org--name/{blobs, refs/<revision>, snapshots/<commit>/...}``, blobs named by their git
hash, snapshot files linking to them, and the per-commit file list the library writes) with
``HF_HUB_OFFLINE`` on, and read through ``huggingface_hub.snapshot_download`` itself. The weights
are written by hand in SAELens's and sparsify's layouts from known tensors, and the loaded SAE is
checked against the formula each peer computes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import httpx2
import huggingface_hub
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache
from safetensors.torch import save, save_file
from torch import Tensor

from lightning_sae.hub import HubError, list_saes, parse
from lightning_sae.io import load, sae_metadata
from lightning_sae.publish import push_main

D_IN, D_SAE, K = 6, 16, 3
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


# ----------------------------------------------------------------------------- the cache
@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hub cache, offline. huggingface_hub reads its environment once, at import, so
    its constants are set here as the environment would have set them."""
    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    for name, value in {
        "HF_HOME": cache.parent,
        "HF_HUB_CACHE": cache,
        "HF_HUB_OFFLINE": "1",
    }.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def put_snapshot(
    cache: Path,
    repo_id: str,
    files: dict[str, bytes],
    commit: str = COMMIT_A,
    revision: str | None = "main",
    listed: bool = True,
) -> Path:
    """``files`` as the snapshot of ``repo_id`` at ``commit`` (``revision`` pointing at it), as
    snapshot_download leaves them; ``listed``: with the repo's file list cached too."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    entries = {}
    for name, content in files.items():
        blob_id = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
        blob = storage / "blobs" / blob_id
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        entries[name] = TreeCacheEntry(size=len(content), blob_id=blob_id)
    if revision is not None:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / revision).write_text(commit)
    if listed:
        write_tree_cache(str(storage), commit, entries)
    return snapshot


def tensors(seed: int, **shapes: tuple[int, ...]) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def inputs(n: int = 32) -> Tensor:
    return 3 * torch.randn(n, D_IN, generator=torch.Generator().manual_seed(9)) + 1


def saelens_files(prefix: str, cfg: dict[str, Any], weights: dict[str, Tensor]) -> dict:
    return {
        f"{prefix}cfg.json": json.dumps(cfg).encode(),
        f"{prefix}sae_weights.safetensors": save(weights),
    }


def sparsify_files(prefix: str, cfg: dict[str, Any], weights: dict[str, Tensor]) -> dict:
    return {
        f"{prefix}cfg.json": json.dumps(cfg).encode(),
        f"{prefix}sae.safetensors": save(weights),
    }


def topk_dense(pre: Tensor, k: int) -> Tensor:
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values)


# ----------------------------------------------------------------------------- SAELens layout
STANDARD = tensors(1, W_enc=(D_IN, D_SAE), b_enc=(D_SAE,), W_dec=(D_SAE, D_IN), b_dec=(D_IN,))
TOPK = tensors(2, W_enc=(D_IN, D_SAE), b_enc=(D_SAE,), W_dec=(D_SAE, D_IN), b_dec=(D_IN,))
# SAELens 5.x (most releases on the Hub): hook_point, activation_fn_str, TopK as a kwarg.
OLD_STANDARD_CFG = {
    "architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "activation_fn_str": "relu",
    "apply_b_dec_to_input": True, "hook_point": "blocks.0.hook_resid_pre", "model_name": "gpt2",
    "normalize_activations": "none", "dataset_path": "Skylion007/openwebtext", "context_size": 128,
}  # fmt: skip
OLD_TOPK_CFG = {
    "d_in": D_IN, "d_sae": D_SAE, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K},
    "apply_b_dec_to_input": False, "hook_name": "blocks.1.hook_resid_pre", "model_name": "gpt2",
    "normalize_activations": None, "sae_lens_version": "3.13.0",
}  # fmt: skip


@pytest.fixture
def release(hub_cache: Path) -> Path:
    files = saelens_files("blocks.0.hook_resid_pre/", OLD_STANDARD_CFG, STANDARD)
    files |= saelens_files("blocks.1.hook_resid_pre/", OLD_TOPK_CFG, TOPK)
    files["README.md"] = b"# a release\n"
    return put_snapshot(hub_cache, "org/release", files)


def test_saelens_release_loads_through_the_hub_cache_as_saelens_computes_it(release: Path) -> None:
    x = inputs()
    standard = load("hf://org/release/blocks.0.hook_resid_pre")
    w = STANDARD
    acts = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])  # apply_b_dec_to_input
    with torch.no_grad():
        torch.testing.assert_close(standard.encode(x), acts)
        torch.testing.assert_close(standard.decode(acts), acts @ w["W_dec"] + w["b_dec"])
    # TopK was activation_fn "topk" with k in activation_fn_kwargs, under "standard".
    topk = load("hf://org/release/blocks.1.hook_resid_pre")
    assert type(topk).__name__ == "TopKSAE" and topk.k == K
    w = TOPK
    acts = torch.relu(topk_dense(x @ w["W_enc"] + w["b_enc"], K))
    with torch.no_grad():
        torch.testing.assert_close(topk.encode(x), acts)
        torch.testing.assert_close(topk.decode(acts), acts @ w["W_dec"] + w["b_dec"])
    metadata = sae_metadata("hf://org/release/blocks.0.hook_resid_pre")
    assert metadata["hook_name"] == "blocks.0.hook_resid_pre" and metadata["model_name"] == "gpt2"
    assert metadata["dataset_path"] == "Skylion007/openwebtext"


def test_a_repo_of_several_saes_lists_them_in_one_line(release: Path) -> None:
    with pytest.raises(HubError) as raised:
        load("hf://org/release")
    message = str(raised.value)
    assert "\n" not in message
    assert (
        "holds 2 SAEs" in message and "blocks.0.hook_resid_pre, blocks.1.hook_resid_pre" in message
    )
    assert "Pick one: hf://org/release/blocks.0.hook_resid_pre" in message
    with pytest.raises(HubError, match="not an SAE folder.*blocks.1.hook_resid_pre"):
        load("hf://org/release/blocks.7")
    # Without the cached file list, the folders of the snapshot are listed.
    assert list_saes(parse("hf://org/release"), release) == [
        "blocks.0.hook_resid_pre",
        "blocks.1.hook_resid_pre",
    ]


def test_revisions_by_branch_tag_and_commit(hub_cache: Path) -> None:
    cfg = {**OLD_STANDARD_CFG, "sae_lens_version": "6.5.0"}
    later = tensors(3, W_enc=(D_IN, D_SAE), b_enc=(D_SAE,), W_dec=(D_SAE, D_IN), b_dec=(D_IN,))
    put_snapshot(hub_cache, "org/versions", saelens_files("sae/", cfg, STANDARD), COMMIT_A)
    put_snapshot(hub_cache, "org/versions", saelens_files("sae/", cfg, later), COMMIT_B, "v2")
    for path, expected in [
        ("hf://org/versions/sae", STANDARD),
        ("hf://org/versions/sae@v2", later),  # subfolder first, as lightning-sae writes it
        ("hf://org/versions@v2/sae", later),  # huggingface_hub's own order
        (f"hf://org/versions/sae@{COMMIT_A}", STANDARD),
    ]:
        assert torch.equal(load(path).W_enc, expected["W_enc"]), path
    with pytest.raises(HubError, match="has no cached 'v3'.*HF_HUB_OFFLINE is set"):
        load("hf://org/versions/sae@v3")


def test_a_repo_missing_offline_is_one_line_naming_the_alternatives(hub_cache: Path) -> None:
    with pytest.raises(HubError) as raised:
        load("hf://org/absent/layers.3")
    message = str(raised.value)
    assert "\n" not in message
    assert "hf://org/absent/layers.3 has no cached copy" in message
    assert "HF_HUB_OFFLINE is set" in message
    assert "pass a local folder instead" in message
    assert "hf download org/absent --include 'layers.3/*' --local-dir DIR" in message
    assert "or unset HF_HUB_OFFLINE to fetch it" in message
    # The cached file list says the weights exist, but they were never fetched.
    files = saelens_files("sae/", OLD_STANDARD_CFG, STANDARD)
    snapshot = put_snapshot(hub_cache, "org/partial", files)
    (snapshot / "sae" / "sae_weights.safetensors").unlink()
    with pytest.raises(HubError, match="has no cached copy.*pass a local folder"):
        load("hf://org/partial/sae")
    for bad in ("hf://org", "hf://datasets/org/data/sae"):
        with pytest.raises(HubError, match=r"hf://org/repo\[/subfolder\]"):
            load(bad)


# ----------------------------------------------------------------------------- sparsify layout
SPARSIFY_CFG = {
    "activation": "topk", "expansion_factor": 32, "normalize_decoder": True,
    "num_latents": D_SAE, "k": K, "multi_topk": False, "skip_connection": False,
    "transcode": False, "d_in": D_IN,
}  # fmt: skip
SPARSIFY = tensors(
    4, **{"encoder.weight": (D_SAE, D_IN), "encoder.bias": (D_SAE,)}, W_dec=(D_SAE, D_IN),
    b_dec=(D_IN,),
)  # fmt: skip
SKIP = tensors(5, W_skip=(D_IN, D_IN))["W_skip"]


@pytest.mark.parametrize(
    ("folder", "transcode", "skip"),
    [("layers.2", False, False), ("layers.2.mlp", True, True), ("layers.3", False, True)],
    ids=["sae", "skip-transcoder", "sae-with-skip"],
)
def test_sparsify_coders_compute_what_sparsify_computes(
    hub_cache: Path, folder: str, transcode: bool, skip: bool
) -> None:
    cfg = {**SPARSIFY_CFG, "transcode": transcode, "skip_connection": skip}
    weights = SPARSIFY | ({"W_skip": SKIP} if skip else {})
    files = sparsify_files(f"{folder}/", cfg, weights)
    run = {
        "model": "EleutherAI/pythia-70m",
        "dataset": "EleutherAI/SmolLM2-135M-10B",
        "ctx_len": 2048,
    }
    files["config.json"] = json.dumps(run).encode()
    put_snapshot(hub_cache, "EleutherAI/sae-test", files)

    sae = load(f"hf://EleutherAI/sae-test/{folder}")
    x = inputs()
    # sparsify: topk(relu(W (x - b_dec) + b)) (a transcoder does not subtract b_dec), then
    # acts @ W_dec + b_dec, plus x @ W_skip^T with a skip connection.
    shifted = x if transcode else x - weights["b_dec"]
    acts = topk_dense(
        torch.relu(shifted @ weights["encoder.weight"].T + weights["encoder.bias"]), K
    )
    x_hat = acts @ weights["W_dec"] + weights["b_dec"]
    if skip:
        x_hat = x_hat + x @ weights["W_skip"].T
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), acts)
        torch.testing.assert_close(sae(x).x_hat, x_hat)
    metadata = sae_metadata(f"hf://EleutherAI/sae-test/{folder}")
    assert metadata["hook_name"] == folder and metadata["model_name"] == "EleutherAI/pythia-70m"
    assert metadata["context_size"] == 2048


def test_export_and_compare_take_a_hub_path(
    hub_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_sae.cli import main

    files = sparsify_files("layers.2/", SPARSIFY_CFG, SPARSIFY)
    put_snapshot(hub_cache, "EleutherAI/sae-test", files)
    out = tmp_path / "exported"
    main(["export", "--ckpt_path", "hf://EleutherAI/sae-test/layers.2", "--out", str(out)])
    assert "sae_weights.safetensors" in capsys.readouterr().out
    # Now in SAELens's layout: the same SAE.
    exported, original = load(out), load("hf://EleutherAI/sae-test/layers.2")
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(exported(x).x_hat, original(x).x_hat)
    assert sae_metadata(out)["hook_name"] == "layers.2"
    # The repo's only SAE needs no subfolder.
    assert torch.equal(load("hf://EleutherAI/sae-test").W_dec, original.W_dec)

    from lightning_sae.analysis.inspector import load_saes
    from lightning_sae.metrics.similarity import load_sae_weights

    ((inspected, metadata),) = load_saes("hf://EleutherAI/sae-test/layers.2").values()
    assert metadata["hook_name"] == "layers.2" and torch.equal(inspected.W_dec, original.W_dec)

    from_hub = load_sae_weights("hf://EleutherAI/sae-test/layers.2")
    assert torch.equal(from_hub["W_dec"], SPARSIFY["W_dec"])
    assert torch.equal(from_hub["W_enc"], SPARSIFY["encoder.weight"].T)


# ----------------------------------------------------------------------------- push
def _checkpoint(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """A Lightning checkpoint of a trained-looking TopKSAE in its run folder, with what a fit
    records: the class, the data's hyperparameters, the tokens seen, the run folder, and the
    run's final table and config."""
    from lightning_sae.models.topk import TopKSAE

    sae = TopKSAE(d_in=D_IN, d_sae=D_SAE, k=K, normalize_activations=True)
    sae.fit_input_scale(inputs() * 5)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "csv" / "version_0").mkdir(parents=True)
    (run / "csv" / "version_0" / "config.yaml").write_text("model:\n  class_path: TopKSAE\n")
    (run / "final_metrics.txt").write_text("final metrics\nFVU   0.1234\n")
    ckpt = run / "checkpoints" / "last.ckpt"
    hparams = {"_class_path": "lightning_sae.models.topk.TopKSAE", **dict(sae.hparams)}
    torch.save(
        {
            "state_dict": sae.state_dict(),
            "hyper_parameters": hparams,
            "datamodule_hyper_parameters": {
                "model": "pythia-70m",
                "hook": "blocks.3.hook_resid_post",
                "dataset": "NeelNanda/pile-10k",
            },
            "callbacks": {"TokenThroughput": {"tokens": 123456}},
            "global_step": 40,
            "run": {"run_dir": str(run), "log_version": 0},
        },
        ckpt,
    )
    return ckpt, sae.eval()


def test_push_dry_run_writes_the_folder_and_card_which_load_back_from_the_hub(
    hub_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, sae = _checkpoint(tmp_path)
    out = tmp_path / "upload"
    push_main(
        [
            "--ckpt_path",
            str(ckpt),
            "--repo",
            "me/saes",
            "--subfolder",
            "topk-l3",
            "--dry-run",
            "--out",
            str(out),
        ]
    )
    assert "nothing uploaded" in capsys.readouterr().out
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == ["topk-l3/README.md", "topk-l3/cfg.json", "topk-l3/sae_weights.safetensors"]
    card = (out / "topk-l3" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: lightning-sae\n")
    for line in (
        "# TopKSAE (`topk`, k=3) on pythia-70m, blocks.3.hook_resid_post",
        "| hook | blocks.3.hook_resid_post |",
        "| dataset | NeelNanda/pile-10k |",
        "| tokens trained | 123,456 |",
        'sae = lightning_sae.load("hf://me/saes/topk-l3")',
        "final metrics\nFVU   0.1234\n```",  # the run's table, as it printed it
        "```yaml\nmodel:\n  class_path: TopKSAE\n```",
    ):
        assert line in card, card
    # The folder as the Hub would serve it: the same SAE (input scale folded in).
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    put_snapshot(hub_cache, "me/saes", files)
    loaded = load("hf://me/saes/topk-l3")
    x = inputs() * 5
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), sae.encode(x))
        torch.testing.assert_close(loaded(x).x_hat, sae(x).x_hat)
    with pytest.raises(SystemExit, match="--out"):
        push_main(["--ckpt_path", str(ckpt), "--repo", "me/saes", "--dry-run"])
    with pytest.raises(SystemExit, match="already holds an SAE.*--overwrite"):
        push_main(
            [
                "--ckpt_path",
                str(ckpt),
                "--repo",
                "me/saes",
                "--subfolder",
                "topk-l3",
                "--dry-run",
                "--out",
                str(out),
            ]
        )


class RecordingHubApi:
    """Stands in for huggingface_hub.HfApi: records the calls push makes, and the folder's files
    at upload time (the folder is temporary)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id: str, **kwargs: Any) -> None:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def create_branch(self, repo_id: str, **kwargs: Any) -> None:
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs: Any) -> huggingface_hub.CommitInfo:
        folder = Path(kwargs["folder_path"])
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        self.calls.append(("upload_folder", {**kwargs, "files": files}))
        return huggingface_hub.CommitInfo(
            commit_url="https://huggingface.co/me/saes/commit/" + COMMIT_B,
            commit_message=kwargs["commit_message"], commit_description="", oid=COMMIT_B,
        )  # fmt: skip


def test_push_creates_the_repo_and_uploads_the_folder_in_one_commit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, _ = _checkpoint(tmp_path)
    api = RecordingHubApi()
    push_main(
        ["--ckpt_path", str(ckpt), "--repo", "me/saes", "--subfolder", "l3", "--private",
         "--revision", "dev", "--commit-message", "first SAE"],
        api=api,
    )  # fmt: skip
    names = [name for name, _ in api.calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    create, branch, upload = (kwargs for _, kwargs in api.calls)
    assert create == {"repo_id": "me/saes", "repo_type": "model", "private": True, "exist_ok": True}
    assert branch["branch"] == "dev" and branch["exist_ok"] is True
    assert upload["repo_id"] == "me/saes" and upload["revision"] == "dev"
    assert upload["commit_message"] == "first SAE"
    assert upload["files"] == ["l3/README.md", "l3/cfg.json", "l3/sae_weights.safetensors"]
    printed = capsys.readouterr().out
    assert (
        "commit/" + COMMIT_B in printed and "lightning_sae.load('hf://me/saes/l3@dev')" in printed
    )


def test_push_of_an_export_folder_copies_it_and_a_failed_upload_is_one_line(
    tmp_path: Path,
) -> None:
    from huggingface_hub.errors import HfHubHTTPError

    sparsify = tmp_path / "layers.2"
    sparsify.mkdir()
    save_file(SPARSIFY, str(sparsify / "sae.safetensors"))
    (sparsify / "cfg.json").write_text(json.dumps(SPARSIFY_CFG))
    out = tmp_path / "out"
    push_main(["--ckpt_path", str(sparsify), "--repo", "me/saes", "--dry-run", "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "cfg.json",
        "sae_weights.safetensors",
    ]
    assert "| hook | layers.2 |" in (out / "README.md").read_text()
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(load(out)(x).x_hat, load(sparsify)(x).x_hat)

    class Refusing(RecordingHubApi):
        def create_repo(self, repo_id: str, **kwargs: Any) -> None:
            request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
            response = httpx2.Response(401, request=request)
            raise HfHubHTTPError("401 Client Error: Unauthorized", response=response)

    with pytest.raises(SystemExit) as raised:
        push_main(["--ckpt_path", str(out), "--repo", "me/saes"], api=Refusing())
    assert "hf auth login" in str(raised.value) and "\n" not in str(raised.value)


TOKEN_THROUGHPUT = "lightning_sae.callbacks.lifecycle.TokenThroughput"


@pytest.fixture
def one_thread() -> Any:
    # Small shapes: a second thread only adds synchronisation on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_fit_pushed_then_validated_from_the_hub_gives_the_runs_final_metrics(
    one_thread: None,
    hub_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """fit keeps its printed table in the run folder; push puts it in the card; validate takes the
    pushed SAE by its hf:// path and measures what the fit measured."""
    from test_lifecycle import SMALL, cli

    monkeypatch.chdir(tmp_path)
    tiny = [
        *("--model.init_args.d_in", "16", "--model.init_args.d_sae", "32"),
        *("--data.init_args.d_in", "16", "--data.init_args.n_features", "32"),
    ]
    steps = ["--trainer.max_steps", "3", "--trainer.val_check_interval", "3"]
    # No figures (seconds of matplotlib); the token count the card reports is still kept.
    counted = ["--default_callbacks", "false", "--trainer.callbacks+", TOKEN_THROUGHPUT]
    fitted = cli("fit", *SMALL, *tiny, *steps, *counted)
    printed = capsys.readouterr().out
    run = tmp_path / "runs" / "toy-standard"
    table = (run / "final_metrics.txt").read_text()
    assert table.startswith("final metrics") and table.strip() in printed

    out = tmp_path / "upload"
    ckpt = run / "checkpoints" / "last.ckpt"
    push_main(
        [
            "--ckpt_path",
            str(ckpt),
            "--repo",
            "me/toy",
            "--subfolder",
            "standard",
            "--dry-run",
            "--out",
            str(out),
        ]
    )
    card = (out / "standard" / "README.md").read_text()
    assert table.strip() in card
    assert "| tokens trained | 192 |" in card  # 3 steps of 64 rows
    assert "class_path: lightning_sae.models.standard.StandardSAE" in card  # the saved config
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    put_snapshot(hub_cache, "me/toy", files)
    capsys.readouterr()
    hub_path = "hf://me/toy/standard"
    validated = cli(
        "validate", *SMALL, *tiny, "--default_callbacks", "false", "--ckpt_path", hub_path
    )
    assert f"checkpoint          {hub_path}" in capsys.readouterr().out  # not the cache's path
    for key in ("val/fvu", "val/l0", "val/dead_fraction"):
        torch.testing.assert_close(
            validated.trainer.callback_metrics[key], fitted.trainer.callback_metrics[key]
        )

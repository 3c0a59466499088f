"""CE loss recovered, KL and final-hidden-state metrics with an SAE spliced into a real bridge."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from lightning_sae.metrics.downstream import ENCODER_ONLY_NOTE, downstream_metrics

HOOK = "blocks.1.hook_resid_post"
VOCAB = 97


def _config() -> GPTNeoXConfig:
    # A larger initializer range than HF's 0.02 so that the random model's predictions are far
    # from uniform and ablating a layer changes the loss by a measurable amount.
    return GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=0.3,
    )


@pytest.fixture(scope="module")
def models() -> tuple[object, GPTNeoXForCausalLM]:
    """A config-built GPT-NeoX bridge and an untouched HF copy of the same weights."""
    torch.manual_seed(0)
    cfg = _config()
    hf = GPTNeoXForCausalLM(cfg).eval()
    reference = GPTNeoXForCausalLM(cfg).eval()
    reference.load_state_dict(hf.state_dict())
    bridge = build_bridge_from_module(hf, "GPTNeoXForCausalLM", hf_config=cfg)
    return bridge, reference


@pytest.fixture(scope="module")
def tokens(models) -> Tensor:
    """Text the model itself writes (sampled), so its clean predictions beat an ablated model's."""
    _, reference = models
    generator = torch.Generator().manual_seed(1)
    sequence = torch.randint(0, VOCAB, (6, 1), generator=generator)
    with torch.no_grad():
        for _ in range(23):
            probs = reference(sequence).logits[:, -1].softmax(-1)
            sequence = torch.cat([sequence, torch.multinomial(probs, 1, generator=generator)], 1)
    return sequence


def _shrink_and_rotate(x: Tensor) -> Tensor:
    """A lossy stand-in for an SAE: a deterministic, imperfect reconstruction."""
    return 0.7 * x + 0.3 * x.roll(1, dims=-1)


def test_identity_sae_recovers_all_of_the_loss(models, tokens) -> None:
    bridge, _ = models
    result = downstream_metrics(bridge, HOOK, lambda x: x, tokens, batch_size=4)
    assert result.ce_zero > result.ce_clean + 0.05  # ablation must matter for the test to mean much
    assert result.ce_loss_recovered == pytest.approx(1.0, abs=1e-6)
    assert result.kl == pytest.approx(0.0, abs=1e-6)
    assert result.final_hidden_cosine == pytest.approx(1.0, abs=1e-6)
    assert result.final_hidden_rel_mse == pytest.approx(0.0, abs=1e-10)


def test_zero_sae_recovers_none_of_the_loss(models, tokens) -> None:
    bridge, _ = models
    result = downstream_metrics(bridge, HOOK, torch.zeros_like, tokens, batch_size=4)
    assert result.ce_loss_recovered == pytest.approx(0.0, abs=1e-6)
    assert result.ce_sae == pytest.approx(result.ce_zero)
    assert result.kl > 0


@pytest.mark.parametrize("first_position", [0, 12])
def test_lossy_sae_matches_splicing_into_the_hf_model_directly(
    models, tokens, first_position: int
) -> None:
    """CE and KL agree with an independent computation: a torch hook on the HF layer output."""
    bridge, reference = models
    result = downstream_metrics(
        bridge, HOOK, _shrink_and_rotate, tokens, batch_size=4, first_position=first_position
    )

    def hf_logits(replace=None) -> Tensor:
        def hook(module, inputs, out: Tensor) -> Tensor:
            return torch.cat([out[:, :first_position], replace(out[:, first_position:])], 1)

        handle = reference.gpt_neox.layers[1].register_forward_hook(hook) if replace else None
        try:
            with torch.no_grad():
                return reference(tokens).logits
        finally:
            if handle:
                handle.remove()

    clean, spliced, zero = hf_logits(), hf_logits(_shrink_and_rotate), hf_logits(torch.zeros_like)

    def ce(logits: Tensor) -> float:
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).item()

    expected_recovered = (ce(zero) - ce(spliced)) / (ce(zero) - ce(clean))
    # KL is averaged over the positions the SAE replaces: earlier ones are untouched (KL 0) and
    # would only dilute it.
    spliced_positions = tokens[:, first_position:].numel()
    expected_kl = (
        F.kl_div(
            spliced[:, first_position:].log_softmax(-1),
            clean[:, first_position:].log_softmax(-1),
            log_target=True,
            reduction="sum",
        ).item()
        / spliced_positions
    )
    assert result.ce_clean == pytest.approx(ce(clean), rel=1e-5)
    assert result.ce_sae == pytest.approx(ce(spliced), rel=1e-5)
    assert result.ce_zero == pytest.approx(ce(zero), rel=1e-5)
    assert result.ce_loss_recovered == pytest.approx(expected_recovered, rel=1e-4)
    assert 0 < result.ce_loss_recovered < 1
    assert result.kl == pytest.approx(expected_kl, rel=1e-4)
    log = result.to_log_dict()
    assert log["downstream/ce_loss_recovered"] == result.ce_loss_recovered
    assert log["downstream/kl"] == result.kl


def test_splice_at_the_last_layer_shows_in_the_final_hidden_state(models, tokens) -> None:
    bridge, reference = models
    result = downstream_metrics(
        bridge, "blocks.2.hook_resid_post", _shrink_and_rotate, tokens, batch_size=4
    )
    # The last block's output, before the final layer norm (hidden_states[-1] is after it).
    captured: list[Tensor] = []
    handle = reference.gpt_neox.layers[2].register_forward_hook(
        lambda m, i, out: captured.append(out)
    )
    with torch.no_grad():
        reference(tokens)
    handle.remove()
    clean = captured[0]
    spliced = _shrink_and_rotate(clean)
    expected_cos = F.cosine_similarity(spliced, clean, dim=-1).mean().item()
    expected_rel = ((spliced - clean).pow(2).sum() / clean.pow(2).sum()).item()
    assert result.final_hidden_cosine == pytest.approx(expected_cos, rel=1e-5)
    assert result.final_hidden_rel_mse == pytest.approx(expected_rel, rel=1e-4)


def test_bad_input_is_named(models, tokens) -> None:
    bridge, _ = models
    with pytest.raises(ValueError, match="unknown hook point"):
        downstream_metrics(bridge, "blocks.9.hook_resid_post", lambda x: x, tokens)
    with pytest.raises(ValueError, match="n_windows, context"):
        downstream_metrics(bridge, HOOK, lambda x: x, tokens[0])
    with pytest.raises(ValueError, match="first_position"):
        downstream_metrics(bridge, HOOK, lambda x: x, tokens, first_position=tokens.shape[1])


def test_encoder_only_model_reports_hidden_state_metrics_and_says_why(tokens) -> None:
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    bridge = build_bridge_from_module(BertForMaskedLM(cfg).eval(), "BertForMaskedLM", hf_config=cfg)
    result = downstream_metrics(bridge, "blocks.0.hook_resid_post", _shrink_and_rotate, tokens)
    assert result.ce_loss_recovered is None and result.kl is None
    assert result.note == ENCODER_ONLY_NOTE
    assert 0 < result.final_hidden_cosine < 1
    assert result.final_hidden_rel_mse > 0
    assert set(result.to_log_dict()) == {
        "downstream/final_hidden_cosine",
        "downstream/final_hidden_rel_mse",
        "downstream/final_hidden_rel_mse_zero",
        "downstream/final_hidden_recovered",
    }
    assert result.final_hidden_recovered == pytest.approx(
        1 - result.final_hidden_rel_mse / result.final_hidden_rel_mse_zero
    )

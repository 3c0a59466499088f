"""A GPT-NeoX built from a config (no download) that the MiniLM tokenizer can drive: the causal
LM of the tests that need a real model's forward, splice or stream."""

from typing import Any


def tiny_neox(**overrides: Any) -> dict[str, Any]:
    """The config of a 2-layer, 32-wide GPT-NeoX over the MiniLM tokenizer's vocabulary;
    ``overrides`` change any field (e.g. ``num_hidden_layers=3``)."""
    return {
        "model_type": "gpt_neox",
        "vocab_size": 30522,  # the MiniLM tokenizer's vocabulary
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
        **overrides,
    }

"""The small Llama of the GPU tests: wide enough (512) for bf16 rounding to be realistic, 4 layers to compile fast."""

from __future__ import annotations

from typing import Any


def small_llama_config(**overrides: Any) -> Any:
    """A LlamaConfig: vocabulary 1024, hidden 512, MLP 1536, 4 layers, 8 heads (4 key/value); ``overrides`` added."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=1024,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        **overrides,
    )

"""P-tuning: virtual tokens from an MLP / LSTM prompt encoder; PEFT's P_TUNING format (encoder folded)."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from _prompt_family import check_peft_interop, check_training_and_round_trip, tiny_gpt2, tiny_llama
from safetensors.torch import load_file

from peftctl.adapters.core.model import get_adapted_model
from peftctl.adapters.core.registry import config_from_dict
from peftctl.errors import ConfigError


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_only_encoder_trains_and_round_trip(build, encoder: str, tmp_path: Path) -> None:
    values = {
        "method": "p_tuning",
        "num_virtual_tokens": 4,
        "encoder_reparameterization_type": encoder,
        "encoder_hidden_size": 16,
    }
    model = check_training_and_round_trip(build, values, tmp_path, lambda n: n.startswith("prompt_encoder.default."))
    head = "lstm_head" if encoder == "LSTM" else "mlp_head"
    assert any(head in n for n, _ in model.named_parameters())


def test_saved_tensor_is_the_encoder_output(tmp_path: Path) -> None:
    model = get_adapted_model(
        tiny_llama(), config_from_dict({"method": "p_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 16})
    )
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    encoder = model.prompt_encoder["default"]
    assert list(saved) == ["prompt_embeddings"]
    torch.testing.assert_close(
        saved["prompt_embeddings"], encoder.mlp_head(encoder.embedding.weight).detach(), rtol=0, atol=0
    )


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
def test_peft_interop_both_ways(encoder: str, tmp_path: Path) -> None:
    values = {
        "method": "p_tuning",
        "num_virtual_tokens": 4,
        "encoder_reparameterization_type": encoder,
        "encoder_hidden_size": 16,
    }
    config = peft.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_reparameterization_type=encoder, encoder_hidden_size=16
    )
    check_peft_interop(tiny_llama, values, config, tmp_path)


def test_generate_with_cache_equals_recompute() -> None:
    model = get_adapted_model(
        tiny_gpt2(), config_from_dict({"method": "p_tuning", "num_virtual_tokens": 3, "encoder_hidden_size": 16})
    )
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(
        model.generate(input_ids=ids, max_new_tokens=5),
        model.generate(input_ids=ids, max_new_tokens=5, use_cache=False),
    )


def test_bad_encoder_type_is_rejected() -> None:
    with pytest.raises(ConfigError, match="adapter.encoder_reparameterization_type='GRU'"):
        config_from_dict({"method": "p_tuning", "encoder_reparameterization_type": "GRU"})

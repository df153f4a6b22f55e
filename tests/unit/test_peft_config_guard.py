"""An adapter_config.json written by `peft` that switches on a PEFT feature peftctl does not implement
is refused with one line naming the field, instead of loading an adapter that computes something else;
PEFT's defaults for those features load as before."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peftctl.adapters.core.model import AdaptedModel
from peftctl.errors import ConfigError


def _tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=300,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )


@pytest.mark.parametrize(
    "option, value", [("lora_bias", True), ("trainable_token_indices", [1, 2]), ("use_qalora", True)]
)
def test_unimplemented_peft_option_is_refused_naming_the_field(option: str, value: object, tmp_path: Path) -> None:
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    peft.get_peft_model(_tiny(), config).save_pretrained(tmp_path)
    # the option is set in the file as peft would write it (some need layers this tiny model lacks)
    path = tmp_path / "adapter_config.json"
    values = json.loads(path.read_text())
    assert option in values and not values[option]  # peft writes the option, switched off by default
    values[option] = value
    path.write_text(json.dumps(values))
    with pytest.raises(ConfigError, match=rf"{tmp_path}: adapter_config.json sets {option}="):
        AdaptedModel.from_pretrained(_tiny(), tmp_path)


def test_peft_defaults_for_those_options_load(tmp_path: Path) -> None:
    peft.get_peft_model(_tiny(), peft.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    model = AdaptedModel.from_pretrained(_tiny(), tmp_path)
    assert model.peft_config["default"].r == 4

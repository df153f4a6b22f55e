"""Prompt tuning: virtual-token embeddings at the input; PEFT's PROMPT_TUNING format."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from _prompt_family import batch, check_peft_interop, check_training_and_round_trip, tiny_gpt2, tiny_llama

from peftctl.adapters.core.model import get_adapted_model
from peftctl.adapters.core.registry import config_from_dict
from peftctl.errors import ConfigError
from peftctl.models.tokenizer import build_byte_tokenizer


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_only_prompts_train_and_round_trip(build, tmp_path: Path) -> None:
    model = check_training_and_round_trip(
        build,
        {"method": "prompt_tuning", "num_virtual_tokens": 4},
        tmp_path,
        lambda n: n == "prompt_encoder.default.embedding.weight",
    )
    assert model.prompt_encoder["default"].embedding.weight.shape == (4, 32)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_peft_interop_both_ways(build, tmp_path: Path) -> None:
    check_peft_interop(
        build,
        {"method": "prompt_tuning", "num_virtual_tokens": 4},
        peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        tmp_path,
    )


def test_forward_prepends_prompts_and_extends_mask_and_labels() -> None:
    model = get_adapted_model(tiny_llama(), config_from_dict({"method": "prompt_tuning", "num_virtual_tokens": 3}))
    inputs = batch()
    labels = inputs["input_ids"].clone()
    out = model(**inputs, labels=labels)
    assert out.logits.shape[1] == inputs["input_ids"].shape[1] + 3
    # labels are extended with -100 for the virtual tokens: the last virtual position predicts the
    # first real token, every later position the next one
    predicting = out.logits[:, 2:-1].reshape(-1, out.logits.shape[-1])
    expected = torch.nn.functional.cross_entropy(predicting, labels.reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    # with the adapter disabled the base model runs unchanged
    with model.disable_adapter():
        assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_text_init_repeats_and_cuts_the_text(tmp_path: Path) -> None:
    tokenizer = build_byte_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    base = tiny_llama()
    values = {
        "method": "prompt_tuning",
        "num_virtual_tokens": 7,
        "prompt_tuning_init": "TEXT",
        "prompt_tuning_init_text": "abc",
        "tokenizer_name_or_path": str(tmp_path),
    }
    model = get_adapted_model(base, config_from_dict(values))
    ids = tokenizer("abc")["input_ids"]
    expected_ids = (ids * 3)[:7]
    expected = model.model.get_input_embeddings().weight[expected_ids]
    assert torch.equal(model.prompt_encoder["default"].embedding.weight, expected)


def test_sample_vocab_init_uses_vocabulary_rows() -> None:
    model = get_adapted_model(
        tiny_llama(),
        config_from_dict({"method": "prompt_tuning", "num_virtual_tokens": 5, "prompt_tuning_init": "SAMPLE_VOCAB"}),
    )
    vocab = model.model.get_input_embeddings().weight
    for row in model.prompt_encoder["default"].embedding.weight:
        assert (vocab == row).all(dim=1).any()


def test_generate_with_cache_equals_recompute() -> None:
    model = get_adapted_model(tiny_llama(), config_from_dict({"method": "prompt_tuning", "num_virtual_tokens": 4}))
    inputs = {"input_ids": batch()["input_ids"]}
    cached = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    recomputed = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (2, 13) and torch.equal(cached, recomputed)


def test_bad_values_name_the_field() -> None:
    with pytest.raises(ConfigError, match="adapter.num_virtual_tokens=0"):
        config_from_dict({"method": "prompt_tuning", "num_virtual_tokens": 0})
    with pytest.raises(ConfigError, match="adapter.prompt_tuning_init_text"):
        config_from_dict({"method": "prompt_tuning", "prompt_tuning_init": "TEXT"})


def test_merge_is_refused_and_unload_returns_the_base() -> None:
    from peftctl.errors import AdapterError

    model = get_adapted_model(tiny_llama(), config_from_dict({"method": "prompt_tuning", "num_virtual_tokens": 3}))
    with pytest.raises(AdapterError, match="cannot be merged"):
        model.merge_and_unload()
    base = model.unload()
    assert not hasattr(model, "prompt_encoder")
    assert torch.equal(base(**batch()).logits, tiny_llama()(**batch()).logits)

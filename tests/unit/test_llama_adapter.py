"""LLaMA-Adapter (PEFT's ADAPTION_PROMPT): gated prompts in the top attention layers."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from _prompt_family import batch, check_peft_interop, check_training_and_round_trip, logits, tiny_llama

from peftctl.adapters.core.model import get_adapted_model
from peftctl.adapters.core.registry import config_from_dict
from peftctl.errors import ConfigError

VALUES = {"method": "llama_adapter", "adapter_len": 3, "adapter_layers": 1}


def test_zero_gate_gives_the_base_output_exactly() -> None:
    base = logits(tiny_llama())
    model = get_adapted_model(tiny_llama(), config_from_dict({**VALUES, "adapter_layers": 2}))
    assert torch.equal(logits(model), base)
    ids = batch()["input_ids"]
    assert torch.equal(
        model.generate(input_ids=ids, max_new_tokens=4, do_sample=False),
        tiny_llama().generate(input_ids=ids, max_new_tokens=4, do_sample=False),
    )


def test_only_top_layers_prompts_and_gates_train(tmp_path: Path) -> None:
    expected = {
        "base_model.model.model.layers.1.self_attn.adaption_prompt.default",
        "base_model.model.model.layers.1.self_attn.adaption_gate.default",
    }
    model = check_training_and_round_trip(tiny_llama, VALUES, tmp_path, lambda n: n in expected)
    assert float(model.model.model.layers[1].self_attn.adaption_gate["default"].detach()) != 0.0
    assert not torch.equal(logits(model), logits(tiny_llama()))


def test_peft_interop_both_ways(tmp_path: Path) -> None:
    check_peft_interop(
        tiny_llama,
        {**VALUES, "adapter_layers": 2},
        peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=3, adapter_layers=2),
        tmp_path,
    )


def test_generation_with_cache_matches_peft(tmp_path: Path) -> None:
    model = get_adapted_model(tiny_llama(), config_from_dict(VALUES))
    with torch.no_grad():
        model.model.model.layers[1].self_attn.adaption_gate["default"].fill_(2.0)
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    ids = batch()["input_ids"]
    ours = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert torch.equal(
        ours, theirs.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    )


def test_too_many_layers_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="adapter.adapter_layers=5"):
        get_adapted_model(tiny_llama(), config_from_dict({**VALUES, "adapter_layers": 5}))


def test_non_llama_attention_is_rejected() -> None:
    from _prompt_family import tiny_gpt2

    from peftctl.errors import AdapterError

    with pytest.raises(ConfigError, match="needs a Llama-family model.*gpt2"):
        get_adapted_model(tiny_gpt2(), config_from_dict({**VALUES, "target_modules": "attn"}))
    llama = tiny_llama()
    with pytest.raises(AdapterError, match="has no q_proj; llama_adapter needs Llama-family attention"):
        get_adapted_model(llama, config_from_dict({**VALUES, "target_modules": "mlp"}))


def test_bf16_base_keeps_fp32_trainable_prompts_and_runs_with_and_without_autocast() -> None:
    """Adam's steps on O(1) prompt values would round away in bf16 (spacing 2^-7): the prompts and
    the gate stay fp32 on a bf16 base and are cast to the activations' dtype at use."""
    model = get_adapted_model(tiny_llama().to(torch.bfloat16), config_from_dict(VALUES))
    attention = model.model.model.layers[1].self_attn
    assert attention.adaption_prompt["default"].dtype == attention.adaption_gate["default"].dtype == torch.float32
    with torch.no_grad():
        attention.adaption_gate["default"].fill_(0.5)
    plain = model(**batch()).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = model(**batch()).logits
    assert plain.dtype == torch.bfloat16 and torch.isfinite(plain.float()).all()
    assert (plain.float() - autocast.float()).abs().max() <= 0.05 * plain.float().abs().max()

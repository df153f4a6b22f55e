"""Prefix tuning: per-layer key/value prefixes through the transformers Cache; PEFT's PREFIX_TUNING format."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from _prompt_family import batch, check_peft_interop, check_training_and_round_trip, tiny_gpt2, tiny_llama
from safetensors.torch import load_file

from peftctl.adapters.core.model import AdaptedModel, get_adapted_model
from peftctl.adapters.core.registry import config_from_dict

PROJECTION = {"method": "prefix_tuning", "num_virtual_tokens": 4, "prefix_projection": True, "encoder_hidden_size": 16}


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("projection", [False, True])
def test_only_prefixes_train_and_round_trip(build, projection: bool, tmp_path: Path) -> None:
    values = PROJECTION if projection else {"method": "prefix_tuning", "num_virtual_tokens": 4}
    check_training_and_round_trip(build, values, tmp_path, lambda n: n.startswith("prompt_encoder.default."))


def test_gqa_prefix_has_per_kv_head_shape(tmp_path: Path) -> None:
    model = get_adapted_model(tiny_llama(), config_from_dict({"method": "prefix_tuning", "num_virtual_tokens": 4}))
    config = model.peft_config["default"]
    # 2 key/value heads of head_dim 8 (4 query heads of 32 / 4): token_dim 16, 2 "attention heads"
    assert (config.token_dim, config.num_attention_heads, config.num_layers) == (16, 2, 2)
    from peftctl.adapters.prompt.prefix_tuning import METHOD

    built = METHOD.prefix_cache(model, "default", 3)
    assert built.layers[0].keys.shape == (3, 2, 4, 8)


def test_projection_is_folded_when_saving(tmp_path: Path) -> None:
    model = get_adapted_model(tiny_llama(), config_from_dict(PROJECTION))
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert list(saved) == ["prompt_embeddings"]
    encoder = model.prompt_encoder["default"]
    expected = encoder.transform(encoder.embedding.weight)
    torch.testing.assert_close(saved["prompt_embeddings"], expected.detach(), rtol=0, atol=0)
    assert saved["prompt_embeddings"].shape == (4, 2 * 2 * 16)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    loaded = AdaptedModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == ["prompt_encoder.default.embedding.weight"]


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("projection", [False, True])
def test_peft_interop_both_ways(build, projection: bool, tmp_path: Path) -> None:
    values = PROJECTION if projection else {"method": "prefix_tuning", "num_virtual_tokens": 4}
    config = peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=projection, encoder_hidden_size=16
    )
    check_peft_interop(build, values, config, tmp_path)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_greedy_generation_with_cache_equals_recompute(build) -> None:
    model = get_adapted_model(build(), config_from_dict({"method": "prefix_tuning", "num_virtual_tokens": 4}))
    with torch.no_grad():
        for param in model.prompt_encoder.parameters():
            param.mul_(3.0)  # prefixes that clearly steer the output
    inputs = {"input_ids": batch()["input_ids"]}
    cached = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    recomputed = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape == (2, 15)
    assert torch.equal(cached, recomputed)
    # the recompute path is the adapted forward itself: its argmax continues the sequence
    step = model(input_ids=cached[:, :-1]).logits[:, -1].argmax(-1)
    assert torch.equal(step, cached[:, -1])
    with model.disable_adapter():
        base = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert not torch.equal(base, cached)


@torch.no_grad()
def cache_free_greedy(model: torch.nn.Module, input_ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding that re-runs the whole sequence through ``model``'s forward at every step."""
    sequence = input_ids
    for _ in range(steps):
        logits = model(input_ids=sequence, attention_mask=torch.ones_like(sequence)).logits[:, -1]
        sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    return sequence


def test_generation_matches_peft(tmp_path: Path) -> None:
    """Our cached decoding equals greedy decoding through peft's forward (no cache anywhere).

    The oracle is peft's forward rather than peft's generate: on transformers >= 5.2x (the cache
    argument renamed from past_key_values to cache) peft 0.21.2's generate drops the prefix after the
    first token, while its forward stays right on every release."""
    model = get_adapted_model(tiny_llama(), config_from_dict({"method": "prefix_tuning", "num_virtual_tokens": 4}))
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    inputs = {"input_ids": batch()["input_ids"], "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    ours = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, cache_free_greedy(theirs, inputs["input_ids"], 6))
    assert torch.equal(ours, model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False))


@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning"])
def test_bf16_base_keeps_fp32_prompts(method: str) -> None:
    model = get_adapted_model(
        tiny_llama().to(torch.bfloat16), config_from_dict({"method": method, "num_virtual_tokens": 2})
    )
    assert all(p.dtype == torch.float32 for p in model.prompt_encoder.parameters())
    out = model(**batch()).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.prompt_encoder.parameters())


@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning"])
def test_left_padded_batch_generates_as_each_row_alone(method: str) -> None:
    """Positions follow the attention mask: a left-padded row decodes exactly as it does unpadded."""
    model = get_adapted_model(tiny_llama(), config_from_dict({"method": method, "num_virtual_tokens": 3}))
    with torch.no_grad():
        for param in model.prompt_encoder.parameters():
            param.mul_(3.0)
    short, long = torch.tensor([[11, 12, 13]]), torch.tensor([[21, 22, 23, 24, 25]])
    padded = torch.tensor([[0, 0, 11, 12, 13], [21, 22, 23, 24, 25]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    together = model.generate(input_ids=padded, attention_mask=mask, max_new_tokens=5)
    assert torch.equal(together[0, 5:], model.generate(input_ids=short, max_new_tokens=5)[0, 3:])
    assert torch.equal(together[1, 5:], model.generate(input_ids=long, max_new_tokens=5)[0, 5:])

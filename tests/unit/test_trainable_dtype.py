"""Every method trains fp32 master weights on a bf16 (or fp16) base, as PEFT's autocast_adapter_dtype
does: Adam's steps (~lr) on O(1) values are below bf16's spacing near 1 (2^-7) and would be rounded
away (Llama-Adapter's prompts once were created in the base dtype and barely trained in bf16)."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from peftctl.adapters.core.model import get_adapted_model
from peftctl.adapters.core.registry import config_from_dict
from peftctl.config.compose import resource_dir

# data-driven inits (eva, corda) and X-LoRA's trained experts are built by their own tests
BUILT_ELSEWHERE = {"xlora", "eva", "corda"}
CHOICES = sorted(
    p.stem for p in resource_dir("configs").joinpath("adapter").glob("*.yaml") if p.stem not in BUILT_ELSEWHERE
)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("choice", CHOICES)
def test_trainable_parameters_are_fp32_on_a_half_precision_base(choice: str, dtype: torch.dtype) -> None:
    values = {
        k: v
        for k, v in yaml.safe_load(resource_dir("configs").joinpath("adapter", f"{choice}.yaml").read_text()).items()
        if v is not None
    }
    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=300,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).to(dtype)
    adapted = get_adapted_model(base, config_from_dict(values))
    trainable = {name: p.dtype for name, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}, trainable
    frozen = {p.dtype for p in adapted.parameters() if not p.requires_grad}
    assert frozen == {dtype}  # the base itself is not upcast

"""Shared checks for the prompt-family tests: tiny models, a few training steps, peft as the oracle."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from peftctl.adapters.core.model import AdaptedModel, get_adapted_model
from peftctl.adapters.core.registry import config_from_dict

VOCAB = 300


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
    ).eval()


def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, VOCAB, (2, 7), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[1, 5:] = 0  # right padding in the second row
    return {"input_ids": input_ids, "attention_mask": mask}


def train_steps(model: AdaptedModel, steps: int = 3) -> None:
    """A few AdamW steps on the causal LM loss of the test batch."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = batch()
    model.train()
    for _ in range(steps):
        logits = model(**inputs).logits[:, -inputs["input_ids"].shape[1] :]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB), inputs["input_ids"][:, 1:].reshape(-1)
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch()).logits


def check_training_and_round_trip(
    build: Callable[[], torch.nn.Module],
    values: dict[str, Any],
    tmp_path: Path,
    expected_trainable: Callable[[str], bool],
) -> AdaptedModel:
    """Only the method's tensors train, the base stays bit-identical, save -> load gives the same logits."""
    base_before = {k: v.clone() for k, v in build().state_dict().items()}
    model = get_adapted_model(build(), config_from_dict(values))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(expected_trainable(n) for n in trainable), trainable
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(trainable)
    base_after = model.model.state_dict()
    for key, value in base_before.items():
        wrapped = key if key in base_after else key.replace("self_attn.", "self_attn.base_layer.")
        assert torch.equal(base_after[wrapped], value), key
    model.save_pretrained(tmp_path)
    loaded = AdaptedModel.from_pretrained(build(), tmp_path)
    assert torch.equal(logits(loaded), logits(model))
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference
    return model


def check_peft_interop(
    build: Callable[[], torch.nn.Module], values: dict[str, Any], peft_config: Any, tmp_path: Path
) -> None:
    """ours -> peft and peft -> ours give the same logits for the same inputs."""
    import peft

    ours = get_adapted_model(build(), config_from_dict(values))
    train_steps(ours, 2)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=0, atol=1e-6)

    torch.manual_seed(5)
    trained = peft.get_peft_model(build(), peft_config)
    with torch.no_grad():
        for param in trained.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    trained.eval()
    trained.save_pretrained(tmp_path / "theirs")
    loaded = AdaptedModel.from_pretrained(build(), tmp_path / "theirs")
    torch.testing.assert_close(logits(loaded), logits(trained), rtol=0, atol=1e-6)

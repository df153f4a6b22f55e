"""Small pieces of the foundation against hand-computed expectations."""

from __future__ import annotations

import math

import pytest
import torch

from peftctl.data.tokenize import IGNORE_INDEX, collate, encode_pair
from peftctl.errors import ConfigError
from peftctl.models.tokenizer import build_byte_tokenizer
from peftctl.train.loop import epoch_order, total_optimizer_steps
from peftctl.train.optim import lr_multiplier


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


def test_byte_tokenizer_roundtrip_and_ids(tokenizer) -> None:
    text = "héllo, wörld ✓"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) == 259 and tokenizer.eos_token_id == 258


def test_prompt_is_masked_and_response_trained(tokenizer) -> None:
    example = encode_pair("Q: hi\nA: ", "ok", tokenizer, max_seq_len=64, train_on_prompt=False)
    n_prompt = 1 + len("Q: hi\nA: ")
    assert example.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example.labels[n_prompt:] == [ord("o"), ord("k"), tokenizer.eos_token_id]
    assert example.input_ids[n_prompt:] == example.labels[n_prompt:]
    full = encode_pair("Q: hi\nA: ", "ok", tokenizer, max_seq_len=64, train_on_prompt=True)
    assert full.labels[1:] == full.input_ids[1:]


def test_truncation_and_padding(tokenizer) -> None:
    long = encode_pair("p" * 20, "r" * 20, tokenizer, max_seq_len=25, train_on_prompt=False)
    assert len(long.input_ids) == len(long.labels) == 25
    short = encode_pair("p", "r", tokenizer, max_seq_len=25, train_on_prompt=False)
    batch = collate([long, short], pad_token_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, 25)
    assert batch["attention_mask"][1].sum().item() == len(short.input_ids)
    assert (batch["labels"][1, len(short.input_ids) :] == IGNORE_INDEX).all()


def test_lr_schedule_shapes() -> None:
    assert lr_multiplier(0, 100, 10, "linear") == pytest.approx(0.1)
    assert lr_multiplier(9, 100, 10, "linear") == pytest.approx(1.0)
    assert lr_multiplier(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_multiplier(55, 100, 10, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(100, 100, 10, "cosine") == pytest.approx(0.0)
    assert lr_multiplier(70, 100, 0, "constant") == 1.0


def test_epoch_order_is_a_seeded_permutation() -> None:
    first = epoch_order(50, seed=1, epoch=0)
    assert sorted(first) == list(range(50))
    assert first == epoch_order(50, seed=1, epoch=0)
    assert first != epoch_order(50, seed=1, epoch=1)


def test_total_steps_from_epochs() -> None:
    from peftctl.config.schema import TrainConfig

    assert total_optimizer_steps(100, TrainConfig(epochs=2, batch_size=8, grad_accum=2)) == 13
    assert total_optimizer_steps(100, TrainConfig(max_steps=7)) == 7
    assert (
        total_optimizer_steps(100, TrainConfig(epochs=2, batch_size=8, grad_accum=1), world_size=2) == 13
    )  # 2 ranks: half the steps


def test_builtin_dataset_file_is_what_the_generator_makes() -> None:
    import json

    from peftctl.data.builtin import BUILTIN_DIR, generate

    splits = generate()
    for split, rows in splits.items():
        shipped = [json.loads(line) for line in (BUILTIN_DIR / f"sentiment_{split}.jsonl").read_text().splitlines()]
        assert shipped == rows
    assert not {r["input"] for r in splits["train"]} & {r["input"] for r in splits["test"]}


def test_schema_rejects_wrong_types_and_ranges() -> None:
    from peftctl.config.schema import build_run_config

    base = {"adapter": {"method": "lora"}}
    with pytest.raises(ConfigError, match="train.grad_accum=0"):
        build_run_config({**base, "train": {"grad_accum": 0}})
    with pytest.raises(ConfigError, match="dataset.eval_size=1.5"):
        build_run_config({**base, "dataset": {"eval_size": 1.5}})
    with pytest.raises(ConfigError, match="did you mean model.name_or_path"):
        build_run_config({**base, "model": {"name_or_pth": "x"}})
    with pytest.raises(ConfigError, match="adapter.lora_dropout=1.0"):
        build_run_config({"adapter": {"method": "lora", "lora_dropout": 1.0}})


def test_gradient_accumulation_matches_a_single_large_batch() -> None:
    """Token-weighted loss: 2 x 4 accumulated equals one batch of 8 (same grads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftctl.train.loop import causal_lm_loss_sum

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=259,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    tok = build_byte_tokenizer()
    examples = [encode_pair("prompt " * (i % 3 + 1), "resp" * (i % 4 + 1), tok, 64, False) for i in range(8)]

    def grads(groups):
        model.zero_grad()
        n = sum(sum(1 for l in e.labels[1:] if l != IGNORE_INDEX) for g in groups for e in g)
        for group in groups:
            loss, _ = causal_lm_loss_sum(model, collate(group, tok.pad_token_id))
            (loss / n).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    assert torch.allclose(grads([examples]), grads([examples[:4], examples[4:]]), atol=1e-6)


def test_second_all_linear_adapter_wraps_the_same_modules_only() -> None:
    """Adding a second adapter must not wrap the first adapter's own Linear layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftctl import get_adapted_model
    from peftctl.adapters.lora import LoraConfig

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    adapted = get_adapted_model(model, LoraConfig(r=2, target_modules="all-linear"))
    before = [name for name, _ in adapted.adapter_layers()]
    adapted.add_adapter("second", LoraConfig(r=2, target_modules="all-linear"))
    assert [name for name, _ in adapted.adapter_layers()] == before
    assert len(before) == 7


def test_resume_shorthand_sets_train_resume() -> None:
    from peftctl.config.compose import compose_config

    assert compose_config(["resume=true"]).train.resume is True
    assert compose_config(["resume=/runs/a/checkpoints/step-000010"]).train.resume == "/runs/a/checkpoints/step-000010"
    with pytest.raises(ConfigError, match="train.resume"):
        compose_config(["resume=[1,2]"])

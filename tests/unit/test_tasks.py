"""Task types: encoding of the task formats, per-task losses, metrics, LoRA / prompt methods on
seq2seq (T5), sequence and token classification (BERT)."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    T5Config,
    T5ForConditionalGeneration,
)

from peftctl.adapters.core.model import AdaptedModel, get_adapted_model
from peftctl.adapters.core.registry import config_from_dict
from peftctl.config.schema import DatasetConfig
from peftctl.data.tasks import encode_task, label_names
from peftctl.data.tokenize import IGNORE_INDEX, Example, collate
from peftctl.errors import ConfigError
from peftctl.eval.metrics import accuracy, entities, entity_f1, macro_f1
from peftctl.models.tokenizer import build_byte_tokenizer
from peftctl.train.losses import label_count, seq2seq_loss_sum, seq_cls_loss_sum, token_cls_loss_sum

TOKENIZER = build_byte_tokenizer()
BOS, EOS, PAD = TOKENIZER.bos_token_id, TOKENIZER.eos_token_id, TOKENIZER.pad_token_id


def tiny_bert_cls(num_labels: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=259,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_labels=num_labels,
        pad_token_id=PAD,
    )
    return BertForSequenceClassification(config).eval()


def tiny_bert_tokens(num_labels: int = 5) -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=259,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_labels=num_labels,
        pad_token_id=PAD,
    )
    return BertForTokenClassification(config).eval()


def tiny_t5() -> torch.nn.Module:
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=259,
        d_model=32,
        d_ff=64,
        d_kv=8,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        pad_token_id=PAD,
        eos_token_id=EOS,
        decoder_start_token_id=PAD,
    )
    return T5ForConditionalGeneration(config).eval()


def dataset_cfg(fmt: str, **extra) -> DatasetConfig:
    return DatasetConfig(path="test", format=fmt, max_seq_len=64, **extra)


# ---------------------------------------------------------------- encoding
def test_token_classification_aligns_tags_to_first_subword() -> None:
    cfg = dataset_cfg("token_classification")
    record = {"tokens": ["Anna", "went", "to", "Oslo"], "tags": ["B-PER", "O", "O", "B-LOC"]}
    names = label_names([record], cfg)
    assert names == ["B-LOC", "B-PER", "O"]
    example = encode_task(record, cfg, TOKENIZER, names)
    assert example.input_ids == [BOS] + TOKENIZER("Anna went to Oslo", add_special_tokens=False)["input_ids"] + [EOS]
    # one byte per sub-word: the tag sits on each word's first byte (the leading space for later words)
    expected = [
        IGNORE_INDEX,
        1,
        IGNORE_INDEX,
        IGNORE_INDEX,
        IGNORE_INDEX,
        2,
        *[IGNORE_INDEX] * 4,
        2,
        IGNORE_INDEX,
        IGNORE_INDEX,
        0,
        *[IGNORE_INDEX] * 4,
        IGNORE_INDEX,
    ]
    assert example.labels == expected


def test_classification_and_seq2seq_encoding() -> None:
    cfg = dataset_cfg("classification", text_pair_column="pair")
    record = {"text": "ab", "pair": "c", "label": 1}
    names = label_names([record, {**record, "label": 0}], cfg)
    assert names == ["0", "1"]
    example = encode_task(record, cfg, TOKENIZER, names)
    assert example.input_ids == [BOS, ord("a"), ord("b"), EOS, ord("c"), EOS] and example.labels == [1]
    s2s = encode_task({"source": "xy", "target": "z"}, dataset_cfg("seq2seq"), TOKENIZER, None)
    assert (s2s.input_ids, s2s.labels) == ([ord("x"), ord("y"), EOS], [ord("z"), EOS])
    with pytest.raises(ConfigError, match="label 'maybe' is not in dataset.label_names"):
        encode_task(
            {"text": "a", "label": "maybe"},
            dataset_cfg("classification", label_names=["no", "yes"]),
            TOKENIZER,
            ["no", "yes"],
        )


def test_collate_pads_labels_to_their_own_width() -> None:
    batch = collate([Example([1, 2, 3], [0], "", ""), Example([4], [1], "", "")], PAD)
    assert batch["labels"].tolist() == [[0], [1]] and batch["input_ids"].shape == (2, 3)
    assert (
        label_count([5], "seq_cls") == 1
        and label_count([IGNORE_INDEX, 3, 4], "token_cls") == 2
        and label_count([1, 2, 3], "causal_lm") == 2
    )


def test_format_must_fit_task_type() -> None:
    from peftctl.config.compose import compose_config

    with pytest.raises(ConfigError, match="dataset.format=classification is not valid with model.task_type=causal_lm"):
        compose_config(["dataset=sentiment_cls"])


# ---------------------------------------------------------------- metrics
def test_metrics_against_hand_computed_values() -> None:
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    # class 0: tp 0 fp 1 fn 1 -> F1 0; class 1: tp 2 fp 1 fn 1 -> F1 2/3
    assert macro_f1([1, 0, 1, 1], [1, 1, 1, 0]) == pytest.approx(1 / 3)
    assert entities(["B-PER", "I-PER", "O", "I-LOC", "B-ORG", "I-PER"]) == {
        ("PER", 0, 2),
        ("LOC", 3, 4),
        ("ORG", 4, 5),
        ("PER", 5, 6),
    }
    reference = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    predicted = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "O"]]  # one of three entities cut short
    assert entity_f1(predicted, reference) == pytest.approx(2 * 2 / (3 + 3))


# ---------------------------------------------------------------- losses
def test_task_losses_match_the_models_own_losses() -> None:
    ids = torch.tensor([[BOS, 10, 11, 12, EOS], [BOS, 13, 14, EOS, PAD]])
    mask = (ids != PAD).long()
    cls = tiny_bert_cls()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([[2], [0]])}
    total, count = seq_cls_loss_sum(cls, batch)
    assert count == 2
    torch.testing.assert_close(
        total / count, cls(input_ids=ids, attention_mask=mask, labels=batch["labels"][:, 0]).loss
    )
    tok = tiny_bert_tokens()
    tags = torch.tensor([[IGNORE_INDEX, 1, 2, 3, IGNORE_INDEX], [IGNORE_INDEX, 4, 0, IGNORE_INDEX, IGNORE_INDEX]])
    total, count = token_cls_loss_sum(tok, {"input_ids": ids, "attention_mask": mask, "labels": tags})
    assert count == 5
    torch.testing.assert_close(total / count, tok(input_ids=ids, attention_mask=mask, labels=tags).loss)
    t5 = tiny_t5()
    targets = torch.tensor([[20, 21, EOS], [22, EOS, IGNORE_INDEX]])
    total, count = seq2seq_loss_sum(t5, {"input_ids": ids, "attention_mask": mask, "labels": targets})
    assert count == 5
    torch.testing.assert_close(total / count, t5(input_ids=ids, attention_mask=mask, labels=targets).loss)


# ---------------------------------------------------------------- methods on the task models
def _train(model: AdaptedModel, loss_fn, batch: dict, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        total, count = loss_fn(model, batch)
        (total / count).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


CLS_BATCH = {
    "input_ids": torch.tensor([[BOS, 10, 11, EOS], [BOS, 12, EOS, PAD]]),
    "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
    "labels": torch.tensor([[2], [1]]),
}
TOK_BATCH = {
    **CLS_BATCH,
    "labels": torch.tensor([[IGNORE_INDEX, 1, 3, IGNORE_INDEX], [IGNORE_INDEX, 4, IGNORE_INDEX, IGNORE_INDEX]]),
}
S2S_BATCH = {**CLS_BATCH, "labels": torch.tensor([[30, 31, EOS], [32, EOS, IGNORE_INDEX]])}

CASES = [
    (
        "seq_cls_lora",
        tiny_bert_cls,
        seq_cls_loss_sum,
        CLS_BATCH,
        {
            "method": "lora",
            "r": 4,
            "target_modules": ["query", "value"],
            "modules_to_save": ["classifier"],
            "task_type": "SEQ_CLS",
        },
    ),
    (
        "token_cls_lora",
        tiny_bert_tokens,
        token_cls_loss_sum,
        TOK_BATCH,
        {
            "method": "lora",
            "r": 4,
            "target_modules": ["query", "value"],
            "modules_to_save": ["classifier"],
            "task_type": "TOKEN_CLS",
        },
    ),
    (
        "seq2seq_lora",
        tiny_t5,
        seq2seq_loss_sum,
        S2S_BATCH,
        {"method": "lora", "r": 4, "target_modules": ["q", "v"], "task_type": "SEQ_2_SEQ_LM"},
    ),
    (
        "seq_cls_ptuning_v2",
        tiny_bert_cls,
        seq_cls_loss_sum,
        CLS_BATCH,
        {"method": "p_tuning_v2", "num_virtual_tokens": 3, "modules_to_save": ["classifier"], "task_type": "SEQ_CLS"},
    ),
    (
        "token_cls_ptuning_v2",
        tiny_bert_tokens,
        token_cls_loss_sum,
        TOK_BATCH,
        {"method": "p_tuning_v2", "num_virtual_tokens": 3, "modules_to_save": ["classifier"], "task_type": "TOKEN_CLS"},
    ),
    (
        "seq_cls_prompt_tuning",
        tiny_bert_cls,
        seq_cls_loss_sum,
        CLS_BATCH,
        {"method": "prompt_tuning", "num_virtual_tokens": 3, "modules_to_save": ["classifier"], "task_type": "SEQ_CLS"},
    ),
    (
        "token_cls_p_tuning",
        tiny_bert_tokens,
        token_cls_loss_sum,
        TOK_BATCH,
        {
            "method": "p_tuning",
            "num_virtual_tokens": 3,
            "encoder_hidden_size": 8,
            "modules_to_save": ["classifier"],
            "task_type": "TOKEN_CLS",
        },
    ),
    (
        "seq2seq_prefix",
        tiny_t5,
        seq2seq_loss_sum,
        S2S_BATCH,
        {"method": "prefix_tuning", "num_virtual_tokens": 3, "task_type": "SEQ_2_SEQ_LM"},
    ),
    (
        "seq2seq_prompt_tuning",
        tiny_t5,
        seq2seq_loss_sum,
        S2S_BATCH,
        {"method": "prompt_tuning", "num_virtual_tokens": 3, "task_type": "SEQ_2_SEQ_LM"},
    ),
]


@pytest.mark.parametrize("name,build,loss_fn,batch,values", CASES, ids=[c[0] for c in CASES])
def test_method_on_task_model(name: str, build, loss_fn, batch: dict, values: dict, tmp_path: Path) -> None:
    base_state = {k: v.clone() for k, v in build().state_dict().items()}
    model = get_adapted_model(build(), config_from_dict(values))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    kinds = ("lora_", "modules_to_save", "prompt_encoder")
    assert trainable and all(any(k in n for k in kinds) for n in trainable)
    if values.get("modules_to_save"):
        assert any("modules_to_save" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, loss_fn, batch)
    assert {n for n, p in model.named_parameters() if not torch.equal(p, before[n])} == trainable
    for key, value in model.model.state_dict().items():
        original = key.replace(".base_layer", "")
        if original in base_state and "modules_to_save" not in key:
            assert torch.equal(value, base_state[original]), key
    model.save_pretrained(tmp_path)
    loaded = AdaptedModel.from_pretrained(build(), tmp_path)
    inputs = {k: v for k, v in batch.items() if k != "labels" or build is tiny_t5}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_t5_prefix_and_prompt_generation() -> None:
    ids = torch.tensor([[10, 11, 12, EOS]])
    for values in (
        {"method": "prefix_tuning", "num_virtual_tokens": 3, "task_type": "SEQ_2_SEQ_LM"},
        {"method": "prompt_tuning", "num_virtual_tokens": 3, "task_type": "SEQ_2_SEQ_LM"},
    ):
        model = get_adapted_model(tiny_t5(), config_from_dict(values))
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5)
        # greedy: each generated token is the argmax of the adapted forward on the tokens before it
        decoder = generated if generated[0, 0] == PAD else torch.cat([torch.full((1, 1), PAD), generated], dim=1)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=decoder[:, :-1]).logits
        assert torch.equal(logits.argmax(-1)[0], decoder[0, 1:])


@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning", "p_tuning"])
def test_t5_prompt_methods_match_peft(method: str, tmp_path: Path) -> None:
    model = get_adapted_model(
        tiny_t5(), config_from_dict({"method": method, "num_virtual_tokens": 3, "task_type": "SEQ_2_SEQ_LM"})
    )
    with torch.no_grad():
        for param in model.prompt_encoder.parameters():
            param.add_(torch.randn_like(param))
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_t5(), tmp_path).eval()
    batch = {k: v for k, v in S2S_BATCH.items()}
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, theirs(**batch).logits, rtol=0, atol=1e-6)

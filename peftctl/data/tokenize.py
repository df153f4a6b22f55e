"""Tokenize (prompt, response) pairs with the prompt masked out of the loss, and collate batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    prompt: str
    response: str
    truncated: bool = False  # cut at dataset.max_seq_len


def encode_pair(prompt: str, response: str, tokenizer: Any, max_seq_len: int, train_on_prompt: bool) -> Example:
    """BOS + prompt + response + EOS, truncated to max_seq_len; labels -100 on the prompt unless
    train_on_prompt (and on BOS always)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (bos + prompt_ids + response_ids)[:max_seq_len]
    labels = (
        [IGNORE_INDEX] * len(bos) + (prompt_ids if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)) + response_ids
    )
    return Example(input_ids, labels[:max_seq_len], prompt, response, truncated=len(labels) > max_seq_len)


def padded_width(longest: int, multiple: int = 1) -> int:
    """``longest`` rounded up to a multiple of ``multiple``."""
    return -(-longest // multiple) * multiple


def collate(examples: list[Any], pad_token_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example (its length rounded up to a multiple of ``multiple``); padding is masked in
    attention and loss. Labels are padded to the input's width where there is one per input token (causal LM),
    else to their own longest length (decoder targets, one class id). Packed rows (data/packing.py) get
    per-example position_ids instead (see collate_packed)."""
    if examples and getattr(examples[0], "position_ids", None) is not None:
        return collate_packed(examples, pad_token_id, multiple)
    width = padded_width(max(len(e.input_ids) for e in examples), multiple)
    per_token_labels = all(len(e.labels) == len(e.input_ids) for e in examples)  # causal LM: one per input token
    label_width = width if per_token_labels else max(len(e.labels) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), label_width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, : len(example.labels)] = torch.tensor(example.labels)
        attention[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def collate_packed(rows: list[Any], pad_token_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Packed rows (data/packing.py's PackedRow): input_ids / labels / position_ids right-padded to the
    longest row (rounded up to a multiple of ``multiple``); attention_mask marks the real tokens (for counting them;
    the loss passes position_ids, not the mask, to the model)."""
    width = padded_width(max(len(r.input_ids) for r in rows), multiple)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.arange(width).repeat(len(rows), 1)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[index, :n] = torch.tensor(row.input_ids)
        labels[index, :n] = torch.tensor(row.labels)
        position_ids[index, :n] = torch.tensor(row.position_ids)
        position_ids[index, n:] = torch.arange(width - n)  # padding: a separate sequence of its own
        attention[index, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "position_ids": position_ids}

"""Preference data: `dataset.format=preference` (prompt, chosen, rejected) and `dataset.format=kto`
(prompt, completion, label true/false).

Prompt and completions are text, or message lists rendered with the tokenizer's chat template (the
prompt's messages with a generation prompt; a completion as the assistant turn that follows). Each
completion is encoded as BOS + prompt + completion + EOS with the prompt masked (-100) out of the
labels, exactly like an SFT example, so log π(completion | prompt) is the sum over its label tokens.
`collate_pairs` stacks all chosen rows and then all rejected rows into one batch (one forward pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from peftctl.data.tokenize import IGNORE_INDEX, Example, collate, encode_pair
from peftctl.errors import ConfigError

PREFERENCE_FORMATS = ("preference", "kto")


@dataclass
class PreferencePair:
    chosen: Example
    rejected: Example
    ref_chosen: float | None = None  # the base model's log-probs, when precomputed
    ref_rejected: float | None = None


@dataclass
class KTOExample:
    prompt_ids: list[int]  # BOS + prompt
    completion_ids: list[int]  # completion + EOS
    desirable: bool
    prompt: str
    completion: str

    @property
    def labels(self) -> list[int]:
        return [IGNORE_INDEX] * len(self.prompt_ids) + self.completion_ids


def preference_columns(dataset_cfg: Any) -> list[str]:
    if dataset_cfg.format == "kto":
        return [dataset_cfg.prompt_column, dataset_cfg.completion_column, dataset_cfg.label_column]
    return [dataset_cfg.prompt_column, dataset_cfg.chosen_column, dataset_cfg.rejected_column]


def _render(prompt: Any, completion: Any, tokenizer: Any, dataset_cfg: Any) -> tuple[str, str]:
    """(prompt text, completion text); message lists go through the chat template."""
    if not isinstance(prompt, list) and not isinstance(completion, list):
        return str(prompt or ""), str(completion or "")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(
            f"dataset {dataset_cfg.path!r}: message lists need a tokenizer with a chat template;"
            " this model's tokenizer has none"
        )
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
    reply = completion if isinstance(completion, list) else [{"role": "assistant", "content": str(completion)}]
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + reply, tokenize=False)
    if not full.startswith(prompt_text):
        raise ConfigError("the tokenizer's chat template renders the conversation prefix differently from the prompt")
    return prompt_text, full[len(prompt_text) :]


def _is_empty(value: Any) -> bool:
    if isinstance(value, list):
        return not value or all(not str(m.get("content", "")).strip() for m in value if isinstance(m, dict))
    return value is None or not str(value).strip()


def _desirable(value: Any, row: int, dataset_cfg: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ConfigError(
        f"dataset {dataset_cfg.path!r} row {row}: {dataset_cfg.label_column}={value!r} is not valid for "
        "format=kto; expected true or false"
    )


def check_preference_columns(records: Any, dataset_cfg: Any) -> None:
    columns = list(records.column_names)
    for column in preference_columns(dataset_cfg):
        if column not in columns:
            raise ConfigError(
                f"dataset {dataset_cfg.path!r} has no column {column!r} needed by format={dataset_cfg.format}; "
                f"its columns: {', '.join(columns)} (set dataset.<role>_column to map one)"
            )


def encode_preference_records(records: Any, dataset_cfg: Any, tokenizer: Any) -> list[Any]:
    """PreferencePair / KTOExample per record; ConfigError naming the row for an empty completion,
    and for a set whose chosen equals its rejected in every row (nothing to prefer)."""
    check_preference_columns(records, dataset_cfg)
    if dataset_cfg.format == "kto":
        return [_encode_kto(record, row, dataset_cfg, tokenizer) for row, record in enumerate(records)]
    pairs, identical = [], 0
    for row, record in enumerate(records):
        prompt, chosen, rejected = (record[c] for c in preference_columns(dataset_cfg))
        for column, value in ((dataset_cfg.chosen_column, chosen), (dataset_cfg.rejected_column, rejected)):
            if _is_empty(value):
                raise ConfigError(
                    f"dataset {dataset_cfg.path!r} row {row}: {column!r} is empty;"
                    " every pair needs a non-empty chosen and rejected completion"
                )
        identical += chosen == rejected
        pairs.append(
            PreferencePair(
                _encode(prompt, chosen, tokenizer, dataset_cfg), _encode(prompt, rejected, tokenizer, dataset_cfg)
            )
        )
    if pairs and identical == len(pairs):
        raise ConfigError(
            f"dataset {dataset_cfg.path!r}: {dataset_cfg.chosen_column!r} equals {dataset_cfg.rejected_column!r} "
            "in every row; a preference pair needs two different completions"
        )
    return pairs


def _encode(prompt: Any, completion: Any, tokenizer: Any, dataset_cfg: Any) -> Example:
    prompt_text, completion_text = _render(prompt, completion, tokenizer, dataset_cfg)
    return encode_pair(prompt_text, completion_text, tokenizer, dataset_cfg.max_seq_len, train_on_prompt=False)


def _encode_kto(record: dict[str, Any], row: int, dataset_cfg: Any, tokenizer: Any) -> KTOExample:
    prompt, completion, label = (record[c] for c in preference_columns(dataset_cfg))
    if _is_empty(completion):
        raise ConfigError(
            f"dataset {dataset_cfg.path!r} row {row}: {dataset_cfg.completion_column!r} is empty;"
            " every example needs a non-empty completion"
        )
    example = _encode(prompt, completion, tokenizer, dataset_cfg)
    n_prompt = next((i for i, label_id in enumerate(example.labels) if label_id != IGNORE_INDEX), len(example.labels))
    return KTOExample(
        example.input_ids[:n_prompt],
        example.input_ids[n_prompt:],
        _desirable(label, row, dataset_cfg),
        example.prompt,
        example.response,
    )


def has_completion(example: Any) -> bool:
    """False when truncation to max_seq_len left no completion token to score."""
    if isinstance(example, PreferencePair):
        return all(sum(1 for t in e.labels[1:] if t != IGNORE_INDEX) > 0 for e in (example.chosen, example.rejected))
    return len(example.completion_ids) > 0


def collate_pairs(pairs: list[PreferencePair], pad_token_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """All chosen rows, then all rejected rows, padded to one width (a multiple of ``multiple``); ``ref_logps`` when
    precomputed."""
    batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_token_id, multiple)
    if all(p.ref_chosen is not None for p in pairs):
        batch["ref_logps"] = torch.tensor(
            [p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs], dtype=torch.float32
        )
    return batch


def collate_kto(examples: list[KTOExample], pad_token_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """The examples, then the mismatched pairs for KTO's KL estimate (prompt i with completion i+1), padded to one
    width (a multiple of ``multiple``)."""
    n = len(examples)
    rows = [Example(e.prompt_ids + e.completion_ids, e.labels, e.prompt, e.completion) for e in examples]
    for i, e in enumerate(examples):
        other = examples[(i + 1) % n]
        rows.append(
            Example(
                e.prompt_ids + other.completion_ids,
                [IGNORE_INDEX] * len(e.prompt_ids) + other.completion_ids,
                e.prompt,
                other.completion,
            )
        )
    batch = collate(rows, pad_token_id, multiple)
    batch["desirable"] = torch.tensor([e.desirable for e in examples], dtype=torch.bool)
    return batch


def as_examples(items: list[Any]) -> list[Example]:
    """Plain examples to show (`peftctl data`): a pair's chosen then rejected; a KTO example as is."""
    out: list[Example] = []
    for item in items:
        if isinstance(item, PreferencePair):
            out += [item.chosen, item.rejected]
        else:
            out.append(Example(item.prompt_ids + item.completion_ids, item.labels, item.prompt, item.completion))
    return out


def split_stats(items: list[Any], dropped: int) -> dict[str, int]:
    examples = as_examples(items)
    return {
        "examples": len(items),
        "dropped": dropped,
        "tokens": sum(len(e.input_ids) for e in examples),
        "trained_tokens": sum(sum(1 for t in e.labels[1:] if t != IGNORE_INDEX) for e in examples),
    }


def _encode_split(records: Any, dataset_cfg: Any, tokenizer: Any) -> tuple[list[Any], int]:
    encoded = encode_preference_records(records, dataset_cfg, tokenizer)
    kept = [e for e in encoded if has_completion(e)]
    return kept, len(encoded) - len(kept)


def prepare_preference(
    train_records: Any, eval_records: Any, dataset_cfg: Any, tokenizer: Any
) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """(train, eval, stats): pairs / KTO examples of both splits, without those truncated to nothing."""
    train, train_dropped = _encode_split(train_records, dataset_cfg, tokenizer)
    evaluation, eval_dropped = ([], 0) if eval_records is None else _encode_split(eval_records, dataset_cfg, tokenizer)
    if not train:
        raise ConfigError(
            f"dataset {dataset_cfg.path!r}: no training example has a completion within "
            f"dataset.max_seq_len={dataset_cfg.max_seq_len}"
        )
    return (
        train,
        evaluation,
        {"train": split_stats(train, train_dropped), "eval": split_stats(evaluation, eval_dropped)},
    )

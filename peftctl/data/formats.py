"""Turn raw records into (prompt, response) text pairs, per dataset.format.

Formats: `alpaca` (instruction / input / output) and `text` (no prompt: loss on all tokens).
`chat` / `sharegpt` conversations are encoded by data/chat.py (every assistant turn trained).
"""

from __future__ import annotations

from typing import Any

from peftctl.data.tasks import TASK_FORMATS, task_columns
from peftctl.errors import ConfigError

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


def required_columns(dataset_cfg: Any) -> list[str]:
    if dataset_cfg.format in TASK_FORMATS:
        return task_columns(dataset_cfg)
    if dataset_cfg.format == "alpaca":
        return [dataset_cfg.instruction_column, dataset_cfg.output_column]
    if dataset_cfg.format == "chat":
        return [dataset_cfg.messages_column]
    if dataset_cfg.format == "sharegpt":
        return [dataset_cfg.conversations_column]
    return [dataset_cfg.text_column]


def check_columns(records: Any, dataset_cfg: Any) -> None:
    columns = list(records.column_names)
    for column in required_columns(dataset_cfg):
        if column not in columns:
            raise ConfigError(
                f"dataset {dataset_cfg.path!r} has no column {column!r} needed by format={dataset_cfg.format}; "
                f"its columns: {', '.join(columns)} (set dataset.<role>_column to map one)"
            )


def alpaca_pair(record: dict[str, Any], dataset_cfg: Any) -> tuple[str, str]:
    instruction = str(record[dataset_cfg.instruction_column])
    extra = record.get(dataset_cfg.input_column)
    if extra:
        prompt = ALPACA_PROMPT.format(instruction=instruction, input=extra)
    else:
        prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    return prompt, str(record[dataset_cfg.output_column])


def chat_pair(record: dict[str, Any], dataset_cfg: Any, tokenizer: Any) -> tuple[str, str]:
    messages = record[dataset_cfg.messages_column]
    if not messages or messages[-1].get("role") != "assistant":
        raise ConfigError(
            f"dataset {dataset_cfg.path!r}: every {dataset_cfg.messages_column!r} list must end with an assistant turn"
        )
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("dataset.format=chat needs a tokenizer with a chat template; this model's tokenizer has none")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ConfigError("the tokenizer's chat template renders the conversation prefix differently from the prompt")
    return prompt, full[len(prompt) :]


def to_pair(record: dict[str, Any], dataset_cfg: Any, tokenizer: Any) -> tuple[str, str]:
    """(prompt, response); text format gives ("", text)."""
    if dataset_cfg.format == "alpaca":
        return alpaca_pair(record, dataset_cfg)
    if dataset_cfg.format == "chat":
        return chat_pair(record, dataset_cfg, tokenizer)
    return "", str(record[dataset_cfg.text_column])

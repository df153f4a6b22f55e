"""load -> format -> tokenize -> split: the examples a run trains and evaluates on."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peftctl.data.formats import check_columns, to_pair
from peftctl.data.preference import PREFERENCE_FORMATS, prepare_preference
from peftctl.data.sources import load_raw_splits
from peftctl.data.tokenize import IGNORE_INDEX, Example, encode_pair
from peftctl.data.tasks import TASK_FORMATS, encode_task_records, label_names
from peftctl.errors import ConfigError


@dataclass
class PreparedData:
    train: list[Example]
    eval: list[Example]
    label_names: list[str] | None = None  # classification / token classification label vocabulary


def _encode_all(records: Any, dataset_cfg: Any, tokenizer: Any) -> list[Example]:
    examples = []
    for record in records:
        prompt, response = to_pair(record, dataset_cfg, tokenizer)
        example = encode_pair(prompt, response, tokenizer, dataset_cfg.max_seq_len, dataset_cfg.train_on_prompt)
        if any(label != IGNORE_INDEX for label in example.labels):
            examples.append(example)  # a prompt longer than max_seq_len leaves nothing to learn
    return examples


def prepare_data(dataset_cfg: Any, tokenizer: Any) -> PreparedData:
    train_records, eval_records = load_raw_splits(dataset_cfg)
    if dataset_cfg.format not in PREFERENCE_FORMATS:  # preference formats check their own columns
        check_columns(train_records, dataset_cfg)
    if dataset_cfg.max_samples is not None:
        train_records = train_records.select(range(min(dataset_cfg.max_samples, len(train_records))))
    if eval_records is None and dataset_cfg.eval_size > 0:
        parts = train_records.train_test_split(test_size=dataset_cfg.eval_size, seed=dataset_cfg.seed)
        train_records, eval_records = parts["train"], parts["test"]
    if dataset_cfg.format in PREFERENCE_FORMATS:
        return PreparedData(*prepare_preference(train_records, eval_records, dataset_cfg, tokenizer))
    if dataset_cfg.format in TASK_FORMATS:
        return _prepare_task(train_records, eval_records, dataset_cfg, tokenizer)
    train = _encode_all(train_records, dataset_cfg, tokenizer)
    evaluation = [] if eval_records is None else (check_columns(eval_records, dataset_cfg) or _encode_all(eval_records, dataset_cfg, tokenizer))
    if not train:
        raise ConfigError(f"dataset {dataset_cfg.path!r}: no training example has a response within dataset.max_seq_len={dataset_cfg.max_seq_len}")
    return PreparedData(train=train, eval=evaluation)


def _prepare_task(train_records: Any, eval_records: Any, dataset_cfg: Any, tokenizer: Any) -> PreparedData:
    names = label_names(train_records, dataset_cfg)
    train = encode_task_records(train_records, dataset_cfg, tokenizer, names)
    evaluation = [] if eval_records is None else (check_columns(eval_records, dataset_cfg) or encode_task_records(eval_records, dataset_cfg, tokenizer, names))
    if not train:
        raise ConfigError(f"dataset {dataset_cfg.path!r}: no training example has a label within dataset.max_seq_len={dataset_cfg.max_seq_len}")
    return PreparedData(train=train, eval=evaluation, label_names=names)

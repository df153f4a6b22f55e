"""Encoding for the non-causal task formats: seq2seq, classification, token classification.

* ``seq2seq``: ``source_column`` -> encoder input (+ EOS), ``target_column`` -> decoder labels (+ EOS).
* ``classification``: ``text_column`` [+ ``text_pair_column``] -> BOS text [EOS pair] EOS, label id.
  The byte tokenizer's BOS plays BERT's [CLS] (the pooled token) and EOS its [SEP].
* ``token_classification``: ``tokens_column`` (a list of words) + ``tags_column`` (one tag per word);
  each word is tokenized alone (a leading space before all but the first) and its tag goes on its
  first sub-word; later sub-words and BOS/EOS get -100, as in the usual sub-word alignment.

Labels may be strings or integers; ``label_names`` (dataset config, else sorted from the training
split) fixes the id of each.
"""

from __future__ import annotations

from typing import Any

from peftctl.data.tokenize import IGNORE_INDEX, Example
from peftctl.errors import ConfigError

TASK_FORMATS = {"seq2seq": "seq2seq_lm", "classification": "seq_cls", "token_classification": "token_cls"}


def task_columns(dataset_cfg: Any) -> list[str]:
    if dataset_cfg.format == "seq2seq":
        return [dataset_cfg.source_column, dataset_cfg.target_column]
    if dataset_cfg.format == "classification":
        pair = [dataset_cfg.text_pair_column] if dataset_cfg.text_pair_column else []
        return [dataset_cfg.text_column, *pair, dataset_cfg.label_column]
    return [dataset_cfg.tokens_column, dataset_cfg.tags_column]


def label_names(records: Any, dataset_cfg: Any) -> list[str] | None:
    """The label (or tag) vocabulary, in id order."""
    if dataset_cfg.format == "seq2seq":
        return None
    if dataset_cfg.label_names:
        return [str(name) for name in dataset_cfg.label_names]
    if dataset_cfg.format == "classification":
        values = {record[dataset_cfg.label_column] for record in records}
    else:
        values = {tag for record in records for tag in record[dataset_cfg.tags_column]}
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return [str(i) for i in range(max(values) + 1)]
    return sorted(str(v) for v in values)


def _label_id(value: Any, names: list[str], dataset_cfg: Any) -> int:
    key = str(value)
    if key not in names:
        raise ConfigError(f"dataset {dataset_cfg.path!r}: label {value!r} is not in dataset.label_names={names}")
    return names.index(key)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _specials(tokenizer: Any) -> tuple[list[int], list[int]]:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return bos, eos


def encode_task(record: dict[str, Any], dataset_cfg: Any, tokenizer: Any, names: list[str] | None) -> Example:
    """One record -> Example (labels: decoder ids, [class id], or one tag id / -100 per input token)."""
    bos, eos = _specials(tokenizer)
    limit = dataset_cfg.max_seq_len
    if dataset_cfg.format == "seq2seq":
        source, target = str(record[dataset_cfg.source_column]), str(record[dataset_cfg.target_column])
        input_ids = (_ids(tokenizer, source) + eos)[:limit]
        labels = (_ids(tokenizer, target) + eos)[:limit]
        return Example(input_ids, labels, source, target)
    assert names is not None
    if dataset_cfg.format == "classification":
        text = str(record[dataset_cfg.text_column])
        ids = bos + _ids(tokenizer, text) + eos
        if dataset_cfg.text_pair_column:
            ids += _ids(tokenizer, str(record[dataset_cfg.text_pair_column])) + eos
        label = _label_id(record[dataset_cfg.label_column], names, dataset_cfg)
        return Example(ids[:limit], [label], text, names[label])
    words, tags = list(record[dataset_cfg.tokens_column]), list(record[dataset_cfg.tags_column])
    if len(words) != len(tags):
        raise ConfigError(f"dataset {dataset_cfg.path!r}: a record has {len(words)} tokens but {len(tags)} tags")
    input_ids, labels = list(bos), [IGNORE_INDEX] * len(bos)
    for index, (word, tag) in enumerate(zip(words, tags)):
        pieces = _ids(tokenizer, (" " if index else "") + str(word))
        input_ids += pieces
        labels += [_label_id(tag, names, dataset_cfg)] + [IGNORE_INDEX] * (len(pieces) - 1)
    input_ids, labels = (input_ids + eos)[:limit], (labels + [IGNORE_INDEX] * len(eos))[:limit]
    return Example(input_ids, labels, " ".join(map(str, words)), " ".join(map(str, tags)))


def encode_task_records(records: Any, dataset_cfg: Any, tokenizer: Any, names: list[str] | None) -> list[Example]:
    examples = [encode_task(record, dataset_cfg, tokenizer, names) for record in records]
    return [e for e in examples if any(label != IGNORE_INDEX for label in e.labels)]

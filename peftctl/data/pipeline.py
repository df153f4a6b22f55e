"""load -> format -> tokenize (cached) -> split -> pack: the examples a run trains and evaluates on.

Tokenization runs through ``datasets.map`` (batched, ``dataset.num_proc`` processes) and its result
is saved under ``$PEFTCTL_CACHE/data/<key>`` (default ~/.cache/peftctl), the key a hash of the
records' fingerprint (datasets derives it from the data files and the select / split applied),
the tokenizer, the dataset settings that change tokens, and the chat template. A later run with the
same key loads the tokens and tokenizes nothing. Packing (data/packing.py) runs after the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from peftctl.data.chat import encode_chat_record, resolve_template
from peftctl.data.formats import check_columns, to_pair
from peftctl.data.packing import pack_examples, packing_efficiency
from peftctl.data.preference import PREFERENCE_FORMATS, prepare_preference
from peftctl.data.sources import load_raw_splits
from peftctl.data.streaming import prepare_stream
from peftctl.data.tasks import TASK_FORMATS, encode_task, label_names
from peftctl.data.tokenize import IGNORE_INDEX, Example, encode_pair
from peftctl.errors import ConfigError

CACHE_VERSION = 1  # bump when the encoding of a record changes, so old caches are not reused
CHAT_FORMATS = ("chat", "sharegpt")
ROW_COLUMN = "__row__"  # the record's position in its file, for error messages
PROGRESS_MIN_RECORDS = 10_000  # show a tokenization progress bar from this many records
COUNTS_FILE = "peftctl_counts.json"
NOT_IN_KEY = ("packing", "packing_split", "num_proc", "cache")  # settings that leave the tokens unchanged


@dataclass
class PreparedData:
    train: Any  # what the loop consumes: a list of Examples (PackedRows with dataset.packing); streaming: a TrainStream
    eval: list[Any]
    label_names: list[str] | None = None  # classification / token classification label vocabulary
    train_examples: list[Example] | None = None  # always unpacked (the same list as train without packing)
    eval_examples: list[Example] | None = None
    stats: dict[str, Any] = field(default_factory=dict)  # per split: examples, dropped, truncated, tokens, ...
    notes: list[str] = field(default_factory=list)  # one-line messages for the user (cache use)

    def __post_init__(self) -> None:
        self.train_examples = self.train if self.train_examples is None else self.train_examples
        self.eval_examples = self.eval if self.eval_examples is None else self.eval_examples


# ---------------------------------------------------------------------------- one record -> Example
def record_encoder(dataset_cfg: Any, tokenizer: Any, names: list[str] | None) -> Callable[[dict[str, Any]], Example]:
    """The function that tokenizes one record of this dataset's format."""
    if dataset_cfg.format in TASK_FORMATS:
        return lambda record: encode_task(record, dataset_cfg, tokenizer, names)
    if dataset_cfg.format in CHAT_FORMATS:
        template = resolve_template(dataset_cfg, tokenizer)
        return lambda record: encode_chat_record(record, dataset_cfg, tokenizer, template, record.get(ROW_COLUMN))

    def encode(record: dict[str, Any]) -> Example:
        prompt, response = to_pair(record, dataset_cfg, tokenizer)
        return encode_pair(prompt, response, tokenizer, dataset_cfg.max_seq_len, dataset_cfg.train_on_prompt)

    return encode


def encode_record(encode: Callable[[dict[str, Any]], Example], record: dict[str, Any]) -> Example:
    """Tokenize one record (a seam: tests count the calls to see that a cached run tokenizes nothing)."""
    return encode(record)


EXAMPLE_COLUMNS = ("input_ids", "labels", "prompt", "response", "truncated")


class _BatchEncoder:
    """datasets.map function: a batch of records -> the kept examples' columns (a picklable object,
    so that num_proc > 1 works)."""

    def __init__(self, encode: Callable[[dict[str, Any]], Example]) -> None:
        self.encode = encode

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {name: [] for name in EXAMPLE_COLUMNS}
        size = len(next(iter(batch.values())))
        for index in range(size):
            example = encode_record(self.encode, {key: values[index] for key, values in batch.items()})
            if any(
                label != IGNORE_INDEX for label in example.labels
            ):  # a prompt longer than max_seq_len leaves nothing to learn
                for name in EXAMPLE_COLUMNS:
                    out[name].append(getattr(example, name))
        return out


# ---------------------------------------------------------------------------- cache
def cache_root() -> Path:
    return Path(os.environ.get("PEFTCTL_CACHE", Path.home() / ".cache" / "peftctl"))


def tokenizer_fingerprint(tokenizer: Any) -> str:
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    digest.update(vocabulary.encode())
    digest.update(
        repr(
            (
                type(tokenizer).__name__,
                sorted(tokenizer.special_tokens_map.items()),
                getattr(tokenizer, "chat_template", None),
            )
        ).encode()
    )
    return digest.hexdigest()


def cache_key(records: Any, dataset_cfg: Any, tokenizer: Any, names: list[str] | None) -> str:
    settings = {k: v for k, v in dataclasses.asdict(dataset_cfg).items() if k not in NOT_IN_KEY}
    if dataset_cfg.format in CHAT_FORMATS:
        settings["chat_template_source"] = resolve_template(dataset_cfg, tokenizer)
    parts = [CACHE_VERSION, records._fingerprint, tokenizer_fingerprint(tokenizer), settings, names]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _examples_from(columns: dict[str, list[Any]]) -> list[Example]:
    return [Example(*values) for values in zip(*(columns[name] for name in EXAMPLE_COLUMNS))]


def _example_features() -> Any:
    import datasets  # lazy: a heavy import, only when data is loaded (CLI start-up)

    sequence = getattr(datasets, "List", datasets.Sequence)
    return datasets.Features(
        {
            "input_ids": sequence(datasets.Value("int64")),
            "labels": sequence(datasets.Value("int64")),
            "prompt": datasets.Value("string"),
            "response": datasets.Value("string"),
            "truncated": datasets.Value("bool"),
        }
    )


def _tokenize(records: Any, dataset_cfg: Any, encode: Callable[[dict[str, Any]], Example], fingerprint: str) -> Any:
    import datasets  # lazy: a heavy import, only when data is loaded (CLI start-up)

    show_progress = len(records) >= PROGRESS_MIN_RECORDS
    if show_progress:
        datasets.enable_progress_bars()
    try:
        return records.map(
            _BatchEncoder(encode),
            batched=True,
            batch_size=256,
            num_proc=dataset_cfg.num_proc,
            remove_columns=list(records.column_names),
            features=_example_features(),
            keep_in_memory=True,
            load_from_cache_file=False,
            new_fingerprint=fingerprint,
            desc="tokenize",
        )
    finally:
        datasets.disable_progress_bars()


def encode_records(
    records: Any, dataset_cfg: Any, tokenizer: Any, names: list[str] | None, notes: list[str], what: str
) -> tuple[list[Example], int]:
    """(examples, how many records were dropped for having no trained token); from the cache when
    dataset.cache and the same data, tokenizer and settings were tokenized before."""
    import datasets  # lazy: a heavy import, only when data is loaded (CLI start-up)

    key = cache_key(records, dataset_cfg, tokenizer, names) if dataset_cfg.cache else None
    folder = cache_root() / "data" / key if key else None
    if folder is not None and (folder / COUNTS_FILE).is_file():
        counts = json.loads((folder / COUNTS_FILE).read_text())
        notes.append(f"data: {what} tokens loaded from the cache {folder} (nothing tokenized)")
        examples = _examples_from(datasets.load_from_disk(str(folder)).to_dict()) if counts["examples"] else []
        return examples, counts["dropped"]
    encoded = _tokenize(records, dataset_cfg, record_encoder(dataset_cfg, tokenizer, names), key or "peftctl-uncached")
    dropped = len(records) - len(encoded)
    if folder is not None:
        _save_to_cache(encoded, dropped, folder)
        notes.append(f"data: {what} tokenized ({len(records)} records), cached in {folder}")
    return _examples_from(encoded.to_dict()), dropped


def _save_to_cache(encoded: Any, dropped: int, folder: Path) -> None:
    """Write into a temporary sibling, then rename it into place; if another process (a DDP rank)
    got there first, keep its copy (the same tokens)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        if len(encoded):  # (datasets cannot load back an empty saved dataset)
            encoded.save_to_disk(str(tmp))
        (tmp / COUNTS_FILE).write_text(json.dumps({"examples": len(encoded), "dropped": dropped}))
        os.rename(tmp, folder)
    except OSError:
        if not (folder / COUNTS_FILE).is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------- the pipeline
def split_stats(examples: list[Example], dropped: int, task_type_causal: bool = True) -> dict[str, int]:
    trained = sum(
        sum(1 for label in e.labels[1 if task_type_causal else 0 :] if label != IGNORE_INDEX) for e in examples
    )
    return {
        "examples": len(examples),
        "dropped": dropped,
        "truncated": sum(bool(e.truncated) for e in examples),
        "tokens": sum(len(e.input_ids) for e in examples),
        "trained_tokens": trained,
    }


def _select_and_split(train_records: Any, eval_records: Any, dataset_cfg: Any) -> tuple[Any, Any]:
    if dataset_cfg.format in CHAT_FORMATS:  # number the records before any shuffle, for error messages
        train_records = train_records.add_column(ROW_COLUMN, list(range(len(train_records))))
        if eval_records is not None:
            eval_records = eval_records.add_column(ROW_COLUMN, list(range(len(eval_records))))
    if dataset_cfg.max_samples is not None:
        train_records = train_records.select(range(min(dataset_cfg.max_samples, len(train_records))))
    if eval_records is None and dataset_cfg.eval_size > 0:
        try:
            parts = train_records.train_test_split(test_size=dataset_cfg.eval_size, seed=dataset_cfg.seed)
        except ValueError:  # too few records to hold any out
            raise ConfigError(
                f"dataset.eval_size={dataset_cfg.eval_size} leaves no training or no eval example of "
                f"{len(train_records)} records; "
                "set dataset.eval_size=0 or a dataset.eval_split"
            ) from None
        train_records, eval_records = parts["train"], parts["test"]
    return train_records, eval_records


def prepare_data(dataset_cfg: Any, tokenizer: Any) -> PreparedData:
    if dataset_cfg.format in CHAT_FORMATS:
        resolve_template(dataset_cfg, tokenizer)  # a bad template name fails before any data is read
    if dataset_cfg.streaming:
        return prepare_streaming(dataset_cfg, tokenizer)
    train_records, eval_records = load_raw_splits(dataset_cfg)
    if dataset_cfg.format in PREFERENCE_FORMATS:  # data/preference.py checks its own columns and rows
        train, evaluation, stats = prepare_preference(
            *_select_and_split(train_records, eval_records, dataset_cfg), dataset_cfg, tokenizer
        )
        return PreparedData(train=train, eval=evaluation, stats=stats)
    check_columns(train_records, dataset_cfg)
    if eval_records is not None:
        check_columns(eval_records, dataset_cfg)
    train_records, eval_records = _select_and_split(train_records, eval_records, dataset_cfg)
    task = dataset_cfg.format in TASK_FORMATS
    names = label_names(train_records, dataset_cfg) if task else None
    notes: list[str] = []
    train, train_dropped = encode_records(train_records, dataset_cfg, tokenizer, names, notes, "train")
    evaluation, eval_dropped = (
        ([], 0) if eval_records is None else encode_records(eval_records, dataset_cfg, tokenizer, names, notes, "eval")
    )
    if not train:
        what = "label" if task else "response"
        raise ConfigError(
            f"dataset {dataset_cfg.path!r}: no training example has a {what} within "
            f"dataset.max_seq_len={dataset_cfg.max_seq_len}"
        )
    causal = dataset_cfg.format not in TASK_FORMATS
    stats = {"train": split_stats(train, train_dropped, causal), "eval": split_stats(evaluation, eval_dropped, causal)}
    data = PreparedData(train=train, eval=evaluation, label_names=names, stats=stats, notes=notes)
    return pack(data, dataset_cfg) if dataset_cfg.packing else data


def prepare_streaming(dataset_cfg: Any, tokenizer: Any) -> PreparedData:
    """dataset.streaming: ``train`` is a data/streaming.py TrainStream (read lazily, never counted:
    ``stats["train"]`` stays empty and ``train_examples`` is []); the held-out data is in memory."""
    stream, held_out, eval_items, notes = prepare_stream(dataset_cfg, record_encoder(dataset_cfg, tokenizer, None))
    stats: dict[str, Any] = {"train": {}, "eval": split_stats(held_out, 0)}
    if dataset_cfg.packing:
        efficiency = packing_efficiency(eval_items, dataset_cfg.max_seq_len)
        stats["eval"].update({"rows": len(eval_items), "packing_efficiency": round(efficiency, 4)})
    return PreparedData(
        train=stream, eval=eval_items, train_examples=[], eval_examples=held_out, stats=stats, notes=notes
    )


def pack(data: PreparedData, dataset_cfg: Any) -> PreparedData:
    """The same data with train / eval packed into rows (the unpacked lists stay in *_examples)."""
    rows = {}
    for name, examples in (("train", data.train_examples), ("eval", data.eval_examples)):
        rows[name] = pack_examples(examples, dataset_cfg.max_seq_len, dataset_cfg.packing_split) if examples else []
        data.stats[name].update(
            {
                "rows": len(rows[name]),
                "packing_efficiency": round(packing_efficiency(rows[name], dataset_cfg.max_seq_len), 4),
            }
        )
    train = data.stats["train"]
    data.notes.append(
        f"data: packed {train['examples']} train examples into {train['rows']} rows of {dataset_cfg.max_seq_len} "
        "tokens "
        f"({train['packing_efficiency']:.0%} real tokens)"
    )
    return dataclasses.replace(data, train=rows["train"], eval=rows["eval"])

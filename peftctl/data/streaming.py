"""dataset.streaming=true: train on a JSON Lines file larger than memory.

The training data is never materialised: the file is read one line at a time from a byte offset,
each record tokenized as it is read (the same encoders as the map-style path), packed on the fly
(dataset.packing) and dealt out in micro-batches. What is held in memory is bounded by the batch and
the packer's open rows, not by the file.

Exact resume: ``TrainStream.state_dict()`` is the whole position of the stream after the last
micro-batch handed out — epoch, byte offset and line number of the next record, the records read
this epoch, the packer's open rows and the items made but not yet batched. The loop saves it in each
checkpoint (trainer_state.json) and a resumed run continues from there with exactly the batches the
uninterrupted run would have seen.

Differences from the map-style path (documented in the README):
- the file is read in order (no per-epoch shuffle: shuffle the file beforehand);
- packing is first-fit over a few open rows (OPEN_ROWS) in reading order, not first-fit-decreasing
  over the whole dataset (which needs every length up front);
- the held-out data is the file's first ``dataset.eval_holdout`` records (kept in memory), or the
  dataset.eval_split file of a built-in dataset; dataset.eval_size (a fraction of a known size) is not
  used;
- dataset.max_samples caps the training records read per epoch; the schedule needs train.max_steps.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from peftctl.data.builtin import builtin_files
from peftctl.data.formats import required_columns
from peftctl.data.packing import PackedRow, _first_label_masked, _row, pack_examples
from peftctl.data.tokenize import IGNORE_INDEX, Example
from peftctl.errors import ConfigError

STREAM_FORMATS = ("alpaca", "text", "chat", "sharegpt")  # one record -> one causal-LM example
DATA_DRIVEN_INITS = ("eva", "corda")  # read the whole training set before training starts
OPEN_ROWS = 8  # packing: rows kept open for first-fit; the oldest is closed when none has room
BUILTIN_PREFIX = "builtin:"

Piece = tuple[list[int], list[int], list[int]]  # (input_ids, labels, position_ids) of one example in a row


# ---------------------------------------------------------------------------- config checks
def streaming_config_problem(dataset: Any, task_type: str, adapter: Any, train: Any) -> str | None:
    """Why this config cannot stream (one line naming the field), or None."""
    if dataset.format not in STREAM_FORMATS:
        return (
            f"dataset.streaming=true is not valid with dataset.format={dataset.format}; "
            f"streaming reads {', '.join(STREAM_FORMATS)} (causal LM) records"
        )
    if task_type != "causal_lm":
        return f"dataset.streaming=true is not valid with model.task_type={task_type}; streaming is for causal_lm only"
    if train.max_steps <= 0:
        return (
            f"train.max_steps={train.max_steps} is not valid with dataset.streaming=true: a stream has no known "
            "length to count epochs in; set train.max_steps > 0"
        )
    init = getattr(adapter, "init_lora_weights", None)
    if isinstance(init, str) and init in DATA_DRIVEN_INITS:
        return (
            f"adapter.init_lora_weights={init} is not valid with dataset.streaming=true: its data-driven init reads "
            "the training set before training starts; set dataset.streaming=false"
        )
    path = str(dataset.path)
    if not path.startswith(BUILTIN_PREFIX) and Path(path).suffix.lower() != ".jsonl":
        return f"dataset.path={path!r} is not valid with dataset.streaming=true; expected a local .jsonl file"
    if dataset.eval_split is not None and not path.startswith(BUILTIN_PREFIX):
        return (
            f"dataset.eval_split={dataset.eval_split!r} is not valid with dataset.streaming=true on a file; "
            "hold out the file's first records with dataset.eval_holdout=N"
        )
    return None


def stream_files(dataset_cfg: Any) -> tuple[Path, Path | None]:
    """(training file, eval file or None)."""
    path = str(dataset_cfg.path)
    if path.startswith(BUILTIN_PREFIX):
        files = builtin_files(path[len(BUILTIN_PREFIX) :])
        if dataset_cfg.split not in files:
            raise ConfigError(f"dataset.split={dataset_cfg.split!r} is not in {path}; splits: {', '.join(files)}")
        if dataset_cfg.eval_split is not None and dataset_cfg.eval_split not in files:
            raise ConfigError(
                f"dataset.eval_split={dataset_cfg.eval_split!r} is not in {path}; splits: {', '.join(files)}"
            )
        evaluation = Path(files[dataset_cfg.eval_split]) if dataset_cfg.eval_split is not None else None
        return Path(files[dataset_cfg.split]), evaluation
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"dataset.path={path!r}: no such file")
    return file, None


# ---------------------------------------------------------------------------- reading
def read_records(file: Path, offset: int = 0, line: int = 0) -> Iterator[tuple[dict[str, Any], int, int]]:
    """(record, its line number, the byte offset after it) for each non-blank line from ``offset``
    (``line``: the number of lines before ``offset``)."""
    with open(file, "rb") as handle:
        handle.seek(offset)
        while True:
            raw = handle.readline()
            if not raw:
                return
            offset, line = offset + len(raw), line + 1
            if raw.strip():
                yield parse_line(raw, file, line), line, offset


def parse_line(raw: bytes, file: Path, line: int) -> dict[str, Any]:
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "msg", None) or type(exc).__name__
        raise ConfigError(
            f"dataset.path: {file} line {line} is not valid JSON ({reason}); expected one record per line"
        ) from None
    if not isinstance(record, dict):
        raise ConfigError(f"dataset.path: {file} line {line} is not a JSON object; expected one record per line")
    return record


def check_record_columns(record: dict[str, Any], dataset_cfg: Any, file: Path, line: int) -> None:
    for column in required_columns(dataset_cfg):
        if column not in record:
            raise ConfigError(
                f"dataset {str(file)!r} line {line} has no column {column!r} needed by format={dataset_cfg.format}; "
                f"its columns: {', '.join(record)} (set dataset.<role>_column to map one)"
            )


def encode_line(
    encode: Callable[[dict[str, Any]], Example], record: dict[str, Any], dataset_cfg: Any, file: Path, line: int
) -> Example | None:
    """The record's example, or None if nothing of it would be trained (a prompt past max_seq_len)."""
    check_record_columns(record, dataset_cfg, file, line)
    try:
        example = encode({**record, "__row__": line - 1})  # chat errors name "record <line>"
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ConfigError(f"dataset {str(file)!r} line {line}: cannot read the record ({exc})") from None
    return example if any(label != IGNORE_INDEX for label in example.labels) else None


def read_examples(
    file: Path, dataset_cfg: Any, encode: Callable[[dict[str, Any]], Example], limit: int | None = None
) -> tuple[list[Example], int, int]:
    """The examples of the first ``limit`` records (all: None), with the byte offset and line number
    after the last record read (where the training stream starts when these are held out)."""
    examples: list[Example] = []
    offset, line, count = 0, 0, 0
    if limit == 0:
        return examples, offset, line
    for record, line, offset in read_records(file):
        example = encode_line(encode, record, dataset_cfg, file, line)
        if example is not None:
            examples.append(example)
        count += 1
        if limit is not None and count >= limit:
            break
    return examples, offset, line


# ---------------------------------------------------------------------------- packing on the fly
class StreamPacker:
    """Packs examples into rows of ``capacity`` tokens as they arrive. Whole examples (split=False)
    go into the first of at most OPEN_ROWS open rows with room (a full row closes; when none has room
    the oldest closes); split=True cuts the concatenated examples into full rows, as pack_examples
    does. ``open_rows`` is the state a checkpoint saves."""

    def __init__(self, capacity: int, split: bool, open_rows: list[list[Piece]] | None = None) -> None:
        self.capacity, self.split = capacity, split
        self.open_rows: list[list[Piece]] = open_rows or []

    @staticmethod
    def _used(row: list[Piece]) -> int:
        return sum(len(piece[0]) for piece in row)

    def add(self, example: Example) -> list[PackedRow]:
        """The rows this example completes."""
        ids, labels = list(example.input_ids)[: self.capacity], _first_label_masked(example)[: self.capacity]
        if self.split:
            return self._add_split(ids, labels)
        piece: Piece = (ids, labels, list(range(len(ids))))
        for index, row in enumerate(self.open_rows):
            if self._used(row) + len(ids) <= self.capacity:
                row.append(piece)
                return [_row(self.open_rows.pop(index))] if self._used(row) == self.capacity else []
        closed = [_row(self.open_rows.pop(0))] if len(self.open_rows) >= OPEN_ROWS else []
        self.open_rows.append([piece])
        return closed + ([_row(self.open_rows.pop())] if len(ids) == self.capacity else [])

    def _add_split(self, ids: list[int], labels: list[int]) -> list[PackedRow]:
        if not self.open_rows:
            self.open_rows.append([])
        done, offset = [], 0
        while offset < len(ids):
            row = self.open_rows[0]
            take = min(self.capacity - self._used(row), len(ids) - offset)
            end = offset + take
            row.append((ids[offset:end], labels[offset:end], list(range(offset, end))))
            offset += take
            if self._used(row) == self.capacity:
                done.append(_row(row))
                self.open_rows[0] = []
        return done

    def flush(self) -> list[PackedRow]:
        """Close every open row (the end of an epoch)."""
        rows = [_row(row) for row in self.open_rows if row]
        self.open_rows = []
        return rows


# ---------------------------------------------------------------------------- the training stream
@dataclass
class StreamState:
    epoch: int = 0
    offset: int = 0  # byte offset of the next line to read
    line: int = 0  # lines before that offset
    records: int = 0  # training records read this epoch (dataset.max_samples)
    items: int = 0  # examples (packed: rows) made this epoch
    exhausted: bool = False  # the epoch's records are all read; what is left is in `ready`
    ready: list[Any] = field(default_factory=list)  # items made and not yet batched (Example / PackedRow)
    open_rows: list[list[Piece]] = field(default_factory=list)  # the packer's


def item_to_dict(item: Any) -> dict[str, Any]:
    return {"kind": "row" if isinstance(item, PackedRow) else "example", **dataclasses.asdict(item)}


def item_from_dict(values: dict[str, Any]) -> Any:
    values = dict(values)
    kind = values.pop("kind")
    return PackedRow(**values) if kind == "row" else Example(**values)


class TrainStream:
    """The training items of a streamed dataset, read lazily from ``file`` starting after the
    held-out records (byte ``start``, line ``start_line``), epoch after epoch."""

    def __init__(
        self,
        file: Path,
        dataset_cfg: Any,
        encode: Callable[[dict[str, Any]], Example],
        start: int = 0,
        start_line: int = 0,
    ) -> None:
        self.file, self.dataset_cfg, self.encode = file, dataset_cfg, encode
        self.start, self.start_line = start, start_line
        self.size = file.stat().st_size
        self.state = StreamState(offset=start, line=start_line)

    # ------------------------------------------------------------------ state (checkpoints)
    def state_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self.state)
        values["ready"] = [item_to_dict(item) for item in self.state.ready]
        values["file_size"] = self.size  # a resume checks that the offsets still point into the same file
        return values

    def load_state_dict(self, values: dict[str, Any]) -> None:
        values = dict(values)
        size = values.pop("file_size", self.size)
        if size != self.size:
            raise ConfigError(
                f"dataset.path: {self.file} has {self.size} bytes, the checkpoint's stream position was taken in a "
                f"file of {size} bytes; a streamed run resumes only on the unchanged file"
            )
        values["ready"] = [item_from_dict(item) for item in values.get("ready", [])]
        values["open_rows"] = [[tuple(piece) for piece in row] for row in values.get("open_rows", [])]
        self.state = StreamState(**values)

    def epoch_progress(self) -> float:
        """Epochs done, the current one as the fraction of its bytes read."""
        span = max(self.size - self.start, 1)
        return self.state.epoch + min(max(self.state.offset - self.start, 0) / span, 1.0)

    # ------------------------------------------------------------------ reading
    def _read_more(self, reader: Iterator[tuple[dict[str, Any], int, int]], packer: StreamPacker | None) -> None:
        """Read one record (or end the epoch), appending what it completes to state.ready."""
        state, cap = self.state, self.dataset_cfg.max_samples
        record = next(reader, None) if cap is None or state.records < cap else None
        if record is None:
            flushed = packer.flush() if packer is not None else []
            state.ready += flushed
            state.items += len(flushed)
            state.exhausted = True
            return
        values, state.line, state.offset = record
        state.records += 1
        example = encode_line(self.encode, values, self.dataset_cfg, self.file, state.line)
        if example is None:
            return
        made = packer.add(example) if packer is not None else [example]
        state.ready += made
        state.items += len(made)

    def _next_epoch(self) -> None:
        if self.state.items == 0:
            held_out = f" after the {self.start_line} held-out lines" if self.start_line else ""
            raise ConfigError(
                f"dataset {str(self.file)!r}: no training record{held_out} has a response within "
                f"dataset.max_seq_len={self.dataset_cfg.max_seq_len}"
            )
        self.state = StreamState(epoch=self.state.epoch + 1, offset=self.start, line=self.start_line)

    def micro_batches(self, batch_size: int) -> Iterator[list[Any]]:
        """Endless micro-batches from the saved position; between two batches ``state`` is exactly
        the position after the last one handed out. An epoch's last batch may be smaller."""
        while True:
            state = self.state
            reader = read_records(self.file, state.offset, state.line)  # open for the rest of the epoch
            packer = (
                StreamPacker(self.dataset_cfg.max_seq_len, self.dataset_cfg.packing_split, state.open_rows)
                if self.dataset_cfg.packing
                else None
            )
            while not (state.exhausted and not state.ready):
                while len(state.ready) < batch_size and not state.exhausted:
                    self._read_more(reader, packer)
                    state.open_rows = packer.open_rows if packer is not None else []
                if state.ready:
                    batch, state.ready = state.ready[:batch_size], state.ready[batch_size:]
                    yield batch
            reader.close()
            self._next_epoch()

    def first_items(self, n: int, batch_size: int = 1) -> list[Any]:
        """The first ``n`` items of the run, in the order it reads them (a fresh stream: ``state`` unchanged)."""
        fresh = TrainStream(self.file, self.dataset_cfg, self.encode, self.start, self.start_line)
        items: list[Any] = []
        batches = fresh.micro_batches(max(batch_size, 1))
        while len(items) < n:
            batch = next(batches)
            if fresh.state.epoch > 0:  # the whole epoch holds fewer than n
                break
            items += batch
        return items[:n]

    def first_examples(self, n: int) -> list[Example]:
        """The first ``n`` training examples, unpacked (an eval sample when nothing is held out)."""
        examples: list[Example] = []
        for values, line, _ in read_records(self.file, self.start, self.start_line):
            example = encode_line(self.encode, values, self.dataset_cfg, self.file, line)
            if example is not None:
                examples.append(example)
            if len(examples) >= n:
                break
        return examples


# ---------------------------------------------------------------------------- the pipeline's entry
def prepare_stream(
    dataset_cfg: Any, encode: Callable[[dict[str, Any]], Example]
) -> tuple[TrainStream, list[Example], list[Any], list[str]]:
    """(training stream, held-out examples, held-out items (packed rows with dataset.packing), notes)."""
    train_file, eval_file = stream_files(dataset_cfg)
    holdout = dataset_cfg.eval_holdout or 0
    if eval_file is not None:
        held_out, _, _ = read_examples(eval_file, dataset_cfg, encode)
        start, start_line = 0, 0
        where = f"the {dataset_cfg.eval_split} split ({len(held_out)} examples)"
    else:
        held_out, start, start_line = read_examples(train_file, dataset_cfg, encode, holdout)
        where = f"the file's first {holdout} records" if holdout else "nothing"
        where += " (dataset.eval_holdout)"
    stream = TrainStream(train_file, dataset_cfg, encode, start, start_line)
    stream.first_items(1)  # ConfigError now (not in the loop) when no record is left to train on
    eval_items: list[Any] = held_out
    if dataset_cfg.packing and held_out:
        eval_items = pack_examples(held_out, dataset_cfg.max_seq_len, dataset_cfg.packing_split)
    packing = ", packed on the fly (first-fit over open rows)" if dataset_cfg.packing else ""
    notes = [f"data: streaming {train_file} in file order{packing}; held out for eval: {where}"]
    return stream, held_out, eval_items, notes

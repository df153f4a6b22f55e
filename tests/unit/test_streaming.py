"""dataset.streaming: the stream reads the file in order, packs every token exactly once, and a
stream restored from its state_dict at any batch boundary continues with exactly the same batches
(the basis of exact resume); config combinations that cannot stream are refused naming the field."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from peftctl.config.compose import compose_config
from peftctl.data.pipeline import prepare_data
from peftctl.data.streaming import OPEN_ROWS, StreamPacker
from peftctl.data.tokenize import IGNORE_INDEX, Example
from peftctl.errors import ConfigError
from peftctl.models.tokenizer import build_byte_tokenizer


def write_texts(path: Path, n: int, seed: int = 0, min_len: int = 4, max_len: int = 60) -> Path:
    rng = random.Random(seed)
    words = ["ab", "cd", "efg", "h", "ijkl"]
    lines = [
        json.dumps({"text": " ".join([str(i)] + rng.choices(words, k=rng.randint(min_len, max_len) // 3))})
        for i in range(n)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _prepared(path: Path, *extra: str) -> object:
    cfg = compose_config(
        ["dataset=text_local", f"dataset.path={path}", "dataset.streaming=true", "train.max_steps=5", *extra]
    )
    return prepare_data(cfg.dataset, build_byte_tokenizer())


def _ids(batches: list[list]) -> list[list[list[int]]]:
    return [[list(item.input_ids) for item in batch] for batch in batches]


@pytest.mark.parametrize("packing", ["false", "true"])
def test_restored_state_continues_with_the_same_batches(tmp_path: Path, packing: str) -> None:
    path = write_texts(tmp_path / "d.jsonl", 90)
    options = ("dataset.max_seq_len=64", f"dataset.packing={packing}", "dataset.eval_holdout=10")
    stream = _prepared(path, *options).train
    batches, states = stream.micro_batches(3), []
    reference = []
    for _ in range(60):  # several epochs of the 80 training records
        states.append(json.loads(json.dumps(stream.state_dict())))  # what a checkpoint stores (JSON)
        reference.append(next(batches))
        # what the stream holds between batches is bounded by the batch and the packer, not the file
        assert len(stream.state.ready) < 3 + OPEN_ROWS and len(stream.state.open_rows) <= OPEN_ROWS
    assert stream.state.epoch >= 2
    if packing == "true":  # the packer's carry-over state was exercised
        assert any(state["open_rows"] for state in states)
    for at in (1, 7, len(reference) - 5):
        restored = _prepared(path, *options).train
        restored.load_state_dict(states[at])
        again = restored.micro_batches(3)
        assert _ids([next(again) for _ in range(5)]) == _ids(reference[at : at + 5])


def test_unpacked_stream_is_the_file_in_order_after_the_holdout(tmp_path: Path) -> None:
    path = write_texts(tmp_path / "d.jsonl", 30)
    data = _prepared(path, "dataset.eval_holdout=4", "dataset.max_seq_len=256")
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    tokenizer = build_byte_tokenizer()
    assert [e.response for e in data.eval_examples] == texts[:4]
    first = data.train.first_items(26, batch_size=4)
    assert [e.response for e in first] == texts[4:]
    assert tokenizer.decode(first[0].input_ids, skip_special_tokens=True) == texts[4]


@pytest.mark.parametrize("split", [False, True])
def test_packer_keeps_every_token_once_within_rows(split: bool) -> None:
    rng = random.Random(1)
    examples = []
    for index in range(200):
        n = rng.randint(2, 40)
        examples.append(Example([index] * n, [IGNORE_INDEX] + [index] * (n - 1), "", ""))
    packer, rows = StreamPacker(48, split), []
    for example in examples:
        rows += packer.add(example)
        assert len(packer.open_rows) <= OPEN_ROWS
    rows += packer.flush()
    assert all(len(row.input_ids) <= 48 for row in rows)
    assert sorted(t for row in rows for t in row.input_ids) == sorted(t for e in examples for t in e.input_ids)
    for row in rows:  # positions run on within each piece; an example's first label is masked
        start = 0
        for length in row.lengths:
            first = row.position_ids[start]
            assert row.position_ids[start : start + length] == list(range(first, first + length))
            assert first == 0 or split  # only packing_split cuts an example, continuing its positions
            assert row.labels[start] == IGNORE_INDEX or first > 0
            start += length
    if not split:
        assert sum(len(r.input_ids) for r in rows) / (48 * len(rows)) > 0.8  # first-fit over open rows packs well


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.max_steps=-1", "train.max_steps"),
        ("adapter.init_lora_weights=eva", "adapter.init_lora_weights"),
        ("dataset.path=data.csv", "dataset.path"),
        ("dataset.eval_split=test", "dataset.eval_split"),
        ("dataset.eval_holdout=-1", "dataset.eval_holdout"),
    ],
)
def test_combinations_that_cannot_stream_name_the_field(override: str, field: str) -> None:
    base = ["dataset=text_local", "dataset.path=data.jsonl", "dataset.streaming=true", "train.max_steps=5"]
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as error:
        compose_config([*base, override])
    assert "\n" not in str(error.value)


def test_other_formats_cannot_stream() -> None:
    with pytest.raises(ConfigError, match="dataset.format=preference"):
        compose_config(["recipe=tiny_dpo", "dataset.streaming=true", "train.max_steps=5"])


def test_a_malformed_line_is_named_when_the_stream_reaches_it(tmp_path: Path) -> None:
    path = write_texts(tmp_path / "d.jsonl", 40)
    lines = path.read_text().splitlines()
    lines[29] = '{"text": "cut off'
    path.write_text("\n".join(lines) + "\n")
    stream = _prepared(path).train  # the first records are fine: nothing is read past them yet
    batches = stream.micro_batches(4)
    with pytest.raises(ConfigError, match=r"d\.jsonl line 30 is not valid JSON"):
        for _ in range(20):
            next(batches)


def test_a_resume_on_a_changed_file_is_refused(tmp_path: Path) -> None:
    path = write_texts(tmp_path / "d.jsonl", 20)
    stream = _prepared(path).train
    next(stream.micro_batches(2))
    state = stream.state_dict()
    with path.open("a") as handle:
        handle.write(json.dumps({"text": "one more"}) + "\n")
    with pytest.raises(ConfigError, match="resumes only on the unchanged file"):
        _prepared(path).train.load_state_dict(state)

"""Tokenized data is cached (issue 13, acceptance 4 first half): a second `train` on the same data
says it used the cache and tokenizes nothing; a changed file or setting tokenizes again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import peftctl.data.pipeline as pipeline
from peftctl.config.compose import compose_config
from peftctl.models.tokenizer import build_byte_tokenizer
from peftctl.train.run import train

ROWS = [{"instruction": f"Say {w} {i}", "input": "", "output": w} for i in range(12) for w in ("alpha", "beta")]


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, int]:
    """A fresh cache folder, and a count of the records tokenized."""
    monkeypatch.setenv("PEFTCTL_CACHE", str(tmp_path / "cache"))
    calls = {"n": 0}
    real = pipeline.encode_record

    def counting(encode, record):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return real(encode, record)

    monkeypatch.setattr(pipeline, "encode_record", counting)
    return calls


def _data_file(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train(path: Path, out: Path, *extra: str) -> Path:
    return train(
        [
            "dataset=alpaca_local",
            f"dataset.path={path}",
            "dataset.eval_size=0.25",
            "train.max_steps=1",
            "train.batch_size=4",
            f"output_dir={out}",
            *extra,
        ]
    )


def test_second_train_uses_the_cache_and_tokenizes_nothing(
    counted: dict[str, int], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = _data_file(tmp_path / "d.jsonl", ROWS)
    _train(path, tmp_path / "r1")
    first = capsys.readouterr().out
    assert counted["n"] == len(ROWS) and "cached in" in first
    counted["n"] = 0
    run = _train(path, tmp_path / "r2")
    second = capsys.readouterr().out
    assert counted["n"] == 0
    assert "data: train tokens loaded from the cache" in second and "data: eval tokens loaded from the cache" in second
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_cached_examples_equal_freshly_tokenized_ones(counted: dict[str, int], tmp_path: Path) -> None:
    path = _data_file(tmp_path / "d.jsonl", ROWS)
    cfg = compose_config(["dataset=alpaca_local", f"dataset.path={path}", "dataset.eval_size=0.25"])
    fresh = pipeline.prepare_data(cfg.dataset, build_byte_tokenizer())
    cached = pipeline.prepare_data(cfg.dataset, build_byte_tokenizer())
    assert counted["n"] == len(ROWS)  # the second call read the cache
    assert cached.train == fresh.train and cached.eval == fresh.eval and cached.stats == fresh.stats
    cfg.dataset.cache = False
    assert pipeline.prepare_data(cfg.dataset, build_byte_tokenizer()).train == fresh.train
    assert counted["n"] == 2 * len(ROWS)  # dataset.cache=false tokenizes again


@pytest.mark.parametrize("change", ["file", "max_seq_len", "tokenizer"])
def test_a_change_of_data_or_settings_tokenizes_again(change: str, counted: dict[str, int], tmp_path: Path) -> None:
    path = _data_file(tmp_path / "d.jsonl", ROWS)
    overrides = ["dataset=alpaca_local", f"dataset.path={path}", "dataset.eval_size=0"]
    tokenizer = build_byte_tokenizer()
    pipeline.prepare_data(compose_config(overrides).dataset, tokenizer)
    counted["n"] = 0
    if change == "file":
        _data_file(path, ROWS[:-1] + [{"instruction": "Say gamma", "input": "", "output": "gamma"}])
    elif change == "max_seq_len":
        overrides.append("dataset.max_seq_len=64")
    else:
        tokenizer.chat_template = "{{ messages }}"
    data = pipeline.prepare_data(compose_config(overrides).dataset, tokenizer)
    assert counted["n"] == len(ROWS)
    assert (data.train[-1].response == "gamma") == (change == "file")


def test_several_processes_give_the_same_examples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEFTCTL_CACHE", str(tmp_path / "cache"))
    path = _data_file(tmp_path / "d.jsonl", ROWS)
    base = ["dataset=alpaca_local", f"dataset.path={path}", "dataset.eval_size=0", "dataset.cache=false"]
    one = pipeline.prepare_data(compose_config(base).dataset, build_byte_tokenizer())
    two = pipeline.prepare_data(compose_config([*base, "dataset.num_proc=2"]).dataset, build_byte_tokenizer())
    assert one.train == two.train

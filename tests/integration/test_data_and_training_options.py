"""Data sources and formats, precision / checkpointing options, and the non-finite-loss stop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peftctl.config.compose import compose_config
from peftctl.data.pipeline import prepare_data
from peftctl.data.tokenize import IGNORE_INDEX
from peftctl.errors import TrainingError
from peftctl.models.tokenizer import build_byte_tokenizer
from peftctl.train.run import train

TINY = ["train.max_steps=3", "train.batch_size=4", "train.log_every=1", "dataset.max_samples=32"]
ROWS = [{"instruction": f"Say {w}", "input": "", "output": w} for w in ["alpha", "beta", "gamma", "delta"] * 5]


def _write(path: Path, kind: str) -> Path:
    import pandas as pd

    frame = pd.DataFrame(ROWS)
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif kind == "json":
        path.write_text(json.dumps(ROWS))
    elif kind == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet"])
def test_local_files_load_and_mask_the_prompt(kind: str, tmp_path: Path) -> None:
    path = _write(tmp_path / f"data.{kind}", kind)
    cfg = compose_config(["dataset=alpaca_local", f"dataset.path={path}", "dataset.eval_size=0.2"])
    data = prepare_data(cfg.dataset, build_byte_tokenizer())
    assert len(data.train) == 16 and len(data.eval) == 4
    example = data.train[0]
    trained = [t for t, l in zip(example.input_ids, example.labels) if l != IGNORE_INDEX]
    assert bytes(trained[:-1]).decode() == example.response and example.response in {"alpha", "beta", "gamma", "delta"}
    assert example.prompt.startswith("### Instruction:\nSay ")


def test_chat_format_uses_the_tokenizer_template(tmp_path: Path) -> None:
    rows = [
        {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]}
        for i in range(10)
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose_config(["dataset=chat_local", f"dataset.path={path}", "dataset.eval_size=0.0"])
    data = prepare_data(cfg.dataset, build_byte_tokenizer())
    example = data.train[0]
    assert example.prompt == "<|user|>hi 0\n<|assistant|>"
    assert example.response == "hello 0\n"
    trained = [t for t, l in zip(example.input_ids, example.labels) if l != IGNORE_INDEX]
    assert bytes(trained[:-1]).decode() == "hello 0\n"


def test_text_format_trains_on_every_token(tmp_path: Path) -> None:
    path = tmp_path / "text.jsonl"
    path.write_text("".join(json.dumps({"text": f"line number {i}"}) + "\n" for i in range(8)))
    cfg = compose_config(["dataset=text_local", f"dataset.path={path}", "dataset.eval_size=0.0"])
    example = prepare_data(cfg.dataset, build_byte_tokenizer()).train[0]
    assert example.labels[1:] == example.input_ids[1:]


def test_dataset_folder_loads_with_datasets(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    _write(folder / "train.jsonl", "jsonl")
    cfg = compose_config(["dataset=alpaca_local", f"dataset.path={folder}", "dataset.eval_size=0.25"])
    assert len(prepare_data(cfg.dataset, build_byte_tokenizer()).train) == 15


def test_bf16_with_gradient_checkpointing_and_accumulation(tmp_path: Path) -> None:
    run = train(
        [
            *TINY,
            "train.precision=bf16",
            "train.gradient_checkpointing=true",
            "train.grad_accum=2",
            f"output_dir={tmp_path / 'r'}",
        ],
        quiet=True,
    )
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def test_local_model_directory_trains(tmp_path: Path) -> None:
    """model.name_or_path pointing at a saved transformers model goes through from_pretrained."""
    from peftctl.models.builtin import builtin_model_dir

    cfg = compose_config([])
    model_dir = builtin_model_dir("tiny-llama", dict(cfg.model.arch))
    run = train(
        [*TINY, "model=hub", f"model.name_or_path={model_dir}", "model.dtype=float32", f"output_dir={tmp_path / 'r'}"],
        quiet=True,
    )
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(model_dir)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import peftctl.train.loop as loop

    real = loop.causal_lm_loss_sum
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss, n = real(model, batch)
        return (loss * float("nan"), n) if calls["n"] > 4 and model.training else (loss, n)

    monkeypatch.setattr(loop, "causal_lm_loss_sum", poisoned)
    run_dir = tmp_path / "r"
    with pytest.raises(TrainingError, match=r"loss became nan at step 5.*step-000004"):
        train(
            [
                "train.max_steps=10",
                "train.save_every=2",
                "train.batch_size=4",
                "dataset.max_samples=32",
                f"output_dir={run_dir}",
            ],
            quiet=True,
        )
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert not (run_dir / "adapter").exists()

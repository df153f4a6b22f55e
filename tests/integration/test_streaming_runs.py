"""dataset.streaming=true end to end: a streamed run killed (SIGKILL) and resumed ends with the
uninterrupted run's per-step losses and adapter; `peftctl eval` of a streamed run scores its held-out
records; `peftctl data` shows the examples a run reads (the same tokens as the map-style path); a bad
line is one error line with its line number; peak memory does not grow with the file's size; two
ranks under torchrun take exactly the steps of one process with twice the accumulation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from peftctl.cli import app
from peftctl.eval.evaluate import evaluate
from peftctl.train.run import train
from tests.integration.test_distributed import _torchrun
from tests.integration.test_kill_anywhere import _forked_train
from tests.unit.test_streaming import write_texts

REPO = Path(__file__).resolve().parents[2]
HOLDOUT = 12


def _schedule(data: Path) -> list[str]:
    """Packed rows of 64 tokens, 2 per micro-batch; 24 training records per epoch, so 14 steps cross
    epochs and the checkpoints hold open packed rows (the packer's carry-over)."""
    return [
        "dataset=text_local",
        f"dataset.path={data}",
        "dataset.streaming=true",
        f"dataset.eval_holdout={HOLDOUT}",
        "dataset.max_samples=24",
        "dataset.max_seq_len=64",
        "dataset.packing=true",
        "adapter.lora_dropout=0.1",
        "train.max_steps=14",
        "train.save_every=5",
        "train.batch_size=2",
        "train.log_every=1",
        "train.eval_every=0",
        "train.device=cpu",
    ]


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_texts(tmp_path_factory.mktemp("stream") / "texts.jsonl", 200)


@pytest.fixture(scope="module")
def straight(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train([*_schedule(data), f"output_dir={tmp_path_factory.mktemp('runs') / 'straight'}"], quiet=True)


def test_streamed_run_killed_and_resumed_sees_the_same_batches(data: Path, straight: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    schedule = [*_schedule(data), f"output_dir={run}"]
    assert _forked_train(schedule, "step:12") == -signal.SIGKILL  # after step 12: checkpoint step 10 is the last
    state = json.loads((run / "checkpoints" / "step-000010" / "trainer_state.json").read_text())["stream"]
    assert state["epoch"] >= 1 and state["open_rows"]  # past an epoch end, with packed rows carried over
    train([*schedule, "train.resume=true"], quiet=True)
    assert _losses(run) == _losses(straight)  # every step's loss, bit for bit
    expected, got = (
        load_file(straight / "adapter" / "adapter_model.safetensors"),
        load_file(run / "adapter" / "adapter_model.safetensors"),
    )
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert any(float(expected[k].abs().max()) > 0 for k in expected if "lora_B" in k)  # it trained


def test_eval_of_a_streamed_run_scores_the_held_out_records(straight: Path) -> None:
    report = evaluate(straight, quiet=True)
    assert report["examples"] == HOLDOUT
    summary = json.loads((straight / "summary.json").read_text())
    assert report["adapted"]["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)  # the loop's own eval
    assert report["adapted"]["eval_loss"] < report["base"]["eval_loss"]


def _data_json(*overrides: str) -> list[dict]:
    result = CliRunner().invoke(app, ["data", *overrides, "--json", "--show", "6"])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"index"')]


def test_data_command_shows_what_the_stream_reads(data: Path) -> None:
    common = ["dataset=text_local", f"dataset.path={data}", "dataset.max_seq_len=64", "train.max_steps=5"]
    streamed = _data_json(*common, "dataset.streaming=true", "dataset.eval_holdout=0")
    mapped = _data_json(*common, "dataset.eval_size=0")  # the map-style path, file order, nothing held out
    assert len(streamed) == 6
    assert [(r["input_ids"], r["labels"]) for r in streamed] == [(r["input_ids"], r["labels"]) for r in mapped]
    packed = _data_json(*common, "dataset.streaming=true", "dataset.packing=true")
    assert all(len(r["input_ids"]) <= 64 and sum(r["lengths"]) == len(r["input_ids"]) for r in packed)
    shown = CliRunner().invoke(app, ["data", *common, "dataset.streaming=true", "dataset.packing=true", "--show", "2"])
    assert shown.exit_code == 0 and "train row 1" in shown.stdout, shown.output


def test_a_malformed_line_is_one_error_line_with_its_number(data: Path, tmp_path: Path) -> None:
    lines = data.read_text().splitlines()
    lines[20] = "{not json"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    args = ["data", "dataset=text_local", f"dataset.path={bad}", "dataset.streaming=true", "train.max_steps=5"]
    result = CliRunner().invoke(app, [*args, "--show", "40"])
    assert result.exit_code == 2
    error = [line for line in result.output.splitlines() if "bad.jsonl" in line and "line 21" in line]
    assert error and "is not valid JSON" in error[0] and "Traceback" not in result.output


def test_peak_memory_does_not_grow_with_the_file(tmp_path: Path) -> None:
    """20k vs 200k records (2 vs 22 MiB; materialised, as the map-style path holds them, an estimated
    1.5-2 KB per example, i.e. hundreds of MiB more for the larger file): the same peak RSS within 16 MiB.
    One process, the small size first twice (the first run in a process makes one-time allocations)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, str(REPO / "benchmarks" / "streaming_memory.py"), "--examples", "20000,20000,200000"]
    result = subprocess.run([*command, "--steps", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    _, small, large = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert large["file_mib"] > 9 * small["file_mib"]
    assert large["peak_rss_mib"] - small["peak_rss_mib"] < 16, (small, large)


def test_two_ranks_stream_like_one_process_with_twice_the_accumulation(data: Path, tmp_path: Path) -> None:
    schedule = [*_schedule(data), "train.max_steps=3", "adapter.lora_dropout=0"]
    _torchrun(*schedule, "train.grad_accum=1", f"output_dir={tmp_path / 'ddp'}")
    single = train([*schedule, "train.grad_accum=2", f"output_dir={tmp_path / 'single'}"], quiet=True)
    ours, reference = (
        load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors"),
        load_file(single / "adapter" / "adapter_model.safetensors"),
    )
    assert max(float((ours[k] - reference[k]).abs().max()) for k in ours) <= 1e-6
    assert torch.allclose(torch.tensor(_losses(tmp_path / "ddp")), torch.tensor(_losses(single)), atol=1e-6)

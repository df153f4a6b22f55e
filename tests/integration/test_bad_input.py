"""Bad input: one line on stderr naming the problem, exit code 2, no traceback, no run directory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from peftctl.cli import app


def _cli(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output


def _assert_one_line_error(code: int, output: str, *fragments: str) -> None:
    assert code == 2, output
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("error: ")
    assert "Traceback" not in output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("train.lrr=0.1", ["train.lrr", "not a known config key"]),
        ("adapter.r=0", ["adapter.r=0", "> 0"]),
        ("train.lr=-1", ["train.lr=-1", "> 0"]),
        ("adapter=loraa", ["adapter=loraa", "lora"]),
        ("adapter.method=nosuch", ["adapter.method='nosuch'", "lora"]),
        ("train.batch_size=abc", ["train.batch_size='abc'", "integer"]),
        ("train.precision=fp8", ["train.precision", "bf16"]),
        ("recipe=nope", ["recipe=nope", "tiny_lora"]),
        ("adapter.lora_alpah=3", ["adapter.lora_alpah", "lora_alpha"]),
    ],
)
def test_bad_config_exits_2_with_one_line(override: str, fragments: list[str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, output = _cli(["train", override, f"output_dir={out}", "--quiet"])
    _assert_one_line_error(code, output, *fragments)
    assert not out.exists()


def test_missing_dataset_file(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, output = _cli(["train", "dataset=alpaca_local", f"dataset.path={tmp_path / 'missing.jsonl'}", f"output_dir={out}", "--quiet"])
    _assert_one_line_error(code, output, "dataset.path", "missing.jsonl")
    assert not out.exists()


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "output": "a"}) + "\n" for i in range(10)))
    out = tmp_path / "run"
    code, output = _cli(["train", "dataset=alpaca_local", f"dataset.path={data}", f"output_dir={out}", "--quiet"])
    _assert_one_line_error(code, output, "'instruction'", str(data), "prompt")
    assert not out.exists()


def test_empty_dataset(tmp_path: Path) -> None:
    data = tmp_path / "empty.csv"
    data.write_text("instruction,input,output\n")
    out = tmp_path / "run"
    code, output = _cli(["train", "dataset=alpaca_local", f"dataset.path={data}", f"output_dir={out}", "--quiet"])
    _assert_one_line_error(code, output, "empty")
    assert not out.exists()


def test_missing_model_directory(tmp_path: Path) -> None:
    code, output = _cli(["train", f"model.name_or_path={tmp_path / 'nomodel'}", f"output_dir={tmp_path / 'run'}", "--quiet"])
    _assert_one_line_error(code, output, "model.name_or_path", "nomodel")


def test_eval_of_a_non_run_directory(tmp_path: Path) -> None:
    code, output = _cli(["eval", str(tmp_path)])
    _assert_one_line_error(code, output, "neither a run directory")


def test_console_script_exit_code_and_stderr(tmp_path: Path) -> None:
    """The real entry point (python -m peftctl) prints one line to stderr and exits 2."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-m", "peftctl", "train", "adapter.r=0", f"output_dir={tmp_path / 'run'}"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "adapter.r=0" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "run").exists()

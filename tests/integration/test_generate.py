"""`peftctl generate`: the same greedy tokens as peft's model loaded from the run's adapter (LoRA) or
as greedy decoding through peft's forward (prefix tuning), streamed text equal to the JSON answer,
an interactive session under a pseudo-terminal, and bad input as one line with exit 2."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from peftctl.cli import app
from peftctl.data.formats import ALPACA_PROMPT
from peftctl.models.loader import resolve_model_path
from peftctl.runs import open_source
from peftctl.train.run import train

INSTRUCTION, REVIEW = "Is this review positive or negative?", "The laptop is cheap. Very annoyed."
ROOT = Path(__file__).resolve().parents[2]


def _cli_json(*args: str) -> list[dict]:
    result = CliRunner().invoke(app, ["generate", *args, "--json"])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]


def _peft_model(run: Path) -> tuple[torch.nn.Module, object]:
    base_dir = resolve_model_path(open_source(run).config.model)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    return peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), run / "adapter"
    ).eval(), tokenizer


def _encode(tokenizer: object, text: str) -> torch.Tensor:
    return tokenizer((tokenizer.bos_token or "") + text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def test_lora_run_generates_what_peft_generates(trained_run: Path) -> None:
    ours = _cli_json(str(trained_run), "--prompt", INSTRUCTION, "--input", REVIEW, "--max-new-tokens", "6")
    model, tokenizer = _peft_model(trained_run)
    ids = _encode(tokenizer, ALPACA_PROMPT.format(instruction=INSTRUCTION, input=REVIEW))
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    assert ours == [
        {"prompt": INSTRUCTION, "response": tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)}
    ]


def test_streamed_text_is_the_json_response(trained_run: Path) -> None:
    expected = _cli_json(str(trained_run), "--prompt", INSTRUCTION, "--input", REVIEW, "--max-new-tokens", "6")[0][
        "response"
    ]
    result = CliRunner().invoke(
        app, ["generate", str(trained_run), "--prompt", INSTRUCTION, "--input", REVIEW, "--max-new-tokens", "6"]
    )
    assert result.exit_code == 0 and result.output.splitlines()[-1] == expected


def test_prefix_tuning_run_generates_peft_forward_greedy(tmp_path: Path) -> None:
    """Oracle: greedy decoding through peft's forward on the whole sequence each step (peft 0.21.2's
    own generate drops the prefix on transformers >= 5.2x, see test_prefix_tuning.py)."""
    run = train(
        [
            "adapter=prefix_tuning",
            "train.max_steps=6",
            "train.save_every=0",
            "train.eval_every=0",
            "dataset.max_samples=48",
            f"output_dir={tmp_path / 'prefix'}",
        ],
        quiet=True,
    )
    ours = _cli_json(str(run), "--prompt", INSTRUCTION, "--input", REVIEW, "--max-new-tokens", "5")[0]["response"]
    model, tokenizer = _peft_model(run)
    sequence = _encode(tokenizer, ALPACA_PROMPT.format(instruction=INSTRUCTION, input=REVIEW))
    start = sequence.shape[1]
    with torch.no_grad():
        for _ in range(5):
            token = (
                model(input_ids=sequence, attention_mask=torch.ones_like(sequence))
                .logits[:, -1]
                .argmax(-1, keepdim=True)
            )
            sequence = torch.cat([sequence, token], dim=1)
            if int(token) == tokenizer.eos_token_id:
                break
    assert ours == tokenizer.decode(sequence[0, start:], skip_special_tokens=True)


def _read_until(fd: int, marker: bytes, timeout: float) -> bytes:
    seen, deadline = b"", time.monotonic() + timeout
    while marker not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break
    return seen


def test_interactive_mode_under_a_pseudo_terminal(trained_run: Path) -> None:
    expected = _cli_json(str(trained_run), "--prompt", INSTRUCTION, "--max-new-tokens", "6")[0]["response"]
    controller, terminal = pty.openpty()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "peftctl", "generate", str(trained_run), "--max-new-tokens", "6"],
        stdin=terminal,
        stdout=terminal,
        stderr=subprocess.DEVNULL,
        env=env,
        close_fds=True,
    )
    os.close(terminal)
    try:
        assert b"> " in _read_until(controller, b"> ", timeout=120)
        os.write(controller, f"{INSTRUCTION}\n".encode())
        answer = _read_until(controller, b"> ", timeout=120)
        assert expected.encode() in answer.replace(b"\r\n", b"\n")
        os.write(controller, b"exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(controller)


@pytest.mark.parametrize(
    "args, named",
    [
        (["--prompt", "a", "--file", "x.txt"], "--prompt and --file"),
        (["--prompt", "a", "--temperature", "-1"], "--temperature"),
        (["--prompt", "a", "--top-p", "0"], "--top-p"),
        (["--prompt", "a", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["--file", "missing.txt"], "--file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(trained_run: Path, args: list[str], named: str) -> None:
    result = CliRunner().invoke(app, ["generate", str(trained_run), *args])
    assert result.exit_code == 2 and named in result.output and "Traceback" not in result.output

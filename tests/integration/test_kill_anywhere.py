"""Kill anywhere: a run SIGKILLed again and again (inside checkpoint writes, between checkpoints,
during the final save, and once from outside at whatever point it has reached) and resumed each
time ends with exactly the uninterrupted run's adapter (CPU fp32, LoRA with its default dropout).

The kills at named points use the test-only hook PEFTCTL_TEST_KILL_AT (train/checkpoint.py
`kill_point`): the process SIGKILLs itself there. Those runs are forked from the test process (the
imports are done once, which keeps this test fast); one run is the real `python -m peftctl train`
killed by the test with SIGKILL from outside.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from peftctl.cli import app
from peftctl.train.checkpoint import KILL_ENV
from peftctl.train.run import train

REPO = Path(__file__).resolve().parents[2]
SCHEDULE = [
    "train.max_steps=20",
    "train.save_every=4",
    "train.keep_checkpoints=2",
    "train.log_every=1",
    "train.batch_size=4",
    "train.eval_every=0",
    "dataset.max_samples=64",
    "train.device=cpu",
]


# Children are forked from multiprocessing's fork server (a clean single-threaded process with peftctl
# imported once), not from the test process: under pytest-xdist the test process has threads, and a fork
# of a threaded process can deadlock the child on a lock one of them held (seen once in CI: a hung child).
multiprocessing.set_forkserver_preload(["peftctl.cli", "tests.integration.test_kill_anywhere"])


def _train_in_child(args: list[str], kill_at: str | None, env: dict[str, str], cwd: str) -> None:
    os.environ.clear()
    os.environ.update(env)  # the fork server's environment is from when it started: use the test's
    os.chdir(cwd)
    code = 1
    try:
        if kill_at:
            os.environ[KILL_ENV] = kill_at
        code = CliRunner().invoke(app, ["train", *args, "--quiet"]).exit_code
    finally:
        os._exit(code)


def start_forked_train(args: list[str], kill_at: str | None = None) -> multiprocessing.Process:
    """`peftctl train ARGS` (killing itself at ``kill_at``) in a child forked from the fork server."""
    child = multiprocessing.get_context("forkserver").Process(
        target=_train_in_child, args=(args, kill_at, dict(os.environ), os.getcwd())
    )
    child.start()
    return child


def _forked_train(args: list[str], kill_at: str | None) -> int:
    """`peftctl train ARGS` in a forked child; returns its exit code, or -SIGKILL if it was killed."""
    child = start_forked_train(args, kill_at)
    child.join()
    return child.exitcode


def _cli_killed_after_line(args: list[str], line_start: str) -> int:
    """The real entry point, SIGKILLed from outside as soon as it prints a line starting with ``line_start``."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
    }
    env.pop(KILL_ENV, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "peftctl", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(line_start):
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=300)
        proc.stdout.close()
    assert any(line.startswith(line_start) for line in seen), "".join(seen)[-2000:]
    return proc.returncode


def _hidden(run: Path) -> list[str]:
    return sorted(
        p.name
        for folder in (run, run / "checkpoints")
        if folder.is_dir()
        for p in folder.iterdir()
        if p.name.startswith(".")
    )


def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_adapter(tmp_path: Path) -> None:
    reference = train([*SCHEDULE, f"output_dir={tmp_path / 'reference'}"], quiet=True)
    run = tmp_path / "run"
    resume = [*SCHEDULE, f"output_dir={run}", "train.resume=true"]
    killed = -signal.SIGKILL

    # 1. inside the step-8 checkpoint write, after the adapter and weights, before the optimizer state
    assert _forked_train([*SCHEDULE, f"output_dir={run}"], "checkpoint:8:optimizer") == killed
    assert [name for name in _hidden(run) if name.startswith(".step-000008.")], _hidden(run)  # a torn temporary folder
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000004"]
    # 2. resumed from step 4, killed with the step-8 checkpoint complete but not yet renamed into place
    assert _forked_train(resume, "checkpoint:8:manifest") == killed
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000004"]
    # 3. resumed from step 4, killed after the step-12 checkpoint's rename, before old ones are pruned
    assert _forked_train(resume, "checkpoint:12:renamed") == killed
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000004", "step-000008", "step-000012"]
    # 4. resumed from step 12, killed between checkpoints (after optimizer step 14, before it is logged)
    assert _forked_train(resume, "step:14") == killed
    # 5. the real CLI, resumed from step 12, killed from outside wherever it is once it has logged step 13
    assert _cli_killed_after_line(resume, "step 13 ") == killed
    # 6. resumed, killed inside the final adapter write (weights written, tokenizer not yet)
    assert _forked_train(resume, "final:adapter") == killed
    assert not (run / "adapter").exists() and [name for name in _hidden(run) if name.startswith(".adapter.")]
    # 7. resumed once more: it finishes
    assert _forked_train(resume, None) == 0

    expected = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key  # bit for bit
    assert (run / "adapter" / "tokenizer_config.json").is_file()
    assert _hidden(run) == []  # every torn temporary write was cleaned up
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 21))  # each step logged once
    reference_losses = [
        r["loss"] for r in map(json.loads, (reference / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]
    assert [r["loss"] for r in records if "loss" in r] == reference_losses

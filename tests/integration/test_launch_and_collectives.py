"""`peftctl train ... train.nproc=2` (torchrun started by peftctl after one config check) and every
collective path of a data-parallel run on CPU (gloo, 2 processes): checkpoint save, eval, the
non-finite-loss stop, and bad input or a failure on one rank each end BOTH ranks, with one error
line, instead of leaving one rank waiting. Each case runs under a timeout: a hang fails the test.
The four collective-path cases share ONE torchrun launch (tests/integration/_ddp_ranks.py: each case through
the CLI's train command on both ranks, with its stderr and exit code), one start-up instead of four."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from peftctl.train.run import train
from tests.integration.test_distributed import REPO, SCHEDULE, _adapter, _losses, ranks_results, start_ranks

HANG = 300  # seconds: far above a 4-step tiny run with 2 ranks on 2 shared cores


def _peftctl(*args: str, fail_at: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
        "PEFTCTL_TEST_FAIL_AT": fail_at or "",
    }
    return subprocess.run(
        [sys.executable, "-m", "peftctl", "train", *args], env=env, capture_output=True, text=True, timeout=HANG
    )


def _error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_nproc_2_launches_two_ranks_that_take_the_steps_of_one_process_with_twice_the_accumulation(
    tmp_path: Path,
) -> None:
    result = _peftctl(
        "train.nproc=2",
        *SCHEDULE,
        "train.grad_accum=1",
        "adapter.lora_dropout=0",
        "train.eval_every=2",
        f"output_dir={tmp_path / 'ddp'}",
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "x 2 ranks" in result.stdout
    single = train(
        [
            *SCHEDULE,
            "train.grad_accum=2",
            "adapter.lora_dropout=0",
            "train.eval_every=2",
            f"output_dir={tmp_path / 'single'}",
        ],
        quiet=True,
    )
    ours, reference = _adapter(tmp_path / "ddp"), _adapter(single)
    assert max(float((ours[k] - reference[k]).abs().max()) for k in ours) <= 1e-6
    assert torch.allclose(torch.tensor(_losses(tmp_path / "ddp")), torch.tensor(_losses(single)), atol=1e-6)
    # eval ran on rank 0 mid-run and at the end, the others waited for it, and logged once
    evals = [line for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
    assert len(evals) == 2
    assert "nproc" in (tmp_path / "ddp" / "config.yaml").read_text()


@pytest.mark.parametrize(
    "bad, field", [("train.lr=-1", "train.lr"), ("train.nproc=two", "train.nproc"), ("adapter.rr=8", "adapter.rr")]
)
def test_nproc_2_with_bad_input_is_one_line_and_exit_2_before_torchrun_starts(
    tmp_path: Path, bad: str, field: str
) -> None:
    result = _peftctl("train.nproc=2", *SCHEDULE, bad, f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and field in lines[0], result.stderr
    assert "torch.distributed" not in result.stderr and "Traceback" not in result.stderr and result.stdout == ""
    assert not (tmp_path / "run").exists()


COLLECTIVE_CASES = {  # case -> (extra overrides, PEFTCTL_TEST_FAIL_AT, the error line's text)
    "checkpoint write fails on rank 0": (
        ["train.save_every=2"],
        "checkpoint:0",
        "injected failure at checkpoint on rank 0",
    ),
    "eval fails on rank 0": (["train.eval_every=2"], "eval:0", "injected failure at eval on rank 0"),
    "bad input on rank 1 only": ([], "inputs:1", "injected bad input on rank 1"),
    "non-finite loss": (["train.lr=1e30", "train.max_grad_norm=null", "train.save_every=0"], None, "loss became"),
}


@pytest.fixture(scope="module")
def collective_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("collectives")
    plan = [
        {
            "name": case,
            "overrides": [*SCHEDULE, *extra],
            "fail_at": fail_at,
            "output_dir": str(root / case.replace(" ", "_")),
        }
        for case, (extra, fail_at, _) in COLLECTIVE_CASES.items()
    ]
    return {"root": root, "ranks": ranks_results(start_ranks(root, plan), root)}


@pytest.mark.parametrize("case", list(COLLECTIVE_CASES))
def test_every_collective_path_ends_all_ranks(collective_cases: dict[str, Any], case: str) -> None:
    _, fail_at, expect = COLLECTIVE_CASES[case]
    outcomes = [rank[case] for rank in collective_cases["ranks"]]
    assert all(o["exit_code"] != 0 for o in outcomes), outcomes  # every rank ended with the failure (no hang: 60 s)
    errors = [line for o in outcomes for line in o["stderr"].splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expect in errors[0], (case, outcomes)  # the failing rank's line, once
    run = collective_cases["root"] / case.replace(" ", "_")
    assert not (run / "adapter").exists()
    if fail_at == "inputs:1":
        assert not run.exists()  # checked by every rank before rank 0 creates anything


def test_a_stalled_rank_becomes_an_error_after_train_dist_timeout_s(tmp_path: Path) -> None:
    """Rank 0 stops inside its checkpoint write (as a stuck file system would): rank 1 gives up after
    train.dist_timeout_s with one error line, and torchrun then ends rank 0 too."""
    result = _peftctl(
        "train.nproc=2",
        *SCHEDULE,
        "train.save_every=2",
        "train.dist_timeout_s=30",
        f"output_dir={tmp_path / 'run'}",
        fail_at="checkpoint:0:stall",
    )
    assert result.returncode != 0
    errors = _error_lines(result)
    assert len(errors) == 1 and "timed out" in errors[0].lower(), result.stderr[-3000:]
    assert not (tmp_path / "run" / "adapter").exists()

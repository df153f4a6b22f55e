"""Data-parallel training (`torchrun --nproc_per_node=2 -m peftctl train ...`, gloo on CPU).

Two ranks with batch_size=b, grad_accum=1 must take exactly the steps of one process with
batch_size=b, grad_accum=2 (same micro-batches, token-weighted loss over the global batch,
gradients summed across ranks), rank 0 alone writes the run directory, and a data-parallel run
resumed from its checkpoint ends where the uninterrupted one did (every rank's RNG restored).

The data-parallel runs of this file share ONE torchrun launch (tests/integration/_ddp_ranks.py runs each
through the CLI's train command on both ranks, one after another) while this process trains the
1-process reference: one interpreter start-up, import and rendezvous per rank instead of one per run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from peftctl.train.run import train
from tests.integration import _ddp_ranks

REPO = Path(__file__).resolve().parents[2]
SCHEDULE = [
    "train.max_steps=4",
    "train.batch_size=4",
    "train.save_every=2",
    "train.log_every=1",
    "train.eval_every=0",
    "train.device=cpu",
    "dataset.max_samples=64",
]
HANG = 400  # seconds for a whole launch: far above its runs on 2 shared cores


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
    }


def _torchrun(*overrides: str) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "peftctl",
        "train",
        *overrides,
        "--quiet",
    ]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def start_ranks(out: Path, plan: list[dict[str, Any]]) -> subprocess.Popen[str]:
    """ONE 2-rank torchrun launch of _ddp_ranks.py running ``plan``'s cases in turn (collect with ``ranks_results``)."""
    (out / "plan.json").write_text(json.dumps(plan))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [_ddp_ranks.__file__, str(out), str(out / "plan.json")]
    # its own session: on a timeout the whole group (torchrun and both ranks) is killed, not torchrun alone
    return subprocess.Popen(
        command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def ranks_results(launched: subprocess.Popen[str], out: Path) -> list[dict[str, dict[str, Any]]]:
    """Wait for the launch (killed after HANG seconds: a hang fails); per rank, case name -> outcome."""
    try:
        log, _ = launched.communicate(timeout=HANG)
    finally:
        if launched.poll() is None:
            os.killpg(launched.pid, signal.SIGKILL)
    assert launched.returncode == 0, log[-5000:]
    return [{r["case"]: r for r in json.loads((out / f"rank{i}.json").read_text())} for i in range(2)]


def assert_ranks_ok(ranks: list[dict[str, dict[str, Any]]], case: str) -> None:
    outcomes = [rank[case] for rank in ranks]
    assert all(o["exit_code"] == 0 for o in outcomes), outcomes


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("ddp")
    dropout = [*SCHEDULE, "adapter.lora_dropout=0.2"]
    plan = [
        {
            "name": "ddp",
            "overrides": [*SCHEDULE, "train.grad_accum=1", "adapter.lora_dropout=0"],
            "output_dir": str(root / "ddp"),
        },
        {"name": "full", "overrides": dropout, "output_dir": str(root / "full")},
        {
            "name": "resumed",
            "overrides": [*dropout, "resume=true"],
            "output_dir": str(root / "resumed"),
            "resume_copy_of": str(root / "full"),
        },
    ]
    launched = start_ranks(root, plan)
    try:  # the 1-process reference, while the ranks run
        single = train(
            [*SCHEDULE, "train.grad_accum=2", "adapter.lora_dropout=0", f"output_dir={root / 'single'}"], quiet=True
        )
    except BaseException:
        os.killpg(launched.pid, signal.SIGKILL)
        raise
    return {"root": root, "single": single, "ranks": ranks_results(launched, root)}


def test_two_ranks_equal_one_process_with_twice_the_accumulation(ddp: dict[str, Any]) -> None:
    assert_ranks_ok(ddp["ranks"], "ddp")
    single, run = ddp["single"], ddp["root"] / "ddp"
    ours, reference = _adapter(run), _adapter(single)
    assert ours.keys() == reference.keys()
    assert max(float((ours[k] - reference[k]).abs().max()) for k in ours) <= 1e-6
    assert any(float(reference[k].abs().max()) > 0 for k in reference if "lora_B" in k)  # it trained
    assert torch.allclose(torch.tensor(_losses(run)), torch.tensor(_losses(single)), atol=1e-6)
    assert len(_losses(run)) == 4  # one writer: no line twice
    checkpoint = run / "checkpoints" / "step-000002"
    assert (checkpoint / "rng.pt").is_file() and (checkpoint / "rng-rank1.pt").is_file()
    assert not (single / "checkpoints" / "step-000002" / "rng-rank1.pt").exists()


def test_data_parallel_resume_restores_every_ranks_stream(ddp: dict[str, Any]) -> None:
    """With dropout, rank 1's masks come from its own RNG: only restoring it reproduces the run."""
    assert_ranks_ok(ddp["ranks"], "full")
    assert_ranks_ok(ddp["ranks"], "resumed")
    full, resumed = ddp["root"] / "full", ddp["root"] / "resumed"
    a, b = _adapter(full), _adapter(resumed)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert torch.allclose(torch.tensor(_losses(resumed)), torch.tensor(_losses(full)), atol=1e-6)

"""Data-parallel training (`torchrun --nproc_per_node=2 -m peftctl train ...`, gloo on CPU).

Two ranks with batch_size=b, grad_accum=1 must take exactly the steps of one process with
batch_size=b, grad_accum=2 (same micro-batches, token-weighted loss over the global batch,
gradients summed across ranks), rank 0 alone writes the run directory, and a data-parallel run
resumed from its checkpoint ends where the uninterrupted one did (every rank's RNG restored)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from peftctl.train.run import train

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


def _torchrun(*overrides: str) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
    }
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
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_two_ranks_equal_one_process_with_twice_the_accumulation(tmp_path: Path) -> None:
    _torchrun(*SCHEDULE, "train.grad_accum=1", "adapter.lora_dropout=0", f"output_dir={tmp_path / 'ddp'}")
    single = train(
        [*SCHEDULE, "train.grad_accum=2", "adapter.lora_dropout=0", f"output_dir={tmp_path / 'single'}"], quiet=True
    )
    ddp = tmp_path / "ddp"
    ours, reference = _adapter(ddp), _adapter(single)
    assert ours.keys() == reference.keys()
    assert max(float((ours[k] - reference[k]).abs().max()) for k in ours) <= 1e-6
    assert any(float(reference[k].abs().max()) > 0 for k in reference if "lora_B" in k)  # it trained
    assert torch.allclose(torch.tensor(_losses(ddp)), torch.tensor(_losses(single)), atol=1e-6)
    assert len(_losses(ddp)) == 4  # one writer: no line twice
    checkpoint = ddp / "checkpoints" / "step-000002"
    assert (checkpoint / "rng.pt").is_file() and (checkpoint / "rng-rank1.pt").is_file()
    assert not (single / "checkpoints" / "step-000002" / "rng-rank1.pt").exists()


def test_data_parallel_resume_restores_every_ranks_stream(tmp_path: Path) -> None:
    """With dropout, rank 1's masks come from its own RNG: only restoring it reproduces the run."""
    full = tmp_path / "full"
    _torchrun(*SCHEDULE, "adapter.lora_dropout=0.2", f"output_dir={full}")
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "adapter")
    _torchrun(*SCHEDULE, "adapter.lora_dropout=0.2", f"output_dir={resumed}", "resume=true")
    a, b = _adapter(full), _adapter(resumed)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert torch.allclose(torch.tensor(_losses(resumed)), torch.tensor(_losses(full)), atol=1e-6)

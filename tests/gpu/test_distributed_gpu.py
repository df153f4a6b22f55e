"""Data-parallel training on 2 GPUs (NCCL): `torchrun --nproc_per_node=2 -m peftctl train ...` takes the
steps of one process with twice the accumulation, for an fp32 LoRA run and for QLoRA (nf4
bases placed per rank by the loader). Run with `pytest -m multigpu tests/gpu` on a machine with 2 GPUs
(on one GPU, `pytest -m "gpu and not multigpu" tests/gpu` leaves these out)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]  # CI deselects these with -m "not gpu"

REPO = Path(__file__).resolve().parents[2]
SCHEDULE = [
    "train.max_steps=6",
    "train.batch_size=4",
    "train.save_every=3",
    "train.log_every=1",
    "train.eval_every=0",
    "train.device=cuda",
    "dataset.max_samples=96",
    "adapter.lora_dropout=0",
]


@pytest.fixture(autouse=True)
def _needs_two_gpus() -> None:
    assert torch.cuda.device_count() >= 2, (
        f"the multigpu-marked tests need 2 CUDA GPUs (this machine has {torch.cuda.device_count()}); "
        "on one GPU run pytest -m 'gpu and not multigpu'"
    )


def _peftctl(*args: str, ranks: int = 1) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
    }
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        if ranks > 1
        else [sys.executable]
    )
    result = subprocess.run(
        [*launcher, "-m", "peftctl", "train", *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    print(result.stdout[-600:])


def _compare(a_dir: Path, b_dir: Path, tolerance: float) -> float:
    a, b = (
        load_file(str(a_dir / "adapter" / "adapter_model.safetensors")),
        load_file(str(b_dir / "adapter" / "adapter_model.safetensors")),
    )
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max() / b[k].float().abs().max().clamp_min(1e-12)) for k in a)
    assert worst <= tolerance, worst
    return worst


@pytest.mark.parametrize("recipe, tolerance", [("tiny_lora", 1e-4), ("qlora_tiny_cpu", 1e-3)])
def test_two_gpus_take_the_steps_of_one_with_twice_the_accumulation(
    recipe: str, tolerance: float, tmp_path: Path
) -> None:
    # fp32 on GPU: the two layouts sum the same per-micro-batch gradients in another order (and
    # cuBLAS may pick other kernels), so agreement is to float rounding, not bit-exact as on CPU
    _peftctl(f"recipe={recipe}", *SCHEDULE, "train.grad_accum=1", f"output_dir={tmp_path / 'ddp'}", ranks=2)
    _peftctl(f"recipe={recipe}", *SCHEDULE, "train.grad_accum=2", f"output_dir={tmp_path / 'single'}")
    worst = _compare(tmp_path / "ddp", tmp_path / "single", tolerance)
    losses = [
        [r["loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
        for run in ("ddp", "single")
    ]
    assert len(losses[0]) == 6 and torch.allclose(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-3)
    assert (tmp_path / "ddp" / "checkpoints" / "step-000003" / "rng-rank1.pt").is_file()
    print(f"{recipe}: 2 ranks vs 1 process, adapter max rel diff {worst:.2e}, losses {losses[0]}")

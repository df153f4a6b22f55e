"""Shared fixtures: an isolated cache for built-in models, no network, one small trained run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# every process a test starts (CLI runs, torchrun ranks, sweep workers) inherits one thread too: two
# xdist workers on 2 cores, each starting 2-thread children, would otherwise oversubscribe the cores
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The suite's models are tiny: one intra-op thread avoids thread hand-off costs that dominate at this
# size (measured ~20x faster per forward on a 2-core machine), and keeps timings steady in CI.
torch.set_num_threads(1)

# a short schedule on the offline default: enough to learn the task, fast on 2 cores
QUICK = [
    "train.max_steps=40",
    "train.save_every=20",
    "train.eval_every=0",
    "train.log_every=10",
    "eval.num_generate=24",
]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["PEFTCTL_CACHE"] = str(tmp_path_factory.mktemp("peftctl-cache"))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run of the default recipe with a short schedule, shared by the integration tests."""
    from peftctl.train.run import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    return train([*QUICK, f"output_dir={out}"], quiet=True)

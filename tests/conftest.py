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


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under `--dist loadgroup` (make test) every test is scheduled on its own, except that the tests of a
    module with a module-scoped fixture of its own (a shared training run, a torchrun launch) form one
    group on one worker: the fixture then runs once, not once per worker that gets one of its tests."""
    for item in items:
        module = item.getparent(pytest.Module)
        fixtures = getattr(item, "_fixtureinfo", None)
        if module is None or fixtures is None:
            continue
        if any(
            definition.scope == "module" and definition.baseid == module.nodeid
            for definitions in fixtures.name2fixturedefs.values()
            for definition in definitions
        ):
            item.add_marker(pytest.mark.xdist_group(module.nodeid))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["PEFTCTL_CACHE"] = str(tmp_path_factory.mktemp("peftctl-cache"))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run of the default recipe with a short schedule, shared by the integration tests."""
    from peftctl.train.run import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    return train([*QUICK, f"output_dir={out}"], quiet=True)

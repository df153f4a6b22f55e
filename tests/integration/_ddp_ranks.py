"""Run by tests/integration/test_distributed.py and test_launch_and_collectives.py on every rank of ONE
2-process torchrun launch (gloo, CPU): several data-parallel `peftctl train` runs one after another, each
through the CLI's own command (`peftctl.cli.app`, as `torchrun ... -m peftctl train` runs it: the same
error handling and one-line reports), each rank writing its exit codes and stderr to ``<out>/rank<r>.json``
for the test to check. One launch instead of one per run keeps the start-up cost (interpreter, imports,
rendezvous) to once; every collective has a 60 s timeout, so a rank left waiting fails its case.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/integration/_ddp_ranks.py OUT PLAN_JSON

The plan is a list of cases: ``{"name", "overrides", "fail_at" (PEFTCTL_TEST_FAIL_AT, optional),
"resume_copy_of" (optional: rank 0 first copies that run directory here without its final adapter)}``.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from typer.testing import CliRunner

from peftctl.cli import app
from peftctl.train.distributed import FAIL_ENV


def _copy_for_resume(source: Path, target: Path) -> None:
    """Rank 0: ``target`` = ``source`` without its final adapter (as if killed after its last checkpoint)."""
    if int(os.environ["RANK"]) == 0:
        shutil.copytree(source, target)
        shutil.rmtree(target / "adapter")
    torch.distributed.barrier()


def _run(case: dict[str, Any]) -> dict[str, Any]:
    if case.get("resume_copy_of"):
        _copy_for_resume(Path(case["resume_copy_of"]), Path(case["output_dir"]))
    os.environ[FAIL_ENV] = case.get("fail_at") or ""
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["train", *case["overrides"], f"output_dir={case['output_dir']}", "--quiet"])
    torch.distributed.barrier()  # both ranks done with this case before the next one starts
    return {
        "case": case["name"],
        "seconds": time.perf_counter() - started,
        "exit_code": result.exit_code,
        "stderr": result.stderr,
        "exception": None if result.exception is None else repr(result.exception),
    }


def main(out: Path, plan: list[dict[str, Any]]) -> None:
    # one process group for every case (train() uses it and leaves it open); 60 s per collective: a hang fails
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    results = [_run(case) for case in plan]
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(results, indent=1))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()))

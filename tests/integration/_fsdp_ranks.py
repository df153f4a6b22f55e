"""Run by tests/integration/test_fsdp.py on every rank of ONE 2-process torchrun launch (gloo, CPU): several
FSDP training runs and failure cases one after another through `peftctl.train.run.train`, each rank writing
what happened to ``<out>/rank<r>.json`` for the test to check. One launch instead of one per case keeps the
start-up cost (interpreter, imports, rendezvous) to once.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/integration/_fsdp_ranks.py OUT BASE_ARGS_JSON
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

from peftctl.train.distributed import FAIL_ENV
from peftctl.train.run import train

FAULTS = {  # case -> (extra overrides, PEFTCTL_TEST_FAIL_AT)
    "checkpoint fails on rank 0": (["train.save_every=2"], "checkpoint:0"),
    "eval fails on rank 0": (["train.eval_every=2"], "eval:0"),
    "bad input on rank 1 only": ([], "inputs:1"),
    "non-finite loss": (["train.lr=1e30", "train.max_grad_norm=null", "train.save_every=0"], ""),
}


def _run(name: str, overrides: list[str], stop_after_step: int | None = None, fail_at: str = "") -> dict[str, Any]:
    os.environ[FAIL_ENV] = fail_at
    started = time.perf_counter()
    try:
        train(overrides, quiet=True, stop_after_step=stop_after_step)
        outcome: dict[str, Any] = {"ok": True}
    except Exception as exc:  # recorded for the test; a hang instead fails on the group's 60 s timeout
        outcome = {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
            "reported_elsewhere": bool(getattr(exc, "reported_elsewhere", False)),
        }
    return {"case": name, "seconds": time.perf_counter() - started, **outcome}


def _copy_for_resume(source: Path, target: Path) -> None:
    """Rank 0: ``target`` = ``source`` as it was after its step-2 checkpoint (the final adapter removed)."""
    if int(os.environ["RANK"]) == 0:
        shutil.copytree(source, target)
        shutil.rmtree(target / "adapter")
    torch.distributed.barrier()


def main(out: Path, plan: dict[str, Any]) -> None:
    # one process group for every case (train() uses it and leaves it open); 60 s per collective: a hang fails
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    base, runs = plan["base"], Path(plan["runs"])
    results = [
        _run("lora", [*base, "train.eval_every=2", f"output_dir={runs / 'lora'}"]),
        _run("qlora", [*plan["qlora"], f"output_dir={runs / 'qlora'}"]),
    ]
    _copy_for_resume(runs / "lora", runs / "resume2")
    results.append(_run("resume on 2", [f"output_dir={runs / 'resume2'}", "train.resume=true"]))
    results.append(_run("resume of a 1-process run", [f"output_dir={runs / 'from1'}", "train.resume=true"]))
    for name, (extra, fail_at) in FAULTS.items():
        results.append(_run(name, [*base, *extra, f"output_dir={runs / name.replace(' ', '_')}"], fail_at=fail_at))
    rank = int(os.environ["RANK"])
    (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()))

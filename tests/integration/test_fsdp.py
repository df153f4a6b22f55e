"""FSDP2 sharded training (`train.distributed=fsdp`) on CPU: 2 gloo processes, fp32 tiny Llama.

ONE torchrun launch (tests/integration/_fsdp_ranks.py) runs every 2-rank case in turn while this process
computes the 1-process references. Checked: 2 FSDP ranks with grad_accum=1 take exactly the steps of
one plain process with grad_accum=2 (LoRA, and QLoRA nf4 with the packed weights stored in the compute
dtype, gradient checkpointing on); a sharded checkpoint resumes exactly on 2 ranks, on 1 process
(2 -> 1) and a 1-process FSDP checkpoint on 2 ranks (1 -> 2); checkpoint save, eval, a non-finite loss
and bad input on one rank each end BOTH ranks with one error (every collective under a 60 s
timeout: a rank left waiting fails its case); combinations that cannot shard are refused with one line
naming the field."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from peftctl.config.compose import compose_config
from peftctl.errors import ConfigError
from peftctl.train.run import train
from tests.integration import _fsdp_ranks
from tests.integration.test_distributed import REPO, SCHEDULE, _adapter, _losses

HANG = 400  # seconds for the whole launch: far above its cases on 2 shared cores
SMALL_EVAL = ["dataset.eval_split=null", "dataset.eval_size=0.25"]  # 16 held-out examples, not the 200 of test
BASE = [*SCHEDULE, *SMALL_EVAL, "train.distributed=fsdp", "adapter.lora_dropout=0"]
QLORA = [
    "recipe=qlora_tiny_cpu",
    *SCHEDULE,
    *SMALL_EVAL,
    "train.distributed=fsdp",
    "train.optimizer=adamw",  # bitsandbytes' optimizers take whole tensors (refused with fsdp, below)
    "quant.quant_storage=compute",  # what fsdp sets; the reference packs the same way (bnb's kernels differ)
    "adapter.lora_dropout=0",
    "train.save_every=0",
    # the clip's grad norm is summed shard by shard under FSDP (another rounding); at this recipe's lr Adam turns
    # that last-bit difference into 4e-5 in the weights. Unclipped, the runs are bit-identical (LoRA above clips)
    "train.max_grad_norm=null",
]
FAULT_MESSAGES = {
    "checkpoint fails on rank 0": "injected failure at checkpoint on rank 0",
    "eval fails on rank 0": "injected failure at eval on rank 0",
    "bad input on rank 1 only": "injected bad input on rank 1",
    "non-finite loss": "loss became",
}
TOLERANCE = 1e-5


def _without_fsdp(overrides: list[str]) -> list[str]:
    return [o for o in overrides if o != "train.distributed=fsdp"]


def _launch(out: Path, plan: dict[str, Any]) -> subprocess.Popen[str]:
    (out / "plan.json").write_text(json.dumps(plan))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [_fsdp_ranks.__file__, str(out), str(out / "plan.json")]
    # its own session: on a timeout the whole group (torchrun and both ranks) is killed, not torchrun alone
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fsdp")
    # a 1-process FSDP run stopped after its step-2 checkpoint: the 2 ranks resume it (1 -> 2)
    train([*BASE, "train.grad_accum=2", f"output_dir={root / 'runs' / 'from1'}"], quiet=True, stop_after_step=2)
    plan = {"base": [*BASE, "train.grad_accum=1"], "qlora": [*QLORA, "train.grad_accum=1"], "runs": str(root / "runs")}
    launched = _launch(root, plan)
    try:  # the 1-process references, while the ranks run
        references = {
            "lora": train([*_without_fsdp(BASE), "train.grad_accum=2", f"output_dir={root / 'ref_lora'}"], quiet=True),
            "qlora": train(
                [*_without_fsdp(QLORA), "train.grad_accum=2", f"output_dir={root / 'ref_qlora'}"], quiet=True
            ),
        }
        log, _ = launched.communicate(timeout=HANG)
    finally:
        if launched.poll() is None:
            os.killpg(launched.pid, signal.SIGKILL)
    assert launched.returncode == 0, log[-5000:]
    ranks = [{r["case"]: r for r in json.loads((root / f"rank{i}.json").read_text())} for i in range(2)]
    return {"runs": root / "runs", "references": references, "ranks": ranks, "log": log}


def _assert_same_run(ours: Path, reference: Path) -> None:
    a, b = _adapter(ours), _adapter(reference)
    assert a.keys() == b.keys()
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) <= TOLERANCE
    assert any(float(b[k].abs().max()) > 0 for k in b if "lora_B" in k)  # it trained
    assert torch.allclose(torch.tensor(_losses(ours)), torch.tensor(_losses(reference)), atol=TOLERANCE)
    assert len(_losses(ours)) == 4  # one writer: no line twice


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_two_fsdp_ranks_take_the_steps_of_one_process_with_twice_the_accumulation(
    runs: dict[str, Any], kind: str
) -> None:
    assert all(rank[kind]["ok"] for rank in runs["ranks"]), [rank[kind] for rank in runs["ranks"]]
    _assert_same_run(runs["runs"] / kind, runs["references"][kind])


def test_lora_run_evaluates_and_checkpoints_in_sharded_form(runs: dict[str, Any]) -> None:
    run = runs["runs"] / "lora"
    evals = [line for line in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
    assert len(evals) == 2  # every rank evaluated, rank 0 logged (mid-run and final)
    checkpoint = run / "checkpoints" / "step-000002"
    assert (checkpoint / "sharded" / ".metadata").is_file() and not (checkpoint / "optimizer.pt").exists()
    assert (checkpoint / "rng-rank1.pt").is_file() and (checkpoint / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["world_size"] == 2
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_sharded_checkpoints_resume_exactly_on_2_ranks_on_1_process_and_from_1_process(
    runs: dict[str, Any], tmp_path: Path
) -> None:
    full = runs["runs"] / "lora"
    for case in ("resume on 2", "resume of a 1-process run"):
        assert all(rank[case]["ok"] for rank in runs["ranks"]), [rank[case] for rank in runs["ranks"]]
    _assert_same_run(runs["runs"] / "resume2", full)  # 2 ranks -> 2 ranks (from the full run's step-2 checkpoint)
    _assert_same_run(runs["runs"] / "from1", full)  # 1 process (grad_accum=2) -> 2 ranks (grad_accum 1 each)
    alone = tmp_path / "alone"
    shutil.copytree(full, alone)
    shutil.rmtree(alone / "adapter")
    train([f"output_dir={alone}", "train.resume=true"], quiet=True)
    _assert_same_run(alone, full)  # 2 ranks -> 1 process, taking both ranks' micro-batches


@pytest.mark.parametrize("case", list(FAULT_MESSAGES))
def test_every_collective_path_under_fsdp_ends_all_ranks(runs: dict[str, Any], case: str) -> None:
    outcomes = [rank[case] for rank in runs["ranks"]]
    assert not any(o["ok"] for o in outcomes), outcomes
    assert not any("timed out" in o["error"].lower() for o in outcomes), outcomes  # no rank left waiting (60 s)
    printed = [o for o in outcomes if not o["reported_elsewhere"]]
    assert len(printed) == 1 and FAULT_MESSAGES[case] in printed[0]["error"], outcomes  # one error line
    assert not (runs["runs"] / case.replace(" ", "_") / "adapter").exists()


@pytest.mark.parametrize(
    "override, field",
    [
        ("adapter=adalora", "adapter=adalora"),
        ("adapter=prompt_tuning", "adapter=prompt_tuning"),
        ("adapter.init_lora_weights=pissa", "adapter.init_lora_weights"),
        ("train.optimizer=paged_adamw_8bit", "train.optimizer"),
        ("quant=int8", "quant=int8"),
        ("train.save_best=true", "train.save_best"),
        ("eval.metrics=[exact_match]", "eval.metrics"),
    ],
)
def test_fsdp_refuses_what_cannot_shard_in_one_line(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match="train.distributed=fsdp") as error:
        compose_config(["train.distributed=fsdp", override])
    assert field in str(error.value) and "\n" not in str(error.value)

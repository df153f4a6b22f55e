"""Fewer host syncs in the training loop (what CUDA runs, forced here on the CPU through
loop.defer_host_sync): the logged figures are those of the per-step path, steps that log nothing read
nothing back from the device, and a non-finite loss still stops the run (at the next log step, naming
the step where it happened). Also: fused AdamW only where every parameter is a CUDA float tensor."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import torch

from peftctl.errors import TrainingError
from peftctl.train import loop
from peftctl.train.optim import build_optimizer, fused_adamw_option
from peftctl.train.run import train

QUICK = [
    "train.max_steps=6",
    "train.batch_size=4",
    "train.grad_accum=2",
    "dataset.max_samples=48",
    "dataset.eval_size=0",
]


def _records(run: Path) -> list[dict[str, Any]]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_deferred_sync_logs_the_same_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exact = _records(train([*QUICK, "train.log_every=3", f"output_dir={tmp_path / 'exact'}"], quiet=True))
    monkeypatch.setattr(loop, "defer_host_sync", lambda device, dist: True)
    deferred = _records(train([*QUICK, "train.log_every=3", f"output_dir={tmp_path / 'deferred'}"], quiet=True))
    assert [r["step"] for r in exact] == [r["step"] for r in deferred] == [3, 6]
    for key in ("loss", "grad_norm", "lr", "epoch"):
        assert [r[key] for r in deferred] == [r[key] for r in exact], key


CONVERSIONS = ("item", "tolist", "__float__", "__int__", "__bool__")


@contextmanager
def _counting_conversions(counter: dict[str, int]) -> Iterator[None]:
    """Count tensor -> Python conversions (each one a device sync on CUDA) while counter['on']."""
    originals = {name: getattr(torch.Tensor, name) for name in CONVERSIONS}

    def counted(name: str) -> Any:
        def convert(self: torch.Tensor, *args: Any) -> Any:
            if counter["on"]:
                counter[name] = counter.get(name, 0) + 1
            return originals[name](self, *args)

        return convert

    for name in CONVERSIONS:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _conversions_per_step(tmp_path: Path, deferred: bool) -> list[int]:
    """Conversions made by the loop's own code in each of 3 steps (log_every=3), model forward /
    backward and the optimizer's own step left out (on CUDA, fused AdamW makes none)."""
    counter: dict[str, Any] = {"on": False}
    per_step: list[int] = []
    real_init, real_step = loop.Trainer.__init__, loop.Trainer._optimizer_step

    def init(self: loop.Trainer, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        self.objective.loss = _paused(self.objective.loss, counter)
        self.optimizer.step = _paused(self.optimizer.step, counter)

    def step(self: loop.Trainer, *args: Any) -> Any:
        before = sum(v for k, v in counter.items() if k != "on")
        counter["on"] = True
        try:
            return real_step(self, *args)
        finally:
            counter["on"] = False
            per_step.append(sum(v for k, v in counter.items() if k != "on") - before)

    with pytest.MonkeyPatch.context() as patch, _counting_conversions(counter):
        patch.setattr(loop, "defer_host_sync", lambda device, dist: deferred)
        patch.setattr(loop.Trainer, "__init__", init)
        patch.setattr(loop.Trainer, "_optimizer_step", step)
        train([*QUICK, "train.max_steps=3", "train.log_every=3", f"output_dir={tmp_path / str(deferred)}"], quiet=True)
    return per_step


def _paused(function: Any, counter: dict[str, Any]) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        was, counter["on"] = counter["on"], False
        try:
            return function(*args, **kwargs)
        finally:
            counter["on"] = was

    return call


def test_deferred_steps_read_nothing_back_from_the_device(tmp_path: Path) -> None:
    exact = _conversions_per_step(tmp_path, deferred=False)
    deferred = _conversions_per_step(tmp_path, deferred=True)
    assert len(exact) == len(deferred) == 3
    assert all(n > 0 for n in exact)  # the per-step path reads the loss, the finite check, the grad norm
    assert deferred == [0] * 3


def test_deferred_non_finite_loss_stops_at_the_next_log_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop, "defer_host_sync", lambda device, dist: True)
    real = loop.causal_lm_loss_sum
    calls = {"n": 0}

    def poisoned(model: Any, batch: Any) -> Any:
        calls["n"] += 1
        loss, n = real(model, batch)
        return (loss * float("nan"), n) if calls["n"] > 4 and model.training else (loss, n)

    monkeypatch.setattr(loop, "causal_lm_loss_sum", poisoned)
    run_dir = tmp_path / "r"
    # micro-batch 5 is the first of step 3 (grad_accum=2); the check runs at the log step, 4
    with pytest.raises(TrainingError, match=r"loss became nan at step 3; training stopped at step 4"):
        train([*QUICK, "train.log_every=4", f"output_dir={run_dir}"], quiet=True)
    assert not (run_dir / "adapter").exists()


def test_fused_adamw_only_for_cuda_float_parameters() -> None:
    cpu = [torch.nn.Parameter(torch.zeros(3))]
    cfg = SimpleNamespace(optimizer="adamw", lr=1e-3, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8, weight_decay=0.0)
    assert not build_optimizer(cpu, cfg).defaults.get("fused")  # the CPU keeps torch's default AdamW
    on_cuda = SimpleNamespace(device=torch.device("cuda"), is_floating_point=lambda: True)
    half_on_cpu = SimpleNamespace(device=torch.device("cpu"), is_floating_point=lambda: True)
    assert fused_adamw_option([on_cuda, on_cuda]) == {"fused": True}
    assert fused_adamw_option([on_cuda, half_on_cpu]) == {} and fused_adamw_option([]) == {}


def test_bench_under_deferred_sync_reports_plain_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    from peftctl.train.bench import bench

    monkeypatch.setattr(loop, "defer_host_sync", lambda device, dist: True)
    result = bench(["recipe=tiny_lora", "train.batch_size=2"], warmup=0, steps=2, seq_len=16).as_dict()
    assert len(result["losses"]) == 2 and all(isinstance(v, float) for v in result["losses"])
    json.dumps(result)

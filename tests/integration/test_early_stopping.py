"""train.early_stopping_patience stops a run whose eval loss stopped improving; train.save_best keeps
the best eval step's adapter as adapter/ and records the step in summary.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftctl.train.loop as loop
from peftctl.config.compose import compose_config
from peftctl.errors import ConfigError
from peftctl.train.run import train

RUN = [
    "train.max_steps=12",
    "train.batch_size=4",
    "train.log_every=1",
    "train.eval_every=1",
    "train.save_every=1",
    "train.keep_checkpoints=20",
    "dataset.max_samples=32",
    "dataset.eval_size=0.25",
]


def _scripted_eval_loss(monkeypatch: pytest.MonkeyPatch, values: list[float]) -> None:
    """The eval loss of each successive eval is the next of ``values`` (the model still trains)."""
    remaining = list(values)
    monkeypatch.setattr(loop, "evaluate_loss", lambda *args, **kwargs: remaining.pop(0))


def _checkpoint_adapter(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return _tensors(run_dir / "checkpoints" / f"step-{step:06d}" / "adapter")


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


def test_a_run_stops_when_eval_loss_stops_improving_and_keeps_the_best_adapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # best at step 3; steps 4 and 5 do not improve by more than min_delta=0.01 -> stop after step 5
    _scripted_eval_loss(monkeypatch, [2.0, 1.5, 1.0, 0.995, 1.2, 0.5, 0.4])
    run_dir = train(
        [
            *RUN,
            "train.early_stopping_patience=2",
            "train.early_stopping_min_delta=0.01",
            "train.save_best=true",
            f"output_dir={tmp_path / 'run'}",
        ]
    )
    out = capsys.readouterr().out
    stop_lines = [line for line in out.splitlines() if "early stopping" in line]
    assert stop_lines == [
        "early stopping at step 5: eval_loss did not improve by more than 0.01 for 2 evals (best 1.0000 at step 3)"
    ]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 5  # no training after the stop
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_early"] is True and summary["steps"] == 5
    assert summary["best_step"] == 3 and summary["adapter_step"] == 3 and summary["best_eval_loss"] == 1.0
    best, last = _checkpoint_adapter(run_dir, 3), _checkpoint_adapter(run_dir, 5)
    adapter = _tensors(run_dir / "adapter")
    assert adapter.keys() == best.keys()
    assert all(torch.equal(adapter[k], best[k]) for k in best)
    assert any(not torch.equal(adapter[k], last[k]) for k in last)  # the best step's, not the last step's
    assert (run_dir / "adapter" / "tokenizer_config.json").is_file() and not (run_dir / "best_adapter").exists()


def test_without_save_best_the_last_adapter_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _scripted_eval_loss(monkeypatch, [2.0, 1.0, 1.5, 1.6])
    run_dir = train([*RUN, "train.early_stopping_patience=2", f"output_dir={tmp_path / 'run'}"], quiet=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["adapter_step"] == 4 and summary["best_step"] == 2
    last, adapter = _checkpoint_adapter(run_dir, 4), _tensors(run_dir / "adapter")
    assert all(torch.equal(adapter[k], last[k]) for k in last)


def test_early_stopping_needs_evals() -> None:
    with pytest.raises(
        ConfigError, match=r"train.eval_every=0 is not valid; train.early_stopping_patience needs evals during training"
    ):
        compose_config(["train.early_stopping_patience=2", "train.eval_every=0"])
    with pytest.raises(ConfigError, match=r"train.eval_every=0 is not valid; train.save_best needs evals"):
        compose_config(["train.save_best=true", "train.eval_every=0"])
    with pytest.raises(ConfigError, match=r"train.early_stopping_patience=-1 is not valid"):
        compose_config(["train.early_stopping_patience=-1", "train.eval_every=5"])

"""`eval.metrics`: task metrics at every `train.eval_every` step, in metrics.jsonl and the trackers, equal
to what `peftctl eval` reports for that step's adapter, and usable as the early-stopping metric."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

import peftctl.train.loop as loop
from peftctl.config.compose import compose_config
from peftctl.errors import ConfigError
from peftctl.eval.evaluate import evaluate
from peftctl.train.run import train

CLS_RUN = [
    "recipe=bert_lora_cls",
    "train.max_steps=6",
    "train.batch_size=8",
    "train.warmup_steps=0",
    "train.log_every=3",
    "train.eval_every=3",
    "train.save_every=3",
    "eval.max_eval_samples=24",
    "eval.metrics=[accuracy,macro_f1]",
]


def _eval_records(run_dir: Path) -> dict[int, dict[str, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "eval_loss" in r}


def _run_with_adapter_of(run_dir: Path, step: int, out: Path) -> Path:
    """A run directory (the run's config.yaml) whose adapter/ is checkpoint step-N's adapter."""
    out.mkdir()
    shutil.copy(run_dir / "config.yaml", out / "config.yaml")
    shutil.copytree(run_dir / "checkpoints" / f"step-{step:06d}" / "adapter", out / "adapter")
    return out


def test_task_metrics_at_each_eval_equal_peftctl_eval_of_that_steps_adapter(tmp_path: Path) -> None:
    run_dir = train([*CLS_RUN, "train.report_to=tensorboard", f"output_dir={tmp_path / 'run'}"], quiet=True)
    evals = _eval_records(run_dir)
    assert sorted(evals) == [3, 6]  # the eval at step 3 and the final one
    for step, run in ((3, _run_with_adapter_of(run_dir, 3, tmp_path / "step3")), (6, run_dir)):
        adapted = evaluate(run, quiet=True)["adapted"]
        assert evals[step]["eval_accuracy"] == adapted["accuracy"], step
        assert evals[step]["eval_macro_f1"] == adapted["macro_f1"], step
    assert evals[3]["eval_accuracy"] != evals[6]["eval_accuracy"] or evals[3]["eval_loss"] != evals[6]["eval_loss"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    logged = {e.step: e.value for e in events.Scalars("eval/accuracy")}
    assert logged == pytest.approx({step: evals[step]["eval_accuracy"] for step in evals})


def test_early_stopping_on_a_task_metric_keeps_the_highest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    scripted = [0.5, 0.75, 0.7, 0.75]  # higher is better: best at step 2, no improvement at 3 and 4
    monkeypatch.setattr(loop, "step_task_metrics", lambda *args, **kwargs: {"eval_accuracy": scripted.pop(0)})
    run_dir = train(
        [
            *CLS_RUN,
            "train.max_steps=12",
            "train.eval_every=1",
            "train.save_every=0",
            "train.early_stopping_patience=2",
            "train.early_stopping_metric=eval_accuracy",
            "train.save_best=true",
            f"output_dir={tmp_path / 'run'}",
        ]
    )
    out = capsys.readouterr().out
    assert (
        "early stopping at step 4: eval_accuracy did not improve by more than 0 for 2 evals (best 0.7500 at step 2)"
        in out
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_step"] == 2 and summary["adapter_step"] == 2 and summary["best_eval_accuracy"] == 0.75
    assert summary["steps"] == 4 and summary["stopped_early"] is True


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["eval.metrics=[bleu]"], "eval.metrics: 'bleu' is not valid; expected one or more of exact_match"),
        (["recipe=bert_lora_cls", "eval.metrics=exact_match"], "expected one or more of accuracy, macro_f1"),
        (
            ["train.early_stopping_metric=eval_exact_match"],
            "train.early_stopping_metric='eval_exact_match' is not valid; expected eval_loss (a metric named",
        ),
    ],
)
def test_bad_eval_metrics_are_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose_config(overrides)


def test_no_eval_metrics_by_default() -> None:
    assert compose_config([]).eval.metrics == []

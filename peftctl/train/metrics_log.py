"""metrics.jsonl, progress display (rich on a TTY, plain lines otherwise) and the loss / lr plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from peftctl.utils import atomic_write_text


def _step_of(line: str) -> int | None:
    """The step of one metrics.jsonl line; None for a blank line or one torn by a kill mid-write."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record.get("step", 0) if isinstance(record, dict) else None


class MetricsLog:
    """Appends one JSON object per logged step; on resume, drops entries after the resumed step."""

    def __init__(self, path: Path, resume_step: int = 0) -> None:
        self.path = path
        if resume_step and path.is_file():
            kept = [
                line
                for line in path.read_text().splitlines()
                if _step_of(line) is not None and _step_of(line) <= resume_step
            ]
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        elif path.exists() and not resume_step:
            path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        return self.read(self.path)

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if _step_of(line) is not None]


class Progress:
    """A rich progress bar when stdout is a terminal; plain log lines otherwise; nothing if quiet."""

    def __init__(self, total: int, start: int, quiet: bool) -> None:
        self.quiet = quiet
        self.interactive = sys.stdout.isatty() and not quiet
        self._bar = None
        if self.interactive:
            self._bar = RichProgress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
            )
            self._task = self._bar.add_task("train", total=total, completed=start, info="")
            self._bar.start()

    def update(self, step: int, info: dict[str, Any], log_line: bool) -> None:
        text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=text)
        elif log_line and not self.quiet:
            print(f"step {step}  {text}", flush=True)

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text)
        elif not self.quiet:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def plot_metrics(records: list[dict[str, Any]], out_path: Path) -> None:
    """Training loss (and eval loss where logged) and learning rate against step."""
    import matplotlib  # lazy: heavy, and the backend must be chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    figure, (loss_axis, lr_axis) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    loss_axis.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        loss_axis.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    loss_axis.set_ylabel("loss")
    loss_axis.legend()
    lr_axis.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:orange")
    lr_axis.set_ylabel("learning rate")
    lr_axis.set_xlabel("step")
    figure.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    tmp.replace(out_path)

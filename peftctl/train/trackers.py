"""Experiment trackers (`train.report_to`): TensorBoard, Weights & Biases, MLflow.

Each tracker receives the same calls: the resolved config once, the train scalars of every logged
step, the eval metrics of every eval. `none` is the no-op tracker, so the training loop never asks
which trackers are on. Only rank 0 tracks (the other ranks get the no-op tracker).

Every tracker writes inside the run directory by default (TensorBoard event files under
`tensorboard/`, W&B offline runs under `wandb/` when no API key is configured, an MLflow `file:`
store under `mlruns/`), and a resumed run continues the same tracker run: the W&B run id and the
MLflow run id are kept in `trackers.json`.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from peftctl.config.schema import TRACKERS, check_report_to, report_to_list  # noqa: F401 - re-exported
from peftctl.errors import ConfigError

STATE_FILE = "trackers.json"
PROJECT = "peftctl"  # the W&B project / MLflow experiment, unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME say otherwise
TRAIN_KEYS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s",
    "memory_gib": "train/memory_gib",
    "epoch": "train/epoch",
}


def train_scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl train record as tracker scalars (train/loss, train/lr, ...)."""
    return {TRAIN_KEYS[key]: float(value) for key, value in record.items() if key in TRAIN_KEYS}


def eval_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """Eval metrics (eval_loss, ...) as tracker scalars (eval/loss, ...)."""
    return {"eval/" + key.removeprefix("eval_"): float(value) for key, value in metrics.items() if key != "step"}


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-4}} -> {"train.lr": 1e-4}: the hyper-parameters every tracker shows."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, name + "."))
        else:
            flat[name] = value if isinstance(value, (bool, int, float, str)) or value is None else str(value)
    return flat


class NullTracker:
    """`train.report_to=none`: every call does nothing."""

    def log(self, scalars: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(NullTracker):
    def __init__(self, run_dir: Path, config: dict[str, Any], resume_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: on resume, TensorBoard drops the events a killed run logged after the checkpoint
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        if not resume_step:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker(NullTracker):
    def __init__(self, run_dir: Path, config: dict[str, Any], state: dict[str, Any]) -> None:
        import wandb

        # no key configured: an offline run, synced later with `wandb sync` (WANDB_MODE, if set, decides)
        mode = "offline" if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE") else None
        state.setdefault("wandb_id", secrets.token_hex(4))
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", PROJECT),
            name=run_dir.name,
            id=state["wandb_id"],
            resume="allow",
            mode=mode,
            dir=str(run_dir),
            config=config,
            settings=wandb.Settings(console="off", silent=True),
        )

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker(NullTracker):
    def __init__(self, run_dir: Path, config: dict[str, Any], state: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"file:{(run_dir / 'mlruns').resolve()}"
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        if state.get("mlflow_run_id"):
            self.run_id = state["mlflow_run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
            state["mlflow_run_id"] = self.run_id
            params = [Param(key, str(value)[:6000]) for key, value in flatten_config(config).items()]
            for start in range(0, len(params), 100):  # log_batch takes at most 100 params
                self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(name, value, now, step) for name, value in scalars.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Trackers(NullTracker):
    """Several trackers behind one object; the ids a resume needs are saved in trackers.json."""

    def __init__(self, trackers: list[NullTracker]) -> None:
        self.trackers = trackers

    def log(self, scalars: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(scalars, step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def _load_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def build_trackers(
    report_to: Any, run_dir: Path, config: dict[str, Any], resume_step: int, is_main: bool
) -> NullTracker:
    """The trackers `train.report_to` names (the no-op tracker for none, or off rank 0)."""
    from peftctl.utils import atomic_write_text

    names = report_to_list(report_to)
    if not names or not is_main:
        return NullTracker()
    state = _load_state(run_dir) if resume_step else {}
    built: list[NullTracker] = []
    for name in names:
        try:
            if name == "tensorboard":
                built.append(TensorBoardTracker(run_dir, config, resume_step))
            elif name == "wandb":
                built.append(WandbTracker(run_dir, config, state))
            else:
                built.append(MlflowTracker(run_dir, config, state))
        except ImportError as exc:
            raise ConfigError(
                f"train.report_to={name} needs the {exc.name} package; install it with pip install 'peftctl[track]'"
            ) from exc
    atomic_write_text(run_dir / STATE_FILE, json.dumps(state, indent=2) + "\n")
    return Trackers(built)

"""train.report_to: TensorBoard, MLflow and W&B (offline) hold the scalars metrics.jsonl holds.

Each store is read back with its own library: TensorBoard's EventAccumulator, MLflow's client on
the local file store, and W&B's own protobuf records from the offline run's .wandb file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from peftctl.config.compose import compose_config
from peftctl.errors import ConfigError
from peftctl.train.run import train

RUN = [
    "train.max_steps=4",
    "train.batch_size=4",
    "train.log_every=1",
    "train.eval_every=2",
    "dataset.max_samples=32",
    "dataset.eval_size=0.25",
]


def _metrics(run_dir: Path) -> tuple[dict[int, float], dict[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_loss = {r["step"]: r["loss"] for r in records if "loss" in r}
    eval_loss = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    return train_loss, eval_loss


def _tensorboard_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def _mlflow_scalars(run_dir: Path, tag: str) -> tuple[list[tuple[int, float]], dict[str, str], str]:
    import os

    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=f"file:{(run_dir / 'mlruns').resolve()}")
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow_run_id"]
    run = client.get_run(run_id)
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, tag))
    return history, run.data.params, run.info.run_name


def _wandb_records(path: Path) -> list[object]:
    """The protobuf records of a .wandb file (LevelDB-log framing: a 7-byte file header, 32 KiB blocks,
    each chunk a 7-byte header of crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, offset, block = [], b"", 7, 32768
    while offset + 7 <= len(data):
        left_in_block = block - offset % block
        if left_in_block < 7:
            offset += left_in_block  # block trailer padding
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        chunk = data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _wandb_scalars(run_dir: Path, tag: str) -> tuple[list[tuple[int, float]], dict[str, object], str]:
    run_id = json.loads((run_dir / "trackers.json").read_text())["wandb_id"]
    files = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert files, "no offline W&B run in the run directory"
    history, config, name = [], {}, ""
    for path in files:  # a resumed run appends a second offline run with the same id
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                values = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item
                }
                if tag in values:
                    history.append((values["_step"], values[tag]))
            elif kind == "run":
                name = record.run.display_name
                config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    return history, config, name


def test_every_tracker_holds_the_logged_scalars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = train(
        [*RUN, "train.report_to=[tensorboard,mlflow,wandb]", f"output_dir={tmp_path / 'tracked'}"], quiet=True
    )
    train_loss, eval_loss = _metrics(run_dir)
    assert sorted(train_loss) == [1, 2, 3, 4] and sorted(eval_loss) == [2, 4]

    tensorboard = _tensorboard_scalars(run_dir, "train/loss")
    assert [step for step, _ in tensorboard] == sorted(train_loss)  # one scalar per logged step
    assert [value for _, value in tensorboard] == pytest.approx([train_loss[s] for s in sorted(train_loss)], rel=1e-6)
    assert dict(_tensorboard_scalars(run_dir, "eval/loss")) == pytest.approx(eval_loss, rel=1e-6)
    assert [step for step, _ in _tensorboard_scalars(run_dir, "train/lr")] == sorted(train_loss)

    mlflow_loss, params, mlflow_name = _mlflow_scalars(run_dir, "train/loss")
    assert dict(mlflow_loss) == pytest.approx(train_loss, rel=1e-9) and len(mlflow_loss) == len(train_loss)
    assert dict(_mlflow_scalars(run_dir, "eval/loss")[0]) == pytest.approx(eval_loss, rel=1e-9)
    assert dict(_mlflow_scalars(run_dir, "train/grad_norm")[0]).keys() == train_loss.keys()
    assert params["train.max_steps"] == "4" and params["adapter.method"] == "lora" and mlflow_name == run_dir.name

    wandb_loss, config, wandb_name = _wandb_scalars(run_dir, "train/loss")
    assert dict(wandb_loss) == pytest.approx(train_loss, rel=1e-9) and len(wandb_loss) == len(train_loss)
    assert dict(_wandb_scalars(run_dir, "eval/loss")[0]) == pytest.approx(eval_loss, rel=1e-9)
    assert config["train"]["max_steps"] == 4 and wandb_name == run_dir.name


def test_a_resumed_run_continues_the_same_tracker_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "resumed"
    overrides = [*RUN, "train.save_every=2", "train.report_to=[tensorboard,mlflow,wandb]", f"output_dir={out}"]
    train(overrides, quiet=True, stop_after_step=3)  # killed after step 3; the checkpoint is at step 2
    ids = json.loads((out / "trackers.json").read_text())
    run_dir = train([*overrides, "train.resume=true"], quiet=True)
    assert json.loads((run_dir / "trackers.json").read_text()) == ids  # the same W&B and MLflow runs
    train_loss, _ = _metrics(run_dir)
    tensorboard = _tensorboard_scalars(run_dir, "train/loss")
    # step 3 was logged twice (before the kill, again after the resume): TensorBoard purged the first
    assert [step for step, _ in tensorboard] == [1, 2, 3, 4]
    assert dict(tensorboard) == pytest.approx(train_loss, rel=1e-6)
    mlflow_loss, _, _ = _mlflow_scalars(run_dir, "train/loss")
    assert {step for step, _ in mlflow_loss} == {1, 2, 3, 4} and dict(mlflow_loss)[4] == pytest.approx(train_loss[4])


def test_report_to_is_checked() -> None:
    assert compose_config(["train.report_to=none"]).train.report_to == "none"
    assert compose_config(["train.report_to=[tensorboard,wandb]"]).train.report_to == ["tensorboard", "wandb"]
    with pytest.raises(
        ConfigError, match=r"train.report_to=.*'comet' is not a tracker; expected none, tensorboard, wandb, mlflow"
    ):
        compose_config(["train.report_to=[tensorboard,comet]"])
    with pytest.raises(ConfigError, match="train.report_to"):
        compose_config(["train.report_to=3"])


def test_only_rank_0_tracks(tmp_path: Path) -> None:
    from peftctl.train.trackers import NullTracker, build_trackers

    tracker = build_trackers(["tensorboard", "mlflow"], tmp_path, {"train": {"lr": 1.0}}, 0, is_main=False)
    assert type(tracker) is NullTracker and not any(tmp_path.iterdir())

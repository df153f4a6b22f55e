"""Sweeps on the launchers users run them on: joblib (N runs at a time here) and SLURM (submitit).

A 3-point sweep with the joblib launcher runs 2 at a time on CPU (more points than slots, never 3 at
once), one point failing on purpose (lr 1e30: the loss becomes non-finite): the summary (printed,
sweep_summary.md / .json) has a row per run with its status and numbers, and the exit code is 1. The
SLURM launcher's config renders a valid sbatch script (submitit's own renderer, with a stand-in `srun`
on PATH instead of a cluster)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peftctl.errors import ConfigError
from peftctl.sweep import resolve_launcher, slurm_submission_script

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "train.max_steps=3",
    "train.batch_size=4",
    "train.log_every=1",
    "train.eval_every=0",
    "train.device=cpu",
    "dataset.max_samples=32",
    "eval.max_eval_samples=8",
]


def _max_overlap(rows: list[dict]) -> int:
    """The most runs that were running at the same moment."""
    events = sorted([(r["started"], 1) for r in rows] + [(r["ended"], -1) for r in rows], key=lambda e: (e[0], e[1]))
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


def test_joblib_sweep_runs_two_at_a_time_and_reports_the_failed_run(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable,
        "-m",
        "peftctl",
        "train",
        "-m",
        "train.lr=1e-3,1e30,2e-3",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        *TINY,
        f"output_dir={tmp_path / 'sweep'}",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "1 of 3 sweep runs failed" in result.stderr
    rows = json.loads((tmp_path / "sweep" / "sweep_summary.json").read_text())
    assert [r["overrides"][0] for r in rows] == ["train.lr=0.001", "train.lr=1e+30", "train.lr=0.002"]
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    failed = rows[1]
    assert (
        failed["exit_code"] == 1 and "loss became" in failed["error"] and not (Path(failed["run"]) / "adapter").exists()
    )
    for row in (rows[0], rows[2]):
        metrics = [json.loads(line) for line in (Path(row["run"]) / "metrics.jsonl").read_text().splitlines()]
        assert row["final_loss"] == [m["loss"] for m in metrics if "loss" in m][-1]
        assert row["eval_loss"] == [m["eval_loss"] for m in metrics if "eval_loss" in m][-1]
        assert (
            row["trainable_params"] == 32_768 and row["tokens_per_s"] > 0 and row["peak_memory_gib"] is None
        )  # CPU: no CUDA peak
        assert (Path(row["run"]) / "adapter" / "adapter_model.safetensors").is_file()
    assert _max_overlap(rows) == 2  # two at a time, never more
    markdown = (tmp_path / "sweep" / "sweep_summary.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| 00")]
    assert len(table) == 3 and "failed" in table[1] and "loss became" in table[1]
    assert "2 of 3 runs succeeded" in markdown
    assert "sweep summary" in result.stdout


def test_max_parallel_is_the_joblib_launcher_and_bad_launcher_input_is_one_clear_error() -> None:
    launcher, settings, rest = resolve_launcher(["train.lr=1e-3,2e-3"], max_parallel=3)
    assert (launcher, settings["n_jobs"], rest) == ("joblib", 3, ["train.lr=1e-3,2e-3"])
    with pytest.raises(
        ConfigError, match="hydra/launcher=ray is not a known launcher; valid: basic, joblib, submitit_slurm"
    ):
        resolve_launcher(["hydra/launcher=ray"])
    with pytest.raises(
        ConfigError, match=r"hydra.launcher.n_jobz is not a field of the joblib launcher; valid: n_jobs"
    ):
        resolve_launcher(["hydra/launcher=joblib", "hydra.launcher.n_jobz=2"])
    with pytest.raises(ConfigError, match="--max-parallel"):
        resolve_launcher(["hydra/launcher=submitit_slurm"], max_parallel=2)
    with pytest.raises(ConfigError, match="--max-parallel=0 is not valid; expected an integer >= 1"):
        resolve_launcher([], max_parallel=0)


def test_the_slurm_launcher_config_renders_a_valid_sbatch_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit only checks that srun exists
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    launcher, settings, _ = resolve_launcher(
        [
            "hydra/launcher=submitit_slurm",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.timeout_min=90",
            "hydra.launcher.setup=[module load cuda/12.4]",
            "hydra.launcher.array_parallelism=2",
            "adapter.r=4,8",
        ]
    )
    script = slurm_submission_script(settings, tmp_path / "sweep")
    assert script.startswith("#!/bin/bash")
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --time=90",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=64GB",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --job-name=peftctl-sweep",
        "module load cuda/12.4",
    ):
        assert line in script.splitlines(), (line, script)
    assert str(tmp_path / "sweep" / ".submitit") in script and "srun" in script
    checked = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr

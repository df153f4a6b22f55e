"""`peftctl train -m`: expand Hydra sweep overrides (a=1,2 b=x,y), run each combination, summarise.

Every point is checked (composed and validated) before any runs, then runs as its own
`peftctl train` process, so one failing run does not end the sweep. Launchers (configs/hydra/launcher/,
field names as in the Hydra launcher plugins):

- basic (default): one run after another;
- joblib: `hydra/launcher=joblib hydra.launcher.n_jobs=N` or `--max-parallel N`: N runs at a time here;
- submitit_slurm: each point a task of a SLURM job array (submitit), `array_parallelism` at a time.

The summary (one row per run: status, final loss, eval loss, trainable params, tok/s, peak memory)
is printed and written to SWEEP_DIR/sweep_summary.md and .json; the exit code is 1 if any run failed.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from peftctl.config.compose import compose_config, quote_value_if_needed, resource_dir, unparsable_override_hint
from peftctl.errors import ConfigError
from peftctl.train.metrics_log import MetricsLog
from peftctl.train.run import default_run_dir
from peftctl.utils import atomic_write_text

LAUNCHERS = ("basic", "joblib", "submitit_slurm")
SUMMARY_NAME = "sweep_summary"


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Cartesian product of the sweep overrides, each as a plain override list."""
    parser = OverridesParser.create()
    quoted = [quote_value_if_needed(o) for o in overrides]
    try:
        parsed = parser.parse_overrides(quoted)
    except Exception as exc:
        raise ConfigError(
            unparsable_override_hint(str(exc), quoted) or f"bad sweep override: {str(exc).splitlines()[0]}"
        ) from None
    choices: list[list[str]] = []
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override():
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    return [list(combo) for combo in itertools.product(*choices)]


# ---------------------------------------------------------------------------------------- launchers
def split_launcher_overrides(overrides: list[str]) -> tuple[str, list[str], list[str]]:
    """(launcher name, its `hydra.launcher.x=v` overrides, the run overrides)."""
    launcher, settings, rest = "basic", [], []
    for item in overrides:
        key, _, value = item.partition("=")
        if key.lstrip("+") == "hydra/launcher":
            launcher = value
        elif key.lstrip("+").startswith("hydra.launcher."):
            settings.append(f"{key.lstrip('+')[len('hydra.launcher.') :]}={value}")
        else:
            rest.append(item)
    if launcher not in LAUNCHERS:
        raise ConfigError(f"hydra/launcher={launcher} is not a known launcher; valid: {', '.join(LAUNCHERS)}")
    return launcher, settings, rest


def launcher_settings(launcher: str, overrides: list[str]) -> dict[str, Any]:
    """configs/hydra/launcher/<launcher>.yaml with `hydra.launcher.<field>=value` overrides applied."""
    if launcher == "basic":
        if overrides:
            raise ConfigError(
                f"hydra.launcher.{overrides[0]} needs a launcher: "
                "add hydra/launcher=joblib or hydra/launcher=submitit_slurm"
            )
        return {}
    base = OmegaConf.load(resource_dir("configs") / "hydra" / "launcher" / f"{launcher}.yaml")
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in base:
            fields = ", ".join(k for k in base if k != "_target_")
            raise ConfigError(f"hydra.launcher.{key} is not a field of the {launcher} launcher; valid: {fields}")
        base[key] = _yaml_value(value)
    settings = OmegaConf.to_container(base, resolve=True)
    settings.pop("_target_", None)
    return settings


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError:
        return text


@dataclass(frozen=True)
class SweepPoint:
    index: int
    overrides: tuple[str, ...]  # without output_dir
    run_dir: str


def run_point(point: SweepPoint) -> dict[str, Any]:
    """One sweep run as its own `peftctl train` process (its output in RUN_DIR.log); its summary row."""
    run_dir = Path(point.run_dir)
    command = [sys.executable, "-m", "peftctl", "train", *point.overrides, f"output_dir={run_dir}"]
    started = time.time()
    result = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    ended = time.time()
    log = run_dir.with_name(run_dir.name + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {' '.join(command)}\n{result.stdout}{result.stderr}")
    return summary_row(point, result.returncode, result.stdout, result.stderr, started, ended)


def summary_row(
    point: SweepPoint, exit_code: int, stdout: str, stderr: str, started: float, ended: float
) -> dict[str, Any]:
    records = (
        MetricsLog.read(Path(point.run_dir) / "metrics.jsonl")
        if (Path(point.run_dir) / "metrics.jsonl").is_file()
        else []
    )
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    memory = [r["memory_gib"] for r in records if "memory_gib" in r]
    trainable = re.search(r"([\d,]+) trainable of", stdout)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    return {
        "index": point.index,
        "run": point.run_dir,
        "overrides": list(point.overrides),
        "status": "ok" if exit_code == 0 else "failed",
        "exit_code": exit_code,
        "final_loss": losses[-1] if losses else None,
        "eval_loss": evals[-1] if evals else None,
        "trainable_params": int(trainable.group(1).replace(",", "")) if trainable else None,
        "tokens_per_s": sum(speeds) / len(speeds) if speeds else None,
        "peak_memory_gib": max(memory) if memory else None,
        "error": errors[-1][len("error: ") :]
        if errors
        else (stderr.strip().splitlines()[-1] if exit_code and stderr.strip() else None),
        "started": started,
        "ended": ended,
    }


def launch_points(
    launcher: str, settings: dict[str, Any], points: list[SweepPoint], root: Path
) -> list[dict[str, Any]]:
    if launcher == "joblib":
        from joblib import Parallel, delayed  # optional dependency (the sweep extra)

        options = {k: settings[k] for k in ("n_jobs", "prefer", "verbose", "timeout", "pre_dispatch") if k in settings}
        return list(Parallel(**options)(delayed(run_point)(p) for p in points))
    if launcher == "submitit_slurm":
        executor = slurm_executor(settings, root)
        jobs = executor.map_array(run_point, points)
        return [_job_result(job, point) for job, point in zip(jobs, points)]
    return [run_point(p) for p in points]


def _job_result(job: Any, point: SweepPoint) -> dict[str, Any]:
    """A SLURM task's row; a task that died (cancelled, node failure) is a failed row, not a crash."""
    try:
        return job.result()
    except Exception as exc:
        now = time.time()
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        return summary_row(point, 1, "", f"error: SLURM job {job.job_id}: {reason}", now, now)


# hydra-submitit-launcher's split: these go to the executor itself, the base fields keep their names,
# the rest are SLURM parameters (slurm_<name>)
_SUBMITIT_BASE = {
    "timeout_min",
    "cpus_per_task",
    "gpus_per_node",
    "tasks_per_node",
    "mem_gb",
    "nodes",
    "name",
    "stderr_to_stdout",
}


def slurm_executor(settings: dict[str, Any], root: Path) -> Any:
    """A submitit SLURM executor configured from the submitit_slurm launcher settings (as the Hydra plugin does)."""
    import submitit  # optional dependency (the sweep extra)

    params = dict(settings)
    folder = Path(str(params.pop("submitit_folder")))
    folder = folder if folder.is_absolute() else root / folder
    executor = submitit.AutoExecutor(
        folder=str(folder), cluster="slurm", slurm_max_num_timeout=params.pop("max_num_timeout", 0)
    )
    executor.update_parameters(
        **{k if k in _SUBMITIT_BASE else f"slurm_{k}": v for k, v in params.items() if v is not None}
    )
    return executor


def slurm_submission_script(
    settings: dict[str, Any], root: Path, command: str = "python -u -m submitit.core._submit"
) -> str:
    """The sbatch script the submitit_slurm launcher submits (rendered here, without a cluster)."""
    executor = slurm_executor(settings, root)
    return executor._executor._make_submission_file_text(command, "render")


# -------------------------------------------------------------------------------------------- sweep
def resolve_launcher(overrides: list[str], max_parallel: int | None = None) -> tuple[str, dict[str, Any], list[str]]:
    """(launcher, its settings, the run overrides); `--max-parallel N` is the joblib launcher with n_jobs=N."""
    launcher, launcher_overrides, rest = split_launcher_overrides(overrides)
    if max_parallel is not None:
        if max_parallel < 1:
            raise ConfigError(f"--max-parallel={max_parallel} is not valid; expected an integer >= 1")
        if launcher == "basic":
            launcher = "joblib"
        if launcher != "joblib":
            raise ConfigError(
                f"--max-parallel sets the joblib launcher's n_jobs; with hydra/launcher={launcher} use its own fields"
            )
        launcher_overrides = [*launcher_overrides, f"n_jobs={max_parallel}"]
    return launcher, launcher_settings(launcher, launcher_overrides), rest


def run_sweep(overrides: list[str], quiet: bool = False, max_parallel: int | None = None) -> int:
    """Run the sweep; 0 if every run succeeded, 1 otherwise (the summary says which)."""
    launcher, settings, rest = resolve_launcher(overrides, max_parallel)
    combos = expand_sweep(rest)
    configs = [compose_config(combo) for combo in combos]  # check every point before training any
    root = (
        Path(configs[0].output_dir)
        if configs[0].output_dir
        else default_run_dir(configs[0]).with_name(default_run_dir(configs[0]).name + "-sweep")
    )
    points = [
        SweepPoint(
            i, tuple(c for c in combo if not c.split("=", 1)[0].lstrip("+") == "output_dir"), str(root / f"{i:03d}")
        )
        for i, combo in enumerate(combos)
    ]
    root.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(
            f"sweep: {len(points)} runs under {root} (launcher {launcher}{_parallel_note(launcher, settings)})",
            flush=True,
        )
    results = sorted(launch_points(launcher, settings, points, root), key=lambda r: r["index"])
    write_summary(results, root)
    print_summary(results)
    failed = [r for r in results if r["status"] != "ok"]
    if failed:
        print(
            f"error: {len(failed)} of {len(results)} sweep runs failed (see {root / (SUMMARY_NAME + '.md')})",
            file=sys.stderr,
            flush=True,
        )
    return 1 if failed else 0


def _parallel_note(launcher: str, settings: dict[str, Any]) -> str:
    if launcher == "joblib":
        return f", {settings.get('n_jobs')} at a time"
    if launcher == "submitit_slurm":
        return f", SLURM array, {settings.get('array_parallelism')} at a time"
    return ""


# ------------------------------------------------------------------------------------------ summary
COLUMNS = [
    ("run", "run"),
    ("overrides", "overrides"),
    ("status", "status"),
    ("final loss", "final_loss"),
    ("eval loss", "eval_loss"),
    ("trainable params", "trainable_params"),
    ("tok/s", "tokens_per_s"),
    ("peak mem GiB", "peak_memory_gib"),
    ("error", "error"),
]


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "overrides":
        return " ".join(value)
    if key in ("final_loss", "eval_loss"):
        return f"{value:.4f}"
    if key == "trainable_params":
        return f"{value:,}"
    if key in ("tokens_per_s",):
        return f"{value:,.0f}"
    if key == "peak_memory_gib":
        return f"{value:.2f}"
    if key == "run":
        return Path(value).name
    return str(value)


def summary_markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(title for title, _ in COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in results:
        lines.append("| " + " | ".join(_cell(key, row.get(key)).replace("|", "\\|") for _, key in COLUMNS) + " |")
    ok = sum(r["status"] == "ok" for r in results)
    return "## peftctl sweep\n\n" + "\n".join(lines) + f"\n\n{ok} of {len(results)} runs succeeded.\n"


def write_summary(results: list[dict[str, Any]], root: Path) -> None:
    atomic_write_text(root / f"{SUMMARY_NAME}.md", summary_markdown(results))
    atomic_write_text(root / f"{SUMMARY_NAME}.json", json.dumps(results, indent=2))


def print_summary(results: list[dict[str, Any]]) -> None:
    table = Table(title="sweep summary")
    for title, key in COLUMNS:
        table.add_column(
            title,
            justify="right"
            if key in ("final_loss", "eval_loss", "trainable_params", "tokens_per_s", "peak_memory_gib")
            else "left",
        )
    for row in results:
        table.add_row(*(_cell(key, row.get(key)) for _, key in COLUMNS))
    Console().print(table)

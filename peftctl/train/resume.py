"""`train.resume`: which run directory and checkpoint, and the config the resumed run uses.

A resumed run continues under the run's saved config.yaml. Overrides on the resume command that
change what the run computes (model, data, adapter, quantization, schedule, optimizer, seed,
precision, ...) are refused, naming them; an override equal to the saved value is harmless. A few
settings may change: logging / checkpoint / eval cadence, the device, gradient checkpointing,
eval.*, and train.lr (e.g. to recover from a non-finite loss; printed as a note).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from peftctl.config.schema import RunConfig, build_run_config
from peftctl.errors import ConfigError
from peftctl.train.checkpoint import MANIFEST_NAME, STATE_NAME, latest_checkpoint, verified_checkpoint

# dotted keys (or sections, ending in ".") a resume may change
CHANGEABLE_ON_RESUME = (
    "output_dir",
    "description",
    "train.resume",
    "train.lr",
    "train.log_every",
    "train.save_every",
    "train.keep_checkpoints",
    "train.eval_every",
    "train.device",
    "train.gradient_checkpointing",
    "train.mlp_tile_tokens",  # memory only: the same values
    "train.gradient_checkpointing_layers",
    "train.report_to",
    "train.early_stopping_patience",
    "train.early_stopping_min_delta",
    "train.save_best",
    "eval.",
    "eval",
)
SHORTHANDS = {"resume": "train.resume"}


def resume_requested(cfg: RunConfig) -> bool:
    return cfg.train.resume not in (False, "false", "False", "")


def resume_run_dir(cfg: RunConfig) -> Path:
    """The run directory a resume continues: output_dir for `true`, else the one holding the path."""
    resume = cfg.train.resume
    if resume is True or resume in ("true", "True"):
        if cfg.output_dir is None:
            raise ConfigError(
                "train.resume=true needs output_dir=<the run directory to continue>; or pass train.resume=<checkpoint "
                "path>"
            )
        return Path(cfg.output_dir)
    path = Path(str(resume))
    if not path.is_dir():
        raise ConfigError(
            f"train.resume={str(resume)!r} is neither a checkpoint nor a run directory with checkpoints (expected true "
            "or a folder)"
        )
    is_checkpoint = (path / STATE_NAME).exists() or (path / MANIFEST_NAME).exists() or path.parent.name == "checkpoints"
    return path.parent.parent if is_checkpoint else path


def find_checkpoint(cfg: RunConfig, run_dir: Path) -> Path:
    """The checkpoint to continue from: the newest valid one of the run, or the named one (verified)."""
    resume = cfg.train.resume
    named = resume not in (True, "true", "True") and Path(str(resume)) != run_dir
    if named:
        return verified_checkpoint(Path(str(resume)))
    found = latest_checkpoint(run_dir)
    if found is None:
        what = "valid checkpoint" if any((run_dir / "checkpoints").glob("step-*")) else "checkpoint"
        raise ConfigError(
            f"train.resume: no {what} in {run_dir / 'checkpoints'}; start the run again without train.resume"
        )
    return found


def override_keys(overrides: list[str]) -> list[str]:
    """The dotted keys (or group names) a Hydra override list sets, `recipe` included."""
    keys = []
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        keys.append(SHORTHANDS.get(key, key))
    return keys


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        flat[prefix + key] = value
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def _changeable(key: str) -> bool:
    return any(
        key == allowed or (allowed.endswith(".") and key.startswith(allowed)) for allowed in CHANGEABLE_ON_RESUME
    )


def _set(values: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        values = values.setdefault(part, {})
    values[leaf] = value


def load_saved_config(run_dir: Path) -> dict[str, Any]:

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(
            f"train.resume: {path} not found; a resumed run continues under the config its run directory saved"
        )
    try:
        values = yaml.safe_load(path.read_text())
        build_run_config(values)
    except (yaml.YAMLError, ConfigError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"train.resume: {path} is not a valid run config "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from None
    return values


def filled_in_by_run(saved: dict[str, Any], run_dir: Path) -> set[str]:
    """Keys the run rewrote in its config.yaml: a LoftQ run's base becomes RUN/loftq_base."""
    base = Path(str((saved.get("model") or {}).get("name_or_path")))
    if base.name == "loftq_base" and base.resolve() == (run_dir / "loftq_base").resolve():
        return {"model.name_or_path", "model.arch", "adapter.init_lora_weights"}
    return set()


def resume_config(requested: RunConfig, overrides: list[str] | None, run_dir: Path) -> tuple[RunConfig, list[str]]:
    """(the config the resumed run uses, notes to print). ``overrides``: the command's override list;
    None when ``requested`` came in as a RunConfig (then every field counts as requested)."""
    saved = load_saved_config(run_dir)
    saved_flat, wanted_flat = _flatten(saved), _flatten(requested.to_dict())
    if saved_flat.get("model.trust_remote_code") and not wanted_flat.get("model.trust_remote_code"):
        # remote code runs only when the command line asks for it, never because a file says so
        raise ConfigError(
            f"train.resume: {run_dir / 'config.yaml'} has model.trust_remote_code=true; the model's own code runs only "
            "when the command says so: add model.trust_remote_code=true to the resume command"
        )
    keys = (
        override_keys(overrides)
        if overrides is not None
        else [k for k, v in wanted_flat.items() if not isinstance(v, dict)]
    )
    filled = filled_in_by_run(saved, run_dir)
    changed = [
        k
        for k in dict.fromkeys(keys)
        if k in wanted_flat
        and k not in filled
        and wanted_flat[k] != saved_flat.get(k)
        and not (k == "model.num_labels" and wanted_flat[k] is None)
    ]
    refused = [k for k in changed if not _changeable(k)]
    if refused:
        shown = ", ".join(
            f"{k}={wanted_flat[k]!r} (saved: {saved_flat.get(k)!r})" if not isinstance(wanted_flat[k], dict) else k
            for k in refused
        )
        raise ConfigError(
            f"train.resume continues the run under its saved {run_dir / 'config.yaml'}; these overrides would change "
            f"it: {shown}. "
            "Drop them, or start a new run in another output_dir"
        )
    for key in changed:
        _set(saved, key, wanted_flat[key])
    _set(saved, "train.resume", requested.train.resume)
    saved["output_dir"] = str(run_dir)
    notes = [
        f"note: train.lr changed from {saved_flat['train.lr']} to {wanted_flat['train.lr']} for the rest of the run "
        "(config.yaml records the new value)"
        for key in changed
        if key == "train.lr"
    ]
    return build_run_config(saved), notes

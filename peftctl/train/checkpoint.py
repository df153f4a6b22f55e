"""Checkpoints: adapter (PEFT format) + optimizer + scheduler + RNG + data position.

checkpoints/step-000200/
  adapter/ (adapter_config.json, adapter_model.safetensors) · optimizer.pt · scheduler.pt · rng.pt
  (+ rng-rank<r>.pt per further rank of a data-parallel run)
  trainer_state.json (step, epoch, position in the epoch, metrics so far)
  sharded/ instead of optimizer.pt and trainable.safetensors with train.distributed=fsdp: every rank's
      shards of the trainable tensors and the optimizer state (torch.distributed.checkpoint, train/fsdp.py;
      adapter/ is still the whole adapter, gathered)
  hooks/<i>-<HookClass>.json + .safetensors   state of the method's training hooks that have
      state_dict() / load_state_dict() (AdaLoRA's rank allocator): tensors and JSON values apart
  manifest.json   every other file's relative path, size and sha256, written last
Written into a temporary folder and renamed, so a checkpoint folder is always complete; on resume the
manifest is verified and a broken checkpoint (missing / truncated / altered file) is skipped.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from peftctl.adapters.core.persistence import read_adapter_weights, save_adapter_dir, set_adapter_state_dict
from peftctl.errors import ConfigError
from peftctl.utils import atomic_directory, remove_path, sha256_file

STATE_NAME = "trainer_state.json"
# the trainable tensors as they are in memory: the PEFT-format adapter folds some of them away
# (P-tuning's prompt encoder, prefix projection), and resume must continue from the unfolded ones
TRAINABLE_NAME = "trainable.safetensors"
HOOKS_DIR = "hooks"
MANIFEST_NAME = "manifest.json"
REQUIRED_FILES = (STATE_NAME, "optimizer.pt", "scheduler.pt", "rng.pt")
SHARDED_METADATA = "sharded/.metadata"  # an FSDP checkpoint's optimizer state: torch.distributed.checkpoint's index
# Test-only fault injection (tests/integration/test_kill_anywhere.py): with PEFTCTL_TEST_KILL_AT=<point>
# the process SIGKILLs itself where kill_point(<point>) is called, e.g. "checkpoint:8:optimizer"
KILL_ENV = "PEFTCTL_TEST_KILL_AT"


def kill_point(point: str) -> None:
    """SIGKILL this process here if PEFTCTL_TEST_KILL_AT names this point (tests only; a no-op otherwise)."""
    if os.environ.get(KILL_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.random.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": json.dumps(random.getstate()),
        "numpy": json.dumps([np_state[0], np_state[1].tolist(), *np_state[2:]]),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.random.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    python_state = json.loads(state["python"])
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    np_state = json.loads(state["numpy"])
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def restore_trainable_state(model: Any, tensors: dict[str, torch.Tensor], path: Path) -> None:
    params = dict(model.named_parameters())
    missing = sorted(set(trainable_state(model)) - set(tensors))
    if missing:
        raise ConfigError(
            f"checkpoint {path} does not fit this run: it lacks {missing[0]} (was the adapter config changed?)"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name not in params or params[name].shape != tensor.shape:
                raise ConfigError(
                    f"checkpoint {path} does not fit this run: {name} is not a trainable tensor of this shape"
                )
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))


def _hook_stem(directory: Path, index: int, hook: Any) -> Path:
    return directory / HOOKS_DIR / f"{index}-{type(hook).__name__}"


def save_hook_states(directory: Path, hooks: Sequence[Any]) -> None:
    """Each hook with ``state_dict()`` (a flat dict): tensor values into ``<stem>.safetensors``,
    the other (JSON) values into ``<stem>.json``."""
    for index, hook in enumerate(hooks):
        if not callable(getattr(hook, "state_dict", None)):
            continue
        state = hook.state_dict()
        tensors = {
            k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)
        }
        values = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
        stem = _hook_stem(directory, index, hook)
        stem.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(stem.with_suffix(".safetensors")))
        stem.with_suffix(".json").write_text(json.dumps({"hook": type(hook).__name__, "state": values}, indent=2))


def load_hook_states(path: Path, hooks: Sequence[Any]) -> None:
    """Give each hook with ``load_state_dict()`` the state ``save_hook_states`` wrote for it."""
    for index, hook in enumerate(hooks):
        if not callable(getattr(hook, "load_state_dict", None)):
            continue
        stem = _hook_stem(path, index, hook)
        if not stem.with_suffix(".json").is_file():  # a checkpoint from before hook states were saved
            warnings.warn(
                f"checkpoint {path} holds no state for the training hook {type(hook).__name__}; "
                "it restarts from its initial state, so the resumed run is not exact",
                stacklevel=2,
            )
            continue
        state = json.loads(stem.with_suffix(".json").read_text())["state"]
        state.update(load_file(str(stem.with_suffix(".safetensors"))))
        hook.load_state_dict(state)


def rng_file(rank: int) -> str:
    return "rng.pt" if rank == 0 else f"rng-rank{rank}.pt"


def save_checkpoint(
    run_dir: Path,
    model: Any,
    adapter_name: str,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    state: dict[str, Any],
    keep: int,
    hooks: Sequence[Any] = (),
    rank_rngs: list[dict[str, Any]] | None = None,
    sharded: tuple[dict[str, torch.Tensor], Any] | None = None,
) -> Path:
    """``rank_rngs``: every rank's RNG state in rank order (data-parallel runs); default: this process's.
    ``sharded`` (FSDP): (the gathered adapter tensors, a function that moves the ranks' written shards
    into the folder it is given) in place of the model's own tensors and the optimizer's state."""
    target = checkpoint_dir(run_dir, state["step"])
    stage = f"checkpoint:{state['step']}"
    # a re-run from an earlier checkpoint replaces the abandoned later one of the same step
    with atomic_directory(target, overwrite=True) as tmp:
        save_adapter_dir(model, tmp / "adapter", adapter_name, tensors=sharded[0] if sharded else None)
        kill_point(f"{stage}:adapter")
        if sharded is not None:
            sharded[1](tmp)
        else:
            save_file(trainable_state(model), str(tmp / TRAINABLE_NAME))
            kill_point(f"{stage}:trainable")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        kill_point(f"{stage}:optimizer")
        torch.save(
            {"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else {}},
            tmp / "scheduler.pt",
        )
        for rank, state_of_rank in enumerate(rank_rngs or [rng_state()]):
            torch.save(state_of_rank, tmp / rng_file(rank))
        save_hook_states(tmp, hooks)
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=2))
        kill_point(f"{stage}:state")
        write_manifest(tmp)
        kill_point(f"{stage}:manifest")
    kill_point(f"{stage}:renamed")
    _prune(run_dir, keep)
    return target


def write_manifest(directory: Path) -> None:
    """manifest.json: every file under ``directory`` with its size and sha256 (adapters are small)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    entries = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in files}
    (directory / MANIFEST_NAME).write_text(json.dumps({"files": entries}, indent=1, sort_keys=True))


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with the checkpoint at ``path`` (a one-line reason naming the file), or None."""
    manifest = path / MANIFEST_NAME
    if not manifest.is_file():
        return f"{manifest} is missing"
    try:
        entries = json.loads(manifest.read_text())["files"]
        listed = {name: (int(meta["size"]), str(meta["sha256"])) for name, meta in entries.items()}
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return f"{manifest} is not a valid manifest"
    for name in REQUIRED_FILES:
        if name == "optimizer.pt" and SHARDED_METADATA in listed:
            continue  # an FSDP checkpoint: the optimizer state is in sharded/
        if name not in listed:
            return f"{manifest} does not list {name}"
    for name, (size, digest) in listed.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != size:
            return f"{file} has {file.stat().st_size} bytes, the manifest says {size} (truncated?)"
        if sha256_file(file) != digest:
            return f"{file} does not match its sha256 in the manifest (altered or corrupt)"
    return None


def warn_line(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _prune(run_dir: Path, keep: int) -> None:
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    for old in checkpoints[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path, warn: bool = True) -> Path | None:
    """The newest checkpoint whose manifest verifies; each broken newer one is skipped with a warning."""
    for path in sorted((run_dir / "checkpoints").glob("step-*"), reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if warn:
            warn_line(f"skipping broken checkpoint {path}: {problem}")
    return None


def verified_checkpoint(path: Path) -> Path:
    """``path`` itself (an explicit train.resume=<checkpoint>), or ConfigError naming what is broken."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ConfigError(
            f"train.resume={str(path)!r} is a broken checkpoint: {problem}; pick another checkpoint or use "
            "train.resume=true"
        )
    return path


# what atomic_directory / atomic_write_text leave behind when killed: .<name>.<random>.tmp and .<name>.old
# (nested: ..adapter.<random>.tmp.<random>.tmp), for these run-directory entries and checkpoints/step-N
RUN_ENTRIES = ("adapter", "config.yaml", "metrics.jsonl", "initial_adapter", "loftq_base")


def _torn_owner(entry: str, names: Sequence[str]) -> str | None:
    """The entry a leftover temporary name belongs to ('adapter', 'step-000008', ...), or None."""
    if not entry.startswith(".") or not entry.endswith((".tmp", ".old")):
        return None
    base = entry.lstrip(".")
    return next((name for name in names if base.startswith(name + ".")), None)


def clean_torn_writes(run_dir: Path) -> None:
    """Remove the temporary folders / files of writes killed midway in a run directory; a checkpoint
    (or adapter/) caught between the two renames of a replacement is moved back into place."""
    checkpoints = run_dir / "checkpoints"
    for folder in (run_dir, checkpoints):
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            names = (
                RUN_ENTRIES
                if folder == run_dir
                else [m.group(0) for m in [re.match(r"\.*(step-\d+)", entry.name)] if m]
            )
            names = [n.lstrip(".") for n in names]
            owner = _torn_owner(entry.name, names)
            if owner is None:
                continue
            final = folder / owner
            if entry.name == f".{owner}.old" and not final.exists():
                os.replace(entry, final)  # the replacement never arrived: keep the previous one
            else:
                remove_path(entry)


def _load_model_and_optimizer(path: Path, model: Any, adapter_name: str, optimizer: Any) -> None:
    if (path / TRAINABLE_NAME).is_file():
        restore_trainable_state(model, load_file(str(path / TRAINABLE_NAME)), path)
    else:  # a checkpoint from before trainable.safetensors existed
        set_adapter_state_dict(
            model, adapter_name, read_adapter_weights(path / "adapter"), source=str(path / "adapter")
        )
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))


def load_checkpoint(
    path: Path,
    model: Any,
    adapter_name: str,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    hooks: Sequence[Any] = (),
    rank: int = 0,
    sharded: bool = False,
) -> dict[str, Any]:
    """``sharded``: the caller has read the tensors and optimizer state of an FSDP checkpoint (train/fsdp.py)."""
    if not (path / STATE_NAME).is_file():
        raise ConfigError(f"train.resume={str(path)!r} is not a checkpoint folder ({STATE_NAME} not found)")
    if not sharded:
        _load_model_and_optimizer(path, model, adapter_name, optimizer)
    saved = torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True)
    scheduler.load_state_dict(saved["scheduler"])
    if scaler is not None and saved["scaler"]:
        scaler.load_state_dict(saved["scaler"])
    rng_path = path / rng_file(rank)
    if not rng_path.is_file():  # resumed with more ranks than the run had
        warnings.warn(
            f"checkpoint {path} holds no RNG state for rank {rank}; it continues rank 0's stream", stacklevel=2
        )
        rng_path = path / rng_file(0)
    restore_rng_state(torch.load(rng_path, map_location="cpu", weights_only=True))
    load_hook_states(path, hooks)
    return json.loads((path / STATE_NAME).read_text())

"""Load raw records: built-in data, local JSON / JSONL / CSV / Parquet files or folders, hub datasets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftctl.data.builtin import builtin_files
from peftctl.errors import ConfigError

BUILTIN_PREFIX = "builtin:"
FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_has_content(file: str) -> None:
    path = Path(file)
    if path.stat().st_size == 0 or (
        path.suffix.lower() in (".json", ".jsonl", ".csv") and not path.read_bytes().strip()
    ):
        raise ConfigError(f"dataset.path={file!r} is empty; expected records ({path.suffix or 'json'} rows)")


def _json_error_location(file: str) -> str | None:
    """'line N is not valid JSON (reason)' for the first record of a JSON / JSON Lines file that does not parse."""
    text = Path(file).read_text(encoding="utf-8", errors="replace")
    try:
        json.loads(text)
        return None  # one JSON document: its content, not its syntax, is the problem
    except json.JSONDecodeError as whole:
        if not text.lstrip().startswith("{"):
            return f"line {whole.lineno} is not valid JSON ({whole.msg})"
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except json.JSONDecodeError as exc:
            return f"line {number} is not valid JSON ({exc.msg}); expected one record per line"
    return None


def _load_files(files: dict[str, str], builder: str) -> Any:
    import datasets  # lazy: a heavy import, only when data is loaded (CLI start-up)

    datasets.disable_progress_bars()
    for file in files.values():
        _check_has_content(file)
    log = datasets.utils.logging
    verbosity = log.get_verbosity()
    log.set_verbosity(log.CRITICAL)  # its "Failed to load JSON" log line would be a second line on stderr
    try:
        return datasets.load_dataset(builder, data_files=files)
    except Exception as exc:  # malformed file: say which one, and where
        for file in files.values():
            location = _json_error_location(file) if builder == "json" else None
            if location:
                raise ConfigError(f"dataset.path: {file} {location}") from None
        raise ConfigError(
            f"dataset.path: cannot read {', '.join(files.values())} as {builder}: {_first_line(exc)}"
        ) from None
    finally:
        log.set_verbosity(verbosity)


def load_raw_splits(dataset_cfg: Any) -> tuple[Any, Any | None]:
    """(train records, eval records or None), as `datasets.Dataset` objects."""
    import datasets  # lazy: see above

    path = str(dataset_cfg.path)
    if path.startswith(BUILTIN_PREFIX):
        loaded = _load_files(builtin_files(path[len(BUILTIN_PREFIX) :]), "json")
    elif Path(path).expanduser().is_file():
        file = Path(path).expanduser()
        builder = FILE_TYPES.get(file.suffix.lower())
        if builder is None:
            raise ConfigError(
                f"dataset.path={path!r}: unsupported file type {file.suffix!r}; expected .json, .jsonl, .csv or "
                ".parquet"
            )
        loaded = _load_files({dataset_cfg.split: str(file)}, builder)
    elif Path(path).expanduser().is_dir() or path.startswith((".", "/", "~")):
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"dataset.path={path!r}: no such file or folder")
        try:
            loaded = datasets.load_dataset(str(folder), name=dataset_cfg.name)
        except Exception as exc:
            raise ConfigError(
                f"dataset.path={path!r}: cannot load the folder as a dataset: {_first_line(exc)}"
            ) from None
    else:
        try:
            loaded = datasets.load_dataset(path, name=dataset_cfg.name)
        except Exception as exc:
            raise ConfigError(
                f"dataset.path={path!r}: not a local file and could not be loaded from the hub: {_first_line(exc)}"
            ) from None
    if dataset_cfg.split not in loaded:
        raise ConfigError(f"dataset.split={dataset_cfg.split!r} is not in {path}; splits: {', '.join(loaded)}")
    train = loaded[dataset_cfg.split]
    evaluation = None
    if dataset_cfg.eval_split is not None:
        if dataset_cfg.eval_split not in loaded:
            raise ConfigError(
                f"dataset.eval_split={dataset_cfg.eval_split!r} is not in {path}; splits: {', '.join(loaded)}"
            )
        evaluation = loaded[dataset_cfg.eval_split]
    if len(train) == 0:
        raise ConfigError(f"dataset.path={path!r}: split {dataset_cfg.split!r} is empty")
    return train, evaluation

"""Load raw records: built-in data, local JSON / JSONL / CSV / Parquet files or folders, hub datasets."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from peftctl.errors import ConfigError

BUILTIN_PREFIX = "builtin:"
FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def first_bad_json_line(path: str) -> tuple[int, str] | None:
    """(line number, parser message) of the first line of a JSON-lines file that is not valid JSON;
    for a file holding one JSON document (an array), where that document breaks."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            return exc.lineno, exc.msg
        return None
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as exc:
                return number, exc.msg
    return None


def _load_files(files: dict[str, str], builder: str) -> Any:
    import datasets

    datasets.disable_progress_bars()
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(logging.CRITICAL)  # our one line replaces the loader's own error log
    try:
        return datasets.load_dataset(builder, data_files=files)
    except Exception as exc:  # malformed file: say which one (and for JSON, which line)
        if builder == "json":
            for path in files.values():
                bad = first_bad_json_line(path)
                if bad is not None:
                    raise ConfigError(f"dataset.path: {path} line {bad[0]} is not valid JSON ({bad[1]})") from None
        raise ConfigError(f"dataset.path: cannot read {', '.join(files.values())} as {builder}: {str(exc).splitlines()[0]}") from None
    finally:
        datasets.logging.set_verbosity(verbosity)


def load_raw_splits(dataset_cfg: Any) -> tuple[Any, Any | None]:
    """(train records, eval records or None), as `datasets.Dataset` objects."""
    import datasets

    path = str(dataset_cfg.path)
    if path.startswith(BUILTIN_PREFIX):
        from peftctl.data.builtin import builtin_files

        loaded = _load_files(builtin_files(path[len(BUILTIN_PREFIX):]), "json")
    elif Path(path).expanduser().is_file():
        file = Path(path).expanduser()
        builder = FILE_TYPES.get(file.suffix.lower())
        if builder is None:
            raise ConfigError(f"dataset.path={path!r}: unsupported file type {file.suffix!r}; expected .json, .jsonl, .csv or .parquet")
        loaded = _load_files({dataset_cfg.split: str(file)}, builder)
    elif Path(path).expanduser().is_dir() or path.startswith((".", "/", "~")):
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"dataset.path={path!r}: no such file or folder")
        try:
            loaded = datasets.load_dataset(str(folder), name=dataset_cfg.name)
        except Exception as exc:
            raise ConfigError(f"dataset.path={path!r}: cannot load the folder as a dataset: {str(exc).splitlines()[0]}") from None
    else:
        try:
            loaded = datasets.load_dataset(path, name=dataset_cfg.name)
        except Exception as exc:
            raise ConfigError(f"dataset.path={path!r}: not a local file and could not be loaded from the hub: {str(exc).splitlines()[0]}") from None
    if dataset_cfg.split not in loaded:
        raise ConfigError(f"dataset.split={dataset_cfg.split!r} is not in {path}; splits: {', '.join(loaded)}")
    train = loaded[dataset_cfg.split]
    evaluation = None
    if dataset_cfg.eval_split is not None:
        if dataset_cfg.eval_split not in loaded:
            raise ConfigError(f"dataset.eval_split={dataset_cfg.eval_split!r} is not in {path}; splits: {', '.join(loaded)}")
        evaluation = loaded[dataset_cfg.eval_split]
    if len(train) == 0:
        raise ConfigError(f"dataset.path={path!r}: split {dataset_cfg.split!r} is empty")
    return train, evaluation

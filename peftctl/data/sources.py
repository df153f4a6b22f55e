"""Load raw records: built-in data, local JSON / JSONL / CSV / Parquet files or folders, hub datasets."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from peftctl.errors import ConfigError
from peftctl.data.builtin import builtin_files

BUILTIN_PREFIX = "builtin:"
FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _load_files(files: dict[str, str], builder: str) -> Any:
    import datasets  # lazy: a heavy import, only when data is loaded (CLI start-up)

    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(builder, data_files=files)
    except Exception as exc:  # malformed file: say which one
        raise ConfigError(f"dataset.path: cannot read {', '.join(files.values())} as {builder}: {str(exc).splitlines()[0]}") from None


def load_raw_splits(dataset_cfg: Any) -> tuple[Any, Any | None]:
    """(train records, eval records or None), as `datasets.Dataset` objects."""
    import datasets  # lazy: see above

    path = str(dataset_cfg.path)
    if path.startswith(BUILTIN_PREFIX):
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

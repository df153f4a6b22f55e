"""`peftctl export`: the adapter in PEFT format, or the merged model."""
from __future__ import annotations

import shutil
from pathlib import Path

from peftctl.errors import ConfigError
from peftctl.utils import atomic_directory

FORMATS = ("peft", "merged")


def export(path: str | Path, format: str, out: str | Path, quiet: bool = False) -> Path:
    from peftctl.export.merge import merge
    from peftctl.runs import open_source

    if format not in FORMATS:
        raise ConfigError(f"--format={format!r} is not valid; expected one of {', '.join(FORMATS)}")
    if format == "merged":
        return merge(path, out, quiet=quiet)
    source = open_source(path)
    with atomic_directory(Path(out)) as tmp:
        for file in source.adapter_dir.iterdir():
            if file.is_file():
                shutil.copy2(file, tmp / file.name)
    if not quiet:
        print(f"adapter (PEFT format) written to {out}")
    return Path(out)

"""`peftctl export`: the adapter in PEFT format, the merged model, or the merged model as GGUF."""
from __future__ import annotations

import shutil
from pathlib import Path

from peftctl.errors import ConfigError
from peftctl.utils import atomic_directory
from peftctl.export.merge import merge
from peftctl.runs import open_source
from peftctl.export.gguf_export import export_gguf

FORMATS = ("peft", "merged", "gguf")


def export(path: str | Path, format: str, out: str | Path, quiet: bool = False, outtype: str | None = None) -> Path:
    if format not in FORMATS:
        raise ConfigError(f"--format={format!r} is not valid; expected one of {', '.join(FORMATS)}")
    if outtype is not None and format != "gguf":
        raise ConfigError("--outtype applies to --format gguf only")
    if format == "gguf":
        return export_gguf(path, out, outtype or "auto", quiet=quiet)
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

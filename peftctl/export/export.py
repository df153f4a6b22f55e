"""`peftctl export`: the adapter in PEFT format, the merged model, or the merged model as GGUF."""

from __future__ import annotations

import shutil
from pathlib import Path

from peftctl.errors import ConfigError
from peftctl.export.gguf_export import export_gguf
from peftctl.export.merge import merge
from peftctl.export.target import check_output_target, source_paths
from peftctl.runs import open_source
from peftctl.utils import atomic_directory, check_output_path

FORMATS = ("peft", "merged", "gguf")


def export(
    path: str | Path,
    format: str,
    out: str | Path,
    quiet: bool = False,
    outtype: str | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Write PATH's adapter (peft), merged model (merged) or GGUF file (gguf) to OUT; an existing
    non-empty OUT (or .gguf file) is replaced only with ``overwrite``, the source never."""
    if format not in FORMATS:
        raise ConfigError(f"--format={format!r} is not valid; expected one of {', '.join(FORMATS)}")
    if outtype is not None and format != "gguf":
        raise ConfigError("--outtype applies to --format gguf only")
    if format == "gguf":
        return export_gguf(
            path, out, outtype or "auto", quiet=quiet, overwrite=overwrite, trust_remote_code=trust_remote_code
        )
    if format == "merged":
        return merge(path, out, quiet=quiet, overwrite=overwrite, trust_remote_code=trust_remote_code)
    check_output_path(out, "--out", directory=False)  # a name the file system takes, a writable parent
    check_output_target(out, source_paths(path), overwrite)  # an existing file or folder only with --overwrite
    source = open_source(path, trust_remote_code=trust_remote_code)
    with atomic_directory(Path(out), overwrite=True) as tmp:  # checked above
        for file in source.adapter_dir.iterdir():
            if file.is_file():
                shutil.copy2(file, tmp / file.name)
    if not quiet:
        print(f"adapter (PEFT format) written to {out}")
    return Path(out)

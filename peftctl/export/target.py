"""Where `peftctl merge` / `export` may write: never over what the user did not ask to replace.

Checked before any model is loaded, so a refused command has written nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from peftctl.errors import ConfigError
from peftctl.runs import open_source


def source_paths(path: str | Path) -> list[Path]:
    """What a merge / export of PATH reads: the run or adapter directory, its adapter/ folder and a
    local base model directory (a target there would destroy the input)."""
    path = Path(path)
    paths = [path]
    try:
        source = open_source(path)
    except ConfigError:
        return paths  # the command itself reports the bad source
    paths.append(source.adapter_dir)
    base = Path(str(source.config.model.name_or_path))
    if base.is_dir():
        paths.append(base)
    return paths


def _contains(outer: Path, inner: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output_target(
    out: str | Path, sources: Iterable[str | Path], overwrite: bool, kind: str = "directory", flag: str = "--out"
) -> None:
    """ConfigError unless ``out`` may be written.

    ``kind``: "directory" (replaced as a whole), "file", or "folder" (a directory that receives a
    file and keeps the rest). Refused even with ``overwrite``: a directory or file target that is a
    source or holds one. Refused without ``overwrite``: an existing file, or a non-empty directory
    (an empty directory is replaced)."""
    target = Path(out).resolve()
    if kind == "folder":
        if target.exists() and not target.is_dir():
            raise ConfigError(
                f"{flag}={str(out)!r} is an existing file that is not a .gguf file; name a .gguf file or a directory"
            )
        return
    for source in map(Path, sources):
        if _contains(target, source.resolve()):
            what = "is" if target == source.resolve() else "holds"
            raise ConfigError(
                f"{flag}={str(out)!r} {what} the source {str(source)!r}; write to another path (--overwrite never "
                "replaces the source)"
            )
    if target.is_dir() and (_contains(target, Path.cwd().resolve()) or target == Path.home().resolve()):
        raise ConfigError(
            f"{flag}={str(out)!r} is the home directory, the current directory or one of its parents; "
            "write to a new path (--overwrite never replaces these)"
        )
    if not (target.exists() or target.is_symlink()):
        return
    if kind == "file" and target.is_dir():
        raise ConfigError(f"{flag}={str(out)!r} is an existing directory; name a file to write")
    if overwrite or (kind == "directory" and target.is_dir() and not any(target.iterdir())):
        return
    existing = "a non-empty directory" if target.is_dir() else "an existing file"
    raise ConfigError(f"{flag}={str(out)!r} is {existing}; pick another path or pass --overwrite to replace it")

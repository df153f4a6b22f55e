"""Small helpers shared across the package: atomic writes, seeding."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from peftctl.errors import ConfigError


def current_umask() -> int:
    """The process umask, read without changing it (Linux: /proc; elsewhere a set-and-restore)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a mkstemp (0600) / mkdtemp (0700) result the mode a plain open() / mkdir() would have."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def _honour_umask_inside(folder: Path) -> None:
    """Libraries that write files with a fixed mode (safetensors: 0600) get the umask's mode too."""
    mask = current_umask()
    for item in folder.rglob("*"):
        if not item.is_symlink():
            executable = item.is_dir() or item.stat().st_mode & 0o111
            os.chmod(item, (0o777 if executable else 0o666) & ~mask)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        honour_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_directory(final: str | os.PathLike, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``final`` in one rename.

    ``overwrite``: whether an existing ``final`` (directory or file) may be replaced; False raises
    FileExistsError before anything is written. Callers decide explicitly: user-named targets
    (merge / export --out) are checked first (export/target.py). On any error the temporary
    directory is removed, so no half-written directory is left.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        honour_umask(tmp, directory=True)
        yield tmp
        _honour_umask_inside(tmp)
        if final.exists():
            if not overwrite:
                raise FileExistsError(final)
            old = final.with_name(f".{final.name}.old")
            remove_path(old)
            os.replace(final, old)
            os.replace(tmp, final)
            remove_path(old)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_path(path: Path) -> None:
    """Remove a file, link or directory tree if it exists."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def check_output_path(path: str | os.PathLike, field: str, directory: bool = True) -> None:
    """ConfigError (naming ``field``) unless ``path`` can be created or written as a directory (or a
    file): no existing file in the way, a name the file system accepts, a writable parent. Creates
    nothing that is left behind."""
    path = Path(path).expanduser().absolute()
    name_max, path_max = _name_limits(path)
    if len(os.fsencode(str(path))) >= path_max:
        raise ConfigError(
            f"{field}={str(path)!r} is too long ({len(str(path))} characters; the limit here is {path_max - 1})"
        )
    for part in path.parts:
        if len(os.fsencode(part)) > name_max:
            raise ConfigError(
                f"{field}: the path component {part[:40]!r}... is {len(part)} characters long; the limit here is "
                f"{name_max}"
            )
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == path and directory and not path.is_dir():
        raise ConfigError(f"{field}={str(path)!r} is an existing file; expected a directory")
    if existing != path and not existing.is_dir():
        raise ConfigError(f"{field}={str(path)!r}: {existing} is a file, so no directory can be created under it")
    if existing.is_dir() and not _can_write_in(existing):
        raise ConfigError(f"{field}={str(path)!r}: {existing} is not writable")


def _name_limits(path: Path) -> tuple[int, int]:
    anchor = next((p for p in (path, *path.parents) if os.path.exists(p)), Path("/"))  # never raises
    try:
        return os.pathconf(anchor, "PC_NAME_MAX"), os.pathconf(anchor, "PC_PATH_MAX")
    except (OSError, ValueError):
        return 255, 4096


def _can_write_in(folder: Path) -> bool:
    """True when a directory can be created in ``folder`` (a real probe: root ignores permission bits,
    read-only and virtual file systems do not); the probe is removed at once."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        os.rmdir(tempfile.mkdtemp(dir=folder, prefix=".peftctl-probe-"))
    except OSError:
        return False
    return True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)

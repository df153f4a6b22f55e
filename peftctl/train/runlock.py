"""An exclusive lock on a run directory: one `peftctl train` at a time writes into it.

The lock is an flock(2) on RUN_DIR/train.lock (held by rank 0 of a torchrun job); the kernel drops
it when the process ends, however it ends, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

LOCK_NAME = "train.lock"


class RunLock:
    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self._handle: IO[str] | None = None

    @property
    def held(self) -> bool:
        return self._handle is not None

    def try_acquire(self) -> str | None:
        """Take the lock (a no-op if held); None on success, else the line to refuse the run with."""
        if self._handle is not None:
            return None
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            pid = handle.read().strip() or "unknown"
            handle.close()
            return (
                f"output_dir={str(self.path.parent)!r} is in use by another peftctl train (pid {pid}); "
                "wait for it to end or pick another output_dir"
            )
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return None

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the file drops the flock
            self._handle = None

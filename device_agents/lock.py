"""Advisory locks on the data dir: one daemon per directory, one job at a time."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from edgekit.errors import UsageError

__all__ = ["DirLock"]


class DirLock:
    """An ``flock`` on a file in the data dir (released when the process dies, even by SIGKILL)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, timeout_s: float | None = None, what: str = "another agent process") -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._fd = fd
                return
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    os.close(fd)
                    raise UsageError(f"{self.path.parent}: {what} is using this data directory",
                                     "Stop it first, or use another --data-dir.") from None
                time.sleep(0.05)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @contextlib.contextmanager
    def held(self, timeout_s: float | None = None, what: str = "another agent process") -> Iterator[None]:
        self.acquire(timeout_s, what)
        try:
            yield
        finally:
            self.release()

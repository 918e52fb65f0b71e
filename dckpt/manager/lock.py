"""One writer per manager root: an advisory flock on ROOT/.lock, released on close/exit."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..errors import LockError
from ..format.layout import LOCK_NAME


class RootLock:
    def __init__(self, root: Path):
        self.path = Path(root) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "RootLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            raise LockError(f"{self.path.parent} is being written by another process "
                            f"({holder or 'unknown pid'}); one manager per root") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RootLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

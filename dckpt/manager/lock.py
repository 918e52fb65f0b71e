"""One writer per manager root: an advisory flock on ROOT/.lock, held for each save.

The lock file names its holder and why ("pid 123 save"). Short holders (a manager clearing
temporaries as it opens, gc) must not make a concurrent save fail: a save meeting one waits
up to `wait` seconds. A save meeting another save fails at once with LockError."""
from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from ..errors import LockError, StorageError
from ..format.layout import LOCK_NAME

SAVE = "save"


class RootLock:
    def __init__(self, root: Path, purpose: str = SAVE, wait: float = 0.0):
        self.path = Path(root) / LOCK_NAME
        self.purpose, self.wait = purpose, wait
        self.fd: int | None = None

    def acquire(self) -> "RootLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StorageError(f"cannot open the lock file {self.path}: {e.strerror}",
                               str(self.path)) from None
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                # An empty or partial name is a holder still writing it: not known to save.
                if holder.endswith(f" {SAVE}") or time.monotonic() >= deadline:
                    os.close(fd)
                    raise LockError(f"{self.path.parent} is being written by another process "
                                    f"({holder or 'unknown pid'}); one manager per root") from None
                time.sleep(0.01)
        try:  # the holder's name only informs contenders; a full disk must not stop us
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} {self.purpose}\n".encode(), 0)
        except OSError:
            pass
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

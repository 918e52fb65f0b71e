"""One writer per manager root: an advisory flock on the root directory, held for each save.

The lock is taken on the root directory itself, not on a file in it: a directory cannot be
hard-linked, so roots copied with `cp -al` have locks of their own, and nothing is opened
through a name that could be a symlink planted to point elsewhere. ROOT/.lock only names
the holder and why ("pid 123 save") for contenders. It is written in place only while it is
the very file this process created there with no other link (storage.commit.OwnFile); a
`.lock` that is a symlink, a hard link or a FIFO is swapped for a fresh file by rename, and
whatever it pointed at is not touched.

Short holders (a manager clearing temporaries as it opens, gc, repair) must not make a
concurrent save fail: a save meeting one waits up to `wait` seconds. A save meeting another
save fails at once with LockError; so does maintenance meeting a save (it is the one to
retry). The holder clears its name before it unlocks, so a contender never reads a
previous holder's.

The lock belongs to the process that took it: its descriptor is close-on-exec and a forked
child closes its copy at once (os.register_at_fork), so a child that outlives its parent
does not keep the root locked (flock locks belong to the open file description, which fork
shares)."""
from __future__ import annotations

import fcntl
import os
import stat
import time
import weakref
from pathlib import Path

from ..errors import LockError, StorageError
from ..format.layout import LOCK_NAME
from ..storage.commit import OwnFile

SAVE = "save"
_HELD: "weakref.WeakSet[RootLock]" = weakref.WeakSet()
_OWN: dict[Path, OwnFile] = {}  # ROOT/.lock -> the holder-name file this process wrote
_MAX_OWN = 16


def _close_in_child() -> None:
    for lock in list(_HELD):
        if lock.fd is not None:
            try:
                os.close(lock.fd)  # the child's reference only; the parent keeps its lock
            except OSError:
                pass
            lock.fd = None
    _HELD.clear()
    for own in _OWN.values():  # the parent's files: a child writes fresh ones of its own
        own.close()
    _OWN.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


class RootLock:
    def __init__(self, root: Path, purpose: str = SAVE, wait: float = 0.0):
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self.purpose, self.wait = purpose, wait
        self.fd: int | None = None

    def acquire(self) -> "RootLock":
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise StorageError(f"cannot open the root {self.root} to lock it: {e.strerror}",
                               str(self.root)) from None
        self.fd = fd
        _HELD.add(self)  # before locking: a fork from another thread must not inherit it
        deadline = time.monotonic() + self.wait
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    holder = self.holder()
                    # An empty name is a holder still writing it: not known to save.
                    if holder.endswith(f" {SAVE}") or time.monotonic() >= deadline:
                        raise LockError(f"{self.root} is being written by another process "
                                        f"({holder or 'unknown pid'}); one manager per "
                                        "root") from None
                    time.sleep(0.01)
                except OSError as e:
                    raise StorageError(f"cannot lock {self.root}: {e.strerror}",
                                       str(self.root)) from None
        except BaseException:
            self._close()
            raise
        self._publish(f"pid {os.getpid()} {self.purpose}\n")
        return self

    def holder(self) -> str:
        """The current holder's name as it published it ('' if none or unreadable)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return ""
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return ""
            return os.pread(fd, 64, 0).decode(errors="replace").strip()
        except OSError:
            return ""
        finally:
            os.close(fd)

    def _publish(self, text: str) -> None:
        """Make ROOT/.lock hold `text`: a file of this process's own, replaced by a fresh one
        whenever anything else is found there (storage.commit.OwnFile). The name only
        informs contenders: a full disk must not stop us."""
        own = _OWN.get(self.path)
        if own is None:
            if len(_OWN) >= _MAX_OWN:  # one descriptor per root: a process may open many
                _OWN.pop(next(iter(_OWN))).close()
            own = _OWN[self.path] = OwnFile(self.path)
        try:
            own.write(text.encode())
        except OSError:
            own.close()

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops the flock with the last reference
            self.fd = None
        _HELD.discard(self)

    def release(self) -> None:
        if self.fd is not None:
            self._publish("")
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            self._close()

    def __enter__(self) -> "RootLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

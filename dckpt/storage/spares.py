"""Recycled data files: the data files of the step retention retired last are kept aside and
the next save writes over them in place instead of creating new files.

A new file costs the kernel fresh page-cache pages, fresh blocks and their metadata, all
freed again when retention deletes an old step; writing over a file of the same size reuses
all three. On ext4 here the native writer's 14 MB and fsync took 9.5 ms into a new file
against 4.4 ms written over, 256 MB 112 against 65 ms (benchmarks/probe_recycle.py,
2026-12-07 20:46 UTC). Databases recycle their log segments for the same reason.

What is kept: a retired step's data files (`rank-*.dckpt`, and the links an incremental save
made to an older step's, `ref-r*-...-rank-*.dckpt`, kept under the name they were written
with), only those that are regular files with a single link (a file shared with a kept step
is that step's data) and that no process holds open. Whether any process holds a file open (a
reader loading the step when it was retired, a mapping) is asked of the kernel with a write
lease, which it grants only to an open file's sole user; the lease is dropped at once. The
check is made when a file is kept and again when a save takes it. A reader that opened the
step before it was retired therefore keeps reading the bytes it expects, as after a delete.

The spare directory is a staging name (format.layout.SPARE_DIR): a crash leaves it as
debris that the next manager's start and `dckpt gc` clear; the manager removes it on
close(). Disk use at its peak (during a save) is what it was: the spare becomes the new
step's file. Between saves the root holds the retired step's unshared files as well.
"""
from __future__ import annotations

import fcntl
import os
import re
import signal
import stat
from pathlib import Path

from .commit import DIR_MODE

# Data files (format.layout.rank_file), and links to older steps' (incremental._link_name:
# ref-r<rank>-<origin directory>-<file name>): the spare takes the name the file was written
# with, which is what a save of that rank creates again.
_DATA_FILE = re.compile(r"^(?:ref-r\d+-.+-)?(rank-\d{5,}(?:-\d+)?\.dckpt)$")


def _sole_user(fd: int) -> bool:
    """No other open file description (in any process, this one included) and no mapping
    refers to the file: the kernel grants a write lease only then. Linux only: elsewhere
    nothing is reused."""
    if not hasattr(fcntl, "F_SETLEASE"):
        return False
    try:
        # A lease broken while held signals its holder; SIGURG's default is to ignore it
        # (SIGIO's would end the process). Held for two system calls only.
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
    except OSError:  # EAGAIN: in use; EACCES: not our file; EINVAL: no leases here
        return False
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return True


def _reusable(path: Path | str, limit: int | None = None) -> bool:
    """A regular file, one link, of at most `limit` bytes, used by no one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        return stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_size > 0 and \
            (limit is None or st.st_size <= limit) and _sole_user(fd)
    finally:
        os.close(fd)


def keep(retired: Path, spares: Path) -> int:
    """Move `retired`'s reusable data files into `spares` (created when needed), except
    names it holds already. Returns how many were kept."""
    kept = 0
    try:
        # (spare name, entry), the step's own files first: a link to an older step's file
        # takes a name only where none of its own holds it.
        found = sorted(((m.group(1), e) for e in os.scandir(retired)
                        if (m := _DATA_FILE.match(e.name))),
                       key=lambda x: (not x[1].name.startswith("rank-"), x[1].name))
    except OSError:
        return 0
    for name, e in found:
        dst = spares / name
        if os.path.lexists(dst) or not _reusable(e.path):
            continue
        if not kept and not _directory(spares):
            return 0
        try:
            os.rename(e.path, dst)
        except OSError:
            continue
        kept += 1
    return kept


def _directory(path: Path) -> bool:
    """`path` is (now) a directory of its own, not a link planted in its place."""
    try:
        path.mkdir(mode=DIR_MODE, exist_ok=True)
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def take(paths: list[str], spares: Path, limit: int | None = None) -> list[bool]:
    """Move the spare of each path's name, where there is a reusable one of at most `limit`
    bytes (the rest of a larger one would be cut off while the save waits), to that path.
    Returns which paths got one."""
    got = []
    for p in paths:
        src = spares / os.path.basename(p)
        ok = False
        if _reusable(src, limit):
            try:
                os.rename(src, p)
                ok = True
            except OSError:
                pass
        got.append(ok)
    return got


def give_back(path: str, spares: Path) -> None:
    """Return a file `take` placed at `path` that the save did not write to."""
    try:
        os.rename(path, spares / os.path.basename(path))
    except OSError:
        os.unlink(path)

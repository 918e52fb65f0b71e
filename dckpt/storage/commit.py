"""Atomic commit: a checkpoint appears complete or not at all.

Data files are fsync'd by the writer, or by threads (`Syncs`) while the records and the
manifest are built. Then manifest.json is written into the staging directory and fsync'd,
then that directory; once every data fsync has returned, the staging directory is renamed
onto the target name, and the parent directory fsync'd. A crash before the last rename
leaves only a hidden staging directory, which readers ignore and gc removes.

Overwriting swaps the staging directory and the committed target in one atomic step
(Linux renameat2 RENAME_EXCHANGE), so readers see the old or the new checkpoint, never none.
Where the file system cannot exchange, the target is moved aside first; a crash before the
final rename then leaves no target, only the aside copy, and recover() (run by every manager
before it clears temporaries) moves it back: the old checkpoint is never lost.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import threading
import uuid
from pathlib import Path

from ..errors import CheckpointExistsError, StorageError
from ..format.layout import TMP_MARK, aside_dir, aside_target, staging_dir
from ..format.manifest import MANIFEST_NAME, Manifest
from . import records  # noqa: F401  (loads the core's manifest writer: format/canonical.py)


# Modes everything a save creates asks for; the umask applies on top. Never world-writable,
# even under a umask of 0: anyone on the machine could otherwise alter a checkpoint.
FILE_MODE, DIR_MODE = 0o664, 0o775


def create_file(path: Path, fresh: bool = False):
    """Open `path` for writing with FILE_MODE: created or truncated, or with `fresh` only
    created (no file there, and never through a link)."""
    how = os.O_EXCL | os.O_NOFOLLOW if fresh else os.O_TRUNC
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | how, FILE_MODE),
                     "wb")


def make_dirs(path: Path) -> None:
    """mkdir -p with DIR_MODE for every directory it creates (Path.mkdir(parents=True)
    gives intermediate ones the default 0o777)."""
    missing = []
    p = Path(path)
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        _mkdir(d, exist_ok=True)


def _mkdir(d: Path, exist_ok: bool = False) -> None:
    """mkdir with DIR_MODE; a failure (read-only, permissions, a file in the way, no free
    inodes) is a StorageError that says what to do."""
    try:
        d.mkdir(mode=DIR_MODE, exist_ok=exist_ok)
    except OSError as e:
        raise _storage_error(f"cannot create directory {d}", d, e) from None


def _storage_error(what: str, path: Path, e: OSError) -> StorageError:
    # ENOSPC from a mkdir or an open(O_CREAT) is most often the file system out of inodes.
    hint = (" (no space, or no free inodes: see `df -i`)" if e.errno == errno.ENOSPC else
            "; save where this process may write (a writable, mounted directory with free "
            "space)")
    return StorageError(f"{what}: {e.strerror or e}{hint}", str(path))


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Syncs:
    """fsyncs of a save's files, run in threads (fsync releases the GIL) while the save goes
    on building its records and manifest; wait() before the commit point joins them and
    raises the first failure. A save's data fsync is disk time (4-8 ms for 14 MB here) that
    the Python work after the write (the records, the manifest and its own fsync) used to
    wait behind."""

    def __init__(self):
        self._threads: list[threading.Thread] = []
        self._errors: list[StorageError] = []

    def start(self, path: Path | str) -> None:
        t = threading.Thread(target=self._sync, args=(path,), daemon=True,
                             name="dckpt-fsync")
        t.start()
        self._threads.append(t)

    def _sync(self, path) -> None:
        try:
            fsync_file(path)
        except OSError as e:  # as the writer reports its own fsync failing
            self._errors.append(StorageError(f"writing {path} failed: fsync: "
                                             f"{e.strerror or e}", str(path)))

    def wait(self) -> None:
        threads, self._threads = self._threads, []
        join_all(threads)
        if self._errors:
            raise self._errors[0]


def join_all(threads: list[threading.Thread]) -> None:
    """Join every thread; a Ctrl-C meanwhile is raised once all of them are done: the
    caller then removes the staging directory, which must not race threads still writing
    or syncing its files."""
    interrupted = None
    for t in threads:
        while t.is_alive():
            try:
                t.join()
            except KeyboardInterrupt as e:
                interrupted = e
    if interrupted is not None:
        raise interrupted


def write_staged(path: Path, data: bytes, fsync: bool, syncs: Syncs) -> None:
    """Write a file inside a staging directory (nothing reads one, so no temporary name),
    fsync'd by `syncs` before the commit."""
    try:
        _write(path, data, False)
    except OSError as e:
        raise StorageError(f"writing {path} failed: {e.strerror or e}", str(path)) from None
    if fsync:
        syncs.start(path)


def _write(path: Path, data: bytes, fsync: bool, fresh: bool = False) -> None:
    with create_file(path, fresh) as f:
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def write_file_durably(path: Path, data: bytes, fsync: bool = True) -> None:
    """Write `data` under a temporary name, fsync, rename onto `path`. The temporary is
    always a new file: whatever lies at its name (a crash's leftover, or a link planted
    there to have the write truncate another file) is removed, not written through."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        _write(tmp, data, fsync, fresh=True)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"writing {path} failed: {e.strerror or e}", str(path)) from None


class OwnFile:
    """A small file this process rewrites at every save (the root lock's holder name, the
    `latest` pointer). The first write creates a fresh file under a staging name (O_EXCL,
    no link followed) and renames it into place; later writes go in place through the
    descriptor kept from that creation, as long as the name still leads to that very file
    with no other link. Anything planted there meanwhile (a symbolic link, a hard link to
    it, a FIFO, another file) is replaced by a fresh file again, never written through.
    A save would otherwise make three new inodes and renames for these. Readers may see
    the file empty or part-written: its callers' readers take it as a hint only."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None
        self._id: tuple[int, int] | None = None

    def write(self, data: bytes) -> None:
        if self._fd is not None:
            try:
                st = os.stat(self.path, follow_symlinks=False)
                if (st.st_dev, st.st_ino) == self._id and st.st_nlink == 1 and \
                        stat.S_ISREG(st.st_mode):
                    os.pwrite(self._fd, data, 0)
                    if st.st_size > len(data):  # truncating costs: only when shorter
                        os.ftruncate(self._fd, len(data))
                    return
            except OSError:
                pass
            self.close()
        # A staging name (".latest.tmp-...", ".lock.tmp-..."): a crash's leftover is cleared.
        name = self.path.name.lstrip(".")
        tmp = self.path.with_name(f".{name}{TMP_MARK}{uuid.uuid4().hex[:12]}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     FILE_MODE)
        try:
            os.write(fd, data)
            os.rename(tmp, self.path)
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        self._fd, self._id = fd, (st.st_dev, st.st_ino)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = self._id = None

    def __del__(self) -> None:  # a manager dropped without close() keeps no descriptor
        try:
            self.close()
        except OSError:
            pass


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
except (OSError, AttributeError):  # not Linux, or a libc without it (glibc < 2.28)
    _renameat2 = None


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where the system or file system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def begin(target: Path, overwrite: bool = False) -> Path:
    """Create and return the staging directory for `target`."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise CheckpointExistsError(f"{target} already exists; pass overwrite=True to replace it")
    make_dirs(target.parent)
    tmp = staging_dir(target)
    _mkdir(tmp)
    return tmp


def write_manifest(tmp: Path, data: bytes, fsync: bool = True) -> None:
    """Write the manifest into the staging directory, durably with the directory's entries.
    Nothing reads a staging directory, so the manifest needs no temporary name."""
    path = tmp / MANIFEST_NAME
    try:
        _write(path, data, fsync)
        if fsync:
            fsync_dir(tmp)
    except OSError as e:
        raise StorageError(f"writing {path} failed: {e.strerror or e}", str(path)) from None


def finish(tmp: Path, target: Path, manifest: Manifest, fsync: bool = True,
           syncs: Syncs | None = None) -> None:
    """Write the manifest last and move the staging directory into place; the fsyncs still
    running in `syncs` (the data files') complete before the move."""
    write_manifest(tmp, manifest.to_bytes(), fsync)
    if syncs is not None:
        syncs.wait()
    try:
        _move_into_place(tmp, target, fsync)
    except OSError as e:
        raise StorageError(f"committing {target} failed: {e.strerror or e}", str(target)) \
            from None


def _move_into_place(tmp: Path, target: Path, fsync: bool) -> None:
    old = None
    if target.exists() and exchange(tmp, target):
        old = tmp  # now holds the replaced checkpoint
    else:
        if target.exists():
            # At every instant one complete copy exists, under a name recover() knows.
            old = aside_dir(target)
            os.rename(target, old)
        os.rename(tmp, target)
    if fsync:
        fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def abort(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def recover(parent: Path) -> list[str]:
    """Finish overwrites a crash interrupted under `parent`: a copy moved aside whose
    replacement never arrived goes back in place; one whose replacement did is removed.
    Returns the names put back. Callers hold the root lock (no overwrite is running)."""
    restored = []
    for p in sorted(Path(parent).iterdir()):
        name = aside_target(p.name)
        if name is None:
            continue
        if (p.parent / name).exists():
            shutil.rmtree(p, ignore_errors=True)
        else:
            os.rename(p, p.parent / name)
            restored.append(name)
    if restored:
        fsync_dir(Path(parent))
    return restored

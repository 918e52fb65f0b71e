"""Atomic commit: a checkpoint appears complete or not at all.

Data files are fsync'd by the writer. Then the manifest is written to a temporary name,
fsync'd and renamed to manifest.json inside the staging directory, the staging directory
is fsync'd, renamed onto the target name, and the parent directory fsync'd. A crash before
the last rename leaves only a hidden staging directory, which readers ignore and gc removes.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import CheckpointExistsError, StorageError
from .format.layout import staging_dir
from .format.manifest import MANIFEST_NAME, Manifest


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durably(path: Path, data: bytes, fsync: bool = True) -> None:
    """Write `data` under a temporary name, fsync, rename onto `path`."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"writing {path} failed: {e.strerror or e}", str(path)) from None


def begin(target: Path, overwrite: bool = False) -> Path:
    """Create and return the staging directory for `target`."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise CheckpointExistsError(f"{target} already exists; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(target)
    tmp.mkdir()
    return tmp


def finish(tmp: Path, target: Path, manifest: Manifest, fsync: bool = True) -> None:
    """Write the manifest last and move the staging directory into place."""
    write_file_durably(tmp / MANIFEST_NAME, manifest.to_bytes(), fsync)
    if fsync:
        fsync_dir(tmp)
    old = None
    if target.exists():
        # Move the old checkpoint aside first: at every instant one complete copy exists.
        old = staging_dir(target)
        os.rename(target, old)
    os.rename(tmp, target)
    if fsync:
        fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def abort(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)

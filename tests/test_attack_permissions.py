"""Permissions: everything a save creates honours the process umask and is never
world-writable, whatever the umask (a umask of 0 must not publish a checkpoint that any
user of the machine could alter)."""
import os
import stat
from contextlib import contextmanager

import pytest

import dckpt
from dckpt import CheckpointManager
from dckpt.engine.incremental import consolidate
from dckpt.manager import AsyncOptions

from helpers.attacks import known_state


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def save_everything(base):
    """Every kind of file dckpt writes: plain save, manager (lock, latest, step dirs, an
    incremental step with links, an overwrite), a consolidated copy, async save."""
    dckpt.save(known_state(1), base / "plain" / "ckpt")
    mgr = CheckpointManager(base / "root", keep_last=2, chunk_size=4096)
    for step in (1, 2, 3):
        mgr.save(step, known_state(step))
    mgr.save(3, known_state(4), overwrite=True)
    consolidate(mgr.path(3), base / "standalone" / "ckpt")
    with CheckpointManager(base / "async", async_save=AsyncOptions(handle_sigterm=False)) as a:
        a.save(1, known_state(1)).result()


def modes(base):
    out = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, base)] = os.lstat(p).st_mode
    return out


@pytest.mark.parametrize("mask", [0o000, 0o002, 0o022, 0o027, 0o077])
def test_created_files_honour_umask_and_are_never_world_writable(tmp_path, mask):
    base = tmp_path / "out"
    with umask(mask):
        base.mkdir()
        save_everything(base)
    found = modes(base)
    assert len(found) > 15
    for path, mode in found.items():
        perms = stat.S_IMODE(mode)
        assert not perms & stat.S_IWOTH, f"{path} is world-writable ({perms:o})"
        assert not perms & mask, f"{path} ({perms:o}) ignores the umask {mask:03o}"
        if stat.S_ISDIR(mode):
            assert perms & 0o700 == 0o700, f"{path} ({perms:o})"
        else:
            assert perms & 0o600 == 0o600 and not perms & 0o111, f"{path} ({perms:o})"
    if mask == 0o022:  # the usual umask: exactly what any tool would create
        assert {stat.S_IMODE(m) for m in found.values()} == {0o755, 0o644}

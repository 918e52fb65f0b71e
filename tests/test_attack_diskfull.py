"""Disk full: a save that runs out of space, at whatever point of the save, fails with a
clear StorageError, leaves no temporary behind and leaves the previous checkpoint intact.

A real small file system (a tmpfs mount, when this process may mount) is filled to leave
every amount of free space from none to enough, in page steps; without mount rights, a
file-size limit (RLIMIT_FSIZE) in a forked process plays the full disk."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import dckpt
from dckpt import CheckpointManager
from dckpt.errors import StorageError
from dckpt.format.layout import LATEST_NAME, LOCK_NAME, parse_step_dir

from helpers.attacks import MEDIUM, SLOW, assert_same, known_state

PAGE = 4096


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({out.stderr.strip() or out.returncode}); "
                    "the RLIMIT_FSIZE test covers the full disk")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(mnt: Path, leave: int) -> None:
    """Grow a filler file until exactly `leave` bytes (rounded to pages) stay free."""
    filler = mnt / "filler"
    filler.touch()
    size = filler.stat().st_size + free_bytes(mnt) - leave
    with open(filler, "r+b") as f:
        f.truncate(0)
        f.seek(0)
        f.write(b"\0" * max(size, 0))
        f.flush()
        os.fsync(f.fileno())


def assert_clean(root: Path, steps: list[int]) -> None:
    """Only committed steps, `latest` and the lock: no staging directory, no .tmp file."""
    names = sorted(p.name for p in root.iterdir())
    extra = [n for n in names if parse_step_dir(n) is None and n not in (LATEST_NAME, LOCK_NAME)]
    assert not extra, f"left behind: {extra}"
    assert sorted(parse_step_dir(n) for n in names if parse_step_dir(n) is not None) == steps
    for p in root.iterdir():
        if parse_step_dir(p.name) is not None:
            assert not [q.name for q in p.iterdir() if q.name.endswith(".tmp")]


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_save_into_a_full_tmpfs(small_fs, compression):
    root = small_fs / "root"
    mgr = CheckpointManager(root, chunk_size=16384, compression=compression, incremental=False)
    mgr.save(1, known_state(1, scale=4), counters={"v": 1})
    need = sum(p.stat().st_size for p in mgr.path(1).iterdir()) + 2 * PAGE
    outcomes = {"failed cleanly": 0, "saved": 0}
    step = PAGE if SLOW or MEDIUM else 3 * PAGE
    for leave in range(0, need + 4 * PAGE, step):
        fill(small_fs, leave)
        try:
            mgr.save(2, known_state(2, scale=4), counters={"v": 2})
        except StorageError as e:
            assert "No space left on device" in str(e), str(e)
            assert e.path and str(root) in e.path
            outcomes["failed cleanly"] += 1
            where = f"failed writing {Path(e.path).name.split('.')[0]}"
            outcomes[where] = outcomes.get(where, 0) + 1
            assert_clean(root, [1])
            assert mgr.latest_step() == 1
        else:
            outcomes["saved"] += 1
            assert_clean(root, [1, 2])
            assert_same(dckpt.load(mgr.path(2)), known_state(2, scale=4))
            shutil.rmtree(mgr.path(2))
        assert_same(dckpt.load(mgr.path(1)), known_state(1, scale=4))
    print(f"\nfull tmpfs ({compression}): {outcomes}")
    assert outcomes["failed cleanly"] >= 3 and outcomes["saved"] >= 1
    if SLOW or MEDIUM:  # page by page, the space runs out in the data and in the manifest
        assert outcomes.get("failed writing manifest") and outcomes.get("failed writing rank-00000")


FSIZE_JOB = r"""
import resource, signal, sys
sys.path.insert(0, sys.argv[3])
from pathlib import Path
import dckpt
from dckpt import CheckpointManager
from dckpt.errors import StorageError
from helpers.attacks import known_state
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
mgr = CheckpointManager(sys.argv[1], chunk_size=16384, incremental=False)
try:
    mgr.save(2, known_state(2, scale=4))
    print("SAVED")
except StorageError as e:
    print("STORAGE", e)
"""


def test_save_under_a_file_size_limit(tmp_path):
    """The unprivileged full disk: every file the save writes is capped (EFBIG)."""
    root = tmp_path / "root"
    mgr = CheckpointManager(root, chunk_size=16384, incremental=False)
    mgr.save(1, known_state(1, scale=4))
    biggest = max(p.stat().st_size for p in mgr.path(1).iterdir())
    outcomes = {}
    for limit in (0, 1, PAGE, biggest // 2, biggest - 1, biggest + PAGE):
        out = subprocess.run([sys.executable, "-c", FSIZE_JOB, str(root), str(limit),
                              str(Path(__file__).parent)], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        kind = out.stdout.split()[0]
        outcomes[limit] = kind
        if kind == "STORAGE":
            assert "File too large" in out.stdout, out.stdout
            assert_clean(root, [1])
        else:
            assert kind == "SAVED" and limit > biggest
            shutil.rmtree(mgr.path(2))
        assert_same(dckpt.load(mgr.path(1)), known_state(1, scale=4))
    print(f"\nRLIMIT_FSIZE: {outcomes}")

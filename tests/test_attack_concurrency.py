"""Concurrency: a second writer on a root gets a clear LockError while the first is anywhere
in its save; readers (restore, load, verify, inspect) never see a half-committed step."""
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import pytest

import dckpt
from dckpt import CheckpointManager
from dckpt.cli import main as cli
from dckpt.errors import (CheckpointNotFoundError, CorruptCheckpointError, DckptError,
                          IncompleteCheckpointError, LockError)
from dckpt.format.layout import is_staging
from dckpt.manager import AsyncOptions
from dckpt.tools.verify import verify_checkpoint

from helpers.attacks import SLOW, assert_same, known_state


def content(step: int, version: int = 0) -> dict:
    return known_state(step * 100 + version)


def fork(fn) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001
            print(f"child failed: {type(e).__name__}: {e}", file=sys.stderr)
            os._exit(3)
        os._exit(0)
    return pid


def wait_for(path: Path, pid: int, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while not path.exists():
        done, status = os.waitpid(pid, os.WNOHANG)
        assert not done, f"writer ended early ({status})"
        assert time.monotonic() - t0 < timeout, f"no {path.name}"
        time.sleep(0.005)


def reap(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)


# ---- a second writer, while the first is paused inside its commit ------------------------------

def paused_writer(root: Path, async_save: bool) -> None:
    """Saves step 2 and stops right where the manifest is being written (holding the lock,
    staging directory on disk) until the test lets it go."""
    def hook(event, args):
        if (event == "open" and str(args[0]).endswith("manifest.json")
                and is_staging(Path(args[0]).parent.name)):
            (root.parent / "paused").touch()
            while not (root.parent / "go").exists():
                time.sleep(0.005)

    opts = AsyncOptions(handle_sigterm=False) if async_save else False
    mgr = CheckpointManager(root, chunk_size=4096, async_save=opts)
    sys.addaudithook(hook)
    h = mgr.save(2, content(2), counters={"version": 0})
    if async_save:
        h.result()
        mgr.close()


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_second_writer_gets_lock_error(tmp_path, async_save):
    root = tmp_path / "root"
    CheckpointManager(root).save(1, content(1), counters={"version": 0})
    pid = fork(lambda: paused_writer(root, async_save))
    try:
        wait_for(tmp_path / "paused", pid)
        staging = [p for p in root.iterdir() if is_staging(p.name)]
        assert staging, "the writer should be mid-save"
        # Opening a manager (what a reader or a second run does) must neither fail nor
        # sweep away the live staging directory.
        second = CheckpointManager(root)
        assert all(p.exists() for p in staging)
        with pytest.raises(LockError, match=rf"another process \(pid {pid} save\)"):
            second.save(3, content(3), counters={"version": 0})
        with pytest.raises(LockError):
            second.gc()
        assert cli(["gc", str(root)]) != 0  # a clear error, not a sweep under a live save
        assert all(p.exists() for p in staging)
        # A reader meanwhile: only step 1 is there, and it restores exactly.
        assert second.steps() == [1] and second.latest_step() == 1
        live = content(0)
        second.restore(live, restore_rng=False)
        assert_same(live, content(1))
    finally:
        (tmp_path / "go").touch()
        assert reap(pid) == 0
    reader = CheckpointManager(root)
    assert reader.steps() == [1, 2]
    assert_same(dckpt.load(reader.path(2)), content(2))


# ---- readers racing a writer -------------------------------------------------------------------

def writer_loop(root: Path, keep_last, overwrite_every: int) -> None:
    mgr = CheckpointManager(root, keep_last=keep_last, chunk_size=4096)
    (root.parent / "ready").touch()
    step, version, n = 0, 0, 0
    while True:
        n += 1
        if overwrite_every and n % overwrite_every == 0 and step:
            version += 1
        else:
            step, version = step + 1, 0
        mgr.save(step, content(step, version), counters={"version": version},
                 overwrite=version > 0)


SECONDS = 20.0 if SLOW else 2.5


@pytest.mark.parametrize("keep_last, overwrite_every", [(None, 0), (2, 3)],
                         ids=["keep all", "retention and overwrites"])
def test_readers_never_see_a_half_committed_step(tmp_path, keep_last, overwrite_every):
    """Strict when nothing is deleted or replaced: every read succeeds, bitwise. With
    retention and overwrites a reader may find its step gone or replaced under it: then a
    typed error, never wrong bytes."""
    root = tmp_path / "root"
    pid = fork(lambda: writer_loop(root, keep_last, overwrite_every))
    counts = {"restored": 0, "verified": 0, "gone or replaced": 0}
    allowed = (CheckpointNotFoundError, IncompleteCheckpointError, CorruptCheckpointError)
    try:
        wait_for(tmp_path / "ready", pid)
        deadline = time.monotonic() + SECONDS
        while time.monotonic() < deadline:
            mgr = CheckpointManager(root)  # never a LockError, never sweeps the writer's files
            step = mgr.latest_step()
            if step is None:
                continue
            try:
                live = content(0)
                report = mgr.restore(live, step=step, restore_rng=False)
                assert_same(live, content(step, report.counters["version"]))
                assert report.step == step
                counts["restored"] += 1
                rep = verify_checkpoint(mgr.path(step))
                bad = [c.message for c in rep.checks
                       if c.level == "error" and c.group in ("structure", "files", "checksums")]
                with contextlib.redirect_stdout(open(os.devnull, "w")):
                    inspected = cli(["inspect", str(mgr.path(step))])
                if bad or inspected != 0:
                    assert keep_last, (bad, inspected)
                    counts["gone or replaced"] += 1
                else:
                    counts["verified"] += 1
            except allowed:
                assert keep_last or overwrite_every, "a read failed with nothing deleted"
                counts["gone or replaced"] += 1
            except DckptError as e:
                pytest.fail(f"reader saw {type(e).__name__}: {e}")
    finally:
        os.kill(pid, signal.SIGKILL)
        reap(pid)
    print(f"\nreaders vs writer ({keep_last=}, {overwrite_every=}): {counts}")
    assert counts["restored"] >= 5


def test_restore_pairs_counters_with_the_tensors_it_read(tmp_path):
    """An overwrite landing while restore runs: the report's counters (and RNG streams) must
    come from the manifest whose tensors were read. Forced deterministically: the step is
    overwritten the moment anything opens its manifest a second time."""
    root = tmp_path / "root"
    CheckpointManager(root).save(1, content(1, 0), counters={"version": 0})

    def victim():
        other = CheckpointManager(root)
        opens, busy = [], []

        def hook(event, args):
            if (event == "open" and str(args[0]).endswith("step-000000001/manifest.json")
                    and not busy):
                opens.append(1)
                if len(opens) == 2:
                    busy.append(1)
                    other.save(1, content(1, 1), counters={"version": 1}, overwrite=True)

        sys.addaudithook(hook)
        live = content(0)
        report = CheckpointManager(root).restore(live, restore_rng=False)
        assert_same(live, content(1, report.counters["version"]))

    assert reap(fork(victim)) == 0

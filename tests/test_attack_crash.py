"""Crash injection: a process saving checkpoints is SIGKILLed, and the root must still hold
every acknowledged checkpoint, loadable and bitwise right; restore must pick a committed one;
`dckpt gc` must clear the debris.

Two ways to pick the moment: a random delay into a loop of saves (sync and async, with
retention and overwrites), and an exhaustive walk over every file-system mutation of one
save (counted by an audit hook in the forked child, so the library carries no test hook).
"""
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

import dckpt
from dckpt import CheckpointManager
from dckpt.cli import main as cli
from dckpt.storage import commit
from dckpt.format.layout import LATEST_NAME, LOCK_NAME, aside_target, is_staging, parse_step_dir
from dckpt.format.manifest import MANIFEST_NAME
from dckpt.manager import AsyncOptions
from dckpt.tools.verify import verify_checkpoint

from helpers.attacks import assert_same, killed_at, known_state, trials

KEEP = 3  # retention keep_last: deletions happen during the trials


def content(step: int, version: int) -> dict:
    return known_state(step * 100 + version)


# ---- the invariants, checked after every kill --------------------------------------------------

def committed_versions(root: Path) -> dict[int, int]:
    """step -> version of every committed checkpoint, each loaded and compared bitwise."""
    out = {}
    for p in sorted(root.iterdir()):
        step = parse_step_dir(p.name)
        if step is None:
            continue
        assert (p / MANIFEST_NAME).is_file(), f"{p.name} is visible but not committed"
        m = dckpt.read_manifest(p)
        version = m.counters["version"]
        assert_same(dckpt.load(p), content(step, version))
        assert not [c for c in verify_checkpoint(p).checks
                    if c.level == "error" and c.group in ("structure", "files", "checksums")]
        out[step] = version
    return out


def acked(root: Path) -> list[tuple[int, int]]:
    path = root.parent / "acks"
    if not path.exists():
        return []
    return [tuple(map(int, line.split())) for line in path.read_text().splitlines()
            if line.count(" ") == 1]


def check_after_kill(root: Path, exchange: bool = True) -> dict[int, int]:
    """What a reader, the next run and `dckpt gc` see after the kill. Without an atomic
    exchange, an overwrite killed mid-way leaves the old copy parked aside: a reader misses
    that step until the next manager puts it back."""
    seen = committed_versions(root)  # as a reader sees it, debris and all
    parked = [n for n in (aside_target(p.name) for p in root.iterdir()) if n]
    assert not parked or not exchange, parked
    # The next run: a manager on the root (recovers, clears temporaries) restores the newest.
    mgr = CheckpointManager(root, keep_last=KEEP)
    versions = committed_versions(root)
    for name in parked:
        assert parse_step_dir(name) in versions, f"{name} was parked aside and not put back"
    assert versions == {**seen, **{parse_step_dir(n): versions[parse_step_dir(n)]
                                   for n in parked}}, (seen, versions, parked)
    acks = acked(root)
    if acks:
        step, version = acks[-1]
        for view in (seen, versions) if exchange else (versions,):
            # Retention may have deleted it, once KEEP newer steps committed (async saves
            # are acknowledged a little after they commit).
            if len([s for s in view if s > step]) < KEEP:
                assert step in view, f"acknowledged step {step} lost; on disk: {view}"
                assert view[step] >= version
    if versions:
        newest = max(versions)
        assert mgr.latest_step() == newest
        live = content(0, 0)
        mgr.restore(live, restore_rng=False)
        assert_same(live, content(newest, versions[newest]))
    assert cli(["gc", str(root)]) == 0
    leftovers = [p.name for p in root.iterdir()
                 if parse_step_dir(p.name) is None and p.name not in (LATEST_NAME, LOCK_NAME)]
    assert not leftovers, f"debris after dckpt gc: {leftovers}"
    after = committed_versions(root)
    assert {s: after[s] for s in after} == {s: versions[s] for s in after}
    return after


def debris(root: Path) -> str:
    """Which phase a kill interrupted, told from what it left behind."""
    names = [p.name for p in root.iterdir()]
    staging = [root / n for n in names if is_staging(n)]
    if any("deleting" in p.name for p in staging):
        return "retention delete"
    if any((p / MANIFEST_NAME).exists() for p in staging):
        return "commit (manifest written)"
    if staging:
        return "writing data"
    if any(n.endswith(".tmp") for n in names):
        return "moving latest"
    return "between saves"


# ---- random moments ----------------------------------------------------------------------------

def save_loop(root: Path, async_save: bool) -> None:
    """The victim: saves steps forever, now and then overwriting the previous one with a new
    version, and acknowledges each save once it returned (async: once it committed)."""
    versions = committed_versions(root) if root.exists() else {}
    step = max(versions, default=0)
    opts = AsyncOptions(max_in_flight=2, handle_sigterm=False) if async_save else False
    mgr = CheckpointManager(root, keep_last=KEEP, chunk_size=4096, async_save=opts)
    ack = open(root.parent / "acks", "a")
    pending = []
    (root.parent / "ready").touch()
    n = 0
    while True:
        n += 1
        if n % 4 == 0 and step in versions:
            versions[step] += 1  # overwrite the newest with another version
        else:
            step += 1
            versions[step] = 0
        h = mgr.save(step, content(step, versions[step]), counters={"version": versions[step]},
                     overwrite=n % 4 == 0)
        pending.append((step, versions[step], h))
        while pending and (not async_save or pending[0][2].done()):
            s, v, h = pending.pop(0)
            if async_save:
                h.result()
            ack.write(f"{s} {v}\n")
            ack.flush()


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_sigkill_at_random_moments(tmp_path, async_save):
    n = trials(10, 200, medium=40)
    root = tmp_path / "root"
    rng = random.Random(1234 + async_save)
    phases: dict[str, int] = {}
    for _ in range(n):
        (tmp_path / "ready").unlink(missing_ok=True)
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            try:
                save_loop(root, async_save)
            except BaseException as e:  # noqa: BLE001
                print(f"victim failed: {type(e).__name__}: {e}", file=sys.stderr)
                os._exit(3)
            os._exit(0)
        while not (tmp_path / "ready").exists():
            done, status = os.waitpid(pid, os.WNOHANG)
            assert not done, f"victim died before it was ready ({status})"
            assert time.monotonic() - start < 60, "victim never got ready"
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.6))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status), f"victim exited with {os.WEXITSTATUS(status)}"
        phase = debris(root)
        phases[phase] = phases.get(phase, 0) + 1
        check_after_kill(root)
    saves = len(acked(root))
    print(f"\n{'async' if async_save else 'sync'}: {n} kills, {saves} acknowledged saves, "
          f"phases hit: {phases}, nothing lost")
    assert saves > n  # the kills landed among real saves, not before the first


# ---- every mutation of one save ----------------------------------------------------------------

@pytest.fixture(scope="module")
def base_root(tmp_path_factory):
    """Three committed steps (1, 2 at version 0, 3 at version 1), keep_last=3."""
    d = tmp_path_factory.mktemp("crashbase")
    root = d / "root"
    mgr = CheckpointManager(root, keep_last=KEEP, chunk_size=4096)
    for step, version in ((1, 0), (2, 0), (3, 0), (3, 1)):
        mgr.save(step, content(step, version), counters={"version": version},
                 overwrite=version > 0)
    (d / "acks").write_text("1 0\n2 0\n3 1\n")
    return root


WORKLOADS = {
    # a new step: data, commit, retention deletes step 1, latest moves
    "new step": lambda root: CheckpointManager(root, keep_last=KEEP, chunk_size=4096).save(
        4, content(4, 0), counters={"version": 0}),
    # the newest step saved again: the old copy must survive until the new one is in place
    "overwrite": lambda root: CheckpointManager(root, keep_last=KEEP, chunk_size=4096).save(
        3, content(3, 2), counters={"version": 2}, overwrite=True),
    "async new step": lambda root: _async_save(root, 4, 0, False),
    "async overwrite": lambda root: _async_save(root, 3, 2, True),
}


def _async_save(root, step, version, overwrite):
    with CheckpointManager(root, keep_last=KEEP, chunk_size=4096,
                           async_save=AsyncOptions(handle_sigterm=False)) as mgr:
        mgr.save(step, content(step, version), counters={"version": version},
                 overwrite=overwrite).result()


def _without_exchange(fn):
    """The fallback commit path of file systems without renameat2 RENAME_EXCHANGE."""
    def run(root):
        commit._renameat2 = None  # in the forked victim only
        fn(root)
    return run


WORKLOADS["overwrite, no exchange"] = _without_exchange(WORKLOADS["overwrite"])
WORKLOADS["async overwrite, no exchange"] = _without_exchange(WORKLOADS["async overwrite"])


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_sigkill_at_every_mutation(base_root, tmp_path, workload):
    k = 0
    while True:
        k += 1
        run = tmp_path / f"k{k}"
        shutil.copytree(base_root.parent, run)
        root = run / "root"
        died = killed_at(k, lambda: WORKLOADS[workload](root))
        check_after_kill(root, exchange="no exchange" not in workload)
        shutil.rmtree(run)
        if not died:
            break
        assert k < 500
    print(f"\n{workload}: killed at each of {k - 1} mutations, nothing lost")

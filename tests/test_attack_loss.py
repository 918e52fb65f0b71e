"""Attacks that lost checkpoints or broke a running job's saves (issue 24): bit rot spread by
incremental saves, a lock file that follows symlinks, gc and repair racing a job, foreign and
symlinked directories in the root, a corrupt newest manifest, async failures at exit."""
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dckpt
from dckpt import CheckpointManager
from dckpt.cli import main as cli
from dckpt.format.manifest import MANIFEST_NAME

from helpers.attacks import SLOW, assert_same
from helpers import env, flip_bit



def frozen_state(step: int) -> dict:
    """'frozen' never changes after step 1; 'moving' changes every step."""
    g = torch.Generator().manual_seed(7)
    return {"frozen": torch.randn(300_000, generator=g),
            "moving": torch.full((1000,), float(step))}


# ---- bit rot must not spread through incremental saves -------------------------------------

@pytest.mark.parametrize("trust_versions", [False, True])
def test_rot_in_a_base_chunk_is_not_linked_into_later_steps(tmp_path, caplog, trust_versions):
    mgr = CheckpointManager(tmp_path, keep_last=2, chunk_size=1 << 18,
                            trust_versions=trust_versions)
    state = frozen_state(1)  # one live state: the version cache sees 'frozen' unchanged
    mgr.save(1, state)
    m = dckpt.read_manifest(mgr.path(1))
    c = m.tensors["frozen"].shards[0].chunks[1]
    flip_bit(m.files[c.file].path(mgr.path(1)), c.offset + c.stored // 2, 3)
    for step in range(2, 6):
        state["moving"].fill_(float(step))
        mgr.save(step, state)  # acknowledged: memory was right every time
    assert mgr.steps() == [4, 5]
    # step 2 found the damage and said so; later steps lean on step 2's fresh copy
    assert "fails its stored hash" in caplog.text
    for step in (4, 5):
        out = {"frozen": torch.empty(300_000), "moving": torch.empty(1000)}
        dckpt.load(mgr.path(step), into=out)
        assert_same(out, frozen_state(step))
    # Still incremental: the intact chunks of 'frozen' are shared, not rewritten.
    meta = dckpt.read_manifest(mgr.path(5)).meta["incremental"]
    assert meta["referenced_chunks"] > 0
    assert "fails its stored hash" in caplog.text


# ---- the root lock ------------------------------------------------------------------------

def run_cli(*args) -> int:
    return cli([str(a) for a in args])


def small_root(root: Path, steps=(1, 2, 3), **kw) -> CheckpointManager:
    mgr = CheckpointManager(root, **kw)
    for s in steps:
        mgr.save(s, {"w": torch.full((100,), float(s))}, metrics={"loss": 1.0 / s})
    return mgr


def test_lock_symlink_to_a_file_outside_is_never_followed(tmp_path):
    root, victim = tmp_path / "root", tmp_path / "victim.txt"
    small_root(root)
    victim.write_text("precious contents\n" * 100)
    (root / ".lock").unlink(missing_ok=True)
    (root / ".lock").symlink_to(victim)
    CheckpointManager(root).restore({"w": torch.empty(100)})
    assert run_cli("gc", root, "--dry-run") == 0
    assert run_cli("gc", root) == 0
    assert run_cli("repair", root) == 0
    small_root(root, steps=(4,))
    assert victim.read_text() == "precious contents\n" * 100
    assert not (root / ".lock").is_symlink()  # replaced by a file of the root's own


def test_lock_dangling_symlink_creates_nothing(tmp_path):
    root, target = tmp_path / "root", tmp_path / "elsewhere" / "created"
    (tmp_path / "elsewhere").mkdir()
    small_root(root)
    (root / ".lock").unlink(missing_ok=True)
    (root / ".lock").symlink_to(target)
    CheckpointManager(root)
    assert run_cli("gc", root) == 0
    small_root(root, steps=(4,))
    assert not target.exists()


def test_lock_fifo_does_not_hang(tmp_path):
    root = tmp_path / "root"
    small_root(root)
    (root / ".lock").unlink(missing_ok=True)
    os.mkfifo(root / ".lock")
    code = subprocess.run(
        [sys.executable, "-c", "import sys, torch; from dckpt import CheckpointManager as M; "
         "M(sys.argv[1]).save(9, {'w': torch.zeros(3)})", str(root)],
        env=env(), timeout=60).returncode
    assert code == 0


def test_roots_copied_with_cp_al_do_not_block_each_other(tmp_path):
    from dckpt.manager.lock import RootLock
    a, b = tmp_path / "a", tmp_path / "b"
    small_root(a)
    subprocess.run(["cp", "-al", str(a), str(b)], check=True)
    assert os.stat(a / ".lock").st_ino == os.stat(b / ".lock").st_ino
    with RootLock(a):  # a save in progress on the original
        small_root(b, steps=(4,))  # the copy's own job saves
        CheckpointManager(b).gc()
    assert CheckpointManager(b).steps() == [1, 2, 3, 4]


FORK_HOLDER = r"""
import os, sys, time
from dckpt.manager.lock import RootLock
lock = RootLock(sys.argv[1]).acquire()
pid = os.fork()
if pid == 0:
    # Written by the child: its fork handlers have run by then (written by the parent, a
    # loaded machine could let the test kill the parent before the child ever ran).
    with open(sys.argv[2], "w") as f:
        f.write(str(os.getpid()))
    time.sleep(120)  # a data-loader worker, say, that outlives its parent
    os._exit(0)
time.sleep(120)
"""


def test_a_forked_child_does_not_keep_the_lock_of_a_killed_parent(tmp_path):
    from dckpt.errors import LockError
    from dckpt.manager.lock import RootLock
    root, pidfile = tmp_path / "root", tmp_path / "child.pid"
    small_root(root)
    parent = subprocess.Popen([sys.executable, "-c", FORK_HOLDER, str(root), str(pidfile)],
                              env=env())
    child = None
    try:
        deadline = time.monotonic() + 60
        while not (pidfile.exists() and pidfile.read_text()):
            assert time.monotonic() < deadline and parent.poll() is None
            time.sleep(0.05)
        child = int(pidfile.read_text())
        with pytest.raises(LockError):  # the parent holds it
            RootLock(root).acquire()
        parent.kill()
        parent.wait(30)
        os.kill(child, 0)  # the child is still alive
        RootLock(root).acquire().release()
        small_root(root, steps=(4,))
    finally:
        parent.kill()
        if child is not None:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---- maintenance beside a running job -----------------------------------------------------

def test_repair_of_one_checkpoint_respects_a_save_in_progress(tmp_path):
    from dckpt.manager.lock import RootLock
    root = tmp_path / "root"
    small_root(root)
    ckpt = root / "step-000000005"
    dckpt.save({"w": torch.ones(10)}, ckpt)  # no RNG streams: repair would add them
    before = (ckpt / MANIFEST_NAME).read_bytes()
    with RootLock(root):  # a job's save (an overwrite of step 5, say) is in progress
        assert run_cli("repair", ckpt, "--no-backup") == 2
        assert (ckpt / MANIFEST_NAME).read_bytes() == before
    assert run_cli("repair", ckpt, "--no-backup") == 0
    assert (ckpt / MANIFEST_NAME).read_bytes() != before  # streams added once it is free


JOB = r"""
import json, sys, time, torch
from dckpt import CheckpointManager
root, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
mgr = CheckpointManager(root, keep_last=3)
failed = []
for step in range(10, n + 10):
    try:
        mgr.save(step, {"w": torch.full((20_000,), float(step)), "k": torch.ones(50_000)})
    except Exception as e:
        failed.append(f"{step}: {type(e).__name__}: {e}")
    time.sleep(0.005)
json.dump({"saves": n, "failed": failed}, open(out, "w"))
"""

MAINTENANCE = r"""
import json, os, sys
from dckpt.cli import main as cli
root, done, out = sys.argv[1], sys.argv[2], sys.argv[3]
runs = {"gc": 0, "repair": 0, "repair-step": 0, "refused": 0}
while not os.path.exists(done):
    for what in ("gc", "repair", "repair-step"):
        steps = sorted(n for n in os.listdir(root) if n.startswith("step-"))
        args = {"gc": ["gc", root], "repair": ["repair", root, "--no-backup"],
                "repair-step": ["repair", os.path.join(root, steps[-1]) if steps else root,
                                "--no-backup"]}[what]
        code = cli(args)
        runs[what] += 1
        runs["refused"] += code != 0
json.dump(runs, open(out, "w"))
"""


def test_gc_and_repair_in_a_loop_never_fail_a_jobs_save(tmp_path):
    root = tmp_path / "root"
    small_root(root, keep_last=3)
    environ = env()
    n = 400 if SLOW else 80
    maint = subprocess.Popen([sys.executable, "-c", MAINTENANCE, str(root),
                              str(tmp_path / "done"), str(tmp_path / "maint.json")], env=environ,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        job = subprocess.run([sys.executable, "-c", JOB, str(root), str(tmp_path / "job.json"),
                              str(n)], env=environ, timeout=600, capture_output=True, text=True)
    finally:
        (tmp_path / "done").touch()
        maint.wait(120)
    assert job.returncode == 0, job.stderr
    result = json.loads((tmp_path / "job.json").read_text())
    runs = json.loads((tmp_path / "maint.json").read_text())
    print(f"{n} saves, {len(result['failed'])} failed; maintenance runs {runs}")
    assert runs["gc"] >= 3 and runs["repair"] >= 3
    assert result["failed"] == []
    assert CheckpointManager(root).latest_step() == n + 9


# ---- foreign and symlinked directories in the root ----------------------------------------

def test_a_foreign_ten_digit_step_directory_does_not_break_saves(tmp_path):
    import shutil
    root = tmp_path / "root"
    mgr = small_root(root, keep_last=2)
    foreign = root / "step-0000000000"  # 10 digits: not the name step 0 is saved under
    shutil.copytree(mgr.path(3), foreign)
    for s in range(4, 8):
        mgr.save(s, {"w": torch.full((100,), float(s))})  # each commits and returns
        assert (root / "latest").read_text().strip() == f"step-{s:09d}"
    assert mgr.steps() == [6, 7] and mgr.latest_step() == 7
    assert (foreign / MANIFEST_NAME).is_file()  # not ours: left alone
    assert run_cli("gc", root) == 0 and foreign.is_dir()


def test_retention_survives_a_step_removed_behind_its_back(tmp_path, monkeypatch):
    import shutil
    root = tmp_path / "root"
    mgr = small_root(root, keep_last=2)
    real_plan = mgr.retention_plan

    def plan_then_vanish():  # another process deletes step 2 after the plan was made
        plan = real_plan()
        shutil.rmtree(mgr.path(2), ignore_errors=True)
        return plan
    monkeypatch.setattr(mgr, "retention_plan", plan_then_vanish)
    mgr.save(4, {"w": torch.full((100,), 4.0)})
    assert mgr.steps() == [3, 4] and mgr.latest_step() == 4


def test_a_symlinked_step_outside_the_root_is_never_followed(tmp_path, capsys):
    import shutil
    root, outside = tmp_path / "root", tmp_path / "archive"
    mgr = small_root(root, keep_last=3)
    outside.mkdir()
    shutil.move(str(mgr.path(1)), outside / "step-000000001")
    (root / "step-000000001").symlink_to(outside / "step-000000001")
    before = sorted(p.name for p in (outside / "step-000000001").iterdir())
    for _ in range(2):
        capsys.readouterr()
        assert run_cli("gc", root, "--keep-last", "2") == 0
        out = capsys.readouterr().out
        assert "removed step 1" not in out and "kept step 1" in out
        assert "nothing to do" in out  # freed 0 B: nothing outside is counted
    mgr.save(4, {"w": torch.full((100,), 4.0)})  # retention meets the link too
    assert sorted(p.name for p in (outside / "step-000000001").iterdir()) == before
    assert (root / "step-000000001").is_symlink()
    assert not [p for p in root.iterdir() if p.name.startswith(".step")]


# ---- a corrupt newest checkpoint ----------------------------------------------------------

def test_a_corrupt_newest_manifest_does_not_fail_later_saves(tmp_path, caplog):
    root = tmp_path / "root"
    mgr = small_root(root, steps=(1, 2))
    flip_bit(mgr.path(2) / MANIFEST_NAME, 40, 2)
    for s in (3, 4):
        result = mgr.save(s, {"w": torch.full((100,), float(s))})
        out = {"w": torch.empty(100)}
        dckpt.load(mgr.path(s), into=out)
        assert torch.equal(out["w"], torch.full((100,), float(s)))
    r3 = dckpt.read_manifest(mgr.path(3))
    assert "incremental" not in r3.meta  # written in full
    assert "unreadable" in caplog.text
    # step 4 leans on step 3 again, incrementally
    assert dckpt.read_manifest(mgr.path(4)).meta["incremental"]["base"] == \
        "step-000000003"


def test_the_full_save_says_why(tmp_path):
    root = tmp_path / "root"
    mgr = small_root(root, steps=(1, 2))
    (mgr.path(2) / MANIFEST_NAME).write_bytes(b"{not json")
    result = mgr.save(3, {"w": torch.full((100,), 3.0)})
    assert any("written in full" in n and "step-000000002" in n for n in result.notes)


def rank_save_past_a_corrupt_newest(rank, world, root):
    import torch.distributed as tdist
    mgr = CheckpointManager(root)
    for s in (1, 2):
        mgr.save(s, {"w": torch.full((64,), float(s + rank))})
    tdist.barrier()
    if rank == 0:
        (Path(root) / "step-000000002" / MANIFEST_NAME).write_bytes(b"{not json")
    tdist.barrier()
    result = mgr.save(3, {"w": torch.full((64,), 3.0 + rank)})
    out = {"w": torch.empty(64)}
    mgr.restore(out, restore_rng=False)
    return {"notes": result.notes, "w": out["w"][0].item()}


def test_a_corrupt_newest_manifest_on_two_ranks(tmp_path):
    from helpers.ranks import run_with_ranks
    res = run_with_ranks(2, rank_save_past_a_corrupt_newest, str(tmp_path / "root"))
    assert [r["w"] for r in res] == [3.0, 4.0]
    assert any("written in full" in n for n in res[0]["notes"])


# ---- gc flags ------------------------------------------------------------------------------

def metric_root(root: Path, **kw) -> CheckpointManager:
    mgr = CheckpointManager(root, **kw)
    for s, loss in zip(range(1, 6), (0.9, 0.1, 0.5, 0.7, 0.8)):  # best: step 2
        mgr.save(s, {"w": torch.full((100,), float(s))}, metrics={"loss": loss})
    return mgr


def test_gc_refuses_a_metric_no_checkpoint_has(tmp_path, capsys):
    mgr = metric_root(tmp_path / "root")
    assert run_cli("gc", mgr.root, "--keep-best", "2", "--metric", "val_loss") == 2
    assert "val_loss" in capsys.readouterr().err
    assert mgr.steps() == [1, 2, 3, 4, 5]
    assert run_cli("gc", mgr.root, "--keep-best", "2", "--metric", "loss") == 0
    assert mgr.steps() == [2, 3, 5]  # the best two and the newest


def test_gc_flags_change_the_recorded_policy_rule_by_rule(tmp_path, capsys):
    mgr = metric_root(tmp_path / "root", keep_last=4)
    assert mgr.steps() == [2, 3, 4, 5]
    capsys.readouterr()
    assert run_cli("gc", mgr.root, "--keep-every", "2") == 0
    out = capsys.readouterr().out
    assert "keep_last=4" in out and "keep_every=2" in out  # the effective policy is shown
    assert mgr.steps() == [2, 3, 4, 5]  # the recorded keep_last still holds
    assert run_cli("gc", mgr.root, "--keep-last", "1", "--keep-every", "2") == 0
    assert "removed step 3" in capsys.readouterr().out
    assert mgr.steps() == [2, 4, 5]


# ---- repair, latest and parked copies agree -----------------------------------------------

def test_after_repair_resume_uses_the_step_latest_names(tmp_path):
    root = tmp_path / "root"
    mgr = small_root(root, keep_last=2)  # steps 2 and 3
    m = dckpt.read_manifest(mgr.path(3))
    c = m.tensors["w"].shards[0].chunks[0]
    flip_bit(m.files[c.file].path(mgr.path(3)), c.offset + 5, 1)
    assert run_cli("verify", root, "--latest") != 0
    assert run_cli("repair", root) == 0
    assert (root / "latest").read_text().strip() == "step-000000002"
    fresh = CheckpointManager(root, keep_last=1)
    assert fresh.latest_step() == 2
    out = {"w": torch.empty(100)}
    assert fresh.restore(out).step == 2 and torch.equal(out["w"], torch.full((100,), 2.0))
    assert run_cli("verify", root, "--latest") == 0
    fresh.gc()  # keep_last=1 keeps the damaged newest (kept as newest) and the resumable one
    assert fresh.steps() == [2, 3]
    fresh.save(4, {"w": torch.full((100,), 4.0)})  # a new save is newest again
    assert fresh.latest_step() == 4 and fresh.steps() == [4]


def test_repair_and_verify_see_a_parked_copy(tmp_path, capsys):
    root = tmp_path / "root"
    mgr = small_root(root)
    parked = root / ".step-000000003.old-0123456789ab"
    os.rename(mgr.path(3), parked)  # an overwrite killed between its two renames
    capsys.readouterr()
    run_cli("verify", root)
    assert parked.name in capsys.readouterr().out
    assert run_cli("repair", root) == 0
    assert mgr.path(3).is_dir() and not parked.exists()
    out = {"w": torch.empty(100)}
    dckpt.load(mgr.path(3), into=out)
    assert torch.equal(out["w"], torch.full((100,), 3.0))


# ---- umask 0 ------------------------------------------------------------------------------

def test_repair_backup_directories_are_not_world_writable_under_umask_0(tmp_path):
    root = tmp_path / "root"
    mgr = small_root(root)
    tmp = root / ".step-000000009.tmp-0123456789ab"  # a crashed save's debris
    tmp.mkdir(mode=0o755)
    (tmp / "rank-00000.dckpt").write_bytes(b"partial")
    (mgr.path(3) / "manifest.json.tmp").write_bytes(b"half")  # nested: backup mirrors it
    old = os.umask(0)
    try:
        assert run_cli("repair", root) == 0
    finally:
        os.umask(old)
    backup = root / ".dckpt-backup"
    dirs = [backup, *[p for p in backup.rglob("*") if p.is_dir()]]
    assert len(dirs) >= 3
    bad = [str(p) for p in dirs if p.stat().st_mode & stat.S_IWOTH]
    assert bad == []


# ---- an async failure nobody waited for ---------------------------------------------------

ASYNC_LAST_FAILS = r"""
import sys, torch
from dckpt import CheckpointManager
mgr = CheckpointManager(sys.argv[1], async_save=True)
mgr.save(1, {"w": torch.ones(1000)}).result()
mgr.save(1, {"w": torch.zeros(1000)})  # fails on the worker: step 1 exists, no overwrite
print("training finished", flush=True)  # and the script ends without wait() or close()
"""


def test_an_unreported_async_failure_fails_the_process(tmp_path):
    p = subprocess.run([sys.executable, "-c", ASYNC_LAST_FAILS, str(tmp_path / "root")],
                       env=env(), capture_output=True,
                       text=True, timeout=120)
    assert "training finished" in p.stdout  # stdout flushed before the exit
    assert p.returncode == 1, p.stderr[-2000:]
    assert "step(s) [1] failed" in p.stderr and "exiting with status 1" in p.stderr


@pytest.mark.parametrize("backup", [True, False])
def test_repair_of_a_root_whose_retired_step_vanishes_meanwhile(tmp_path, monkeypatch,
                                                                backup):
    """A live job's retention removes a retired step in the background, outside the root
    lock: repair finding it gone halfway is not an error."""
    from dckpt.tools import repair as repair_mod
    root = tmp_path / "root"
    small_root(root, keep_last=2).close()
    gone = root / ".step-000000009.tmp-deleting"
    gone.mkdir()
    (gone / "rank-00000.dckpt").write_bytes(b"x")
    remove = repair_mod._Backup.remove

    def vanishing(self, src):
        if src.name == gone.name:
            shutil.rmtree(src)  # the job's removal thread, a moment earlier
        return remove(self, src)

    monkeypatch.setattr(repair_mod._Backup, "remove", vanishing)
    report = repair_mod.repair(root, backup=backup)
    action = [a for a in report.actions if a.target == gone.name]
    assert action and action[0].done and "gone meanwhile" in action[0].detail
    assert not gone.exists()

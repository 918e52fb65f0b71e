"""What a durable save does besides writing its bytes: the writer hands each MiB to the
kernel's writeback as it goes (so the closing fsync waits for the tail only), writes small
tensors several at a time, and the manager removes the steps retention retired in a
thread, after the save returned."""
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch

from dckpt import _native as native
from dckpt.manager import CheckpointManager
from dckpt.manager import manager as manager_module
from dckpt.storage import local as io

from test_native import noise, weights

CS = 1 << 20


def dirty_pages() -> int:
    with open("/proc/vmstat") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("nr_dirty "))


def on_tmpfs(path) -> bool:
    best, fstype = "", ""
    with open("/proc/mounts") as f:
        for line in f:
            _, mount, kind = line.split()[:3]
            if str(path).startswith(mount) and len(mount) > len(best):
                best, fstype = mount, kind
    return fstype in ("tmpfs", "ramfs")


@pytest.mark.parametrize("codec", [0, 1, 2])
def test_writeback_leaves_files_and_records_as_they_were(tmp_path, codec):
    bufs = [weights(3 * CS + 123, seed=1), noise(CS // 2, seed=2), weights(5, seed=3)]
    prev = [None, [0], None]  # one buffer hashed against (wrong) previous hashes
    out = {}
    for wb in (False, True):
        p = tmp_path / f"wb{wb}"
        recs = native.write_chunks(str(p), bufs, [4, 1, 1], chunk_size=CS, codec=codec,
                                   threads=1, fsync=False, prev_hashes=prev, writeback=wb)
        out[wb] = (recs, p.read_bytes())
    assert out[True] == out[False]


def test_writeback_starts_the_disk_writes_before_any_fsync(tmp_path):
    if on_tmpfs(tmp_path):
        pytest.skip("tmpfs has no writeback")
    buf = noise(96 << 20, seed=4)
    pages = len(buf) // os.sysconf("SC_PAGE_SIZE")
    dirtied = {}
    for wb in (False, True):
        before = dirty_pages()
        native.write_chunks(str(tmp_path / f"f{wb}"), [buf], [1], chunk_size=4 * CS,
                            threads=2, fsync=False, writeback=wb)
        dirtied[wb] = dirty_pages() - before
    if dirtied[False] < pages // 2:
        pytest.skip(f"the kernel wrote back on its own ({dirtied[False]} of {pages} pages "
                    "still dirty): nothing to compare")
    # Handed to writeback, a page is no longer dirty (it is under writeback or clean).
    assert dirtied[True] < pages // 4, dirtied


def syscalls(tmp_path, names: str, size: int, count: int, **kw) -> str:
    """strace of one write_chunks of `count` buffers of `size` bytes into tmp_path."""
    if shutil.which("strace") is None:
        pytest.skip("needs strace")
    script = (
        "import sys, numpy as np\n"
        "from dckpt import _native as n\n"
        f"bufs = [np.full({size}, i % 251, np.uint8) for i in range({count})]\n"
        f"n.write_chunks(sys.argv[1], bufs, [1] * {count}, **{kw!r})\n")
    out = tmp_path / "strace.txt"
    subprocess.run(["strace", "-f", "-qq", "-e", f"trace={names}", "-o", str(out),
                    sys.executable, "-c", script, str(tmp_path / "data")], check=True)
    return out.read_text()


def test_small_buffers_are_handed_to_writeback_a_mib_at_a_time(tmp_path):
    """A state of small tensors (one chunk each) is handed over per MiB a worker wrote, not
    per chunk: one sync_file_range per MiB."""
    if on_tmpfs(tmp_path):
        pytest.skip("tmpfs has no writeback")
    trace = syscalls(tmp_path, "sync_file_range", 64 << 10, 256, threads=2, fsync=False,
                     writeback=True)
    calls = trace.count("sync_file_range(")
    assert 1 <= calls <= 16 + 2, calls  # 16 MiB in 256 chunks, two workers


def test_small_chunks_are_written_several_at_a_time(tmp_path):
    """300 tensors of 46.7 KB (the demo's size) go out in writes of up to 256 KiB: about 55
    pwritev calls, not 300 pwrites."""
    trace = syscalls(tmp_path, "pwrite64,pwritev", 46_700, 300, threads=2, fsync=False)
    writes = trace.count("pwrite64(") + trace.count("pwritev(")
    assert 14_010_000 // (256 << 10) <= writes <= 70, writes


def test_incremental_writer_hands_its_file_to_writeback(tmp_path, monkeypatch):
    """The incremental save fsyncs its data file itself, after the write: the writer must
    still be told the bytes will be synced."""
    seen = []
    real = io._native.write_chunks

    def spy(*args, **kwargs):
        seen.append((kwargs["fsync"], kwargs["writeback"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(io._native, "write_chunks", spy)
    mgr = CheckpointManager(tmp_path)
    state = {"w": torch.arange(1000.0)}
    mgr.save(1, state)
    state["w"] += 1
    mgr.save(2, state)
    assert seen and all(fsync or writeback for fsync, writeback in seen), seen
    seen.clear()
    CheckpointManager(tmp_path / "nosync", fsync=False).save(1, state)
    assert seen and not any(fsync or writeback for fsync, writeback in seen), seen


def test_retired_steps_are_removed_after_the_save_returns(tmp_path, monkeypatch):
    release, started, log = threading.Event(), threading.Event(), []
    real = shutil.rmtree

    def slow_rmtree(path, *args, **kwargs):
        log.append(("rmtree", threading.current_thread().name, os.path.basename(path)))
        started.set()
        release.wait(30)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(manager_module.shutil, "rmtree", slow_rmtree)
    mgr = CheckpointManager(tmp_path, keep_last=1)
    state = {"w": torch.arange(10.0)}
    mgr.save(1, state)
    mgr.save(2, state)  # retires step 1; returns while its removal is held up
    log.append(("returned", threading.current_thread().name, 2))
    assert started.wait(30)
    assert mgr.steps() == [2]  # renamed aside before the save returned
    assert (tmp_path / ".step-000000001.tmp-deleting").exists()
    release.set()
    mgr.close()  # waits for the removal
    assert not (tmp_path / ".step-000000001.tmp-deleting").exists()
    assert sorted(log) == [("returned", "MainThread", 2),
                           ("rmtree", "dckpt-retention", ".step-000000001.tmp-deleting")]
    mgr2 = CheckpointManager(tmp_path, keep_last=1)
    assert mgr2.restore({"w": torch.zeros(10)}).step == 2


def test_gc_waits_for_a_removal_in_progress(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=1)
    state = {"w": torch.arange(10.0)}
    for s in (1, 2, 3):
        mgr.save(s, state)
    report = mgr.gc()
    # The retired steps' directories are not reported as a crash's debris.
    assert not report["removed_temporaries"], report
    assert sorted(os.listdir(tmp_path)) == [".lock", "latest", "step-000000003"]


def _durability_log(monkeypatch) -> list:
    """Every fsync (once it returned) and rename, in order: fsyncs by the file they synced."""
    log = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.endswith(".dckpt"):
            time.sleep(0.2)  # a slow disk: the commit must wait for it
        real_fsync(fd)
        log.append(("fsync", path))

    def rename(src, dst, *args, **kwargs):
        log.append(("rename", str(src), str(dst)))
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    return log


@pytest.mark.parametrize("how", ["save", "split", "manager, changed"])
def test_data_fsyncs_return_before_the_commit(tmp_path, monkeypatch, how):
    """The data and record files are fsync'd in threads while the manifest is built: every
    one of those fsyncs has returned before the staging directory is renamed into place."""
    import dckpt
    state = {f"w{i}": torch.randn(50_000) for i in range(8)}
    mgr = CheckpointManager(tmp_path / "mgr") if how.startswith("manager") else None
    if mgr is not None:
        mgr.save(1, state)
    log = _durability_log(monkeypatch)
    if mgr is not None:
        for t in state.values():
            t.add_(1)
        mgr.save(2, state)
        target = tmp_path / "mgr" / "step-000000002"
    else:
        target = tmp_path / "ck"
        dckpt.save(state, target, threads=2, layout="split" if how == "split" else None)
    commit = [i for i, e in enumerate(log) if e[0] == "rename" and e[2] == str(target)]
    assert len(commit) == 1, log
    synced = {os.path.basename(e[1]) for e in log[:commit[0]] if e[0] == "fsync"}
    staged = {os.path.basename(e[1]) for e in log if e[0] == "fsync" and ".tmp-" in e[1]}
    data = {p.name for p in target.iterdir() if p.suffix == ".dckpt" and "ref-" not in p.name}
    assert data and data <= synced, (data, log)
    assert {"manifest.json"} | data <= staged <= synced, log
    if how == "split":
        assert any(n.startswith("records-") for n in synced), log
    assert torch.equal(dckpt.load(target)["w3"], state["w3"])


@pytest.mark.parametrize("incremental", [False, True])
def test_a_failed_background_fsync_fails_the_save(tmp_path, monkeypatch, incremental):
    """An I/O error in a data file's fsync, which runs beside the manifest's building, is the
    save's error (naming the file), and nothing is committed or left behind."""
    from dckpt.errors import StorageError
    from dckpt.storage import commit
    real = commit.fsync_file

    def failing(path):
        if str(path).endswith(".dckpt"):
            raise OSError(5, "Input/output error")
        return real(path)

    mgr = CheckpointManager(tmp_path)
    state = {"w": torch.randn(100_000)}
    if incremental:
        mgr.save(1, state)
        state["w"].add_(1)
    monkeypatch.setattr(commit, "fsync_file", failing)
    with pytest.raises(StorageError, match=r"rank-00000.*\.dckpt failed: fsync: Input/output"):
        mgr.save(2, state, full=not incremental)
    assert mgr.steps() == ([1] if incremental else [])
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]

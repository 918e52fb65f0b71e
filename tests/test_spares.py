"""Recycled data files (dckpt/storage/spares.py): the data files of the step retention
retired are written over by the next save, but only files no one else uses."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dckpt
from dckpt import CheckpointManager
from dckpt import _native as native
from dckpt.format.layout import SPARE_DIR
from dckpt.storage import spares
from dckpt.tools.verify import verify
from helpers.cli import run_json

DATA = "rank-00000.dckpt"


def state(step: int, n: int = 8, numel: int = 4096) -> dict:
    g = torch.Generator().manual_seed(step)
    return {f"w{i}": torch.randn(numel, generator=g) for i in range(n)}


def assert_loads(mgr: CheckpointManager, step: int, expected: dict) -> None:
    got = dckpt.load(mgr.path(step))
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
    assert verify(mgr.path(step), deep=True).ok


def ino(path) -> int:
    return os.stat(path).st_ino


def test_the_next_save_writes_over_the_retired_steps_file(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2):
        mgr.save(step, state(step))
    first = ino(mgr.path(1) / DATA)
    mgr.save(3, state(3))  # retires step 1: its file is kept aside, not deleted
    mgr.wait()
    assert not mgr.path(1).exists()
    assert ino(tmp_path / SPARE_DIR / DATA) == first
    mgr.save(4, state(4))  # every tensor changed: written over step 1's file
    assert ino(mgr.path(4) / DATA) == first
    assert_loads(mgr, 4, state(4))
    assert_loads(mgr, 3, state(3))
    mgr.close()
    assert not (tmp_path / SPARE_DIR).exists()  # close() leaves only checkpoints
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "latest", "step-000000003", "step-000000004"]


def test_a_smaller_save_cuts_the_file_it_reuses(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=1)
    mgr.save(1, state(1, n=16))
    mgr.save(2, state(2, n=16))  # step 1's file becomes the spare
    spare_size = os.path.getsize(tmp_path / SPARE_DIR / DATA)
    small = state(3, n=3)
    mgr.save(3, small)
    size = os.path.getsize(mgr.path(3) / DATA)
    assert size < spare_size
    assert size == sum(f.size for f in dckpt.read_manifest(mgr.path(3)).files)
    assert_loads(mgr, 3, small)
    mgr.close()


def test_an_unchanged_save_gives_the_spare_back(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        mgr.save(step, state(step))
    mgr.wait()
    spare = ino(tmp_path / SPARE_DIR / DATA)
    mgr.save(4, state(3))  # nothing changed: the save links step 3's file, writes none
    assert not (mgr.path(4) / DATA).exists()
    mgr.wait()
    assert ino(tmp_path / SPARE_DIR / DATA) == spare
    assert_loads(mgr, 4, state(3))
    mgr.save(5, state(5))
    assert ino(mgr.path(5) / DATA) == spare
    assert_loads(mgr, 5, state(5))
    mgr.close()


def test_a_file_shared_with_a_kept_step_is_not_kept(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=1)
    fixed = state(1)
    mgr.save(1, fixed)
    mgr.save(2, fixed)  # links step 1's file; retiring step 1 leaves it step 2's data
    mgr.wait()
    assert not (tmp_path / SPARE_DIR).exists()  # not even empty
    assert_loads(mgr, 2, fixed)
    mgr.close()


def test_a_link_left_as_the_last_name_of_a_file_is_kept(tmp_path):
    """Step 2 linked step 1's unchanged file; once both are retired, that file is no
    step's data and becomes the spare under the name it was written with."""
    mgr = CheckpointManager(tmp_path, keep_last=1)
    mgr.save(1, state(1))
    original = ino(mgr.path(1) / DATA)
    mgr.save(2, state(1))  # unchanged: links step 1's file
    mgr.save(3, state(3))  # retires step 2, whose link is the file's last name
    mgr.wait()
    assert ino(tmp_path / SPARE_DIR / DATA) == original
    mgr.save(4, state(4))
    assert ino(mgr.path(4) / DATA) == original
    assert_loads(mgr, 4, state(4))
    mgr.close()


def test_a_file_someone_reads_is_deleted_not_written_over(tmp_path):
    """A reader that opened the retired step keeps reading the bytes it expects: another
    process holding the file open, or this one (an open descriptor, a mapping)."""
    mgr = CheckpointManager(tmp_path, keep_last=1)
    mgr.save(1, state(1))
    path = mgr.path(1) / DATA
    before = path.read_bytes()
    reader = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; f = open(sys.argv[1], 'rb'); "
         "print('open', flush=True); time.sleep(60)", str(path)], stdout=subprocess.PIPE)
    try:
        assert reader.stdout.readline() == b"open\n"
        fd = os.open(path, os.O_RDONLY)
        mapped = np.memmap(path, np.uint8, "r")
        mgr.save(2, state(2))  # retires step 1
        mgr.wait()
        assert not (tmp_path / SPARE_DIR / DATA).exists()
        for step in (3, 4):
            mgr.save(step, state(step))
        assert os.pread(fd, len(before) + 1, 0) == before
        assert mapped.tobytes() == before
        os.close(fd)
        del mapped
    finally:
        reader.kill()
        reader.wait()
    assert_loads(mgr, 4, state(4))
    mgr.close()


def test_what_is_planted_among_the_spares_is_never_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious" * 1000)
    root = tmp_path / "root"
    mgr = CheckpointManager(root, keep_last=1)
    mgr.save(1, state(1))
    (root / SPARE_DIR).mkdir()
    plants = [lambda p: p.symlink_to(victim), lambda p: os.link(victim, p),
              lambda p: os.mkfifo(p)]
    for step, plant in enumerate(plants, start=2):
        spare = root / SPARE_DIR / DATA
        if os.path.lexists(spare):
            spare.unlink()
        plant(spare)
        mgr.save(step, state(step))
        assert_loads(mgr, step, state(step))
        assert victim.read_bytes() == b"precious" * 1000
    mgr.close()


def test_a_link_planted_as_the_spare_directory_is_not_followed(tmp_path):
    elsewhere, root = tmp_path / "elsewhere", tmp_path / "root"
    elsewhere.mkdir()
    mgr = CheckpointManager(root, keep_last=1)
    (root / SPARE_DIR).symlink_to(elsewhere)
    for step in (1, 2, 3):
        mgr.save(step, state(step))
        mgr.wait()
    assert os.listdir(elsewhere) == []
    assert_loads(mgr, 3, state(3))
    mgr.close()
    assert elsewhere.is_dir()


def test_recycle_off_and_gc_and_restart_leave_no_spares(tmp_path):
    mgr = CheckpointManager(tmp_path / "off", keep_last=1, recycle=False)
    for step in (1, 2, 3):
        mgr.save(step, state(step))
    mgr.wait()
    assert not (tmp_path / "off" / SPARE_DIR).exists()

    root = tmp_path / "on"
    mgr = CheckpointManager(root, keep_last=1)
    for step in (1, 2):
        mgr.save(step, state(step))
    mgr.wait()
    assert (root / SPARE_DIR / DATA).exists()
    code, listing = run_json("ls", str(root), "--json")
    assert code == 0
    spare = [e for e in listing["checkpoints"] if e["name"] == SPARE_DIR]
    assert spare and spare[0]["status"] == "spare files" and spare[0]["disk_bytes"] > 0
    code, report = run_json("gc", str(root), "--json")
    assert code == 0 and not (root / SPARE_DIR).exists()
    # Not a crash's debris, but its bytes are freed.
    assert report["removed_temporaries"] == [] and report["freed_bytes"] > 0
    mgr.save(3, state(3))
    mgr.wait()
    assert (root / SPARE_DIR).exists()
    del mgr  # dropped without close(): a new manager's start clears the debris
    CheckpointManager(root, keep_last=1)
    assert not (root / SPARE_DIR).exists()


def test_native_reuse_writes_over_in_place_and_cuts(tmp_path):
    path = str(tmp_path / "f")
    big = np.arange(1 << 16, dtype=np.uint8)
    native.write_chunks(path, [big], [1], chunk_size=4096, fsync=False)
    first = ino(path)
    small = np.full(5000, 7, np.uint8)
    recs = native.write_chunks(path, [small], [1], chunk_size=4096, fsync=False, reuse=[True])
    assert ino(path) == first and open(path, "rb").read() == small.tobytes()
    assert [r[1] for r in recs[0]] == [0, 4096]
    # Nothing written (every chunk unchanged): the file is left as it was.
    same = [[r[5] for r in recs[0]]]
    recs = native.write_chunks(path, [small], [1], chunk_size=4096, fsync=False,
                               prev_hashes=same, reuse=[True])
    assert all(r[1] == -1 for r in recs[0]) and open(path, "rb").read() == small.tobytes()
    # Without reuse the file is truncated first, as always.
    native.write_chunks(path, [small[:10]], [1], chunk_size=4096, fsync=False)
    assert os.path.getsize(path) == 10
    with pytest.raises(native.ChunkError, match="buffered"):
        native.write_chunks(path, [small], [1], direct=True, reuse=[True])
    with pytest.raises(native.ChunkError, match="one entry per path"):
        native.write_chunks(path, [small], [1], reuse=[True, False])


def test_keep_takes_only_unshared_data_files(tmp_path):
    """A step's own files, and its links to an older step's files that no kept step shares
    any more (under the name they were written with); never a file with another link."""
    retired, spare_dir = tmp_path / "retired", tmp_path / "spares"
    retired.mkdir()
    for name in ("ref-r0-step-000000001-rank-00000.dckpt", DATA, "rank-00000-1.dckpt",
                 "ref-r1-step-000000001-rank-00001.dckpt",
                 "ref-r2-step-000000001-rank-00002.dckpt", "manifest.json", "shared.dckpt"):
        (retired / name).write_bytes(b"x" * 100)
    os.link(retired / "rank-00000-1.dckpt", tmp_path / "elsewhere")
    os.link(retired / "ref-r2-step-000000001-rank-00002.dckpt", tmp_path / "elsewhere2")
    assert spares.keep(retired, spare_dir) == 2
    assert sorted(os.listdir(spare_dir)) == [DATA, "rank-00001.dckpt"]
    assert ino(spare_dir / DATA) != ino(retired / "ref-r0-step-000000001-rank-00000.dckpt")
    dest = tmp_path / "new"
    dest.mkdir()
    assert spares.take([str(dest / DATA), str(dest / "rank-00002.dckpt")], spare_dir) == \
        [True, False]
    assert (dest / DATA).read_bytes() == b"x" * 100
    assert os.listdir(spare_dir) == ["rank-00001.dckpt"]


def _ranks_recycle(rank: int, world: int, root: str) -> tuple[list, bool]:
    """Each rank's own file of the retired step is written over by its next save."""
    mgr = CheckpointManager(root, keep_last=1)
    seen = []
    for step in (1, 2, 3):
        mgr.save(step, {f"rank{rank}": state(10 * step + rank)})
        mgr.wait()
        seen.append(ino(mgr.path(step) / f"rank-{rank:05d}.dckpt"))
    got = dckpt.load(mgr.path(3))[f"rank{rank}"]  # this rank's own state, read back
    same = all(torch.equal(got[k], v) for k, v in state(30 + rank).items())
    mgr.close()
    return seen, same


def test_every_rank_writes_over_its_own_retired_file(tmp_path):
    from helpers.ranks import run_with_ranks
    for seen, same in run_with_ranks(2, _ranks_recycle, str(tmp_path)):
        assert seen[2] == seen[0] != seen[1]  # step 3 in step 1's file
        assert same  # bit for bit
    assert verify(tmp_path / "step-000000003", deep=True).ok
    assert not (tmp_path / SPARE_DIR).exists()


def test_verify_and_repair_leave_a_live_runs_spares_alone(tmp_path):
    from dckpt.tools.repair import repair
    mgr = CheckpointManager(tmp_path, keep_last=1)
    for step in (1, 2):
        mgr.save(step, state(step))
    mgr.wait()
    report = verify(tmp_path)
    assert report.ok and not [c for c in report.all_checks() if c.group == "root"
                              and c.level != "pass"]
    repair(tmp_path)
    assert (tmp_path / SPARE_DIR / DATA).exists()
    mgr.close()


def test_a_spare_far_larger_than_the_save_is_left_alone(tmp_path):
    """A small save would cut a large spare down while it waits (freeing its pages):
    it writes a new file instead, and the spare stays for a save of its size."""
    mgr = CheckpointManager(tmp_path, keep_last=1)
    mgr.save(1, state(1, n=256))
    mgr.save(2, state(2, n=256))  # step 1's 4 MB file is the spare
    spare = ino(tmp_path / SPARE_DIR / DATA)
    mgr.save(3, state(3, n=2))  # 32 KB
    assert ino(mgr.path(3) / DATA) != spare
    assert ino(tmp_path / SPARE_DIR / DATA) == spare
    assert_loads(mgr, 3, state(3, n=2))
    mgr.close()


def test_async_saves_recycle_only_when_buffered(tmp_path):
    from dckpt import AsyncOptions
    for direct in (True, False):
        root = tmp_path / str(direct)
        mgr = CheckpointManager(root, keep_last=1, async_save=AsyncOptions(direct=direct))
        for step in (1, 2, 3):
            mgr.save(step, state(step))
            mgr.wait()
        # Direct writes never take a spare: none is kept to lie unused.
        assert (root / SPARE_DIR).exists() is not direct
        first = ino(root / SPARE_DIR / DATA) if not direct else None
        mgr.save(4, state(4))
        mgr.wait()
        if not direct:
            assert ino(mgr.path(4) / DATA) == first
        assert_loads(mgr, 4, state(4))
        mgr.close()

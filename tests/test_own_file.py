"""storage.commit.OwnFile: the root lock's holder name and the `latest` pointer are
rewritten in place only while the name leads to the file this process created there with no
other link; whatever was planted there instead is replaced, never written through."""
import os

import torch

from dckpt.manager import CheckpointManager
from dckpt.storage.commit import OwnFile, write_file_durably


def test_rewrites_in_place_while_the_file_is_its_own(tmp_path):
    f = OwnFile(tmp_path / "latest")
    f.write(b"step-000000001\n")
    ino = os.stat(tmp_path / "latest").st_ino
    for text in (b"step-000000002\n", b"x\n", b"step-000000100000\n"):
        f.write(text)
        assert (tmp_path / "latest").read_bytes() == text
        assert os.stat(tmp_path / "latest").st_ino == ino
    assert sorted(os.listdir(tmp_path)) == ["latest"]  # no temporaries left


def test_anything_planted_is_replaced_not_written_through(tmp_path):
    path, victim = tmp_path / "latest", tmp_path / "victim"
    f = OwnFile(path)
    f.write(b"one\n")
    victim.write_bytes(b"precious\n")
    # A symbolic link to another file, a hard link to it, another file renamed in place.
    plants = [lambda: (path.unlink(), path.symlink_to(victim)),
              lambda: os.link(path, tmp_path / "second-name"),
              lambda: (victim.with_name("other").write_bytes(b"theirs\n"),
                       os.rename(victim.with_name("other"), path))]
    for i, plant in enumerate(plants):
        plant()
        f.write(f"step {i}\n".encode())
        assert path.read_bytes() == f"step {i}\n".encode() and not path.is_symlink()
        assert os.stat(path).st_nlink == 1
        assert victim.read_bytes() == b"precious\n"
    # The hard link kept what the file held when it was planted: not written through.
    assert (tmp_path / "second-name").read_bytes() == b"step 0\n"


def test_a_manager_keeps_its_latest_and_lock_files(tmp_path):
    mgr = CheckpointManager(tmp_path / "root", keep_last=2)
    mgr.save(1, {"w": torch.ones(3)})
    ids = [os.stat(tmp_path / "root" / n).st_ino for n in ("latest", ".lock")]
    for step in (2, 3, 4):
        mgr.save(step, {"w": torch.full((3,), float(step))})
    assert [os.stat(tmp_path / "root" / n).st_ino for n in ("latest", ".lock")] == ids
    assert (tmp_path / "root" / "latest").read_text() == "step-000000004\n"
    assert (tmp_path / "root" / ".lock").read_text() == ""  # cleared when released
    mgr.close()
    assert CheckpointManager(tmp_path / "root").latest_step() == 4


def test_many_roots_keep_few_descriptors(tmp_path):
    """A process that saves under many roots (a sweep) and drops its managers without
    close() keeps a bounded number of open descriptors for the lock names and pointers."""
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_fds()
    for i in range(60):
        mgr = CheckpointManager(tmp_path / f"root{i}", keep_last=1)
        mgr.save(1, {"w": torch.ones(2)})
        del mgr
    import gc
    gc.collect()
    assert open_fds() - before <= 20  # the lock registry's bound (16) and a few spare


def test_durable_writes_never_write_through_their_temporary_name(tmp_path):
    """repair and convert write through `NAME.tmp`: a link planted at that name (or a
    crash's leftover) is removed, never written through or truncated."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    path = tmp_path / "manifest.json"
    tmp = tmp_path / "manifest.json.tmp"
    for plant in (lambda: tmp.symlink_to(victim), lambda: os.link(victim, tmp),
                  lambda: tmp.symlink_to(tmp_path / "missing"), lambda: tmp.write_bytes(b"x")):
        plant()
        write_file_durably(path, b"new\n")
        assert path.read_bytes() == b"new\n" and not path.is_symlink()
        assert not os.path.lexists(tmp) and not (tmp_path / "missing").exists()
        assert victim.read_bytes() == b"precious\n" and os.stat(victim).st_nlink == 1

"""O_DIRECT writes (write_chunks(direct=True)) and paced writes (duty) of the native core.

A direct write must leave exactly the bytes a buffered write leaves: chunks back to back,
the same records, file sizes that are not a multiple of the block size, sources at any
address; and it must really bypass the page cache where the filesystem allows it, and
fall back to buffered writes where it does not (tmpfs)."""
import ctypes
import mmap
import os
import subprocess
import sys

import numpy as np
import pytest

from dckpt import _native as native

CS = 64 << 10  # chunk size: a few chunks per buffer, each 16 blocks


def noise(nbytes, seed=0):
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def unaligned(nbytes, seed=0, shift=1):
    """Bytes whose address is `shift` past a 4 KiB boundary (an O_DIRECT write cannot
    send them as they are)."""
    base = np.empty(nbytes + 8192, np.uint8)
    start = (-base.ctypes.data) % 4096 + shift
    out = base[start:start + nbytes]
    out[:] = noise(nbytes, seed)
    return out


def direct_supported(d) -> bool:
    try:
        fd = os.open(os.path.join(d, ".probe"), os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    os.unlink(os.path.join(d, ".probe"))
    return True


def cached_pages(path) -> int:
    """Pages of `path` in the page cache (mincore on a mapping that touches none)."""
    size = os.path.getsize(path)
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), size) as m:
        pages = -(-size // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * pages)()
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        rc = libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec)
        assert rc == 0, os.strerror(ctypes.get_errno())
        count = sum(v & 1 for v in vec)
        del addr
    return count


def check_file(path, buffers, records, in_order=True):
    """Chunks tile the file back to back, each holding its bytes: in buffer/chunk order
    (direct writes lay them out so), or in any order (buffered writers with several threads
    place each chunk where the file ends when its write begins)."""
    with open(path, "rb") as f:
        data = f.read()
    spans = []
    for buf, recs in zip(buffers, records):
        pos = 0
        for r in recs:
            file_index, offset, stored, raw, codec, raw_hash, stored_hash = r
            assert (stored, raw, codec) == (raw, min(CS, len(buf) - pos), 0)
            assert data[offset:offset + raw] == buf[pos:pos + raw].tobytes()
            assert raw_hash == stored_hash == native.hash64(buf[pos:pos + raw])
            spans.append((offset, raw))
            pos += raw
        assert pos == len(buf)
    if not in_order:
        spans.sort()
    end = 0
    for offset, raw in spans:
        assert offset == end
        end += raw
    assert len(data) == end


def read_back(path, buffers, records):
    dests = [np.zeros_like(b) for b in buffers]
    native.read_chunks([path], dests, [1] * len(buffers), records, verify=True)
    return dests


LAYOUTS = {
    "aligned": [CS * 3, 8192],
    "odd tails": [CS * 2 + 17, 5, 4096 * 3 + 1, 1000, 4093],
    "tiny": [1, 2, 3],
    "one block": [4096],
    "empty": [],
    "empty buffer": [0, 100],
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_direct_round_trip_is_bit_exact(tmp_path, name, threads):
    sizes = LAYOUTS[name]
    buffers = [unaligned(n, i) if i % 2 else noise(n, i) for i, n in enumerate(sizes)]
    path = str(tmp_path / "d.dckpt")
    records = native.write_chunks(path, buffers, [1] * len(buffers), chunk_size=CS,
                                  threads=threads, direct=True)
    check_file(path, buffers, records)
    for got, want in zip(read_back(path, buffers, records), buffers):
        assert np.array_equal(got, want)
    # Same records as a buffered write by one thread (which stores in the same order).
    buffered = native.write_chunks(str(tmp_path / "b.dckpt"), buffers, [1] * len(buffers),
                                   chunk_size=CS, threads=1)
    assert records == buffered
    assert (tmp_path / "d.dckpt").read_bytes() == (tmp_path / "b.dckpt").read_bytes()


def test_direct_write_bypasses_the_page_cache(tmp_path):
    if not direct_supported(tmp_path):
        pytest.skip(f"{tmp_path}: the filesystem refuses O_DIRECT")
    buffers = [noise(CS * 4 + 100, 1), unaligned(CS * 2, 2)]
    direct, buffered = str(tmp_path / "d.dckpt"), str(tmp_path / "b.dckpt")
    native.write_chunks(buffered, buffers, [1, 1], chunk_size=CS)
    records = native.write_chunks(direct, buffers, [1, 1], chunk_size=CS, direct=True)
    pages = -(-os.path.getsize(direct) // mmap.PAGESIZE)
    assert cached_pages(buffered) == pages  # the probe sees cached pages where they are
    assert cached_pages(direct) == 0
    check_file(direct, buffers, records)


FALLBACK_CHILD = """
import os, sys
import numpy as np
sys.path.insert(0, {tests!r})
from test_native_direct import CS, check_file, direct_supported, noise, unaligned
from dckpt import _native as native
d = sys.argv[1]
assert not direct_supported(d), "ramfs took O_DIRECT"
buffers = [noise(CS + 3, 1), unaligned(5000, 2), noise(CS * 2, 3)]
records = native.write_chunks(os.path.join(d, "f"), buffers, [1] * 3, chunk_size=CS,
                              threads=2, direct=True)
check_file(os.path.join(d, "f"), buffers, records, in_order=False)
print("fell back")
"""


def test_direct_falls_back_where_unsupported(tmp_path):
    """ramfs refuses O_DIRECT at open (recent tmpfs takes it): mounted in a mount namespace
    of its own, so nothing outlives the child."""
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    script = tmp_path / "child.py"
    script.write_text(FALLBACK_CHILD.format(tests=os.path.dirname(__file__)))
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", f"mount -t ramfs none {mnt}"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a ramfs in a mount namespace: {probe.stderr.decode()[:200]}")
    cmd = f"mount -t ramfs none {mnt} && exec {sys.executable} {script} {mnt}"
    out = subprocess.run(["unshare", "--mount", "sh", "-c", cmd], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    assert "fell back" in out.stdout


def test_direct_incremental_skips_unchanged_chunks(tmp_path):
    old = noise(CS * 4 + 10, 1)
    first = native.write_chunks(str(tmp_path / "a"), [old], [1], chunk_size=CS)
    new = old.copy()
    new[CS + 5] ^= 1  # chunk 1 changes, and the short last chunk
    new[-1] ^= 1
    path = str(tmp_path / "b")
    records = native.write_chunks(path, [new], [1], chunk_size=CS, direct=True,
                                  prev_hashes=[[r[5] for r in first[0]]])
    written = [r for r in records[0] if r[1] != -1]
    assert [r[1] for r in records[0]] == [-1, 0, -1, -1, CS]
    data = open(path, "rb").read()
    assert len(data) == CS + 10
    assert data == new[CS:2 * CS].tobytes() + new[4 * CS:].tobytes()
    assert [r[5] for r in written] == [native.hash64(new[CS:2 * CS]), native.hash64(new[4 * CS:])]


def test_direct_with_compression_writes_buffered(tmp_path):
    buf = np.zeros(CS * 2 + 7, np.uint8)
    path = str(tmp_path / "z")
    records = native.write_chunks(path, [buf], [1], chunk_size=CS, codec=1, direct=True)
    assert [r[4] for r in records[0]] == [1, 1, 0]  # 7 zero bytes do not compress
    dest = np.ones_like(buf)
    native.read_chunks([path], [dest], [1], records, verify=True)
    assert np.array_equal(dest, buf)


@pytest.mark.parametrize("direct", [False, True])
def test_paced_write_is_complete(tmp_path, direct):
    buffers = [noise(CS * 3 + 1, 3), unaligned(777, 4)]
    path = str(tmp_path / "p")
    records = native.write_chunks(path, buffers, [1, 1], chunk_size=CS, threads=1,
                                  direct=direct, duty=0.5)
    check_file(path, buffers, records)


@pytest.mark.parametrize("duty", [0.0, -0.5, 1.5, float("nan")])
def test_duty_outside_its_range_is_refused(tmp_path, duty):
    with pytest.raises(native.ChunkError, match="duty") as e:
        native.write_chunks(str(tmp_path / "x"), [noise(10)], [1], duty=duty)
    assert e.value.kind == "invalid_argument"
    assert not (tmp_path / "x").exists()

"""The native I/O core against its oracles: Python zstandard, xxhash and numpy."""
import os
import pickle
import sys
import threading
import time

import numpy as np
import pytest
import xxhash
import zstandard

import dckpt
from dckpt import _native as native
from helpers import flip_bit

CS = 4096  # small chunk size so that modest buffers span many chunks


def weights(nbytes, seed=0):
    """Float32 bytes like trained weights: compressible, more so after a 4-byte shuffle."""
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal(nbytes // 4 + 1) * 0.02).astype(np.float32)
    return np.frombuffer(values.tobytes()[:nbytes], np.uint8).copy()


def noise(nbytes, seed=0):
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def unshuffle(data, width):
    n = len(data) // width
    head = np.frombuffer(data[: n * width], np.uint8).reshape(width, n).T.tobytes()
    return head + data[n * width:]


def check_oracle(path, buffers, records, elem_sizes, chunk_size):
    """Every record agrees with an independent decoder, and chunks tile the file exactly."""
    with open(path, "rb") as f:
        data = f.read()
    placed = []
    for buf, recs, width in zip(buffers, records, elem_sizes):
        raw = bytes(memoryview(buf).cast("B"))
        assert len(recs) == -(-len(raw) // chunk_size)
        for c, (file_index, offset, stored_len, raw_len, codec, raw_hash, stored_hash) in enumerate(recs):
            piece = raw[c * chunk_size:(c + 1) * chunk_size]
            stored = data[offset:offset + stored_len]
            assert file_index == 0
            assert raw_len == len(piece)
            assert raw_hash == xxhash.xxh3_64_intdigest(piece)
            assert stored_hash == xxhash.xxh3_64_intdigest(stored)
            if codec == 0:
                assert stored == piece
            elif codec == 1:
                assert stored_len < raw_len
                assert zstandard.ZstdDecompressor().decompress(stored) == piece
            else:
                assert codec == 2 and width > 1 and stored_len < raw_len
                assert unshuffle(zstandard.ZstdDecompressor().decompress(stored), width) == piece
            placed.append((offset, stored_len))
    end = 0
    for offset, stored_len in sorted(placed):
        assert offset == end
        end += stored_len
    assert end == len(data)


def roundtrip(tmp_path, buffers, elem_sizes, chunk_size=CS, **kw):
    path = str(tmp_path / "rank-00000.dckpt")
    records = native.write_chunks(path, buffers, elem_sizes, chunk_size=chunk_size, **kw)
    check_oracle(path, buffers, records, elem_sizes, chunk_size)
    dests = [np.full(memoryview(b).nbytes, 0xAB, np.uint8) for b in buffers]
    native.read_chunks([path], dests, elem_sizes, records, threads=kw.get("threads", 0))
    for buf, dest in zip(buffers, dests):
        assert dest.tobytes() == bytes(memoryview(buf).cast("B"))
    flat = [r for recs in records for r in recs]
    widths = [w for recs, w in zip(records, elem_sizes) for _ in recs]
    assert native.verify_chunks([path], flat, widths) == []
    assert native.verify_chunks([path], flat, widths, deep=True) == []
    return path, records


def test_versions():
    assert native.version() == dckpt.__version__  # one version, from dckpt/__init__.py
    assert native.zstd_version().count(".") == 2


@pytest.mark.parametrize("size", [0, 1, 3, 16, 255, 4095, CS - 1, CS, CS + 1, 3 * CS + 7, 65_537])
def test_hash64_matches_xxhash(size):
    data = noise(size, seed=size)
    expected = xxhash.xxh3_64_intdigest(data.tobytes())
    assert native.hash64(data) == expected
    assert native.hash64(data.tobytes()) == expected
    assert native.hash64(memoryview(bytearray(data.tobytes()))) == expected


_ISA_CHECK = """
import sys, numpy as np, xxhash
import dckpt
from dckpt import _native as native
sizes = [0, 1, 3, 16, 17, 128, 129, 240, 241, 1000, 1024, 4095, 65_537, 1 << 20]
for n in sizes:  # one-shot: every length class of XXH3 (0-16, 17-128, 129-240, long)
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    assert native.hash64(data) == xxhash.xxh3_64_intdigest(data.tobytes()), n
# Streaming: a verified read hashes 256 KiB blocks of a 1 MiB + 5 chunk as they arrive.
data = np.random.default_rng(9).integers(0, 256, (1 << 20) + 5, dtype=np.uint8)
path = sys.argv[1]
(recs,) = native.write_chunks(path, [data], [1], chunk_size=1 << 21)
assert recs[0][5] == xxhash.xxh3_64_intdigest(data.tobytes())
out = np.zeros_like(data)
native.read_chunks([path], [out], [1], [recs], verify=True)
assert (out == data).all()
print(native.hash_isa())
"""


@pytest.mark.parametrize("isa", ["sse2", "avx2", "avx512"])
def test_every_xxh3_variant_matches_xxhash(tmp_path, isa):
    """XXH3 is compiled for SSE2, AVX2 and AVX-512 and picked at run time; DCKPT_XXH3 caps
    the pick so each variant this CPU runs is checked against the oracle, one-shot and
    streamed."""
    import subprocess
    res = subprocess.run([sys.executable, "-c", _ISA_CHECK, str(tmp_path / "f")],
                         capture_output=True, text=True, env={**os.environ, "DCKPT_XXH3": isa})
    assert res.returncode == 0, res.stderr[-2000:]
    ran = res.stdout.strip()
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    supported = {"sse2": True, "avx2": "avx2" in flags, "avx512": "avx512f" in flags}
    assert ran == isa if supported[isa] else ran in ("sse2", "avx2")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("codec", [0, 1, 2])
@pytest.mark.parametrize("size", [0, 1, 5, 4093, CS - 1, CS, CS + 1, 3 * CS + 7])
def test_roundtrip_sizes(tmp_path, size, codec, threads):
    roundtrip(tmp_path, [weights(size, seed=size)], [4], codec=codec, threads=threads)


@pytest.mark.parametrize("chunk_size", [1, 7, 1000, 1 << 16, 4 << 20])
def test_roundtrip_chunk_sizes(tmp_path, chunk_size):
    size = 20_000 if chunk_size < 1000 else 5 << 20
    roundtrip(tmp_path, [weights(size)], [4], chunk_size=chunk_size, codec=2, threads=2)


@pytest.mark.parametrize("width", [1, 2, 3, 4, 8, 16])
def test_shuffle_by_elem_size(tmp_path, width):
    # 10_007 is prime: every chunk-tail and element-tail combination occurs.
    _, records = roundtrip(tmp_path, [weights(10_007)], [width], codec=2, threads=2)
    codecs = {r[4] for r in records[0]}
    assert codecs == ({1} if width == 1 else {2})


@pytest.mark.parametrize("codec", [0, 1, 2])
def test_several_mib_default_chunks(tmp_path, codec):
    buffers = [weights(9 << 20), weights((4 << 20) + 1, seed=1), noise(100)]
    _, records = roundtrip(tmp_path, buffers, [4, 2, 1], chunk_size=4 << 20, codec=codec,
                           threads=2)
    if codec == 2:
        assert {r[4] for r in records[0]} == {2}


def test_many_buffers_of_mixed_kinds(tmp_path):
    buffers = [weights(n, seed=n) for n in (0, 1, 100, CS, 5 * CS + 3)]
    buffers += [noise(2 * CS), np.zeros(3 * CS, np.uint8)]
    roundtrip(tmp_path, buffers, [4, 1, 2, 8, 4, 2, 16], codec=2, threads=2)


@pytest.mark.parametrize("codec", [1, 2])
def test_incompressible_chunks_are_stored_raw(tmp_path, codec):
    data = noise(5 * CS + 11)
    path, records = roundtrip(tmp_path, [data], [4], codec=codec, threads=2)
    assert {r[4] for r in records[0]} == {0}
    assert os.path.getsize(path) == data.nbytes


def test_buffer_types(tmp_path):
    raw = weights(3 * CS + 5)
    floats = np.frombuffer(raw[: 3 * CS].tobytes(), np.float32).reshape(-1, 8)
    buffers = [raw.tobytes(), bytearray(raw.tobytes()), memoryview(raw), floats]
    roundtrip(tmp_path, buffers, [4, 4, 4, 4], codec=2, threads=2)


def test_write_from_address_and_nbytes(tmp_path):
    """A tensor's memory by (address, nbytes), as the save passes CPU tensors: the same
    file and records as from the buffer itself; a pair that names no memory is refused."""
    bufs = [weights(2 * CS + 7, seed=1), noise(999, seed=2), np.zeros(0, np.uint8)]
    pairs = [(b.ctypes.data, b.nbytes) for b in bufs]
    for codec in (0, 2):
        # One thread: the chunks' order in the file is then the same in both.
        by_buffer = native.write_chunks(str(tmp_path / "a"), bufs, [4, 1, 1], chunk_size=CS,
                                        codec=codec, threads=1)
        by_address = native.write_chunks(str(tmp_path / "b"), pairs, [4, 1, 1], chunk_size=CS,
                                         codec=codec, threads=1)
        assert by_address == by_buffer
        assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
        records = native.write_chunks(str(tmp_path / "c"), pairs, [4, 1, 1], chunk_size=CS,
                                      codec=codec, threads=2)
        dests = [np.zeros(b.nbytes, np.uint8) for b in bufs]
        native.read_chunks([str(tmp_path / "c")], dests, [4, 1, 1], records)
        assert all(np.array_equal(d, b) for d, b in zip(dests, bufs))
    for bad in [(0, 10), (-1, 10), (bufs[0].ctypes.data, -1), (1, 2, 3), ("a", 1)]:
        with pytest.raises(native.ChunkError) as e:
            native.write_chunks(str(tmp_path / "c"), [bad], [1])
        assert e.value.kind == "invalid_argument" and "buffers[0]" in str(e.value)


def test_records_of_a_given_tuple_type(tmp_path):
    """record_type: the records come back as that named tuple, field for field what the
    plain tuples hold (the save passes the manifest's Chunk); anything but a tuple subclass
    is refused."""
    from dckpt.format.manifest import Chunk
    bufs = [weights(2 * CS + 7, seed=3), noise(999, seed=4)]
    for codec in (0, 2):
        plain = native.write_chunks(str(tmp_path / "a"), bufs, [4, 1], chunk_size=CS,
                                    codec=codec, threads=1)
        typed = native.write_chunks(str(tmp_path / "b"), bufs, [4, 1], chunk_size=CS,
                                    codec=codec, threads=1, record_type=Chunk)
        assert [[type(r) for r in rs] for rs in typed] == [[Chunk] * 3, [Chunk]]
        assert [[tuple(r) for r in rs] for rs in typed] == plain
        assert typed[0][0].raw_hash == plain[0][0][5] and typed[1][0].raw == 999
    for bad in (list, int, "Chunk"):
        with pytest.raises(native.ChunkError) as e:
            native.write_chunks(str(tmp_path / "c"), bufs, [4, 1], record_type=bad)
        assert e.value.kind == "invalid_argument" and "record_type" in str(e.value)


def test_non_contiguous_or_readonly_buffers_are_rejected(tmp_path):
    path = str(tmp_path / "f")
    strided = np.zeros((64, 64), np.uint8)[:, ::2]
    with pytest.raises(native.ChunkError) as e:
        native.write_chunks(path, [strided], [1])
    assert e.value.kind == "invalid_argument"
    records = native.write_chunks(path, [b"abcd"], [1])
    with pytest.raises(native.ChunkError) as e:
        native.read_chunks([path], [b"\0\0\0\0"], [1], records)
    assert e.value.kind == "invalid_argument" and "writable" in str(e.value)


@pytest.mark.parametrize("fsync", [False, True])
def test_fsync_flag(tmp_path, fsync):
    roundtrip(tmp_path, [weights(2 * CS + 1)], [4], codec=1, fsync=fsync)


def test_default_arguments(tmp_path):
    path = str(tmp_path / "f")
    data = weights(100_000)
    records = native.write_chunks(path, [data], [4])
    assert len(records[0]) == 1 and records[0][0][4] == 0
    dest = np.empty_like(data)
    native.read_chunks([path], [dest], [4], records)
    assert (dest == data).all()


def test_file_index_and_pathlike(tmp_path):
    records = native.write_chunks(tmp_path / "f", [b"xyz"], [1], file_index=3)
    assert records[0][0][0] == 3
    dest = bytearray(3)
    native.read_chunks(["a", "b", "c", tmp_path / "f"], [dest], [1], records)
    assert dest == b"xyz"


def test_file_mode_follows_umask(tmp_path):
    old = os.umask(0o027)
    try:
        native.write_chunks(str(tmp_path / "f"), [b"x"], [1])
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "f").st_mode & 0o777 == 0o640


def test_rewrite_truncates(tmp_path):
    path = str(tmp_path / "f")
    native.write_chunks(path, [noise(50_000)], [1])
    native.write_chunks(path, [b"short"], [1])
    assert os.path.getsize(path) == 5


def test_prev_hashes_skip_unchanged_chunks(tmp_path):
    old_path, new_path = str(tmp_path / "old"), str(tmp_path / "new")
    a, b, c = weights(4 * CS, seed=1), weights(2 * CS + 3, seed=2), weights(CS, seed=3)
    old = native.write_chunks(old_path, [a, b, c], [4, 4, 4], chunk_size=CS, codec=2)
    a2 = a.copy()
    a2[2 * CS + 10] ^= 1  # chunk 2 of buffer a changes
    b2 = np.concatenate([b, weights(CS, seed=4)])  # buffer b grows by one chunk
    prev = [[r[5] for r in old[0]], [r[5] for r in old[1]], None]
    new = native.write_chunks(new_path, [a2, b2, c], [4, 4, 4], chunk_size=CS, codec=2,
                              file_index=1, prev_hashes=prev)

    assert [r[1] == -1 for r in new[0]] == [True, True, False, True]
    assert [r[1] == -1 for r in new[1]] == [True, True, False, False]
    assert [r[1] == -1 for r in new[2]] == [False]
    for r in new[0] + new[1]:
        if r[1] == -1:
            assert r[0] == 1 and r[2] == 0 and r[4] == 0 and r[6] == 0
    skipped = [r for r in new[0] + new[1] if r[1] == -1]
    written = sum(r[2] for recs in new for r in recs)
    assert os.path.getsize(new_path) == written and len(skipped) == 5

    merged = [[o if n[1] == -1 else n for o, n in zip(old[i] + [None] * 9, new[i])]
              for i in range(3)]
    dests = [np.empty_like(a2), np.empty_like(b2), np.empty_like(c)]
    native.read_chunks([old_path, new_path], dests, [4, 4, 4], merged)
    assert all((d == s).all() for d, s in zip(dests, [a2, b2, c]))


def test_prev_hash_raw_hash_is_set_on_skipped_chunks(tmp_path):
    data = weights(2 * CS)
    first = native.write_chunks(str(tmp_path / "a"), [data], [4], chunk_size=CS)
    again = native.write_chunks(str(tmp_path / "b"), [data], [4], chunk_size=CS,
                                prev_hashes=[[r[5] for r in first[0]]])
    assert again == [[(0, -1, 0, CS, 0, r[5], 0) for r in first[0]]]
    assert os.path.getsize(tmp_path / "b") == 0


@pytest.mark.parametrize("codec", [0, 1, 2])
def test_flipped_bit_in_every_chunk_is_detected(tmp_path, codec):
    buffers = [weights(3 * CS + 100, seed=5), weights(2 * CS, seed=6)]
    path, records = roundtrip(tmp_path, buffers, [4, 2], codec=codec, threads=2)
    flat = [(b, c, r) for b, recs in enumerate(records) for c, r in enumerate(recs)]
    widths = [4] * 4 + [2] * 2
    assert codec == 0 or any(r[4] == codec for _, _, r in flat)
    for index, (b, c, record) in enumerate(flat):
        expected_kind = "raw_hash" if record[4] == 0 else "stored_hash"
        position = record[1] + record[2] // 2
        flip_bit(path, position, 4)
        dests = [np.empty(len(buf), np.uint8) for buf in buffers]
        with pytest.raises(native.ChunkError) as e:
            native.read_chunks([path], dests, [4, 2], records, threads=2)
        err = e.value
        assert (err.kind, err.buffer_index, err.chunk_index) == (expected_kind, b, c)
        assert err.path == path and err.offset == record[1]
        assert f"buffer {b} chunk {c}" in str(err) and path in str(err)
        assert err.expected == (record[5] if record[4] == 0 else record[6])
        assert err.actual != err.expected
        for deep in (False, True):
            failures = native.verify_chunks([path], [r for _, _, r in flat], widths, deep=deep)
            assert [(f[0], f[1], f[2]) for f in failures] == [(index, "stored_hash", record[6])]
            assert failures[0][3] != record[6] and isinstance(failures[0][4], str)
        flip_bit(path, position, 4)
    native.read_chunks([path], [np.empty(len(b), np.uint8) for b in buffers], [4, 2], records)


def test_read_without_verify_skips_hash_checks(tmp_path):
    data = weights(2 * CS)
    path, records = roundtrip(tmp_path, [data], [4])
    flip_bit(path, 5, 4)
    dest = np.empty_like(data)
    native.read_chunks([path], [dest], [4], records, verify=False)
    assert (dest != data).sum() == 1


def test_chunk_error_attributes_and_pickle(tmp_path):
    with pytest.raises(native.ChunkError) as e:
        native.read_chunks([str(tmp_path / "missing")], [bytearray(4)], [1],
                           [[(0, 0, 4, 4, 0, 1, 1)]])
    err = e.value
    assert isinstance(err, Exception)
    assert (err.kind, err.buffer_index, err.chunk_index, err.offset) == ("missing_file", 0, 0, 0)
    assert err.expected is None and err.actual is None
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is native.ChunkError
    assert (again.kind, again.path, str(again)) == (err.kind, err.path, str(err))
    plain = native.ChunkError("boom")
    assert (plain.kind, plain.path, plain.chunk_index) == ("io", None, -1)


@pytest.mark.parametrize("kwargs", [
    dict(chunk_size=0), dict(chunk_size=(1 << 30) + 1), dict(codec=3), dict(codec=-1),
    dict(codec=1, level=1000), dict(threads=-1), dict(file_index=-1),
    dict(prev_hashes=[None, None]), dict(prev_hashes=[[-1]]), dict(prev_hashes=[[1 << 64]]),
])
def test_write_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(native.ChunkError) as e:
        native.write_chunks(str(tmp_path / "f"), [b"abc"], [1], **kwargs)
    assert e.value.kind == "invalid_argument"


@pytest.mark.parametrize("elem_sizes", [[], [0], [-4], [1, 1]])
def test_write_rejects_bad_elem_sizes(tmp_path, elem_sizes):
    with pytest.raises(native.ChunkError) as e:
        native.write_chunks(str(tmp_path / "f"), [b"abc"], elem_sizes)
    assert e.value.kind == "invalid_argument"


def test_write_into_missing_directory_is_an_io_error(tmp_path):
    with pytest.raises(native.ChunkError) as e:
        native.write_chunks(str(tmp_path / "no" / "f"), [b"abc"], [1])
    assert e.value.kind == "io" and "No such file or directory" in str(e.value)


def test_many_threads_and_auto_threads(tmp_path):
    buffers = [weights(17 * CS + 1)]
    roundtrip(tmp_path, buffers, [4], codec=2, threads=0)
    roundtrip(tmp_path, buffers, [4], codec=2, threads=64)


def test_concurrent_calls_share_the_pool(tmp_path):
    data = [weights(40 * CS + i, seed=i) for i in range(6)]
    errors = []

    def work(i):
        try:
            roundtrip(tmp_path / str(i), [data[i]], [4], codec=i % 3, threads=2)
        except BaseException as exc:  # reported below
            errors.append(exc)

    for i in range(6):
        (tmp_path / str(i)).mkdir()
    workers = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_pool_works_in_a_forked_child(tmp_path):
    data = weights(32 * CS)
    roundtrip(tmp_path, [data], [4], codec=2, threads=2)  # the pool now has threads
    pid = os.fork()
    if pid == 0:
        try:
            path = str(tmp_path / "child")
            records = native.write_chunks(path, [data], [4], chunk_size=CS, codec=2, threads=2)
            dest = np.empty_like(data)
            native.read_chunks([path], [dest], [4], records, threads=2)
            os._exit(0 if (dest == data).all() else 1)
        except BaseException:
            os._exit(2)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("native call in a forked child hung")


def test_gil_is_released(tmp_path):
    data = weights(32 << 20)
    path = str(tmp_path / "f")
    records = native.write_chunks(path, [data], [4], codec=2, threads=1, fsync=False)[0]
    entering = threading.Event()
    times = {}

    def work():
        entering.set()
        times["started"] = time.perf_counter()
        native.verify_chunks([path], records, [4] * len(records), deep=True, threads=1)
        times["finished"] = time.perf_counter()

    worker = threading.Thread(target=work)
    worker.start()
    entering.wait()
    resumed = time.perf_counter()  # impossible before the call ends if it holds the GIL
    worker.join()
    call = times["finished"] - times["started"]
    assert resumed - times["started"] < 0.5 * call, (resumed - times["started"], call)


@pytest.mark.parametrize("threads", [1, 2])
def test_runs_of_small_chunks(tmp_path, threads):
    """Small raw chunks go out several at a time (one pwritev of up to 256 KiB, at most 256
    pieces, csrc/write.cpp): sizes around the limits, tiny tensors in runs longer than the
    piece cap, large chunks in between, and previous hashes that skip some of a run."""
    big = 1 << 20  # one chunk per buffer: which are small is decided by their sizes
    rng = np.random.default_rng(9)
    sizes = ([4] * 600 + [1, 3, 4095, 4096, 4097, 46_700, 100_000, 262_143, 262_144,
                          262_145, 3 * big + 5] + list(rng.integers(1, 80_000, 200)))
    bufs = [noise(int(n), seed=i) for i, n in enumerate(sizes)]
    widths = [1] * len(bufs)
    roundtrip(tmp_path, bufs, widths, chunk_size=big, threads=threads)

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    first = native.write_chunks(a, bufs, widths, chunk_size=big)
    changed = [x.copy() for x in bufs]
    for i in range(0, len(changed), 3):  # every third buffer changes, in its last chunk
        changed[i][-1] ^= 1
    again = native.write_chunks(b, changed, widths, chunk_size=big, threads=threads,
                                prev_hashes=[[r[5] for r in recs] for recs in first])
    for i, recs in enumerate(again):
        assert [r[1] == -1 for r in recs][-1] == (i % 3 != 0), i
    assert os.path.getsize(b) == sum(r[2] for recs in again for r in recs)
    merged = [[o if n[1] == -1 else (1, *n[1:]) for o, n in zip(f, g)]
              for f, g in zip(first, again)]
    dests = [np.empty_like(x) for x in changed]
    native.read_chunks([a, b], dests, widths, merged)
    assert all((d == s).all() for d, s in zip(dests, changed))

    paths = [str(tmp_path / "m0"), str(tmp_path / "m1")]
    recs = native.write_chunks(paths, bufs, widths, chunk_size=big, threads=threads)
    dests = [np.empty_like(x) for x in bufs]
    native.read_chunks(paths, dests, widths, recs)
    assert all((d == s).all() for d, s in zip(dests, bufs))


def test_verify_reads_runs_of_small_chunks_and_names_each_failure(tmp_path):
    """Adjacent small chunks are checked from one read per run: every damaged chunk is still
    reported on its own, whatever the order of the records and across files with gaps."""
    bufs = [noise(5 + i % 7, seed=i) for i in range(300)]
    paths = [str(tmp_path / "a"), str(tmp_path / "b")]
    recs_a = native.write_chunks(paths[0], bufs[:200], [1] * 200, fsync=False)
    recs_b = native.write_chunks(paths[1], bufs[200:], [1] * 100, fsync=False, file_index=1)
    flat = [r[0] for r in recs_a + recs_b]
    skip = set(range(0, 300, 9))  # gaps: chunks whose neighbours are not checked
    order = [i for i in np.random.default_rng(0).permutation(300).tolist() if i not in skip]
    records = [flat[i] for i in order]
    assert native.verify_chunks(paths, records, [1] * len(records), threads=2) == []
    damaged = [1, 2, 150, 199, 200, 299]  # neighbours, the ends of both files
    for i in damaged:
        flip_bit(paths[flat[i][0]], flat[i][1] + flat[i][2] - 1, 3)
    failures = native.verify_chunks(paths, records, [1] * len(records), threads=2)
    assert sorted(order[f[0]] for f in failures) == [i for i in damaged if i not in skip]
    assert all(f[1] == "stored_hash" and f[2] == records[f[0]][6] != f[3] for f in failures)

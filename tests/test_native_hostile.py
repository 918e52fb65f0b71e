"""Hostile chunk records and damaged files: every one is a typed error, never a crash.

Self-contained (no conftest, no other dckpt module) so that csrc/asan_test.sh can run it
against an AddressSanitizer build of the native core.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import xxhash
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dckpt import _native as native

CS = 8192
KINDS = {"stored_hash", "raw_hash", "missing_file", "out_of_bounds", "corrupt_frame",
         "invalid_record", "io", "invalid_argument"}
OFFSET, STORED, RAW, CODEC, RAW_HASH, STORED_HASH = 1, 2, 3, 4, 5, 6


def weights(nbytes, seed):
    values = (np.random.default_rng(seed).standard_normal(nbytes // 4) * 0.02).astype(np.float32)
    return np.frombuffer(values.tobytes(), np.uint8).copy()


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """A file whose buffer 0 is shuffled zstd, buffer 1 plain zstd and buffer 2 raw."""
    path = str(tmp_path_factory.mktemp("hostile") / "rank-00000.dckpt")
    noise = np.random.default_rng(3).integers(0, 256, 2 * CS + 5, dtype=np.uint8)
    buffers = [weights(3 * CS, 1), weights(2 * CS + 1000, 2), noise]
    widths = [4, 1, 2]
    records = native.write_chunks(path, buffers, widths, chunk_size=CS, codec=2, threads=2)
    assert [{r[CODEC] for r in recs} for recs in records] == [{2}, {1}, {0}]
    return path, buffers, widths, records


def with_field(record, field, value):
    r = list(record)
    r[field] = value
    return tuple(r)


def read(paths, buffers, widths, records, dests=None, verify=True):
    if dests is None:
        dests = [np.zeros(len(b), np.uint8) for b in buffers]
    native.read_chunks(paths, dests, widths, records, verify=verify, threads=2)
    return dests


def expect_read_error(kind, paths, buffers, widths, records, where=None, **kw):
    with pytest.raises(native.ChunkError) as e:
        read(paths, buffers, widths, records, **kw)
    assert e.value.kind == kind, str(e.value)
    if where is not None:
        assert (e.value.buffer_index, e.value.chunk_index) == where
    return e.value


def verify_failures(paths, records, widths, deep):
    flat = [r for recs in records for r in recs]
    flat_widths = [w for recs, w in zip(records, widths) for _ in recs]
    failures = native.verify_chunks(paths, flat, flat_widths, deep=deep, threads=2)
    for index, kind, expected, actual, message in failures:
        assert 0 <= index < len(flat) and kind in KINDS and isinstance(message, str)
        assert 0 <= expected < 2**64 and 0 <= actual < 2**64
    return [(index, kind) for index, kind, *_ in failures]


def flat_index(records, b, c):
    return sum(len(r) for r in records[:b]) + c


BAD_FIELDS = [
    # (name, field, value, read kind)
    ("offset past EOF", OFFSET, 10**9, "out_of_bounds"),
    ("offset+len past 2^63", OFFSET, 2**63 - 1, "out_of_bounds"),
    ("offset 2^64-1", OFFSET, 2**64 - 1, "invalid_record"),
    ("offset beyond 64 bits", OFFSET, 2**80, "invalid_record"),
    ("negative offset", OFFSET, -1, "invalid_record"),
    ("negative stored_len", STORED, -5, "invalid_record"),
    ("negative raw_len", RAW, -CS, "invalid_record"),
    ("huge raw_len", RAW, 2**40, "invalid_record"),
    ("raw_len 2^63-1", RAW, 2**63 - 1, "invalid_record"),
    ("stored_len over zstd bound", STORED, 2 * CS, "invalid_record"),
    ("unknown codec", CODEC, 7, "invalid_record"),
    ("negative codec", CODEC, -1, "invalid_record"),
    ("file_index out of range", 0, 1, "invalid_record"),
    ("negative file_index", 0, -1, "invalid_record"),
    ("negative hash", RAW_HASH, -1, "invalid_record"),
    ("hash beyond 64 bits", STORED_HASH, 2**64, "invalid_record"),
]


@pytest.mark.parametrize("name,field,value,kind", BAD_FIELDS, ids=[b[0] for b in BAD_FIELDS])
@pytest.mark.parametrize("b", [0, 2])
def test_bad_record_field(valid, name, field, value, kind, b):
    path, buffers, widths, records = valid
    bad = [list(r) for r in records]
    bad[b][1] = with_field(bad[b][1], field, value)
    dests = [np.full(len(x), 7, np.uint8) for x in buffers]
    expect_read_error(kind, [path], buffers, widths, bad, where=(b, 1), dests=dests)
    # Nothing is read before every record checks out.
    assert all((d == 7).all() for d in dests)
    for deep in (False, True):
        assert verify_failures([path], bad, widths, deep) == [(flat_index(bad, b, 1), kind)]


def test_raw_record_must_be_self_consistent(valid):
    path, buffers, widths, records = valid
    for field, value in ((STORED, records[2][0][STORED] - 1), (STORED_HASH, 12345)):
        bad = [list(r) for r in records]
        bad[2][0] = with_field(bad[2][0], field, value)
        expect_read_error("invalid_record", [path], buffers, widths, bad, where=(2, 0))


@pytest.mark.parametrize("delta", [-1, 1, -CS])
def test_raw_lengths_must_match_destination(valid, delta):
    path, buffers, widths, records = valid
    dests = [np.zeros(len(b), np.uint8) for b in buffers]
    dests[1] = np.zeros(len(buffers[1]) + delta, np.uint8)
    err = expect_read_error("invalid_record", [path], buffers, widths, records, dests=dests)
    assert err.buffer_index == 1 and "destination" in str(err)


def test_record_claiming_another_size_is_caught(valid):
    path, buffers, widths, records = valid
    bad = [list(r) for r in records]
    # Shrink chunk 0 and grow chunk 1 so the sum still matches the destination.
    bad[0][0] = with_field(bad[0][0], RAW, CS - 4)
    bad[0][1] = with_field(bad[0][1], RAW, CS + 4)
    # Both chunks fail, on two threads: the lower-numbered one is reported, every time.
    for _ in range(50):
        expect_read_error("corrupt_frame", [path], buffers, widths, bad, where=(0, 0))
    assert verify_failures([path], bad, widths, deep=False) == []
    assert verify_failures([path], bad, widths, deep=True) == [(0, "corrupt_frame"), (1, "corrupt_frame")]


@pytest.mark.parametrize("bad_args", [
    dict(paths=[], kind="invalid_record"),
    dict(records_shape="six fields", kind="invalid_argument"),
    dict(records_shape="str field", kind="invalid_argument"),
    dict(records_shape="not a list", kind="invalid_argument"),
    dict(elem_sizes=[4, 1], kind="invalid_argument"),
    dict(elem_sizes=[0, 1, 2], kind="invalid_argument"),
])
def test_malformed_arguments(valid, bad_args):
    path, buffers, widths, records = valid
    paths = bad_args.get("paths", [path])
    widths = bad_args.get("elem_sizes", widths)
    records = [list(r) for r in records]
    shape = bad_args.get("records_shape")
    if shape == "six fields":
        records[0][0] = records[0][0][:6]
    elif shape == "str field":
        records[0][0] = with_field(records[0][0], OFFSET, "0")
    elif shape == "not a list":
        records[0] = 5
    expect_read_error(bad_args["kind"], paths, buffers, widths, records)


def test_destinations_by_address(valid):
    """A destination may be an (address, nbytes) pair (how torch tensors are passed): it
    reads like the buffer there, and a malformed pair is refused before any read."""
    path, buffers, widths, records = valid
    dests = [np.zeros(len(b), np.uint8) for b in buffers]
    pairs = [(d.ctypes.data, d.nbytes) for d in dests]
    native.read_chunks([path], pairs, widths, records, threads=2)
    assert all(np.array_equal(d, b) for d, b in zip(dests, buffers))
    address, nbytes = pairs[2]
    for bad in [(address,), (address, nbytes, 0), (address, -1), (0, nbytes), (address, "1"),
                (-address, nbytes), (2**64, nbytes), (address, 2**63)]:
        dests[2][:] = 7
        with pytest.raises(native.ChunkError) as e:
            native.read_chunks([path], pairs[:2] + [bad], widths, records, threads=2)
        assert e.value.kind == "invalid_argument", str(e.value)
        assert np.all(dests[2] == 7)
    expect_read_error("invalid_record", [path], buffers, widths, records,
                      dests=dests[:2] + [(address, nbytes - 1)])


def test_missing_file(valid, tmp_path):
    path, buffers, widths, records = valid
    other = str(tmp_path / "rank-00001.dckpt")
    bad = [list(r) for r in records]
    bad[1] = [with_field(r, 0, 1) for r in bad[1]]
    err = expect_read_error("missing_file", [path, other], buffers, widths, bad, where=(1, 0))
    assert err.path == other
    for deep in (False, True):
        assert verify_failures([path, other], bad, widths, deep) == [(3, "missing_file"),
                                                                     (4, "missing_file"),
                                                                     (5, "missing_file")]


def test_directory_and_fifo_instead_of_file(valid, tmp_path):
    path, buffers, widths, records = valid
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    for bogus in (str(tmp_path), fifo):
        err = expect_read_error("io", [bogus], buffers, widths, records, where=(0, 0))
        assert err.path == bogus
        assert {k for _, k in verify_failures([bogus], records, widths, False)} == {"io"}


def test_truncated_file(valid, tmp_path):
    path, buffers, widths, records = valid
    short = str(tmp_path / "short")
    with open(path, "rb") as f:
        data = f.read()
    flat = [r for recs in records for r in recs]
    cut = sorted(r[OFFSET] for r in flat)[len(flat) // 2] + 1
    with open(short, "wb") as f:
        f.write(data[:cut])
    expect_read_error("out_of_bounds", [short], buffers, widths, records)
    beyond = {i for i, r in enumerate(flat) if r[OFFSET] + r[STORED] > cut}
    for deep in (False, True):
        failures = verify_failures([short], records, widths, deep)
        assert failures == [(i, "out_of_bounds") for i in sorted(beyond)]


def write_file_with(tmp_path, payload):
    path = str(tmp_path / "crafted")
    with open(path, "wb") as f:
        f.write(payload)
    return path


def frame_record(payload, raw_len, codec=1, raw_hash=0):
    return (0, 0, len(payload), raw_len, codec, raw_hash, xxhash.xxh3_64_intdigest(payload))


CRAFTED = {
    "garbage": (b"\x28\xb5\x2f\xfd" + bytes(range(60)), 100),
    "not zstd": (b"hello, this is not a zstd frame at all", 40),
    "content size too big": (zstandard.ZstdCompressor().compress(b"a" * 200), 100),
    "content size too small": (zstandard.ZstdCompressor().compress(b"a" * 50), 100),
    "no content size, decodes to more": (
        zstandard.ZstdCompressor(write_content_size=False).compress(b"b" * 300), 100),
    "no content size, decodes to less": (
        zstandard.ZstdCompressor(write_content_size=False).compress(b"b" * 30), 100),
    "two frames": (zstandard.ZstdCompressor().compress(b"c" * 50) * 2, 100),
    "truncated frame": (zstandard.ZstdCompressor().compress(bytes(range(256)) * 4)[:-3], 1024),
    "empty": (b"", 16),
}


@pytest.mark.parametrize("codec", [1, 2])
@pytest.mark.parametrize("name", list(CRAFTED))
def test_undecodable_frames(tmp_path, name, codec):
    payload, raw_len = CRAFTED[name]
    path = write_file_with(tmp_path, payload)
    record = frame_record(payload, raw_len, codec)
    err = expect_read_error("corrupt_frame", [path], [bytes(raw_len)], [4], [[record]],
                            where=(0, 0))
    assert err.path == path
    assert verify_failures([path], [[record]], [4], deep=False) == []
    assert verify_failures([path], [[record]], [4], deep=True) == [(0, "corrupt_frame")]


def test_valid_crafted_frame_reads(tmp_path):
    raw = bytes(range(256)) * 8
    payload = zstandard.ZstdCompressor(write_content_size=False).compress(raw)
    path = write_file_with(tmp_path, payload)
    record = frame_record(payload, len(raw), raw_hash=xxhash.xxh3_64_intdigest(raw))
    dest = read([path], [raw], [1], [[record]])[0]
    assert dest.tobytes() == raw


def test_file_changed_after_validation_is_an_error_not_a_crash(valid, tmp_path):
    # Records that pass validation against a file that is then rewritten: the stored
    # hash still guards the data.
    path, buffers, widths, records = valid
    copy = str(tmp_path / "copy")
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[records[0][2][OFFSET] + 3] ^= 0xFF
    with open(copy, "wb") as f:
        f.write(data)
    expect_read_error("stored_hash", [copy], buffers, widths, records, where=(0, 2))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_records_never_crash(valid, data):
    path, buffers, widths, records = valid
    flat_positions = [(b, c) for b, recs in enumerate(records) for c in range(len(recs))]
    bad = [list(r) for r in records]
    for _ in range(data.draw(st.integers(1, 3))):
        b, c = data.draw(st.sampled_from(flat_positions))
        field = data.draw(st.integers(0, 6))
        value = data.draw(st.one_of(
            st.sampled_from([0, 1, -1, 2, CS, CS - 1, CS + 1, 2**31, 2**32, 2**62, 2**63 - 1,
                             2**63, 2**64 - 1, 2**64, -(2**63), os.path.getsize(path)]),
            st.integers(-(2**70), 2**70)))
        bad[b][c] = with_field(bad[b][c], field, value)
    dests = [np.zeros(len(x), np.uint8) for x in buffers]
    try:
        read([path], buffers, widths, bad, dests=dests)
    except native.ChunkError as e:
        assert e.kind in KINDS - {"invalid_argument", "io"}, str(e)
    else:
        # Verified success means the bytes are the real ones.
        assert all(d.tobytes() == b.tobytes() for d, b in zip(dests, buffers))
    verify_failures([path], bad, widths, deep=data.draw(st.booleans()))


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(position=st.integers(0, 10**9), flip=st.integers(1, 255))
def test_corrupted_byte_anywhere_is_detected(valid, tmp_path_factory, position, flip):
    path, buffers, widths, records = valid
    with open(path, "rb") as f:
        data = bytearray(f.read())
    position %= len(data)
    data[position] ^= flip
    copy = str(tmp_path_factory.mktemp("flip") / "f")
    with open(copy, "wb") as f:
        f.write(data)
    with pytest.raises(native.ChunkError) as e:
        read([copy], buffers, widths, records)
    assert e.value.kind in ("stored_hash", "raw_hash")
    assert len(verify_failures([copy], records, widths, deep=False)) == 1


DISK_FULL = textwrap.dedent("""
    import resource, signal, sys
    import numpy as np
    from dckpt import _native
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    data = np.random.default_rng(0).integers(0, 256, 8 << 20, dtype=np.uint8)
    try:
        _native.write_chunks(sys.argv[1], [data], [1], chunk_size=1 << 18,
                             codec=int(sys.argv[2]), threads=2)
    except _native.ChunkError as e:
        print(e.kind, e.path, e)
        sys.exit(0)
    print("no error")
    sys.exit(1)
""")


@pytest.mark.parametrize("codec", [0, 1])
def test_disk_full_is_an_io_error(tmp_path, codec):
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(native.__file__)))
    env = dict(os.environ, PYTHONPATH=package_root)
    target = str(tmp_path / "full.dckpt")
    proc = subprocess.run([sys.executable, "-c", DISK_FULL, target, str(codec)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"io {target} ")
    assert "File too large" in proc.stdout


def test_verify_raises_only_for_bad_arguments(valid):
    path, _, _, records = valid
    flat = [r for recs in records for r in recs]
    for chunks, widths in (
        (flat, [4] * (len(flat) - 1)),  # one elem size per chunk
        (flat[:1] + [flat[1][:6]], [4, 4]),  # a record needs 7 fields
        ([("0", 0, 1, 1, 0, 0, 0)], [1]),  # fields are ints
        (flat[:1], [0]),  # elem sizes are >= 1
    ):
        with pytest.raises(native.ChunkError) as e:
            native.verify_chunks([path], chunks, widths)
        assert e.value.kind == "invalid_argument"

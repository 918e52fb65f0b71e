"""The native reader fed mutated chunk records, destinations and files: it must answer with
ChunkError or exactly the chunks the records name, never crash or touch memory it does not
own. Needs only numpy and the native module (no torch), so `make asan` (csrc/asan_test.sh)
runs it against an AddressSanitizer + UBSan build of the core."""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dckpt import _native as native

SLOW = os.environ.get("DCKPT_SLOW") == "1"
EXAMPLES = 5000 if SLOW else 300
CS = 4096
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=not SLOW,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """Three buffers (floats, bytes, int16) written raw, zstd and zstd+shuffle."""
    d = tmp_path_factory.mktemp("native_fuzz")
    rng = np.random.default_rng(0)
    floats = (rng.standard_normal(3000) * 0.01).astype(np.float32).view(np.uint8)
    buffers = [floats, rng.integers(0, 4, 9000, dtype=np.uint8),
               np.arange(5000, dtype=np.int16).view(np.uint8)]
    widths = [4, 1, 2]
    out = {}
    for codec in (0, 1, 2):
        path = str(d / f"codec{codec}.dckpt")
        records = native.write_chunks(path, buffers, widths, chunk_size=CS, codec=codec)
        out[codec] = (path, [[list(r) for r in rs] for rs in records])
    fifo = d / "fifo"
    os.mkfifo(fifo)
    return {"files": out, "buffers": buffers, "widths": widths, "dir": d, "fifo": str(fifo)}


BOUNDARY = [0, 1, -1, 2, 7, 4095, 4096, 4097, 2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1,
            2**63, 2**64 - 1, 2**64, -2**63, -2**63 - 1, 1 << 30, (1 << 30) + 1]
ints = st.one_of(st.sampled_from(BOUNDARY), st.integers(-2**64, 2**66), st.integers(0, 70000))


def mutate_records(data, records, size):
    recs = [[list(r) for r in rs] for rs in records]
    flat = [r for rs in recs for r in rs]
    for _ in range(data.draw(st.integers(1, 4))):
        r = data.draw(st.sampled_from(flat))
        field = data.draw(st.integers(0, 6))
        if field == 1:
            r[1] = data.draw(st.one_of(ints, st.sampled_from([size, size - 1, size + 1])))
        elif field in (5, 6):
            r[field] = data.draw(st.one_of(st.sampled_from([r[5], r[6], 0, 2**64 - 1]),
                                           st.integers(0, 2**64 - 1), st.sampled_from([-1, 2**64])))
        else:
            r[field] = data.draw(ints)
    if data.draw(st.booleans()):  # structural edits: drop, duplicate or move a record
        rs = data.draw(st.sampled_from(recs))
        if rs:
            i = data.draw(st.integers(0, len(rs) - 1))
            op = data.draw(st.sampled_from(["drop", "dup", "swap"]))
            if op == "drop":
                rs.pop(i)
            elif op == "dup":
                rs.insert(i, list(rs[i]))
            else:
                rs[0], rs[i] = rs[i], rs[0]
    return recs


@SETTINGS
@given(data=st.data())
def test_read_with_mutated_records(stored, data):
    codec = data.draw(st.sampled_from([0, 1, 2]))
    path, records = stored["files"][codec]
    recs = mutate_records(data, records, os.path.getsize(path))
    sizes = [len(b) + data.draw(st.sampled_from([0, 0, 0, -1, 1, -4096]))
             for b in stored["buffers"]]
    dests = [np.full(max(n, 0), 0xAB, np.uint8) for n in sizes]
    verify = data.draw(st.booleans())
    threads = data.draw(st.sampled_from([0, 1, 3]))
    try:
        native.read_chunks([path], dests, stored["widths"], recs, verify=verify, threads=threads)
    except native.ChunkError as e:
        assert e.kind in ("invalid_argument", "invalid_record", "out_of_bounds", "stored_hash",
                          "raw_hash", "corrupt_frame"), (e.kind, str(e))
        return
    if verify:  # accepted with hashes checked: exactly the chunks the records name, in order
        by_hash = {r[5]: bytes(buf[c * CS:(c + 1) * CS])
                   for buf, rs in zip(stored["buffers"], records) for c, r in enumerate(rs)}
        for rs, dest in zip(recs, dests):
            assert dest.tobytes() == b"".join(by_hash[r[5]] for r in rs)


@SETTINGS
@given(data=st.data())
def test_verify_with_mutated_records(stored, data):
    codec = data.draw(st.sampled_from([0, 1, 2]))
    path, records = stored["files"][codec]
    recs = mutate_records(data, records, os.path.getsize(path))
    flat = [r for rs in recs for r in rs]
    widths = [w for rs, w in zip(recs, stored["widths"]) for _ in rs]
    try:
        failures = native.verify_chunks([path], flat, widths, deep=data.draw(st.booleans()),
                                        threads=data.draw(st.sampled_from([0, 2])))
    except native.ChunkError as e:
        assert e.kind == "invalid_argument", (e.kind, str(e))
        return
    assert all(0 <= f[0] < len(flat) for f in failures)
    originals = {tuple(r) for rs in records for r in rs}
    for i, r in enumerate(flat):  # a changed record fails or still describes good bytes
        if tuple(r) in originals:
            assert i not in {f[0] for f in failures}


@SETTINGS
@given(data=st.data())
def test_read_from_hostile_files(stored, data):
    """Valid records against the wrong file: missing, a directory, a FIFO, /dev/zero, an
    empty file, another codec's file, a truncated copy."""
    codec = data.draw(st.sampled_from([0, 1, 2]))
    path, records = stored["files"][codec]
    d = stored["dir"]
    choice = data.draw(st.sampled_from(["missing", "dir", "fifo", "devzero", "empty", "other",
                                        "truncated"]))
    if choice == "missing":
        target = str(d / "no-such-file")
    elif choice == "dir":
        target = str(d)
    elif choice == "fifo":
        target = stored["fifo"]
    elif choice == "devzero":
        target = "/dev/zero"
    elif choice == "empty":
        target = str(d / "empty")
        open(target, "wb").close()
    elif choice == "other":
        target = stored["files"][(codec + 1) % 3][0]
    else:
        target = str(d / f"trunc{codec}")
        blob = open(path, "rb").read()
        with open(target, "wb") as f:
            f.write(blob[:data.draw(st.integers(0, len(blob) - 1))])
    dests = [np.zeros(len(b), np.uint8) for b in stored["buffers"]]
    with pytest.raises(native.ChunkError) as e:
        native.read_chunks([target], dests, stored["widths"], records)
    assert e.value.kind in ("missing_file", "io", "out_of_bounds", "stored_hash", "raw_hash",
                            "corrupt_frame")

"""Coalesced ranged reads of a remote load (storage/ranges.py, ObjectStore.get_scatter,
RemoteStorage.read_into): odd and hostile chunk layouts, bitwise loads through few GETs,
damage still named by tensor and chunk, a truncated range, bounded memory."""
from __future__ import annotations

import random
import tracemalloc

import boto3
import numpy as np
import pytest
import torch

import dckpt
from helpers import s3server
from dckpt.errors import CorruptCheckpointError, IncompleteCheckpointError
from dckpt.storage import objectstore, ranges


def _check_plan(pieces, spans, max_bytes, max_gap):
    seen = sorted(i for s in spans for i in s.pieces)
    assert seen == list(range(len(pieces)))  # each piece in exactly one span
    for s in spans:
        mine = [pieces[i] for i in s.pieces]
        assert all(f == s.file for f, _, _ in mine)
        assert s.start == mine[0][1] and s.stop == max(o + n for _, o, n in mine)
        for (_, o1, n1), (_, o2, _) in zip(mine, mine[1:]):
            assert o1 + n1 <= o2 <= o1 + n1 + max_gap  # in order, disjoint, small gaps
        assert len(mine) == 1 or s.stop - s.start <= max_bytes
    sizes = [s.stop - s.start for s in spans]
    assert sizes == sorted(sizes, reverse=True)


def test_coalesce_hostile_and_odd_layouts():
    rng = random.Random(7)
    for trial in range(300):
        n = rng.randrange(0, 40)
        pieces = []
        at = {f: 0 for f in range(3)}
        for _ in range(n):
            f = rng.randrange(3)
            kind = rng.random()
            length = rng.choice([0, 1, 7, 4096, 100_000, 3 << 20])
            if kind < 0.15 and pieces:  # a duplicate or overlap of an earlier chunk
                f, o, ln = rng.choice(pieces)
                pieces.append((f, o + rng.randrange(0, max(ln, 1)), length))
                continue
            gap = rng.choice([0, 0, 0, 1, 4095, ranges.MAX_GAP, ranges.MAX_GAP + 1])
            pieces.append((f, at[f] + gap, length))
            at[f] += gap + length
        if rng.random() < 0.3:
            rng.shuffle(pieces)  # manifest order unrelated to file order
        max_bytes = rng.choice([1, 4096, 1 << 20, 64 << 20])
        spans = ranges.coalesce(pieces, max_bytes)
        _check_plan(pieces, spans, max_bytes, ranges.MAX_GAP)


def test_coalesce_joins_what_it_should_and_nothing_else():
    # back to back across "tensors": one span
    assert [(s.start, s.stop, s.pieces) for s in
            ranges.coalesce([(0, 0, 10), (0, 10, 10), (0, 20, 5)], 1 << 20)] == \
        [(0, 25, [0, 1, 2])]
    # the same offsets in another object, a gap too wide, an overlap: never joined
    assert len(ranges.coalesce([(0, 0, 10), (1, 10, 10)], 1 << 20)) == 2
    assert len(ranges.coalesce([(0, 0, 10), (0, 10 + ranges.MAX_GAP + 1, 1)], 1 << 30)) == 2
    assert len(ranges.coalesce([(0, 0, 10), (0, 10 + ranges.MAX_GAP, 1)], 1 << 30)) == 1
    assert len(ranges.coalesce([(0, 0, 10), (0, 5, 10)], 1 << 20)) == 2
    assert len(ranges.coalesce([(0, 0, 10), (0, 0, 10)], 1 << 20)) == 2
    # the size limit: a chunk larger than it is a span of its own, never split
    spans = ranges.coalesce([(0, 0, 100), (0, 100, 30), (0, 130, 30)], 64)
    assert sorted((s.start, s.stop) for s in spans) == [(0, 100), (100, 160)]
    assert ranges.span_bytes(1000, 4, 8 << 20, 64 << 20) == 8 << 20
    assert ranges.span_bytes(1 << 30, 4, 8 << 20, 64 << 20) == 64 << 20
    assert ranges.span_bytes(1 << 30, 4, 8 << 20, 1 << 20) == 1 << 20  # the high limit wins


def many_tensors(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(40):
        n = [1, 3, 257, 4099, 70_001][i % 5]
        t = torch.randn(n, generator=g)
        out[f"t{i:02d}"] = t.to([torch.float32, torch.bfloat16, torch.float16][i % 3])
    out["empty"] = torch.zeros(0)
    return out


def _count_gets(monkeypatch) -> list:
    calls = []
    real = objectstore.ObjectStore.get_scatter

    def counted(self, url, start, stop, targets):
        calls.append((start, stop, len(targets)))
        return real(self, url, start, stop, targets)
    monkeypatch.setattr(objectstore.ObjectStore, "get_scatter", counted)
    return calls


@pytest.mark.parametrize("range_bytes", [None, 256 << 10])
def test_load_is_bitwise_through_few_coalesced_gets(s3_bucket, monkeypatch, range_bytes):
    if range_bytes:
        monkeypatch.setenv("DCKPT_REMOTE_RANGE_BYTES", str(range_bytes))
    st = many_tensors()
    url = f"s3://{s3_bucket}/ck"
    dckpt.save(st, url, chunk_size=64 << 10)
    m = dckpt.read_manifest(url)
    nchunks = sum(len(s.chunks) for t in m.tensors.values() for s in t.shards)
    calls = _count_gets(monkeypatch)
    out = {k: torch.full_like(v, 3.0) for k, v in st.items()}
    dckpt.load(url, into=out)
    for k, v in st.items():
        assert torch.equal(out[k].view(torch.uint8), v.view(torch.uint8)), k
    total = sum(b - a for a, b, _ in calls)
    assert nchunks > 40 and sum(n for _, _, n in calls) == nchunks  # each chunk once
    if range_bytes is None:
        assert len(calls) == 1  # 1 MB of chunks of 41 tensors: one request
    else:
        assert all(b - a <= range_bytes for a, b, _ in calls)
        assert len(calls) <= 2 * -(-total // range_bytes)


@pytest.mark.parametrize("range_bytes", [None, 200 << 10])
def test_flipped_bit_in_a_coalesced_get_is_named_by_tensor_and_chunk(
        s3_endpoint, s3_bucket, monkeypatch, range_bytes):
    if range_bytes:
        monkeypatch.setenv("DCKPT_REMOTE_RANGE_BYTES", str(range_bytes))
    st = many_tensors(1)
    url = f"s3://{s3_bucket}/ck"
    dckpt.save(st, url, chunk_size=64 << 10)
    m = dckpt.read_manifest(url)
    ch = m.tensors["t24"].shards[0].chunks[3]  # 70_001 float32 values: 5 chunks
    c = boto3.client("s3", **s3server._boto_args(s3_endpoint))
    key = "ck/rank-00000.dckpt"
    body = bytearray(c.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
    body[ch.offset + 1000] ^= 0x10
    c.put_object(Bucket=s3_bucket, Key=key, Body=bytes(body))
    with pytest.raises(CorruptCheckpointError) as e:
        dckpt.load(url, into={k: torch.empty_like(v) for k, v in st.items()})
    assert e.value.tensor == "t24" and e.value.chunk == 3
    assert "t24" in str(e.value) and "chunk 3" in str(e.value) and key in str(e.value)
    assert e.value.offset == ch.offset


def test_get_scatter_fills_targets_and_names_where_an_object_ends(s3_bucket):
    store = objectstore.connect(f"s3://{s3_bucket}")
    data = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8)
    url = f"s3://{s3_bucket}/obj"
    store.put_bytes(url, data.tobytes())
    # odd targets with gaps between them; the bytes in the gaps are dropped
    a, b, c = np.zeros(1, np.uint8), np.zeros(1 << 20, np.uint8), np.zeros(12345, np.uint8)
    store.get_scatter(url, 10, (2 << 20) + 12345, [(10, a), (100, b), (2 << 20, c)])
    assert a[0] == data[10] and np.array_equal(b, data[100:100 + (1 << 20)])
    assert np.array_equal(c, data[2 << 20:(2 << 20) + 12345])
    # past the end: the error says where the object ended
    out = np.zeros(2 << 20, np.uint8)
    with pytest.raises(IncompleteCheckpointError, match="truncated") as e:
        store.get_scatter(url, 2 << 20, 4 << 20, [(2 << 20, out)])
    assert e.value.offset == 3 << 20
    assert np.array_equal(out[:1 << 20], data[2 << 20:])
    with pytest.raises(IncompleteCheckpointError, match="truncated") as e:
        store.get_scatter(url, 5 << 20, 6 << 20, [(5 << 20, np.zeros(1 << 20, np.uint8))])
    assert e.value.offset == 5 << 20
    with pytest.raises(IncompleteCheckpointError, match="missing"):
        store.get_scatter(url + "-absent", 0, 10, [(0, np.zeros(10, np.uint8))])


def test_a_large_coalesced_get_holds_little_memory(s3_bucket):
    """The response is streamed into the destination: a 24 MiB range costs the process a
    few MiB, not the range."""
    store = objectstore.connect(f"s3://{s3_bucket}")
    url = f"s3://{s3_bucket}/big"
    store.put_bytes(url, bytes(range(256)) * (96 << 12))
    dest = np.zeros(24 << 20, np.uint8)
    tracemalloc.start()
    store.get_scatter(url, 0, 24 << 20, [(0, dest)])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert dest[255] == 255 and dest[-1] == 255
    assert peak < 6 << 20, peak


@pytest.mark.parametrize("size", [6 << 20, (12 << 20) + 7])
def test_etag_computed_during_the_upload_is_the_servers(s3_bucket, tmp_path, size):
    """One PUT below two parts, else parts of the part size: the ETag computed while the
    bytes travel is the one the server gives (else every checked upload would fail)."""
    f = tmp_path / "blob"
    f.write_bytes(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes())
    store = objectstore.connect(f"s3://{s3_bucket}")
    info = store.put_file(f, f"s3://{s3_bucket}/blob", part_size=5 << 20)
    parts = 0 if size < 10 << 20 else 3
    assert info.etag == objectstore._md5_etag_cut(f, size, 5 << 20 if parts else 0)[1]
    assert info.etag.endswith("-3") == bool(parts)


def test_a_failed_multipart_upload_is_aborted_leaving_nothing(s3_endpoint, s3_bucket, tmp_path):
    """A part that cannot be read (here: the file is shorter than the upload expects) fails
    the upload: the other parts are cancelled and the multipart upload aborted, so neither
    an object nor stored parts remain."""
    from fsspec.asyn import sync
    f = tmp_path / "blob"
    f.write_bytes(b"x" * (11 << 20))
    store = objectstore.connect(f"s3://{s3_bucket}")
    url = f"s3://{s3_bucket}/blob"
    with pytest.raises(OSError, match="shrank"):
        sync(store.fs.loop, store._upload_s3, str(f), url, 16 << 20, 5 << 20, 2)
    c = boto3.client("s3", **s3server._boto_args(s3_endpoint))
    assert not c.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
    assert store.info(url) is None
    # the same file with its true size goes up whole, in 3 parts
    info = store.put_file(f, url, part_size=5 << 20)
    assert info.size == 11 << 20 and info.etag.endswith("-3")


def test_compressed_chunks_share_gets_and_damage_is_still_named(s3_endpoint, s3_bucket,
                                                                 monkeypatch):
    """zstd chunks close together are fetched by one GET and decoded one by one: the load
    is bitwise, and a flipped bit names its tensor and chunk."""
    st = {f"t{i:02d}": (torch.arange(30_000 + 17 * i) % 97).to(torch.float32)
          for i in range(30)}
    url = f"s3://{s3_bucket}/z"
    dckpt.save(st, url, compression="zstd", chunk_size=32 << 10)
    m = dckpt.read_manifest(url)
    chunks = [c for t in m.tensors.values() for s in t.shards for c in s.chunks]
    assert len(chunks) > 60 and all(c.codec != 0 for c in chunks)
    calls = _count_gets(monkeypatch)
    out = {k: torch.zeros_like(v) for k, v in st.items()}
    dckpt.load(url, into=out)
    assert all(torch.equal(out[k], v) for k, v in st.items())
    assert len(calls) == 1  # every compressed chunk in one GET (all lie within 8 MiB)
    ch = m.tensors["t13"].shards[0].chunks[2]
    c = boto3.client("s3", **s3server._boto_args(s3_endpoint))
    key = "z/rank-00000.dckpt"
    body = bytearray(c.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
    body[ch.offset + ch.stored // 2] ^= 0x01
    c.put_object(Bucket=s3_bucket, Key=key, Body=bytes(body))
    with pytest.raises(CorruptCheckpointError) as e:
        dckpt.load(url, into=out)
    assert e.value.tensor == "t13" and e.value.chunk == 2 and "chunk 2" in str(e.value)
    assert key in str(e.value) and e.value.offset == ch.offset

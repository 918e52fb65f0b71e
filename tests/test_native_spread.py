"""write_chunks over several files (writer threads share the chunks out) against the
oracles: Python zstandard and xxhash decode and hash every chunk where its record says."""
import os

import numpy as np
import pytest
import xxhash
import zstandard

from dckpt import _native as native

from test_native import noise, unshuffle, weights

CS = 64 << 10


def check_files(paths, buffers, records, elem_sizes, base=0):
    """Every record agrees with the oracles in the file it names; chunks tile each file."""
    data = [open(p, "rb").read() for p in paths]
    placed = {f: [] for f in range(len(paths))}
    for buf, recs, width in zip(buffers, records, elem_sizes):
        raw = bytes(memoryview(buf).cast("B"))
        assert len(recs) == -(-len(raw) // CS)
        for c, rec in enumerate(recs):
            file_index, offset, stored_len, raw_len, codec, raw_hash, stored_hash = rec
            assert base <= file_index < base + len(paths)
            f = file_index - base
            piece = raw[c * CS:(c + 1) * CS]
            stored = data[f][offset:offset + stored_len]
            assert raw_len == len(piece) and raw_hash == xxhash.xxh3_64_intdigest(piece)
            assert stored_hash == xxhash.xxh3_64_intdigest(stored)
            if codec == 0:
                assert stored == piece
            elif codec == 1:
                assert zstandard.ZstdDecompressor().decompress(stored) == piece
            else:
                assert unshuffle(zstandard.ZstdDecompressor().decompress(stored), width) == piece
            placed[f].append((offset, stored_len))
    for f, spans in placed.items():
        end = 0
        for offset, stored_len in sorted(spans):
            assert offset == end
            end += stored_len
        assert end == len(data[f])
    return [len(spans) for spans in placed.values()]


@pytest.mark.parametrize("codec", [0, 1, 2])
@pytest.mark.parametrize("files,threads", [(2, 0), (2, 1), (3, 2), (2, 4)])
def test_chunks_shared_over_files_match_the_oracles_and_read_back(tmp_path, codec, files, threads):
    buffers = [weights(3 * CS + 123, 1), noise(40 * CS, 2), np.arange(50_000, dtype=np.int64),
               b"", weights(CS, 3)]
    widths = [4, 1, 8, 1, 2]
    paths = [str(tmp_path / f"part-{i}") for i in range(files)]
    records = native.write_chunks(paths, buffers, widths, chunk_size=CS, codec=codec,
                                  threads=threads)
    # Every file exists, even one that no writer got a chunk for: the manifest lists them.
    assert all(os.path.isfile(p) for p in paths)
    check_files(paths, buffers, records, widths)
    dests = [np.full(memoryview(b).nbytes, 0xAB, np.uint8) for b in buffers]
    native.read_chunks(paths, dests, widths, records)
    for buf, dest in zip(buffers, dests):
        assert dest.tobytes() == bytes(memoryview(buf).cast("B"))


def test_records_name_files_from_file_index(tmp_path):
    paths = [str(tmp_path / "a"), str(tmp_path / "b")]
    buffers = [noise(30 * CS)]
    records = native.write_chunks(paths, buffers, [1], chunk_size=CS, file_index=5)
    check_files(paths, buffers, records, [1], base=5)


def test_paced_writers_both_get_chunks(tmp_path):
    # duty < 1: the calling thread sleeps after each chunk, so the pool's writer is awake
    # and claims chunks too; each thread appends to its own file.
    paths = [str(tmp_path / "a"), str(tmp_path / "b")]
    buffers = [noise(200 * CS)]
    records = native.write_chunks(paths, buffers, [1], chunk_size=CS, threads=2, duty=0.5)
    counts = check_files(paths, buffers, records, [1])
    assert sum(counts) == 200 and min(counts) > 0


def test_direct_writes_take_one_file(tmp_path):
    with pytest.raises(native.ChunkError, match="one file") as e:
        native.write_chunks([str(tmp_path / "a"), str(tmp_path / "b")], [noise(CS)], [1],
                            direct=True)
    assert e.value.kind == "invalid_argument"
    assert not os.path.exists(tmp_path / "a")


def test_a_file_that_cannot_be_created_is_named(tmp_path):
    (tmp_path / "b").mkdir()
    with pytest.raises(native.ChunkError, match="cannot create file") as e:
        native.write_chunks([str(tmp_path / "a"), str(tmp_path / "b")], [noise(CS)], [1])
    assert e.value.path == str(tmp_path / "b")

"""The local POSIX backend (see dckpt/storage/__init__.py for the contract): chunked
tensor I/O through the native core, and the atomic rename commit of storage/commit.py.

It turns tensors into byte views (no copies), calls the native write/read/verify, and maps
native errors onto the typed error tree, naming the tensor each failing chunk belongs to.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from dataclasses import dataclass, replace

import numpy as np
import torch

from .. import _native
from . import commit, spares
from ..errors import (CorruptCheckpointError, DckptError, IncompleteCheckpointError,
                      InvalidArgumentError, ManifestError, StorageError)
from ..format.manifest import CODEC_RAW, CODEC_ZSTD, CODEC_ZSTD_SHUFFLE, Chunk

DEFAULT_CHUNK_SIZE = 4 << 20


def default_threads() -> int:
    return len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class WriteOptions:
    """How chunks are stored. compression: None/"none", "zstd", or a zstd level (int)."""
    compression: str | int | None = None
    shuffle: bool = True
    chunk_size: int = DEFAULT_CHUNK_SIZE
    threads: int = 0
    fsync: bool = True
    # The caller fsyncs the files itself afterwards (fsync=False here): the writer still
    # starts the kernel's writeback of each MiB as it goes, as it does with fsync.
    synced_later: bool = False
    # A directory of retired data files to write over instead of creating new ones
    # (storage/spares.py; the manager's). Buffered writes only.
    spares: str | None = None
    # What the write is expected to store (an incremental save's estimate; None: all of
    # it): a spare much larger would be cut down in line, freeing pages the save waits for.
    expect: int | None = None

    @property
    def codec(self) -> int:
        if self.compression in (None, "none", "raw", 0, False):
            return CODEC_RAW
        return CODEC_ZSTD_SHUFFLE if self.shuffle else CODEC_ZSTD

    @property
    def level(self) -> int:
        if isinstance(self.compression, int) and not isinstance(self.compression, bool):
            return self.compression
        return 1

    def validate(self) -> "WriteOptions":
        c = self.compression
        level = isinstance(c, int) and not isinstance(c, bool)
        if not (c in (None, "none", "raw", "zstd") and not isinstance(c, bool)
                or level and 0 <= c <= 22):
            # Checked before anything is written: an unknown name used to save with zstd
            # and record the bogus name.
            raise InvalidArgumentError(
                f"compression={c!r} is not understood; use None (or \"none\"/\"raw\") for "
                "no compression, \"zstd\" (level 1), or a zstd level 1-22 as an int")
        if not 4096 <= self.chunk_size <= (1 << 30):
            raise ValueError(f"chunk_size {self.chunk_size} must lie in [4 KiB, 1 GiB]")
        if self.codec != CODEC_RAW and not 1 <= self.level <= 22:
            raise ValueError(f"zstd level {self.level} must lie in [1, 22]")
        if self.threads < 0:
            raise ValueError("threads must be >= 0 (0 = all usable cores)")
        return self


@dataclass(frozen=True)
class Background:
    """How a save that runs beside training writes (the async saver passes it down).

    direct: raw chunks bypass the page cache (O_DIRECT where the filesystem allows it,
        else buffered): no kernel copy into the cache and no later writeback of dirty
        pages, both of which take memory bandwidth from the training step.
    duty: the share of time each writer thread spends writing, in (0, 1]; it sleeps the
        rest, so a write of t seconds takes about t / duty.
    """
    direct: bool = False
    duty: float = 1.0

    def __post_init__(self):
        if not 0 < self.duty <= 1:
            raise ValueError(f"duty must lie in (0, 1], not {self.duty!r}")


FOREGROUND = Background()  # a save the caller waits for: buffered, at full speed


def byte_view(value: torch.Tensor | np.ndarray) -> np.ndarray:
    """A uint8 numpy view of a contiguous CPU tensor/array, sharing its memory (flat for
    arrays; a tensor's keeps its leading dimensions, which the native core ignores)."""
    if isinstance(value, np.ndarray):
        assert value.flags.c_contiguous
        return value.reshape(-1).view(np.uint8)
    assert value.is_cpu and value.is_contiguous()
    if value.requires_grad:  # numpy() refuses a tensor that requires grad; a leaf's does not
        value = value.detach()
    if value.dim() == 0 or not value.numel():  # view(dtype) needs a dimension and data
        value = value.reshape(-1) if value.numel() else torch.empty(0, dtype=torch.uint8)
    # The native side takes any C-contiguous buffer, so the N-d uint8 view needs no reshape.
    if value.dtype in NUMPY_DTYPES:  # numpy's byte view is cheaper than torch's (per leaf)
        return value.numpy().view(np.uint8)
    return value.view(torch.uint8).numpy()


# Tensor dtypes that numpy() converts (bfloat16 and the float8s are not among them).
NUMPY_DTYPES = frozenset({torch.float16, torch.float32, torch.float64, torch.int8,
                          torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
                          torch.complex64, torch.complex128})


def elem_size(value: torch.Tensor | np.ndarray) -> int:
    return value.itemsize if isinstance(value, np.ndarray) else value.element_size()


def write_file(path: str, values: list, opts: WriteOptions, mode: Background = FOREGROUND,
               file_index: int = 0, prev_hashes: list | None = None) -> list[list[Chunk]]:
    """Write contiguous CPU tensors/arrays to one file; returns their chunk records."""
    sources, sizes = _sources(values)
    return _write_views(path, sources, sizes, opts, mode, file_index, prev_hashes)


def _sources(values: list) -> tuple[list, list[int]]:
    """What the native writer reads each value from, and its element size, in one pass (a
    few hundred small tensors per save): a CPU tensor by (address, nbytes), which costs a
    tenth of byte_view; arrays as they are."""
    sources, sizes = [], []
    for v in values:
        if type(v) is torch.Tensor and v.is_cpu and v.is_contiguous():
            sources.append((v.data_ptr(), v.nbytes))
            sizes.append(v.element_size())
        else:
            sources.append(byte_view(v))
            sizes.append(elem_size(v))
    return sources, sizes


def _write_views(path: str | list[str], views: list, sizes: list[int], opts: WriteOptions,
                 mode: Background, file_index: int = 0,
                 prev_hashes: list | None = None) -> list[list[Chunk]]:
    paths = [path] if isinstance(path, str) else path
    reuse = None
    if opts.spares is not None and not mode.direct:
        expect = opts.expect if opts.expect is not None else \
            sum(v[1] if type(v) is tuple else v.nbytes for v in views)
        reuse = spares.take(paths, Path(opts.spares), 2 * expect // len(paths) + (1 << 20))
    try:
        records = _native.write_chunks(
            path, views, sizes, chunk_size=opts.chunk_size, codec=opts.codec, level=opts.level,
            threads=opts.threads, fsync=opts.fsync, file_index=file_index,
            prev_hashes=prev_hashes, direct=mode.direct, duty=mode.duty,
            writeback=opts.synced_later, record_type=Chunk,
            reuse=reuse if reuse and any(reuse) else None)
    except _native.ChunkError as e:
        where = getattr(e, "path", None) or (path if isinstance(path, str) else path[0])
        raise StorageError(f"writing {where} failed: {e}", where) from None
    if reuse and any(reuse):
        _unused_spares_back(paths, reuse, records, file_index, Path(opts.spares))
    return records


def _unused_spares_back(paths: list[str], reuse: list[bool], records: list, file_index: int,
                        spare_dir: Path) -> None:
    """A spare the writer wrote nothing into (an incremental save that found its chunks
    unchanged) still holds its old bytes: it goes back, and an empty file takes its place,
    as the writer leaves a file it got nothing for."""
    written = {c.file for recs in records for c in recs if c.offset != -1}
    for f, p in enumerate(paths):
        if reuse[f] and file_index + f not in written:
            spares.give_back(p, spare_dir)
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                              commit.FILE_MODE))


# Below this much data per file a rank writes one file: another would cost an open and an
# fsync for little gain.
MIN_PART_BYTES = 16 << 20


def part_count(nbytes: int, opts: WriteOptions) -> int:
    """How many files one rank's data goes into: one per writer thread. Writers to one file
    take turns on its inode lock in the kernel (tmpfs and ext4 buffered writes), writers to
    separate files copy in parallel: on 2 cores about 2x on /dev/shm, 1.2x on ext4 + fsync."""
    threads = opts.threads or default_threads()
    return int(max(1, min(threads, nbytes // MIN_PART_BYTES)))


def write_files(paths: list[str], values: list, opts: WriteOptions,
                mode: Background = FOREGROUND) -> list[list[Chunk]]:
    """Write contiguous CPU tensors/arrays across `paths`, one writer thread per file, all
    running at once; each value's records (file = index into paths) come back in order, as
    from one file. Buffered writes share the chunks out as the threads ask for them (which
    file holds a chunk varies); direct writes cut the values on their chunk grid into equal
    shares, one O_DIRECT file per share."""
    if len(paths) == 1:
        return write_file(paths[0], values, opts, mode)
    if not mode.direct:
        # One native call whose writer threads take chunks from one queue, each appending
        # to its own file: a thread slowed by other work on the machine writes fewer chunks
        # instead of finishing a fixed half late (issue 27; docs/ARCHITECTURE.md).
        return _write_views(list(paths), *_sources(values), opts, mode)
    views = [byte_view(v).reshape(-1) for v in values]
    sizes = [elem_size(v) for v in values]
    plan = _split([v.nbytes for v in views], len(paths), opts.chunk_size)
    each = replace(opts, threads=max(1, (opts.threads or default_threads()) // len(paths)))
    results: list = [None] * len(paths)
    errors: list[BaseException] = []
    # The helper threads write as this one does (direct: each O_DIRECT file in its own call).

    def write(i: int) -> None:
        try:
            results[i] = _write_views(paths[i], [views[v][a:z] for v, a, z in plan[i]],
                                      [sizes[v] for v, _, _ in plan[i]], each, mode, i)
        except BaseException as e:  # re-raised in the calling thread
            errors.append(e)

    helpers = [threading.Thread(target=write, args=(i,)) for i in range(1, len(paths))]
    for t in helpers:
        t.start()
    write(0)
    commit.join_all(helpers)
    if errors:
        raise errors[0]
    out: list[list[Chunk]] = [[] for _ in values]
    for pieces, records in zip(plan, results):
        for (v, _, _), rs in zip(pieces, records):
            out[v].extend(rs)
    return out


def _split(lengths: list[int], parts: int, chunk: int) -> list[list[tuple[int, int, int]]]:
    """Per file, the (value, start, stop) byte ranges it holds: the concatenated values cut
    into `parts` nearly equal runs, each cut moved up to the value's next chunk boundary."""
    total = sum(lengths)
    bounds = [total * k // parts for k in range(1, parts)]
    plan: list[list[tuple[int, int, int]]] = [[] for _ in range(parts)]
    base = 0
    for v, length in enumerate(lengths):
        cuts = [0]
        for b in bounds:
            c = min(length, max(0, -(-(b - base) // chunk) * chunk))
            cuts.append(max(cuts[-1], c))
        cuts.append(length)
        for f in range(parts):
            if cuts[f + 1] > cuts[f]:
                plan[f].append((v, cuts[f], cuts[f + 1]))
        base += length
    return plan


def read_into(paths: list[str], dests: list, elem_sizes: list[int], chunks: list[list[Chunk]],
              names: list[str], verify: bool = True, threads: int = 0) -> None:
    """Read chunks straight into contiguous CPU destinations, verifying raw hashes.

    elem_sizes are the stored element sizes (they undo the byte shuffle), which differ
    from the destination's when it is a byte staging buffer."""
    if not dests:
        return
    try:
        _native.read_chunks(paths, [_memory(d) for d in dests], elem_sizes,
                            chunks,
                            verify=verify, threads=threads)
    except _native.ChunkError as e:
        raise _map_error(e, names, chunks) from None


def _memory(dest: torch.Tensor | np.ndarray):
    """What the native reader fills: an array itself, a tensor by address and size."""
    if isinstance(dest, np.ndarray):
        return byte_view(dest)
    if not dest.is_cpu or not dest.is_contiguous():
        raise ValueError("read destinations are contiguous CPU tensors")
    return (dest.data_ptr(), dest.nbytes)


def verify_chunks(paths: list[str], chunks: list[Chunk], elem_sizes: list[int],
                  deep: bool = False, threads: int = 0) -> list[tuple]:
    """Failures as (chunk_index, kind, expected, actual, message); empty when all good."""
    try:
        return _native.verify_chunks(paths, chunks, elem_sizes, deep=deep, threads=threads)
    except _native.ChunkError as e:  # the call itself failed, not a chunk: typed too
        raise _map_error(e, [], [chunks]) from None


def hash64(data) -> int:
    return _native.hash64(data)


def _map_error(e, names: list[str], chunks: list[list[Chunk]]) -> DckptError:
    b = getattr(e, "buffer_index", -1)
    ci = getattr(e, "chunk_index", -1)
    tensor = names[b] if 0 <= b < len(names) else None
    where = f"tensor '{tensor}' chunk {ci}" if tensor is not None else "a chunk"
    path, offset = getattr(e, "path", None), getattr(e, "offset", -1)
    kind = getattr(e, "kind", "io")
    msg = f"{where} in {path} at offset {offset}: {e}"
    if kind in ("stored_hash", "raw_hash", "corrupt_frame"):
        return CorruptCheckpointError(msg, path, tensor, ci, offset,
                                      getattr(e, "expected", None), getattr(e, "actual", None))
    if kind in ("missing_file", "out_of_bounds"):
        return IncompleteCheckpointError(msg, path, tensor, ci, offset)
    if kind in ("invalid_record", "invalid_argument"):
        return ManifestError(msg, path)
    return StorageError(msg, path)


class LocalStorage:
    """The local POSIX backend as a Storage (dckpt/storage/__init__.py): the functions of
    this module and the rename commit of storage/commit.py, looked up at each call."""

    def begin(self, target, overwrite=False):
        return commit.begin(target, overwrite)

    def finish(self, tmp, target, manifest, fsync=True, syncs=None):
        return commit.finish(tmp, target, manifest, fsync, syncs)

    def abort(self, tmp):
        return commit.abort(tmp)

    def size(self, path):
        try:
            return os.stat(path).st_size
        except FileNotFoundError:
            return None

    def write_bytes(self, path, data):
        commit.write_file_durably(Path(path), data)

    def write_files(self, paths, values, opts, mode=FOREGROUND, syncs=None):
        if syncs is None or not opts.fsync:
            return write_files(paths, values, opts, mode)
        # The files' fsyncs go on in `syncs`, beside the records and manifest being built.
        chunks = write_files(paths, values, replace(opts, fsync=False, synced_later=True), mode)
        for p in paths:
            syncs.start(p)
        return chunks

    def write_file(self, path, values, opts, mode=FOREGROUND, file_index=0, prev_hashes=None):
        return write_file(path, values, opts, mode, file_index, prev_hashes)

    def read_into(self, paths, dests, elem_sizes, chunks, names, verify=True, threads=0):
        return read_into(paths, dests, elem_sizes, chunks, names, verify, threads)

    def verify_chunks(self, paths, chunks, elem_sizes, deep=False, threads=0):
        return verify_chunks(paths, chunks, elem_sizes, deep, threads)


LOCAL = LocalStorage()

__all__ = ["WriteOptions", "Background", "FOREGROUND", "write_file", "write_files",
           "part_count", "read_into", "verify_chunks", "hash64", "byte_view", "elem_size",
           "default_threads", "CODEC_ZSTD", "LocalStorage", "LOCAL"]

"""Plan and run the reads that fill destination tensors from stored shards.

A destination is a block of a global tensor (the whole tensor, or a rank's shard of it).
Each stored shard overlapping it is read straight into the destination when the overlap is
the whole shard and lands contiguously there; otherwise the needed byte span of the shard is
read into a staging buffer and the overlap copied out. CUDA or non-contiguous destinations
are filled through a contiguous CPU buffer.
"""
from __future__ import annotations

import math
import os
import stat
from pathlib import Path

import numpy as np
import torch

from .. import storage
from ..errors import (IncompleteCheckpointError, ResourceLimitError, StateMismatchError,
                      StorageError)
from ..format import lookup
from ..format.manifest import Manifest, Shard, TensorEntry
from .tensors import dtype_name, torch_dtype


def max_load_bytes() -> int:
    """What one load may allocate for tensors it creates: DCKPT_MAX_LOAD_BYTES, else the
    machine's physical memory. The manifest bounds raw bytes by stored bytes only up to
    zstd's 32,768x, so a 66 KB checkpoint may declare 2 GiB and a 32 MiB sparse file 1 TiB;
    a load needing more than the machine has cannot succeed, and failing in the allocator
    gives an untyped error after other tensors were read."""
    text = os.environ.get("DCKPT_MAX_LOAD_BYTES", "")
    if text:
        try:
            return int(text)
        except ValueError:
            pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 1 << 62


class TensorReader:
    def __init__(self, ckpt: Path | str, manifest: Manifest, verify: bool = True,
                 threads: int = 0, store: storage.Storage | None = None):
        """ckpt: a checkpoint directory, or an object store URL (storage.location); store:
        the backend that holds it (storage.for_path(ckpt) when not given)."""
        self.ckpt, self.m = storage.location(ckpt), manifest
        self.remote = storage.is_remote(self.ckpt)
        self.store = store or storage.for_path(self.ckpt)
        if self.remote:
            self.paths = [self.store.file_url(self.ckpt, f) for f in manifest.files]
        else:
            self.paths = [str(f.path(self.ckpt)) for f in manifest.files]
        self.verify, self.threads = verify, threads
        self._dests: list = []
        self._sizes: list[int] = []
        self._chunks: list = []
        self._names: list[str] = []
        self._after: list = []  # copies from staging into destinations, run after the reads
        self._admitted: set[int] = set()
        self._allocated = 0  # bytes allocated for this load (new tensors, staging)
        self._ceiling = max_load_bytes()

    def _sync_paths(self) -> None:
        """A split manifest (format/lookup.py) grows its files as record files are read."""
        files = self.m.files
        for f in files[len(self.paths):]:
            self.paths.append(self.store.file_url(self.ckpt, f) if self.remote
                              else str(f.path(self.ckpt)))

    def allocate(self, name: str, nbytes: int, make):
        """make() a new destination or buffer of `nbytes` for tensor `name`, after checking
        the tensor's files (admit) and the load's ceiling; an allocator failure becomes a
        typed error too. Nothing of the tensor has been read yet."""
        self.admit(name)
        self._allocated += nbytes
        if self._allocated > self._ceiling:
            raise self._limit_error(
                name, nbytes, f"loading it needs {nbytes} bytes, {self._allocated} in all for "
                f"this load, over the limit of {self._ceiling} (DCKPT_MAX_LOAD_BYTES, by default "
                "the machine's memory): a hostile or damaged manifest, or a checkpoint too "
                "large for this machine (raise DCKPT_MAX_LOAD_BYTES if it is real)")
        try:
            return make()
        except (RuntimeError, MemoryError) as e:  # torch's allocator raises RuntimeError
            if isinstance(e, RuntimeError) and not any(
                    w in str(e) for w in ("alloc", "out of memory")):
                raise
            raise self._limit_error(name, nbytes, f"cannot allocate {nbytes} bytes to load it "
                                    f"({type(e).__name__}: {str(e)[:200]})") from None

    def _limit_error(self, name: str, nbytes: int, why: str) -> ResourceLimitError:
        chunks = [c for s in self.m.tensors[name].shards for c in s.chunks]
        path = self.paths[chunks[0].file] if chunks else None
        return ResourceLimitError(f"tensor '{name}' (in {path}): {why}", path, name, nbytes)

    def admit(self, name: str) -> None:
        """Check that the files behind tensor `name` exist and hold the bytes the manifest
        promises. Callers run this before allocating for the tensor: the manifest bounds raw
        bytes by stored bytes, so a huge declared tensor cannot outgrow its real files."""
        self._sync_paths()
        if len(self._admitted) == len(self.paths):  # soon true: few files, many tensors
            return
        for shard in self.m.tensors[name].shards:
            for ch in shard.chunks:
                if ch.file not in self._admitted:
                    self._admit_file(ch.file, name)
                    self._admitted.add(ch.file)

    def _admit_file(self, index: int, tensor: str) -> None:
        path, want = self.paths[index], self.m.files[index].size
        if self.remote:  # an object: there and long enough (a HEAD), nothing more to check
            size = self.store.size(path)
            if size is None:
                raise IncompleteCheckpointError(
                    f"tensor '{tensor}': data object {path} is missing", path, tensor)
            if size < want:
                raise IncompleteCheckpointError(
                    f"tensor '{tensor}': {path} has {size} bytes, the manifest promises "
                    f"{want}: the object was truncated", path, tensor)
            return
        try:
            st = os.lstat(path)  # a link could lead outside the checkpoint: refused below
        except FileNotFoundError:
            raise IncompleteCheckpointError(f"tensor '{tensor}': data file {path} is missing",
                                            path, tensor) from None
        except OSError as e:
            raise StorageError(f"tensor '{tensor}': cannot stat {path}: {e.strerror}",
                               path) from None
        if stat.S_ISLNK(st.st_mode):
            raise IncompleteCheckpointError(
                f"tensor '{tensor}': {path} is a symbolic link (refused: a checkpoint holds "
                "only regular files; replace the link with a copy of the file)", path, tensor)
        if not stat.S_ISREG(st.st_mode):
            raise IncompleteCheckpointError(f"tensor '{tensor}': {path} is not a regular file",
                                            path, tensor)
        if st.st_size < want:
            raise IncompleteCheckpointError(
                f"tensor '{tensor}': {path} has {st.st_size} bytes, the manifest promises "
                f"{want}: the file was truncated", path, tensor)

    def request(self, name: str, dest, offsets: list[int] | None = None) -> None:
        """Fill `dest` (tensor or ndarray) with the block of tensor `name` at `offsets`."""
        if self.m.split is not None:  # read the record files holding the block, if unread
            lookup.ensure_block(self.m, name, offsets, None if offsets is None
                                else list(dest.shape))
        entry = self.m.tensors[name]
        self.admit(name)
        if isinstance(dest, np.ndarray):
            if dest.dtype.str != entry.dtype or list(dest.shape) != entry.shape:
                raise StateMismatchError([f"{name}: array {dest.dtype.str}{list(dest.shape)} "
                                          f"vs stored {entry.dtype}{entry.shape}"])
            self._add(name, dest, entry.itemsize, entry.shards[0].chunks)
            return
        if dtype_name(dest.dtype) != entry.dtype:
            raise StateMismatchError([f"{name}: dtype {dest.dtype} vs stored {entry.dtype}"])
        shards = entry.shards
        if (offsets is None and len(shards) == 1 and dest.is_cpu and dest.is_contiguous()
                and list(dest.shape) == shards[0].shape):
            # The common case (a whole tensor stored in one piece): no block arithmetic.
            self._add(name, dest, entry.itemsize, shards[0].chunks)
            return
        offsets = offsets or [0] * len(entry.shape)
        target = dest
        if not dest.is_cpu or not dest.is_contiguous():
            target = self.allocate(name, dest.nbytes, lambda: torch.empty(
                dest.shape, dtype=dest.dtype, pin_memory=dest.is_cuda))
            self._after.append(lambda d=dest, t=target: d.copy_(t, non_blocking=d.is_cuda))
        self._plan_block(name, entry, target, offsets)

    def request_whole(self, name: str, entry: TensorEntry, dest: torch.Tensor) -> None:
        """request() for a contiguous CPU tensor whose dtype and shape the caller checked
        against `entry`, stored in one shard."""
        self.admit(name)
        self._add(name, dest, entry.itemsize, entry.shards[0].chunks)

    def _plan_block(self, name: str, entry: TensorEntry, dest: torch.Tensor, offsets: list[int]):
        shape = list(dest.shape)
        if math.prod(shape) == 0:
            return
        covered = 0
        for shard in entry.shards:
            lo = [max(a, b) for a, b in zip(offsets, shard.offsets)]
            hi = [min(a + n, b + m) for a, n, b, m in
                  zip(offsets, shape, shard.offsets, shard.shape)]
            if any(h <= l for l, h in zip(lo, hi)):
                continue
            covered += math.prod(h - l for l, h in zip(lo, hi))
            dview = dest[tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, offsets))]
            whole = lo == shard.offsets and [h - l for l, h in zip(lo, hi)] == shard.shape
            if whole and dview.is_contiguous():
                self._add(name, dview, entry.itemsize, shard.chunks)
            else:
                self._stage(name, entry, shard, dview, lo, hi)
        if covered != math.prod(shape):
            raise IncompleteCheckpointError(
                f"tensor '{name}': stored shards cover {covered} of the {math.prod(shape)} "
                f"elements of the block at {offsets} shape {shape}", tensor=name)

    def _stage(self, name, entry: TensorEntry, shard: Shard, dview, lo, hi):
        """Read only the chunks spanning the overlap, then copy the overlap out."""
        local_lo = [l - o for l, o in zip(lo, shard.offsets)]
        local_hi = [h - o - 1 for h, o in zip(hi, shard.offsets)]
        strides = [math.prod(shard.shape[i + 1:]) for i in range(len(shard.shape))]
        first = sum(i * s for i, s in zip(local_lo, strides)) * entry.itemsize
        last = (sum(i * s for i, s in zip(local_hi, strides)) + 1) * entry.itemsize
        start = 0
        picked, begin = [], None
        for ch in shard.chunks:
            end = start + ch.raw
            if end > first and start < last:
                begin = start if begin is None else begin
                picked.append(ch)
                stop = end
            start = end
        buf = self.allocate(name, shard.raw_bytes,
                            lambda: torch.empty(shard.raw_bytes, dtype=torch.uint8))
        self._add(name, buf[begin:stop], entry.itemsize, picked)
        dtype = torch_dtype(entry.dtype)
        src = buf.view(dtype).reshape(shard.shape)[
            tuple(slice(l, h + 1) for l, h in zip(local_lo, local_hi))]
        self._after.append(lambda d=dview, s=src: d.copy_(s))

    def _add(self, name, dest, elem_size: int, chunks) -> None:
        self._dests.append(dest)
        self._sizes.append(elem_size)
        self._chunks.append(chunks)
        self._names.append(name)

    def run(self) -> None:
        # Every path goes along: the native reader opens only the files a chunk refers to.
        self._sync_paths()
        self.store.read_into(self.paths, self._dests, self._sizes, self._chunks,
                                              self._names, verify=self.verify,
                                              threads=self.threads)
        for fn in self._after:
            fn()
        self._dests, self._sizes, self._chunks, self._names, self._after = [], [], [], [], []

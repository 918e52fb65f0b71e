"""A base for an incremental save made of plain files, not of a checkpoint: tensors whose
raw bytes already lie in a file beside the checkpoint (Trainer's model.safetensors) are
shared with it by hard link instead of being written a second time.

The incremental writer (incremental.py) needs a base manifest: chunk records with raw
hashes, cut as a rewrite would cut the tensors. Here that manifest is made from the files'
own tensor index (dckpt/format/safetensors.py): each tensor becomes one raw shard whose
chunks point into the file, hashed from the file's bytes. Then everything is the
incremental path as it is: the writer shares a chunk only where the live tensor hashes
equal, every shared chunk is read again through the link and checked before the commit,
and the checkpoint holds its own hard link, so it stays a self-contained directory that any
dckpt reader loads and verifies (no format change). Whatever does not match (another
name, dtype or shape, other bytes, a file that cannot be read or linked) is written as
usual: sharing can only make a checkpoint smaller, never different.

The manifest is built lazily, at the first use inside the save (after the save's first
exchange), so that a file rank 0 writes just before the collective save is complete when
the other ranks look at it. The files are fsync'd first: a committed checkpoint may point
into them.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import xxhash

from ..errors import DckptError
from ..format import safetensors
from ..format.manifest import Chunk, FileEntry, Manifest, Shard, TensorEntry, open_regular
from .incremental import Base

log = logging.getLogger("dckpt")


class FileBase(Base):
    """The safetensors files directly in `folder` matching `pattern`, listed when the save
    first needs them, whose tensors a save may share. name_of maps a tensor name in a file
    to its name in the saved state ("model/" + name for a model component); chunk_size must
    be the save's, or nothing lines up."""

    def __init__(self, folder: str | os.PathLike, pattern: str, chunk_size: int,
                 name_of: Callable[[str], str] = lambda n: n, fsync: bool = True):
        super().__init__(Path(folder))
        self.pattern, self.chunk_size = pattern, chunk_size
        self.name_of, self.fsync = name_of, fsync

    @property
    def label(self) -> str:
        return f"{self.path.name}/{self.pattern}"

    @property
    def depth(self) -> int:
        return 0  # plain files: the save that shares them is the first of a chain

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            self._manifest = self._build()
        return self._manifest

    def manifest_for(self, rank: int) -> Manifest:
        return self.manifest  # the files' own records: the same for every rank

    def _build(self) -> Manifest:
        m = Manifest()
        for name in sorted(p.name for p in self.path.glob(self.pattern) if p.is_file()):
            try:
                entries = self._file(name, len(m.files))
            except (DckptError, OSError) as e:
                log.warning("dckpt: %s: not shared (%s); its tensors are written again",
                            self.path / name, e)
                continue
            m.files.append(FileEntry(name, (self.path / name).stat().st_size, 0))
            m.tensors.update(entries)
        return m

    def _file(self, name: str, index: int) -> dict[str, TensorEntry]:
        path = self.path / name
        stored = safetensors.read_index(path)
        fd, _ = open_regular(path)
        try:
            if self.fsync:
                os.fsync(fd)  # the bytes a committed checkpoint will point into
            out = {}
            for t in stored:
                chunks, pos = [], 0
                while pos < t.nbytes:
                    n = min(self.chunk_size, t.nbytes - pos)
                    data = os.pread(fd, n, t.offset + pos)
                    if len(data) != n:
                        raise OSError(f"{path} ends inside tensor '{t.name}'")
                    h = xxhash.xxh3_64_intdigest(data)
                    chunks.append(Chunk(index, t.offset + pos, n, n, 0, h, h))
                    pos += n
                out[self.name_of(t.name)] = TensorEntry(
                    t.dtype, t.shape, [Shard([0] * len(t.shape), t.shape, 0, chunks)])
            return out
        finally:
            os.close(fd)

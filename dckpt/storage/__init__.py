"""Where bytes live. Every byte of a checkpoint is written, read and committed through a
`Storage`; the local POSIX backend (local, over the native core, with commit) is the one
there is today. The only package that imports dckpt._native; may import format and errors.

The contract, written for the backends to come (object stores, a peer's memory):

- begin(target, overwrite) -> staging: rank 0, once per save, before any write. Fails
  (CheckpointExistsError) if `target` is committed and not `overwrite`.
- write_files(paths, values, opts, mode, syncs) -> chunk records: every rank, at the same
  time, each to its own file names inside the staging location; a call may write its files
  in parallel. `values` are contiguous CPU tensors/arrays read in place (no copy) until the
  call returns; with opts.fsync the bytes are durable when it returns, or, given `syncs`
  (a commit.Syncs), once syncs.wait() returned. `mode` (Background) says how a save
  beside training writes: direct (bypass caches) and a duty cycle.
- write_file(path, values, opts, mode, file_index, prev_hashes): one file, for the
  incremental writer, which links unchanged chunks of a base (a local-backend feature).
- finish(staging, target, manifest, fsync, syncs): rank 0, after every rank's write
  returned; rank 0's own `syncs` are waited for before the commit point. The commit point:
  afterwards a reader finds the whole checkpoint, before it none. Locally the
  manifest is written last into the staging directory, then the directory is renamed onto
  `target` (an exchange when overwriting). Where there is no rename (an object store),
  the manifest object is written last and *is* the commit: data objects live under a
  prefix only that manifest names, readers look for the manifest only, and an overwrite
  is a new manifest whose old data is removed after.
- size(path) -> int | None: the size of a file just written (None: absent).
- write_bytes(path, data): a small file of the checkpoint other than the manifest (per-rank
  records, say), written durably; treated like the data files by every backend.
- abort(staging): any time after begin, idempotent; removes what the save wrote.
- read_into(paths, dests, elem_sizes, chunks, names, verify, threads) and
  verify_chunks(paths, chunks, elem_sizes, deep, threads): any number at once, from any
  rank; committed files never change. Reads land straight in destination memory; each
  chunk is checked against its hash as it arrives. Errors are typed (CorruptCheckpointError,
  IncompleteCheckpointError, StorageError) and name the file, tensor and chunk.

Locations: a local checkpoint is a Path; a remote one (any "scheme://" URL but file://,
see storage/remote.py for its commit without rename) a URL string. location() makes one
from what a user passed, join() names a file inside either. Which of the two a location is
gets decided here, by a type check and one match of a string's start, and nowhere else:
objectstore.is_url / local_path are these functions, so a local save or load never enters
the object store client (nor imports it, nor fsspec).

The local backend releases the GIL for all byte work (pwrite/pread straight from tensor
memory on the core's thread pool). `records` (the manifest reader with the native record
check) imports no torch, so this package's __init__ imports nothing heavy either.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..format.manifest import Chunk, Manifest
    from .local import Background, WriteOptions


class Storage(Protocol):
    """The calls every backend provides (see the module docstring for the contract)."""

    def begin(self, target: Path, overwrite: bool = False) -> Path: ...
    def write_files(self, paths: list[str], values: list, opts: WriteOptions,
                    mode: Background = ..., syncs=None) -> list[list[Chunk]]: ...
    def write_file(self, path: str, values: list, opts: WriteOptions, mode: Background = ...,
                   file_index: int = 0, prev_hashes: list | None = None) -> list[list[Chunk]]: ...
    def finish(self, tmp: Path, target: Path, manifest: Manifest, fsync: bool = True,
               syncs=None) -> None: ...
    def abort(self, tmp: Path) -> None: ...
    def size(self, path: str) -> int | None: ...
    def write_bytes(self, path: str, data: bytes) -> None: ...
    def read_into(self, paths: list[str], dests: list, elem_sizes: list[int],
                  chunks: list[list[Chunk]], names: list[str], verify: bool = True,
                  threads: int = 0) -> None: ...
    def verify_chunks(self, paths: list[str], chunks: list[Chunk], elem_sizes: list[int],
                      deep: bool = False, threads: int = 0) -> list[tuple]: ...


# What makes a string a URL: "scheme://" at its start. file:// and local:// name the local
# file system; every other scheme is an object store.
SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
LOCAL_SCHEMES = ("file", "local")


def is_remote(path) -> bool:
    """True for an object store URL: a str "scheme://..." with any scheme but file:// (a
    Path, or anything else not a str, is local)."""
    if not isinstance(path, str):
        return False
    m = SCHEME.match(path)
    return m is not None and m.group(1).lower() not in LOCAL_SCHEMES


def local_path(path) -> str | None:
    """The local file system path of a plain path or a file:// URL; None for a remote URL."""
    if isinstance(path, str):
        m = SCHEME.match(path)
        if m:
            return (path[m.end():] or "/") if m.group(1).lower() in LOCAL_SCHEMES else None
    return os.fspath(path)


def location(path) -> "Path | str":
    """Where a checkpoint lies: a Path for a local path or file:// URL, the URL (without a
    trailing "/") for an object store. A Path is returned as it is: already decided."""
    if isinstance(path, Path):
        return path
    local = local_path(path)
    return Path(local) if local is not None else str(path).rstrip("/")


def join(where, name: str) -> "Path | str":
    """The file `name` inside a location."""
    if is_remote(where):
        from .objectstore import join as url_join
        return url_join(where, name)
    return Path(where) / name


def for_path(path, storage_options: dict | None = None) -> Storage:
    """The backend that holds `path`: the local file system for a path or file:// URL, an
    object store (storage/remote.py over fsspec; options as fsspec takes them) for any
    other "scheme://" URL."""
    if is_remote(path):
        from .remote import for_url
        return for_url(str(path), storage_options)
    from .local import LOCAL
    return LOCAL

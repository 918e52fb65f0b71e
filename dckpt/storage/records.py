"""The manifest reader with the native record check: what every reader above format uses
(local paths, file:// and object store URLs).

format.manifest validates manifests in pure Python; the native core checks and builds the
common record (a torch tensor stored whole by one rank, thousands per manifest) in one
pass, and format checks the rest field by field. This module hands that check to format,
so that format never imports the core. It imports no torch, so `dckpt inspect` and
`dckpt ls` use it too; in a process without the core (they run there) every record is
checked field by field: the same rules, slower. There is no second copy of the fast check
in Python at run time: its Python mirror is the oracle of tests/test_native_records.py.
"""
from __future__ import annotations

import os

from ..format.manifest import Manifest, RecordCheck, parse as _parse, read_manifest as _read
from ..format.manifest import read_records as _read_records
from ..format import canonical, lookup as _lookup
from . import is_remote, local_path

try:
    from .._native import records_json, value_json, whole_tensors as check
    # Manifests and record files written by the core too (format/canonical.py).
    canonical.use_native(records_json, value_json)
except ImportError:  # inspect/ls without the core: format's field-by-field checks only
    check: RecordCheck | None = None


def read_manifest(ckpt: str | os.PathLike, ranks: list[int] | None = None,
                  storage_options: dict | None = None) -> Manifest:
    """format.manifest.read_manifest with the native record check (same errors). ranks:
    of a split checkpoint, only these ranks' record files (None: all). For an object store
    URL, the manifest object (its size checked before it is downloaded) and the record
    objects asked for."""
    local = local_path(ckpt)  # None for an object store URL: local or not, decided once
    if local is not None:
        return _read(local, check, ranks)
    from .objectstore import connect, join
    from .remote import read_manifest_bytes
    url = str(ckpt).rstrip("/")
    m = _parse(read_manifest_bytes(connect(url, storage_options), url),
               join(url, "manifest.json"), check)
    return read_records(m, url, ranks, storage_options) if m.split is not None else m


def _fetch(ckpt, storage_options: dict | None):
    """How record files are read: from the directory (None), or as objects."""
    if not is_remote(ckpt):
        return None
    from .objectstore import connect
    store = connect(str(ckpt), storage_options)

    def fetch(url: str, size: int) -> bytes:
        from ..errors import IncompleteCheckpointError
        try:  # a record larger than the index says is refused unread
            return store.get_bytes(url, size)
        except FileNotFoundError:
            raise IncompleteCheckpointError(f"record object {url} is missing", url) from None
    return fetch


def read_records(m: Manifest, ckpt: str | os.PathLike, ranks: list[int] | None = None,
                 storage_options: dict | None = None) -> Manifest:
    """format.manifest.read_records with the native record check."""
    return _read_records(m, ckpt, ranks, check, _fetch(ckpt, storage_options))


def parse(data: bytes, path: str | None = None) -> Manifest:
    """format.manifest.parse with the native record check (same errors)."""
    return _parse(data, path, check)


def lazily(m: Manifest, ckpt: str | os.PathLike,
           storage_options: dict | None = None) -> Manifest:
    """format.lookup.lazily with the native record check: a partly read split manifest
    whose tensors fetch their record files on demand."""
    return _lookup.lazily(m, ckpt, check, _fetch(ckpt, storage_options))


def read_for_rank(ckpt: str | os.PathLike, rank: int,
                  storage_options: dict | None = None) -> Manifest:
    """What rank `rank` needs to restore from (or save incrementally against) `ckpt`: of a
    split checkpoint the index and that rank's record file (rank 0's for a rank the save
    did not have), other records fetched when a lookup needs them; a single manifest whole."""
    m = read_manifest(ckpt, ranks=[], storage_options=storage_options)
    if m.split is not None:
        read_records(m, ckpt, [rank if rank < m.world_size else 0], storage_options)
        lazily(m, ckpt, storage_options)
    return m

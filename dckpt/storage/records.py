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

try:
    from .._native import whole_tensors as check
except ImportError:  # inspect/ls without the core: format's field-by-field checks only
    check: RecordCheck | None = None


def read_manifest(ckpt: str | os.PathLike, storage_options: dict | None = None) -> Manifest:
    """format.manifest.read_manifest with the native record check (same errors); for an
    object store URL, the manifest object (its size checked before it is downloaded)."""
    from .objectstore import connect, is_url, join, local_path
    if is_url(ckpt):
        from .remote import read_manifest_bytes
        url = str(ckpt).rstrip("/")
        return _parse(read_manifest_bytes(connect(url, storage_options), url),
                      join(url, "manifest.json"), check)
    return _read(local_path(ckpt), check)


def parse(data: bytes, path: str | None = None) -> Manifest:
    """format.manifest.parse with the native record check (same errors)."""
    return _parse(data, path, check)

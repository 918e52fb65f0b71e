"""The manifest reader with the native record check: what every reader above format uses.

format.manifest validates manifests in pure Python; the native core checks the common case
(whole tensors, thousands per manifest) in one pass. This module hands that check to
format, so that format never imports the core. It imports no torch, so `dckpt inspect`
and `dckpt ls` use it too; without a built core it reads with the Python checks.
"""
from __future__ import annotations

import os

from ..format.manifest import Manifest, RecordCheck, parse as _parse, read_manifest as _read
from ..format.manifest import read_records as _read_records
from ..format import lookup as _lookup

try:
    from .._native import whole_tensors as check
except ImportError:  # format without the built core: the same rules, checked in Python
    check: RecordCheck | None = None


def read_manifest(ckpt: str | os.PathLike, ranks: list[int] | None = None) -> Manifest:
    """format.manifest.read_manifest with the native record check (same errors). ranks:
    of a split checkpoint, only these ranks' record files (None: all)."""
    return _read(ckpt, check, ranks)


def read_records(m: Manifest, ckpt: str | os.PathLike, ranks: list[int] | None = None) -> Manifest:
    """format.manifest.read_records with the native record check."""
    return _read_records(m, ckpt, ranks, check)


def parse(data: bytes, path: str | None = None) -> Manifest:
    """format.manifest.parse with the native record check (same errors)."""
    return _parse(data, path, check)


def lazily(m: Manifest, ckpt: str | os.PathLike) -> Manifest:
    """format.lookup.lazily with the native record check: a partly read split manifest
    whose tensors fetch their record files on demand."""
    return _lookup.lazily(m, ckpt, check)


def read_for_rank(ckpt: str | os.PathLike, rank: int) -> Manifest:
    """What rank `rank` needs to restore from (or save incrementally against) `ckpt`: of a
    split checkpoint the index and that rank's record file (rank 0's for a rank the save
    did not have), other records fetched when a lookup needs them; a single manifest whole."""
    m = read_manifest(ckpt, ranks=[])
    if m.split is not None:
        read_records(m, ckpt, [rank if rank < m.world_size else 0])
        lazily(m, ckpt)
    return m

"""Finding a tensor's records in a split checkpoint without reading the whole job's.

A reader starts from the index and its own rank's record file (read_manifest(ckpt,
ranks=[r])). lazily(m, ckpt) then makes `m.tensors` fetch what is missing on demand:

- a name not yet known: the record of its owner (the index's "owned" map), else every
  record whose span could hold it, else all the remaining records;
- a block of a sharded tensor not yet covered by the shards read (ensure_block): the
  records whose span overlaps the block's rows, else all the remaining ones.

Resuming at the same world size, a rank's own record holds every block it needs, so it
reads nothing more; resharding reads the few records whose rows overlap its own.
"""
from __future__ import annotations

import math
import os
from typing import Callable

from . import split as splitfmt
from .manifest import Manifest, RecordCheck, RecordFetch, read_records

Fetch = Callable[[list[int]], None]


class LazyTensors(dict):
    """Manifest.tensors of a partly read split manifest: a lookup that misses reads the
    record files that may hold the name, then answers."""

    def __init__(self, tensors: dict, fetch_name: Callable[[str], None]):
        super().__init__(tensors)
        self._fetch_name = fetch_name

    def __missing__(self, name):
        self._fetch_name(name)
        return dict.__getitem__(self, name)

    def get(self, name, default=None):
        if not dict.__contains__(self, name):
            self._fetch_name(name)
        return dict.get(self, name, default)

    def __contains__(self, name) -> bool:
        if not dict.__contains__(self, name):
            self._fetch_name(name)
        return dict.__contains__(self, name)


def lazily(m: Manifest, ckpt: str | os.PathLike, records: RecordCheck | None = None,
           fetch_bytes: RecordFetch | None = None) -> Manifest:
    """Make the tensors of split manifest `m` fetch their records on demand (see module
    docstring); a single manifest is returned unchanged. fetch_bytes: as for read_records."""
    index = m.split
    if index is None or index.complete or isinstance(m.tensors, LazyTensors):
        return m

    def fetch(ranks: list[int]) -> None:
        read_records(m, ckpt, ranks, records, fetch_bytes)

    def fetch_name(name: str) -> None:
        if index.complete:
            return
        owner = index.owned.get(name)
        if owner is not None and owner not in index.loaded:
            fetch([owner])
        if dict.__contains__(m.tensors, name):
            return
        fetch(_by_span(m, splitfmt.FULL))
        if not dict.__contains__(m.tensors, name):
            fetch([r for r in range(index.count) if r not in index.loaded])

    m.tensors = LazyTensors(m.tensors, fetch_name)
    m.fetch_records = fetch  # type: ignore[attr-defined]
    return m


def _by_span(m: Manifest, want: splitfmt.Span) -> list[int]:
    return m.split.overlapping(want)


def covered(m: Manifest, name: str, offsets: list[int], shape: list[int]) -> bool:
    """Whether the shards read so far cover the block (their shards are disjoint)."""
    t = dict.get(m.tensors, name)
    if t is None:
        return False
    if len(t.shards) == 1 and t.shards[0].offsets == offsets and t.shards[0].shape == shape:
        return True  # the usual case: the rank's own block, as it saved it
    want = math.prod(shape)
    got = 0
    for s in t.shards:
        n = 1
        for a, k, b, j in zip(offsets, shape, s.offsets, s.shape):
            n *= max(0, min(a + k, b + j) - max(a, b))
            if not n:
                break
        got += n
    return got >= want


def ensure_block(m: Manifest, name: str, offsets: list[int] | None,
                 shape: list[int] | None) -> None:
    """Read the record files holding the block of `name` at `offsets` (the whole tensor
    when None) that have not been read: first those whose span overlaps its rows."""
    index = m.split
    fetch = getattr(m, "fetch_records", None)
    if index is None or index.complete or fetch is None:
        return
    t = m.tensors.get(name)  # fetches the name if unknown
    if t is None:
        return
    if offsets is None or shape is None:
        offsets, shape = [0] * len(t.shape), list(t.shape)
    if covered(m, name, offsets, shape):
        return
    fetch(_by_span(m, splitfmt.wanted_interval(offsets, shape, t.shape)))
    if not covered(m, name, offsets, shape):
        fetch([r for r in range(index.count) if r not in index.loaded])

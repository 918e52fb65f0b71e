"""The canonical JSON of a manifest, and a faster writer of its largest part.

The canonical form is what `json.dumps(obj, sort_keys=True, separators=(",", ":"),
allow_nan=False, ensure_ascii=True)` gives: the manifest's self hash is taken over it,
and readers compare against it. Its "tensors" member is most of a manifest (one record
per tensor, one list per chunk) and its records all have one shape, so `tensors()` writes
them directly from the records, byte for byte what json.dumps writes of their to_json()
(tests/test_manifest_canonical.py compares the two), at a fraction of the cost: building
the dicts and encoding them took ~3 ms of a 300-tensor save that has ~5 ms to spend on
everything it does besides its bytes. Anything of another shape (a value that is not an
exact int where ints are expected) goes through json.dumps, so the bytes never differ.
"""
from __future__ import annotations

import json
from typing import Any


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False,
                      ensure_ascii=True).encode("ascii")


def _text(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False,
                      ensure_ascii=True)


# A record's fixed text (its name, dtype, kind, placement, shape) repeats save after save:
# kept per name, and reused while the record's fields are equal. Bounded: a state with
# more tensors than this simply formats the rest each time.
_HEADS: dict[str, tuple] = {}
_MAX_HEADS = 1 << 16


def _ints(values) -> str:
    # Exact ints only: json writes a bool as true and an int subclass by its own rules.
    if type(values) is list and all(type(v) is int for v in values):
        return "[" + ",".join(map(str, values)) + "]"
    return _text(values)


def _chunk(c) -> str:
    # A chunk as its to_json() list: five ints, then both hashes as 16 hex digits.
    if len(c) == 7 and all(type(v) is int for v in c) and 0 <= c[5] < 1 << 64 and \
            0 <= c[6] < 1 << 64:
        return '[%d,%d,%d,%d,%d,"%016x","%016x"]' % c
    return _text(c.to_json())


def _shard(s) -> str:
    rank = str(s.rank) if type(s.rank) is int else _text(s.rank)
    return ('{"chunks":[' + ",".join(map(_chunk, s.chunks)) + '],"offsets":'
            + _ints(s.offsets) + ',"rank":' + rank + ',"shape":' + _ints(s.shape) + "}")


def _head(name: str, t) -> str:
    """'"name":{"dtype":...,"kind":...,["placement":...,]"shape":[...],"shards":['"""
    # Keyed by the texts of the fields that vary (equal texts, equal bytes: a shape [True]
    # never matches one of [1]); name, dtype and kind are exact strs, compared as such.
    key = (t.dtype, t.kind, _ints(t.shape),
           None if t.placement is None else _text(t.placement))
    hit = _HEADS.get(name)
    if hit is not None and hit[0] == key and type(t.dtype) is str and type(t.kind) is str:
        return hit[1]
    placement = "" if key[3] is None else ',"placement":' + key[3]
    text = (_text(name) + ':{"dtype":' + _text(t.dtype) + ',"kind":' + _text(t.kind)
            + placement + ',"shape":' + key[2] + ',"shards":[')
    if len(_HEADS) < _MAX_HEADS or name in _HEADS:
        _HEADS[name] = (key, text)
    return text


def tensors(entries: dict) -> bytes:
    """canonical({name: entry.to_json() for name, entry in entries.items()})."""
    if not all(type(k) is str for k in entries):
        return canonical({k: v.to_json() for k, v in entries.items()})
    parts = []
    for name in sorted(entries):
        t = entries[name]
        parts.append(_head(name, t) + ",".join(map(_shard, t.shards)) + "]}")
    return ("{" + ",".join(parts) + "}").encode("ascii")

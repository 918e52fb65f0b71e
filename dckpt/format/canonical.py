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


# A record's text is a template: its fixed part (name, dtype, kind, placement, shapes,
# offsets, ranks) and one '%d...%016x' slot group per chunk. Kept per name and reused while
# those fields are equal, which they are save after save. Bounded: a state with more
# tensors than this formats the rest each time.
_TEMPLATES: dict[str, tuple] = {}
_MAX_TEMPLATES = 1 << 16
_CHUNK = '[%d,%d,%d,%d,%d,"%016x","%016x"]'  # Chunk.to_json(): five ints, two hashes as hex


def _ints(values) -> str:
    return "[" + ",".join(map(str, values)) + "]"


def _template(name: str, t, placement: str | None) -> str:
    # Only the strings may hold a '%': the slots stay slots, the rest is escaped.
    shards = ",".join('{"chunks":[' + ",".join([_CHUNK] * len(s.chunks)) + '],"offsets":'
                      + _ints(s.offsets) + ',"rank":' + str(s.rank) + ',"shape":'
                      + _ints(s.shape) + "}" for s in t.shards)
    head = (_text(name).replace("%", "%%") + ':{"dtype":' + _text(t.dtype).replace("%", "%%")
            + ',"kind":' + _text(t.kind).replace("%", "%%"))
    if placement is not None:
        head += ',"placement":' + placement.replace("%", "%%")
    return head + ',"shape":' + _ints(t.shape) + ',"shards":[' + shards + "]}"


def tensors(entries: dict) -> bytes:
    """canonical({name: entry.to_json() for name, entry in entries.items()})."""
    keys, ints, whole = [], [], True
    for name in sorted(entries) if all(type(k) is str for k in entries) else ():
        t = entries[name]
        shards = t.shards
        placement = None if t.placement is None else _text(t.placement)
        # Equal keys give equal text only for exact ints and strs (True == 1, "a" == a str
        # subclass): every int of the record is type-checked below, in one pass.
        keys.append((name, (t.dtype, t.kind, tuple(t.shape), placement,
                            tuple((tuple(s.offsets), tuple(s.shape), s.rank, len(s.chunks))
                                  for s in shards))))
        ints += t.shape
        for s in shards:
            ints += s.offsets
            ints += s.shape
            ints.append(s.rank)
            for c in s.chunks:
                ints += c
                whole = whole and len(c) == 7
    if not whole or len(keys) != len(entries) or not set(map(type, ints)) <= {int} or not all(
            type(k[1][0]) is str and type(k[1][1]) is str for k in keys):
        return canonical({k: v.to_json() for k, v in entries.items()})
    parts = []
    for name, key in keys:
        t = entries[name]
        hit = _TEMPLATES.get(name)
        if hit is None or hit[0] != key:
            hit = (key, _template(name, t, key[3]))
            if len(_TEMPLATES) < _MAX_TEMPLATES or name in _TEMPLATES:
                _TEMPLATES[name] = hit
        parts.append(hit[1] % tuple([v for s in t.shards for c in s.chunks for v in c]))
    return ("{" + ",".join(parts) + "}").encode("ascii")

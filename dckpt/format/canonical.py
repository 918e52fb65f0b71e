"""The canonical JSON of a manifest, and a faster writer of its largest part.

The canonical form is what `json.dumps(obj, sort_keys=True, separators=(",", ":"),
allow_nan=False, ensure_ascii=True)` gives: the manifest's self hash is taken over it,
and readers compare against it. Its "tensors" member is most of a manifest (one record
per tensor, one list per chunk) and its records all have one shape, so `tensors()` writes
them directly from the records, byte for byte what json.dumps writes of their to_json()
(tests/test_manifest_canonical.py compares the two), at a fraction of the cost: of the
300-tensor manifest of benchmarks/bench_small.py, to_bytes took 1.6-1.7 ms CPU (the records'
dicts, then json.dumps), 0.9 ms with this writer (0.54 ms of it the records). Anything of
another shape (a value that is not an exact int where ints are expected, a key that is not
a str) goes through json.dumps, so the bytes never differ.

The native core writes the same bytes again, without a Python call per number: the
records (`records_json`, csrc/tensor_records.cpp) and any other JSON value (`value_json`:
state trees, RNG states, metadata).
format never imports the core: the storage layer hands them in with `use_native` when it
loads the core (dckpt/storage/records.py), as it hands in the native record check for
reads. Without them (a process without the core) json and this module's writer run;
tests/test_manifest_canonical.py holds all of them to the same bytes.
"""
from __future__ import annotations

import json
from typing import Any, Callable

# (entries, placements: name -> placement text) -> the bytes, or None for json's writer
RecordsWriter = Callable[[dict, dict], "bytes | None"]
# a value -> its bytes, or None for json's writer
ValueWriter = Callable[[Any], "bytes | None"]
_records: RecordsWriter | None = None
_value: ValueWriter | None = None


def use_native(records: RecordsWriter | None, value: ValueWriter | None) -> None:
    """Write with these from now on (None: json and this module's writer)."""
    global _records, _value
    _records, _value = records, value


def canonical(obj: Any) -> bytes:
    if _value is not None:
        out = _value(obj)
        if out is not None:
            return out
    return dumped(obj)


def dumped(obj: Any) -> bytes:
    """canonical() by json."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False,
                      ensure_ascii=True).encode("ascii")


def _text(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False,
                      ensure_ascii=True)


# A record's text is a template: its strings (name, dtype, kind, placement) written out and
# a slot for every number (shapes, offsets, ranks, each chunk's five ints and two hashes).
# Kept per name and reused while the strings and the counts of numbers are equal, which they
# are save after save. Bounded: a state with more tensors than this formats the rest each
# time.
_TEMPLATES: dict[str, tuple] = {}
_MAX_TEMPLATES = 1 << 16
_CHUNK = '[%d,%d,%d,%d,%d,"%016x","%016x"]'  # Chunk.to_json(): five ints, two hashes as hex


def _slots(n: int) -> str:
    return "[" + ",".join(["%d"] * n) + "]"


def _template(name: str, t, placement: str | None) -> str:
    # The strings are escaped ('%' -> '%%'); the numbers are slots.
    shards = ",".join('{"chunks":[' + ",".join([_CHUNK] * len(s.chunks)) + '],"offsets":'
                      + _slots(len(s.offsets)) + ',"rank":%d,"shape":' + _slots(len(s.shape))
                      + "}" for s in t.shards)
    head = (_text(name).replace("%", "%%") + ':{"dtype":' + _text(t.dtype).replace("%", "%%")
            + ',"kind":' + _text(t.kind).replace("%", "%%"))
    if placement is not None:
        head += ',"placement":' + placement.replace("%", "%%")
    return head + ',"shape":' + _slots(len(t.shape)) + ',"shards":[' + shards + "]}"


_PLACEMENTS: dict[tuple, str] = {}  # a placement's items -> its text (a handful per state)


def _placement(p: dict) -> str:
    """_text(p), remembered for placements of strings only ({"kind": "replicated"}: one per
    tensor of a DDP state, a json.dumps each otherwise). Sharded ones hold lists, and a
    number as key would confuse 1, 1.0 and True: those are written each time."""
    if type(p) is not dict or not all(type(k) is str and type(v) is str
                                      for k, v in p.items()):
        return _text(p)
    key = tuple(p.items())
    text = _PLACEMENTS.get(key)
    if text is None:
        text = _text(p)
        if len(_PLACEMENTS) < 256:
            _PLACEMENTS[key] = text
    return text


def tensors(entries: dict) -> bytes:
    """canonical({name: entry.to_json() for name, entry in entries.items()})."""
    if _records is not None:
        out = _records(entries, {n: _placement(t.placement) for n, t in entries.items()
                                 if t.placement is not None})
        if out is not None:
            return out
    return written(entries)


def written(entries: dict) -> bytes:
    """tensors() by this module's writer."""
    if not all(type(k) is str for k in entries):
        return canonical({k: v.to_json() for k, v in entries.items()})
    parts, numbers, exact = [], [], True
    for name in sorted(entries):
        t = entries[name]
        exact = exact and type(t.dtype) is str and type(t.kind) is str
        placement = None if t.placement is None else _placement(t.placement)
        # The numbers in the order the template holds their slots (a record's keys sorted:
        # shape before shards; a shard's chunks, offsets, rank, shape), the counts in the key.
        values = list(t.shape)
        layout = [t.dtype, t.kind, placement, len(values)]
        for s in t.shards:
            chunks = s.chunks
            for c in chunks:
                values += c
                exact = exact and len(c) == 7
            values += s.offsets
            values.append(s.rank)
            values += s.shape
            layout += (len(chunks), len(s.offsets), len(s.shape))
        hit = _TEMPLATES.get(name)
        if hit is None or hit[0] != layout:
            hit = (layout, _template(name, t, placement))
            if len(_TEMPLATES) < _MAX_TEMPLATES or name in _TEMPLATES:
                _TEMPLATES[name] = hit
        parts.append((hit[1], values))
        numbers += values
    # Exact ints and strs only: json writes a bool as true, a float with a point, and a
    # str subclass by its own str; anything else is written by json itself.
    if not exact or not set(map(type, numbers)) <= {int}:
        return canonical({k: v.to_json() for k, v in entries.items()})
    return ("{" + ",".join([text % tuple(values) for text, values in parts])
            + "}").encode("ascii")

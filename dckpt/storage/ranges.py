"""Which byte ranges of which objects a load asks for: chunks coalesced into large GETs.

An object store charges per request (latency, and on some servers a cost proportional to
the whole object for every ranged GET), so a load of many chunks asks for few large
ranges: chunks that lie close together in one object (gaps of at most `max_gap` bytes,
read and dropped) join one range of at most `max_bytes`, whichever tensor each belongs to.
Every chunk keeps its own destination and is still checked by its own hash after its range
has landed; a range never splits a chunk (a chunk larger than `max_bytes` is a range of its
own). Overlapping or out-of-order chunks (a hostile manifest) are never merged with each
other: each then costs its own request, and nothing is read twice into one place.
"""
from __future__ import annotations

from dataclasses import dataclass, field

MAX_GAP = 1 << 20  # bytes read and dropped to join two chunks rather than ask twice


@dataclass
class Span:
    """One GET: bytes [start, stop) of object `file`, and the pieces (indices into the
    caller's list) that lie in it, by offset."""
    file: int
    start: int
    stop: int
    pieces: list[int] = field(default_factory=list)


def coalesce(pieces: list[tuple[int, int, int]], max_bytes: int,
             max_gap: int = MAX_GAP) -> list[Span]:
    """Spans covering `pieces` ((file, offset, length) each, length >= 0), largest first
    (so the longest requests start first on a pool). Each piece is in exactly one span."""
    order = sorted(range(len(pieces)), key=lambda i: (pieces[i][0], pieces[i][1], i))
    spans: list[Span] = []
    cur: Span | None = None
    for i in order:
        f, off, n = pieces[i]
        if (cur is not None and cur.file == f and cur.stop <= off <= cur.stop + max_gap
                and off + n - cur.start <= max_bytes):
            cur.pieces.append(i)
            cur.stop = off + n
            continue
        cur = Span(f, off, off + n, [i])
        spans.append(cur)
    spans.sort(key=lambda s: s.start - s.stop)  # stable: equal sizes keep file order
    return spans


def span_bytes(total: int, threads: int, low: int, high: int) -> int:
    """The largest span for a load of `total` bytes on `threads` requests in flight: enough
    spans to keep every request busy, none smaller than `low` (fewer, larger requests
    where the load is small) nor larger than `high` (which wins over `low`)."""
    return max(1, min(high, max(low, -(-total // max(1, threads)))))


__all__ = ["Span", "coalesce", "span_bytes", "MAX_GAP"]

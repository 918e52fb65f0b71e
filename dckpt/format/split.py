"""The split layout (format version 3): a small index plus one record file per rank.

A single manifest holds every chunk of every rank, so every rank of a large job would read
and parse records of the whole job to restore its own share. In the split layout
`manifest.json` is an index: the job-wide values (counters, metrics, meta, meshes), the
records of tensors every rank needs (replicated ones, written once), which rank owns each
owned tensor, and one entry per rank naming its record file `records-NNNNN.json` with the
file's size and XXH3 hash. A record file holds that rank's data files, the records of the
blocks it wrote (sharded, owned and per-rank tensors) and its state tree. The index is
still written last and is the commit point; its self hash covers the record files' hashes,
so verification still covers every byte.

Each index entry also carries the rank's `span`: the smallest interval of [0, 1] holding
every block it wrote along the first dimension, as fractions of the global size (exact
integer pairs). A reader resharding to another world size reads only the record files
whose span overlaps the rows it needs. The index grows by one entry (~90 bytes) per rank
plus the replicated records and one name per owned tensor: it is bounded by the world size
and the model's tensor count, never by their product.

Pure data like the rest of format: no torch, no native core.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import xxhash

from . import canonical

SPLIT_VERSION = 3
RECORDS_FORMAT = "dckpt-records"
MAX_RECORD_BYTES = 256 << 20


def record_name(rank: int) -> str:
    return f"records-{rank:05d}.json"


Span = tuple[tuple[int, int], tuple[int, int]]  # ((lo_num, lo_den), (hi_num, hi_den))
FULL: Span = ((0, 1), (1, 1))


@dataclass
class RecordRef:
    """One rank's record file, as the index describes it."""
    name: str
    size: int
    hash: int
    rank: int
    span: Span | None  # None: the rank wrote no blocks of partly held tensors

    def to_json(self) -> dict:
        return {"name": self.name, "size": self.size, "hash": f"{self.hash:016x}",
                "rank": self.rank, "span": None if self.span is None else
                [list(self.span[0]), list(self.span[1])]}

    @classmethod
    def of(cls, rank: int, data: bytes, span: Span | None) -> "RecordRef":
        return cls(record_name(rank), len(data), xxhash.xxh3_64_intdigest(data), rank, span)


NO_SPAN = (0, 0, 0, 0)


@dataclass
class SplitIndex:
    """What the index says about the record files, column by column (one entry per rank;
    record r is named record_name(r)), and which of them a Manifest has read."""
    sizes: list[int]
    hashes: list[str]  # 16 hex digits each
    spans: list[int]  # 4 per rank: lo_num, lo_den, hi_num, hi_den; NO_SPAN for none
    owned: dict[str, int]  # owned tensor -> rank whose record file holds it
    loaded: set[int] = field(default_factory=set)
    index_tensors: int = 0  # how many of Manifest.tensors came from the index itself

    @classmethod
    def of(cls, refs: list[RecordRef], owned: dict[str, int]) -> "SplitIndex":
        spans: list[int] = []
        for ref in refs:
            spans.extend(NO_SPAN if ref.span is None else (*ref.span[0], *ref.span[1]))
        return cls([r.size for r in refs], [f"{r.hash:016x}" for r in refs], spans, owned)

    @property
    def count(self) -> int:
        return len(self.sizes)

    @property
    def complete(self) -> bool:
        return len(self.loaded) == len(self.sizes)

    def span(self, r: int) -> Span | None:
        a, b, c, d = self.spans[4 * r:4 * r + 4]
        return None if b == 0 else ((a, b), (c, d))

    def ref(self, r: int) -> RecordRef:
        return RecordRef(record_name(r), self.sizes[r], int(self.hashes[r], 16), r, self.span(r))

    def to_json(self) -> dict:
        return {"sizes": self.sizes, "hashes": self.hashes, "spans": self.spans}

    def overlapping(self, want: Span) -> list[int]:
        """Unread records whose span overlaps `want`."""
        sp = self.spans
        return [r for r in range(self.count) if r not in self.loaded and sp[4 * r + 1]
                and overlaps(((sp[4 * r], sp[4 * r + 1]), (sp[4 * r + 2], sp[4 * r + 3])),
                             want)]


# ---- spans ---------------------------------------------------------------------------------
def block_interval(offsets: list[int], shape: list[int], gshape: list[int]) -> Span:
    """The rows [lo, hi) of a block as fractions of the first dimension; the whole of [0, 1]
    for scalars and tensors with no rows."""
    if not gshape or gshape[0] == 0:
        return FULL
    return (offsets[0], gshape[0]), (offsets[0] + shape[0], gshape[0])


def span_of(blocks: list[tuple[list[int], list[int], list[int]]]) -> Span | None:
    """The envelope of (offsets, shape, global shape) blocks, reduced fractions; None if
    there are none."""
    lo = hi = None
    for offsets, shape, gshape in blocks:
        (a, b), (c, d) = block_interval(offsets, shape, gshape)
        f, g = Fraction(a, b), Fraction(c, d)
        lo = f if lo is None or f < lo else lo
        hi = g if hi is None or g > hi else hi
    if lo is None:
        return None
    return (lo.numerator, lo.denominator), (hi.numerator, hi.denominator)


def overlaps(span: Span | None, want: Span) -> bool:
    """Whether a record's span can hold rows of the interval `want` (integer arithmetic)."""
    if span is None:
        return False
    (a, b), (c, d) = span
    (e, f), (g, h) = want
    if e * h == g * f:  # an empty interval (a block with no rows): anywhere may hold it
        return a * f <= e * b <= c * f
    return a * h < g * b and e * d < c * f  # lo < want_hi and want_lo < hi


# ---- record files --------------------------------------------------------------------------
def compact_mesh(mesh: dict) -> dict:
    """A mesh record with its rank list as {"first", "count"} when it is a contiguous run
    (the usual case): a 16,384-rank mesh is then 40 bytes in every record file, not 100 KB."""
    ranks = mesh.get("ranks")
    if isinstance(ranks, list) and ranks and ranks == list(range(ranks[0], ranks[0] + len(ranks))):
        return {**mesh, "ranks": {"first": ranks[0], "count": len(ranks)}}
    return mesh


def record_bytes(rank: int, files: list[dict], tensors: dict, entry: dict,
                 meshes: list[dict]) -> bytes:
    """A rank's record file: canonical JSON (sorted keys, compact, ASCII). `tensors`: name
    -> TensorEntry, written by canonical.tensors (the bytes json.dumps gives of their
    to_json(), faster). Chunk file indices refer to `files`; placement mesh indices to
    `meshes`."""
    doc = {"format": RECORDS_FORMAT, "version": SPLIT_VERSION, "rank": rank, "files": files,
           "rank_state": entry, "meshes": [compact_mesh(m) for m in meshes]}
    parts = {k: canonical.canonical(v) for k, v in doc.items()}
    parts["tensors"] = canonical.tensors(tensors)
    return (b"{" + b",".join(canonical.canonical(k) + b":" + parts[k] for k in sorted(parts))
            + b"}\n")


def expand_ranks(value: Any) -> Any:
    """A mesh's "ranks" as a list (undoing compact_mesh); anything else unchanged, for the
    validator to judge."""
    if isinstance(value, dict) and set(value) == {"first", "count"}:
        first, count = value["first"], value["count"]
        if (type(first) is int and type(count) is int and 0 <= first <= 1 << 20
                and 0 < count <= 1 << 20):
            return list(range(first, first + count))
    return value


def wanted_interval(offsets: list[int] | None, shape: list[int] | None,
                    gshape: list[int]) -> Span:
    """The rows a reader needs of a tensor: a block, or all of it."""
    if offsets is None or shape is None or math.prod(gshape) == 0:
        return FULL
    return block_interval(offsets, shape, gshape)

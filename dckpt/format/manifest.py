"""The manifest: schema, validation and (de)serialization of a checkpoint's description.

Pure data: no torch, so tools can read a checkpoint anywhere. Every field is validated on
parse before anything trusts it (see docs/FORMAT.md). The usual tensor record is checked
and built by the native core, handed in by dckpt.storage.records; every other record (and
every record where no core is given) is checked field by field here, naming what is wrong.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import xxhash

from ..errors import (CheckpointNotFoundError, CorruptCheckpointError, FormatVersionError,
                      ManifestError, NotACheckpointError)
from .dtypes import ITEMSIZE, numpy_itemsize
from . import canonical, split as splitfmt

# The fast check of whole-tensor records: the native core's `whole_tensors`, handed in by
# the storage layer (dckpt.storage.records), which alone imports the core. It returns an
# entry per record it accepts and None for the rest, which _check_tensor then checks field
# by field. Without it (the reference reader; `dckpt inspect` in a process without the
# core) every record is checked field by field: the same rules, slower. The Python mirror
# of the native check is tests/test_native_records.py's oracle, not a second runtime path.
RecordCheck = Any  # (tensors, file_sizes, world, ITEMSIZE, (Chunk, Shard, TensorEntry)) -> list
# Reads a record file that is not in a local directory: (location, expected size) -> bytes.
RecordFetch = Callable[[str, int], bytes]

FORMAT_NAME = "dckpt"
FORMAT_VERSION = 3  # the newest this dckpt reads
VIEWS_VERSION = 2  # written only by saves whose state tree holds $view nodes (docs/FORMAT.md)
# 3: the split layout (format/split.py): an index plus one record file per rank
HASH_ALGORITHM = "xxh3_64"
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 512 << 20


def _env_limit(name: str, default: int) -> int:
    """A limit a user may raise (or lower) by environment variable; bad values are ignored."""
    try:
        value = int(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if value > 0 else default


# Parsed JSON takes up to ~30x its text (`[],` is 3 bytes, an empty list 64), so the byte
# limit alone let a 300 MB manifest of empty lists take > 4 GB. Values (counted as commas
# plus brackets plus braces, an upper bound found before parsing) and tensor records are
# bounded too: a 70B-parameter model with AdamW on 64 ranks, 4 MB chunks, writes about 5M
# values and 2k tensors. At the value limit a parse takes at most about 1 GB.
MAX_MANIFEST_VALUES = _env_limit("DCKPT_MAX_MANIFEST_VALUES", 1 << 24)
MAX_MANIFEST_TENSORS = _env_limit("DCKPT_MAX_MANIFEST_TENSORS", 1 << 19)
MAX_CHUNK_BYTES = 1 << 30
MAX_INT = (1 << 63) - 1
# A zstd block of up to 128 KiB costs at least 4 stored bytes (an RLE block), so no frame
# expands more than this: it bounds what a declared raw length can claim from a small file.
MAX_ZSTD_RATIO = 1 << 15
# Shard overlap checks allowed per tensor; real layouts (1-D or 2-D grids) need far fewer.
MAX_SHARD_COMPARISONS = 10_000_000

CODEC_RAW, CODEC_ZSTD, CODEC_ZSTD_SHUFFLE = 0, 1, 2
CODEC_NAMES = {CODEC_RAW: "raw", CODEC_ZSTD: "zstd", CODEC_ZSTD_SHUFFLE: "zstd+shuffle"}

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,254}$")
_HEX16 = re.compile(r"[0-9a-f]{16}").fullmatch


def is_safe_name(name: Any) -> bool:
    """A single path component: no separators, no '..', no hidden or absolute names."""
    return isinstance(name, str) and bool(_SAFE_NAME.match(name)) and ".." not in name


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def open_regular(path: str | os.PathLike) -> tuple[int, os.stat_result]:
    """Open a file of a checkpoint for reading as the native reader opens data files
    (csrc/fileio.cpp): O_NOFOLLOW, since a checkpoint holds only regular files and a link
    could lead a loader (and an incremental save's hard link) outside it; O_NONBLOCK, so a
    FIFO cannot hang the open; then fstat, regular files only. Returns the descriptor and
    its stat. Raises OSError as os.open does (FileNotFoundError, ...), and ValueError
    saying what the path is instead of a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ValueError("is a symbolic link (refused: a checkpoint holds only regular "
                             "files; replace the link with a copy of the file)") from None
        raise
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
        raise ValueError(f"is {kind}, not a regular file (refused)")
    return fd, st


def read_manifest_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of the manifest at `path`, for every manifest reader. Opened by
    open_regular (no FIFO can hang it, no link leads it to /dev/zero), its size checked
    before reading, and never more than MAX_MANIFEST_BYTES + 1 bytes read (a file growing
    meanwhile cannot make it read more). Raises ManifestError for a link, a non-regular or
    an oversized file, OSError (FileNotFoundError, ...) where it cannot be opened."""
    try:
        fd, st = open_regular(path)
    except ValueError as e:
        raise ManifestError(f"{path} {e}", str(path)) from None
    try:
        if st.st_size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{path}: size: {st.st_size} bytes exceeds the "
                                f"{MAX_MANIFEST_BYTES} byte limit", str(path), "size")
        parts, total, want = [], 0, st.st_size + 1
        while total <= MAX_MANIFEST_BYTES:
            part = os.read(fd, min(want, MAX_MANIFEST_BYTES + 1 - total))
            if not part:
                break
            parts.append(part)
            total += len(part)
            want = 1 << 20
        if total > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{path}: size: it grew past the {MAX_MANIFEST_BYTES} byte "
                                "limit while being read", str(path), "size")
        return b"".join(parts)
    finally:
        os.close(fd)


class Chunk(NamedTuple):
    """A stored chunk, fields in the order the native core takes them (a tuple goes to it
    as is: thousands per load)."""
    file: int
    offset: int
    stored: int
    raw: int
    codec: int
    raw_hash: int
    stored_hash: int

    def to_json(self) -> list:
        return [self.file, self.offset, self.stored, self.raw, self.codec,
                f"{self.raw_hash:016x}", f"{self.stored_hash:016x}"]


class Shard(NamedTuple):
    """A stored block of a tensor: its place in the global tensor and its chunks."""
    offsets: list[int]
    shape: list[int]
    rank: int
    chunks: list[Chunk]

    @property
    def raw_bytes(self) -> int:
        return sum(c.raw for c in self.chunks)

    def to_json(self) -> dict:
        return {"offsets": self.offsets, "shape": self.shape, "rank": self.rank,
                "chunks": [c.to_json() for c in self.chunks]}


class TensorEntry(NamedTuple):
    """A logical tensor. kind "torch" uses torch dtype names, "numpy" numpy dtype strings.

    placement (distributed saves): {"kind": "sharded", "mesh": i, "placements": [...]} for a
    DTensor (mesh i of Manifest.meshes), or {"kind": "replicated" | "owned" | "local"}.
    Which rank wrote each shard is Shard.rank."""
    dtype: str
    shape: list[int]
    shards: list[Shard]
    kind: str = "torch"
    placement: dict | None = None

    @property
    def itemsize(self) -> int:
        size = ITEMSIZE.get(self.dtype) if self.kind == "torch" else numpy_itemsize(self.dtype)
        assert size is not None, self.dtype
        return size

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    @property
    def stored_bytes(self) -> int:
        return sum(c.stored for s in self.shards for c in s.chunks)

    def to_json(self) -> dict:
        out = {"kind": self.kind, "dtype": self.dtype, "shape": self.shape,
               "shards": [s.to_json() for s in self.shards]}
        if self.placement is not None:
            out["placement"] = self.placement
        return out


@dataclass
class FileEntry:
    """A data file. `dir` names a sibling checkpoint directory for chunks an incremental
    checkpoint shares with an older one; None means this checkpoint's own directory."""
    name: str
    size: int
    rank: int
    dir: str | None = None

    def path(self, ckpt: str | os.PathLike) -> Path:
        """Where the file lies: in checkpoint `ckpt`, or in the sibling `dir` names."""
        ckpt = Path(ckpt)
        return ckpt.parent / self.dir / self.name if self.dir else ckpt / self.name

    def to_json(self) -> dict:
        out: dict = {"name": self.name, "size": self.size, "rank": self.rank}
        if self.dir is not None:
            out["dir"] = self.dir
        return out


@dataclass
class Manifest:
    world_size: int = 1
    files: list[FileEntry] = field(default_factory=list)
    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    ranks: list[dict] = field(default_factory=list)  # per rank: {"tree": encoded tree, ...}
    counters: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)  # library versions, options, provenance notes
    created: float = field(default_factory=time.time)
    version: int = 1  # save() writes VIEWS_VERSION where the trees hold views
    # device meshes of sharded tensors: {"shape": [...], "dim_names": [...] | None,
    # "ranks": [global ranks, row-major]}
    meshes: list[dict] = field(default_factory=list)
    # The split layout (format/split.py): the index's view of the record files and which
    # were read. None for the single-file layout.
    split: splitfmt.SplitIndex | None = field(default=None, repr=False)

    def to_dict(self, tensors: bool = True) -> dict:
        """The manifest as JSON values; without its "tensors" member when not `tensors`
        (to_bytes writes that one itself)."""
        if self.split is not None and not self.split.loaded:
            return self._index_dict(tensors)
        if self.split is not None and not self.split.complete:
            raise ValueError("a split manifest with only some record files read cannot be "
                             "written as one file")
        out = {
            "format": FORMAT_NAME,
            # A split checkpoint read whole is written as one file: the version that may
            # hold views, not the split layout's.
            "version": min(self.version, VIEWS_VERSION),
            "hash_algorithm": HASH_ALGORITHM,
            "created": self.created,
            "world_size": self.world_size,
            "files": [f.to_json() for f in self.files],
            "ranks": self.ranks,
            "counters": encode_nonfinite(self.counters),
            "metrics": encode_nonfinite(self.metrics),
            "meta": self.meta,
        }
        if tensors:
            out["tensors"] = {k: v.to_json() for k, v in self.tensors.items()}
        if self.meshes:
            out["meshes"] = self.meshes
        return out

    def _index_dict(self, tensors: bool = True) -> dict:
        """The split layout's index: what every rank reads (docs/FORMAT.md)."""
        out = {
            "format": FORMAT_NAME, "version": splitfmt.SPLIT_VERSION,
            "hash_algorithm": HASH_ALGORITHM, "created": self.created,
            "world_size": self.world_size, "files": [f.to_json() for f in self.files],
            "records": self.split.to_json(),
            "owned": self.split.owned,
            "counters": encode_nonfinite(self.counters),
            "metrics": encode_nonfinite(self.metrics), "meta": self.meta,
        }
        if tensors:
            out["tensors"] = {k: v.to_json() for k, v in self.tensors.items()}
        if self.meshes:
            out["meshes"] = self.meshes
        return out

    def to_bytes(self) -> bytes:
        parts = _canonical_parts(self.to_dict(tensors=False))
        parts["tensors"] = canonical.tensors(self.tensors)  # its records written directly
        digest = xxhash.xxh3_64_intdigest(_join(parts))
        parts["self_hash"] = _canonical(f"{digest:016x}")
        return _join(parts) + b"\n"

    @property
    def total_bytes(self) -> int:
        total = 0
        for t in self.tensors.values():  # TensorEntry.nbytes, inlined: asked at every save
            size = ITEMSIZE.get(t.dtype) if t.kind == "torch" else None
            total += math.prod(t.shape) * size if size is not None else t.nbytes
        return total

    @property
    def stored_bytes(self) -> int:
        return sum(t.stored_bytes for t in self.tensors.values())


# JSON has no NaN or infinity, and a diverging run still checkpoints: in metrics and counters
# a non-finite float is stored as the state tree's one-key object {"$float": "nan"|"inf"|
# "-inf"} and read back as the float (docs/FORMAT.md). Nowhere else is one accepted.
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def encode_nonfinite(v: Any) -> Any:
    """`v` (plain JSON values) with every non-finite float as {"$float": ...}."""
    if isinstance(v, float) and not math.isfinite(v):
        return {"$float": "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")}
    if isinstance(v, dict):
        return {k: encode_nonfinite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [encode_nonfinite(x) for x in v]
    return v


def _decode_nonfinite(c: "_Check", v: Any, where: str) -> Any:
    if isinstance(v, dict):
        if len(v) == 1 and "$float" in v:
            if not isinstance(v["$float"], str) or v["$float"] not in _NONFINITE:
                c.fail(where, f"bad $float payload {v['$float']!r:.40}")
            return _NONFINITE[v["$float"]]
        return {k: _decode_nonfinite(c, x, f"{where}.{k}") for k, x in v.items()}
    if isinstance(v, list):
        return [_decode_nonfinite(c, x, f"{where}[{i}]") for i, x in enumerate(v)]
    return v


def _values(c: "_Check", obj: dict, key: str) -> dict:
    """The counters or metrics dict, non-finite floats decoded."""
    try:
        return _decode_nonfinite(c, c.type_(obj.get(key, {}), dict, key), key)
    except RecursionError:
        c.fail(key, "nested too deeply")


_canonical = canonical.canonical


# The canonical form of a dict is its sorted "key":value pairs joined by commas, so the forms
# with and without "self_hash" are built from one serialization of the top-level values.
def _canonical_parts(obj: dict) -> dict[str, bytes]:
    return {k: _canonical(v) for k, v in obj.items()}


def _join(parts: dict[str, bytes]) -> bytes:
    return b"{" + b",".join(_canonical(k) + b":" + parts[k] for k in sorted(parts)) + b"}"


def _no_duplicates(pairs: list) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise ManifestError(f"duplicate key {k!r} in manifest", field=k)
        out[k] = v
    return out


def _reject_constant(name: str):
    raise ManifestError(f"non-standard JSON constant {name} in manifest")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ManifestError(f"number {text[:40]} is out of range")
    return value


def _decode(data: bytes, path: str | None) -> tuple[Any, dict | None, bool]:
    """The JSON value of `data`; its canonical parts when `data` is exactly the canonical
    form (which every writer produces); and whether `data` already passed its self hash.

    The usual manifest passes the self hash on its raw bytes (see _raw_hash_ok): the bytes
    are then what the writer serialized, canonical by construction, unless forged (a forger
    can make any bytes pass: their duplicate keys read last-wins, and they still face every
    schema check). Otherwise the value is serialized again to compare with `data` (about
    2 ms per 200 KB), and anything that is not the canonical form is parsed again with
    checks that name the problem."""
    try:
        # A non-standard constant or a number out of range, even in bytes that pass the
        # self hash, sends them to the strict parse below, which names it.
        obj = json.loads(data, parse_constant=_reject_constant, parse_float=_finite_float)
        if isinstance(obj, dict):
            if _raw_hash_ok(data, obj.get("self_hash")):
                return obj, None, True
            parts = _canonical_parts(obj)
            full = _join(parts)
            if data == full or data == full + b"\n":
                return obj, parts, False
    except (ManifestError, ValueError, RecursionError):
        pass
    try:
        return json.loads(data, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant,
                          parse_float=_finite_float), None, False
    except ManifestError as e:
        raise ManifestError(f"{path or 'manifest'}: {e}", path, e.field) from None
    except (ValueError, RecursionError) as e:
        raise ManifestError(f"{path or 'manifest'}: not valid JSON ({e})", path) from None


def _raw_hash_ok(data: bytes, stored: Any) -> bool:
    """Whether `data` with one `,"self_hash":"<stored>"` member (and a trailing newline)
    cut out hashes to `stored`. The writer hashed the canonical form without that member,
    so a match means these are the bytes it wrote, byte for byte (an xxh3 collision aside,
    the assurance the self hash gives anyway), without serializing the value again.
    A nested member spelled the same cannot pass in place of the top-level one: the rest
    would then still hold a top-level "self_hash", which the hashed form never has."""
    if type(stored) is not str or not _HEX16(stored):
        return False
    member = b',"self_hash":"' + stored.encode() + b'"'
    body = memoryview(data)[:-1] if data.endswith(b"\n") else memoryview(data)
    want = int(stored, 16)
    at = data.find(member, 0, len(body))
    while at >= 0:
        h = xxhash.xxh3_64()
        h.update(body[:at])
        h.update(body[at + len(member):])
        if h.intdigest() == want:
            return True
        at = data.find(member, at + 1, len(body))
    return False


def _check_self_hash(c: "_Check", obj: dict, parts: dict | None) -> None:
    """The hash covers the canonical form without "self_hash", and the bytes must be the
    canonical form exactly (one trailing newline allowed; `parts` is None when they are
    not): so every change is caught, even one JSON reads as the same value ("1E-08" for
    "1e-08", "\\u00E9" for "\\u00e9")."""
    stored_hash = c.hash_(obj.pop("self_hash", None), "self_hash")
    canonical = parts is not None
    if parts is None:
        try:
            parts = _canonical_parts(obj)
        except (ValueError, RecursionError) as e:
            c.fail("top level", f"cannot be written canonically ({e})")
    parts.pop("self_hash", None)
    actual = xxhash.xxh3_64_intdigest(_join(parts))
    problem = None
    if actual != stored_hash:
        problem = f"manifest hash mismatch (expected {stored_hash:016x}, got {actual:016x})"
    elif not canonical:
        problem = "manifest bytes are not in canonical form"
    if problem:
        raise CorruptCheckpointError(
            f"{c.path or 'manifest'}: {problem}: the manifest was modified or damaged",
            path=c.path, expected=stored_hash, actual=actual)


class _Check:
    """Field validation that names the offending field and file in every error."""

    def __init__(self, path: str | None):
        self.path = path

    def fail(self, where: str, why: str):
        raise ManifestError(f"{self.path or 'manifest'}: {where}: {why}", self.path, where)

    def int_(self, v: Any, where: str, lo: int = 0, hi: int = MAX_INT) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            self.fail(where, f"expected an integer in [{lo}, {hi}], got {v!r:.80}")
        return v

    def type_(self, v: Any, t: type, where: str):
        if not isinstance(v, t) or isinstance(v, bool) and t is not bool:
            self.fail(where, f"expected {t.__name__}, got {type(v).__name__}")
        return v

    def hash_(self, v: Any, where: str) -> int:
        if not isinstance(v, str) or not _HEX16(v):
            self.fail(where, f"expected 16 lowercase hex digits, got {v!r:.40}")
        return int(v, 16)


def read_manifest(ckpt: str | os.PathLike, records: RecordCheck | None = None,
                  ranks: list[int] | None = None) -> Manifest:
    """The manifest of the checkpoint directory `ckpt`, read (read_manifest_bytes) and
    validated (parse): the one reader that load, incremental saves, repair and the
    reference reader use. `records`: the native record check (dckpt.storage.records).
    Raises NotACheckpointError (a file, a manager root: says what to use instead),
    CheckpointNotFoundError (no manifest), ManifestError (unreadable, a link, a FIFO, too
    large, invalid), FormatVersionError, CorruptCheckpointError (self-hash mismatch).
    ranks: of a split checkpoint (format/split.py), read only these ranks' record files
    (more can be read later by read_records); None reads them all: the whole manifest."""
    path = Path(ckpt) / MANIFEST_NAME
    try:
        data = read_manifest_bytes(path)
    except OSError as e:
        from .layout import not_a_checkpoint  # layout imports this module
        why = not_a_checkpoint(Path(ckpt))
        if why:
            raise NotACheckpointError(why, str(ckpt)) from None
        if isinstance(e, FileNotFoundError):
            raise CheckpointNotFoundError(
                f"{ckpt} is not a committed checkpoint (no {MANIFEST_NAME})") from None
        raise ManifestError(f"cannot read {path}: {e.strerror}", str(path)) from None
    m = parse(data, str(path), records)
    return read_records(m, ckpt, ranks, records) if m.split is not None else m


def parse(data: bytes, path: str | None = None, records: RecordCheck | None = None) -> Manifest:
    """Validate and parse manifest bytes. Raises ManifestError / FormatVersionError.
    `records`: the native record check (see RecordCheck); None checks them in Python."""
    c = _Check(path)
    if len(data) > MAX_MANIFEST_BYTES:
        c.fail("size", f"{len(data)} bytes exceeds the {MAX_MANIFEST_BYTES} byte limit")
    # Before parsing: what the parse would allocate. memchr-speed, ~1 ms per 3 MB.
    values = data.count(b",") + data.count(b"[") + data.count(b"{")
    if values > MAX_MANIFEST_VALUES:
        c.fail("size", f"about {values} JSON values exceed the limit of {MAX_MANIFEST_VALUES} "
                       "(set DCKPT_MAX_MANIFEST_VALUES to read a manifest this large)")
    # Every tensor record has a "shards" key: in the canonical form each writer produces,
    # this bounds the records before parsing (a record takes ~1.7 KB parsed and ~25 us).
    if data.count(b'"shards":') > MAX_MANIFEST_TENSORS:
        c.fail("tensors", f"more than {MAX_MANIFEST_TENSORS} tensor records exceed the limit "
                          "(set DCKPT_MAX_MANIFEST_TENSORS to read them)")
    obj, parts, hash_ok = _decode(data, path)
    c.type_(obj, dict, "top level")
    # Other spellings of the same are caught here, before the self hash and the records.
    tensors_obj = obj.get("tensors")
    if isinstance(tensors_obj, dict) and len(tensors_obj) > MAX_MANIFEST_TENSORS:
        c.fail("tensors", f"{len(tensors_obj)} tensor records exceed the limit of "
                          f"{MAX_MANIFEST_TENSORS} (set DCKPT_MAX_MANIFEST_TENSORS to read them)")
    if obj.get("format") != FORMAT_NAME:
        c.fail("format", f"not a dckpt manifest (format={obj.get('format')!r:.40})")
    version = obj.get("version")
    c.int_(version, "version", 1)
    if version > FORMAT_VERSION:
        raise FormatVersionError(
            f"{path or 'manifest'}: format version {version} is newer than this dckpt "
            f"supports ({FORMAT_VERSION}); upgrade dckpt to read it", path, "version")
    if obj.get("hash_algorithm") != HASH_ALGORITHM:
        c.fail("hash_algorithm", f"unsupported {obj.get('hash_algorithm')!r:.40}")
    if hash_ok:
        del obj["self_hash"]
    else:
        _check_self_hash(c, obj, parts)

    world = c.int_(obj.get("world_size"), "world_size", 1, 1 << 20)
    files = [_parse_file(c, f, i) for i, f in enumerate(c.type_(obj.get("files"), list, "files"))]
    meshes = [_parse_mesh(c, x, f"meshes[{i}]")
              for i, x in enumerate(c.type_(obj.get("meshes", []), list, "meshes"))]
    tensors_obj = c.type_(obj.get("tensors"), dict, "tensors")
    tensors = _parse_tensors(c, tensors_obj, files, world, meshes, records)
    _check_regions(c, files, tensors)
    split = "records" in obj or version >= splitfmt.SPLIT_VERSION
    if split:
        if version < splitfmt.SPLIT_VERSION or "records" not in obj or "ranks" in obj:
            c.fail("records", f"version {version} with{'' if 'records' in obj else 'out'} "
                              "record files: the split layout is version 3 and has no ranks")
        index = _parse_index(c, obj, world, tensors)
        ranks: list = [None] * world
    else:
        ranks = c.type_(obj.get("ranks"), list, "ranks")
    if split:
        pass
    elif len(ranks) != world:
        c.fail("ranks", f"{len(ranks)} rank entries for world_size {world}")
    for r, entry in enumerate([] if split else ranks):
        c.type_(entry, dict, f"ranks[{r}]")
        if "tree" not in entry:
            c.fail(f"ranks[{r}]", "no tree")
        _check_aliases(c, entry.get("aliases", {}), f"ranks[{r}].aliases", tensors)
    created = obj.get("created")
    if not isinstance(created, (int, float)) or isinstance(created, bool):
        c.fail("created", "expected a timestamp")
    return Manifest(
        world_size=world, files=files, tensors=tensors, ranks=ranks,
        counters=_values(c, obj, "counters"), metrics=_values(c, obj, "metrics"),
        meta=c.type_(obj.get("meta", {}), dict, "meta"),
        created=float(created), version=version, meshes=meshes,
        split=index if split else None)


_HEX16_LIST = re.compile(r"[0-9a-f]{16}(?:,[0-9a-f]{16})*").fullmatch


def _parse_index(c: _Check, obj: dict, world: int, tensors: dict) -> splitfmt.SplitIndex:
    """The split layout's "records" (columns of one entry per rank) and "owned" map. Tight
    loops: at 16,384 ranks this is most of what a restoring rank parses."""
    x = c.type_(obj.get("records"), dict, "records")
    sizes, hashes, spans = x.get("sizes"), x.get("hashes"), x.get("spans")
    for key, v, n in (("sizes", sizes, world), ("hashes", hashes, world),
                      ("spans", spans, 4 * world)):
        if type(v) is not list or len(v) != n:
            c.fail(f"records.{key}", f"expected a list of {n} entries for world_size {world}")
    if set(map(type, sizes)) != {int} or min(sizes) < 1 or max(sizes) > splitfmt.MAX_RECORD_BYTES:
        c.fail("records.sizes", f"expected integers in [1, {splitfmt.MAX_RECORD_BYTES}]")
    if set(map(type, hashes)) != {str} or not _HEX16_LIST(",".join(hashes)):
        c.fail("records.hashes", "expected 16 lowercase hex digits each")
    if set(map(type, spans)) != {int} or min(spans) < 0:
        c.fail("records.spans", "expected non-negative integers")
    for r, (a, b, d, e) in enumerate(zip(spans[0::4], spans[1::4], spans[2::4], spans[3::4])):
        # lo = a/b <= hi = d/e <= 1, or all zero: the rank wrote no blocks
        if not (b and e and a <= b and d <= e and a * e <= d * b) and (a, b, d, e) != (0, 0, 0, 0):
            c.fail(f"records.spans[{r}]", f"expected 0 <= {a}/{b} <= {d}/{e} <= 1")
    owned = c.type_(obj.get("owned", {}), dict, "owned")
    for k, v in owned.items():
        c.int_(v, f"owned[{k!r:.80}]", 0, world - 1)
    return splitfmt.SplitIndex(sizes, hashes, spans, owned, index_tensors=len(tensors))


def read_records(m: Manifest, ckpt: str | os.PathLike, ranks: list[int] | None = None,
                 records: RecordCheck | None = None, fetch: RecordFetch | None = None) -> Manifest:
    """Read the record files of `ranks` (all when None) of a split manifest into `m`: their
    files, tensor blocks and rank entries. Each file's size is checked before it is read
    and its XXH3 against the index before it is parsed; then every field as in a single
    manifest. Once every record is read, the shards of every tensor must tile it, as in a
    single manifest. Raises CorruptCheckpointError (hash mismatch), IncompleteCheckpointError
    (a record file missing), ManifestError; each names the record file. fetch: how the
    bytes of a record file are read where `ckpt` is not a local directory (an object store:
    dckpt.storage.records), given its location and expected size."""
    index = m.split
    if index is None:
        return m
    todo = [r for r in (range(index.count) if ranks is None else ranks)
            if r not in index.loaded]
    touched: set[str] = set()
    for r in todo:
        ref = index.ref(r)
        if fetch is None:
            path = Path(ckpt) / ref.name
            data = _read_record(path, ref)
        else:
            path = f"{str(ckpt).rstrip('/')}/{ref.name}"
            data = _checked_record(path, ref, fetch(path, ref.size))
        touched |= _merge_record(m, _Check(str(path)), r, data, records)
        index.loaded.add(r)
    c = _Check(f"{str(ckpt).rstrip('/')}/{MANIFEST_NAME}")
    for name in touched:
        _check_disjoint(c, f"tensors[{name!r:.80}].shards", dict.__getitem__(m.tensors, name).shards)
    if index.complete and todo:
        for name, t in m.tensors.items():
            if sum(math.prod(s.shape) for s in t.shards) != math.prod(t.shape) or not t.shards:
                c.fail(f"tensors[{name!r:.80}].shards",
                       f"shards of all record files do not tile the global shape {t.shape}")
        _check_regions(c, m.files, m.tensors)
    return m


def _read_record(path: Path, ref: splitfmt.RecordRef) -> bytes:
    from ..errors import IncompleteCheckpointError
    try:
        fd, st = open_regular(path)
    except FileNotFoundError:
        raise IncompleteCheckpointError(f"record file {path} is missing (rank {ref.rank}'s "
                                        "tensor records)", str(path)) from None
    except ValueError as e:
        raise ManifestError(f"{path} {e}", str(path)) from None
    except OSError as e:
        raise ManifestError(f"cannot read {path}: {e.strerror}", str(path)) from None
    try:
        if st.st_size != ref.size:
            raise CorruptCheckpointError(
                f"{path}: record file has {st.st_size} bytes, the index records {ref.size}: "
                "it was truncated or modified", path=str(path))
        parts, total = [], 0
        while total < ref.size:
            part = os.read(fd, ref.size - total)
            if not part:
                break
            parts.append(part)
            total += len(part)
        data = b"".join(parts)
    finally:
        os.close(fd)
    return _checked_record(path, ref, data)


def _checked_record(path, ref: splitfmt.RecordRef, data: bytes) -> bytes:
    """`data`, the bytes read of record file `path`, when its size and XXH3 are the index's."""
    actual = xxhash.xxh3_64_intdigest(data)
    if actual != ref.hash or len(data) != ref.size:
        raise CorruptCheckpointError(
            f"{path}: record file hash mismatch (expected {ref.hash:016x}, got {actual:016x}): "
            "it was modified or damaged", path=str(path), expected=ref.hash, actual=actual)
    return data


def _merge_record(m: Manifest, c: _Check, r: int, data: bytes,
                  records: RecordCheck | None) -> set[str]:
    """Validate one record file and add it to `m`; returns the tensors it added shards to."""
    try:
        obj = json.loads(data, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ManifestError, ValueError, RecursionError) as e:
        c.fail("top level", f"not valid JSON ({e})")
    c.type_(obj, dict, "top level")
    if obj.get("format") != splitfmt.RECORDS_FORMAT or obj.get("rank") != r:
        c.fail("format", f"not the record file of rank {r}")
    files = [_parse_file(c, f, i) for i, f in enumerate(c.type_(obj.get("files"), list, "files"))]
    meshes = [_parse_mesh(c, x, f"meshes[{i}]")
              for i, x in enumerate(c.type_(obj.get("meshes", []), list, "meshes"))]
    world = m.world_size
    tensors_obj = c.type_(obj.get("tensors"), dict, "tensors")
    if len(tensors_obj) > MAX_MANIFEST_TENSORS:
        c.fail("tensors", f"{len(tensors_obj)} tensor records exceed the limit")
    fast = (records(tensors_obj, [f.size for f in files], world, ITEMSIZE,
                    (Chunk, Shard, TensorEntry)) if records is not None
            else [None] * len(tensors_obj))
    # Each record numbers its own meshes; the manifest's list holds each distinct one once.
    places = []
    for mesh in meshes:
        if mesh not in m.meshes:
            m.meshes.append(mesh)
        places.append(m.meshes.index(mesh))
    renumber = places != list(range(len(meshes)))
    tensors = {}
    for (name, t), e in zip(tensors_obj.items(), fast):
        e = (e or _block_tensor(name, t, files, world, meshes)
             or _check_tensor(c, name, t, files, world, meshes, tiles=False))
        if renumber and e.placement is not None and e.placement.get("kind") == "sharded":
            e = e._replace(placement={**e.placement, "mesh": places[e.placement["mesh"]]})
        tensors[name] = e
    entry = c.type_(obj.get("rank_state"), dict, "rank_state")
    if "tree" not in entry:
        c.fail("rank_state", "no tree")
    # One list of files for the manifest: a file several records name (an incremental
    # save's shared base file) is one entry, so overlapping claims on it are found.
    where = {(f.name, f.dir): i for i, f in enumerate(m.files)}
    remap = []
    for f in files:
        key = (f.name, f.dir)
        if key in where:
            if m.files[where[key]].size != f.size:
                c.fail(f"files[{f.name}]", "size differs from another record's")
        else:
            where[key] = len(m.files)
            m.files.append(f)
        remap.append(where[key])
    touched = set()
    for name, t in tensors.items():
        shards = [s._replace(chunks=[ch._replace(file=remap[ch.file]) for ch in s.chunks])
                  for s in t.shards]
        if any(s.rank != r for s in shards):
            c.fail(f"tensors[{name!r:.80}]", f"a shard of another rank in rank {r}'s records")
        old = dict.get(m.tensors, name)  # no lazy fetch (format/lookup.py) from here
        if old is None:
            dict.__setitem__(m.tensors, name, t._replace(shards=shards))
            if len(shards) > 1:
                touched.add(name)
            continue
        if (old.dtype, old.shape, old.kind) != (t.dtype, t.shape, t.kind):
            c.fail(f"tensors[{name!r:.80}]", "dtype, shape or kind differ from another record's")
        old.shards.extend(shards)
        touched.add(name)
    _check_aliases(c, entry.get("aliases", {}), "rank_state.aliases", m.tensors)
    m.ranks[r] = entry
    return touched


def _check_aliases(c: _Check, aliases: Any, where: str, tensors: dict) -> None:
    """A rank's tree names -> manifest tensor names; every target must exist."""
    c.type_(aliases, dict, where)
    for k, v in aliases.items():
        if not isinstance(v, str) or not dict.__contains__(tensors, v):
            c.fail(f"{where}[{k!r:.80}]", f"names no tensor of the manifest ({v!r:.80})")


def _parse_file(c: _Check, f: Any, i: int) -> FileEntry:
    where = f"files[{i}]"
    c.type_(f, dict, where)
    name, d = f.get("name"), f.get("dir")
    if not is_safe_name(name):
        c.fail(f"{where}.name", f"unsafe file name {name!r:.80}")
    if d is not None and not is_safe_name(d):
        c.fail(f"{where}.dir", f"unsafe directory name {d!r:.80}")
    return FileEntry(name, c.int_(f.get("size"), f"{where}.size"),
                     c.int_(f.get("rank"), f"{where}.rank"), d)


_SIMPLE_PLACEMENTS = {"replicated", "owned", "local"}


def _block_tensor(name: str, t: Any, files: list[FileEntry], world: int,
                  meshes: list[dict]) -> TensorEntry | None:
    """One block of a tensor with its placement, stored by one rank (a record file of the
    split layout holds a thousand of these): every check of _check_tensor with tiles=False
    in one pass. None for anything else, which _check_tensor then checks field by field."""
    if type(t) is not dict or not 0 < len(name) <= 4096:
        return None
    p = t.get("placement")
    if type(p) is not dict:
        return None
    pk = p.get("kind")
    if pk == "sharded":
        mesh, pl = p.get("mesh"), p.get("placements")
        if (len(p) != 3 or type(mesh) is not int or not 0 <= mesh < len(meshes)
                or type(pl) is not list or len(pl) != len(meshes[mesh]["shape"])):
            return None
        for x in pl:
            if type(x) is not str or len(x) >= 256:
                return None
    elif type(pk) is not str or pk not in _SIMPLE_PLACEMENTS or len(p) != 1:
        return None
    kind, dtype, shape, shards = t.get("kind"), t.get("dtype"), t.get("shape"), t.get("shards")
    if type(dtype) is not str or type(shards) is not list or len(shards) != 1:
        return None
    itemsize = (ITEMSIZE.get(dtype) if kind == "torch" else
                numpy_itemsize(dtype) if kind == "numpy" else None)
    s = shards[0]
    if itemsize is None or not _shape_ok(shape) or type(s) is not dict:
        return None
    offsets, sshape, rank, chunks = s.get("offsets"), s.get("shape"), s.get("rank"), s.get("chunks")
    if (not _shape_ok(sshape) or type(offsets) is not list or len(offsets) != len(shape)
            or len(sshape) != len(shape) or type(rank) is not int or not 0 <= rank < world
            or type(chunks) is not list):
        return None
    for o, n, g in zip(offsets, sshape, shape):
        if type(o) is not int or not 0 <= o or o + n > g:
            return None
    raw = 0
    for ch in chunks:
        if not _chunk_ok(ch, files):
            return None
        raw += ch[3]
    if raw != math.prod(sshape) * itemsize:
        return None
    return TensorEntry(dtype, shape, [Shard(offsets, sshape, rank, [
        _chunk(ch) for ch in chunks])], kind, p)


def _parse_tensors(c: _Check, tensors: dict, files: list[FileEntry], world: int,
                   meshes: list[dict], records: RecordCheck | None) -> dict[str, TensorEntry]:
    if records is None:
        return {name: _check_tensor(c, name, t, files, world, meshes)
                for name, t in tensors.items()}
    fast = records(tensors, [f.size for f in files], world, ITEMSIZE,
                   (Chunk, Shard, TensorEntry))
    return {name: e or _check_tensor(c, name, t, files, world, meshes)
            for (name, t), e in zip(tensors.items(), fast)}


def _check_tensor(c: _Check, name: str, t: Any, files: list[FileEntry], world: int,
                  meshes: list[dict], tiles: bool = True) -> TensorEntry:
    """Every rule, field by field. tiles=False for one record file's blocks of a tensor
    (the split layout), whose shards tile it only with every other record's."""
    where = f"tensors[{name!r:.80}]"
    if not name or len(name) > 4096:
        c.fail(where, "empty or over-long tensor name")
    c.type_(t, dict, where)
    kind = t.get("kind")
    dtype = t.get("dtype")
    if kind == "torch":
        itemsize = ITEMSIZE.get(dtype) if isinstance(dtype, str) else None
    elif kind == "numpy":
        itemsize = numpy_itemsize(dtype) if isinstance(dtype, str) else None
    else:
        c.fail(f"{where}.kind", f"unknown kind {kind!r:.40}")
    if itemsize is None:
        c.fail(f"{where}.dtype", f"unknown dtype {dtype!r:.40}")
    shape = _parse_shape(c, t.get("shape"), f"{where}.shape")
    shards = []
    for si, s in enumerate(c.type_(t.get("shards"), list, f"{where}.shards")):
        sw = f"{where}.shards[{si}]"
        c.type_(s, dict, sw)
        sshape = _parse_shape(c, s.get("shape"), f"{sw}.shape")
        offsets = _parse_shape(c, s.get("offsets"), f"{sw}.offsets")
        if len(sshape) != len(shape) or len(offsets) != len(shape):
            c.fail(sw, "shard rank differs from tensor rank")
        if any(o + n > g for o, n, g in zip(offsets, sshape, shape)):
            c.fail(sw, f"shard {offsets}+{sshape} exceeds global shape {shape}")
        rank = c.int_(s.get("rank"), f"{sw}.rank", 0, world - 1)
        chunks = [_parse_chunk(c, ch, f"{sw}.chunks[{ci}]", files)
                  for ci, ch in enumerate(c.type_(s.get("chunks"), list, f"{sw}.chunks"))]
        want = math.prod(sshape) * itemsize
        got = sum(ch.raw for ch in chunks)
        if got != want:
            c.fail(sw, f"chunks hold {got} bytes but shape {sshape} x {dtype} needs {want}")
        shards.append(Shard(offsets, sshape, rank, chunks))
    if not shards or tiles and sum(math.prod(s.shape) for s in shards) != math.prod(shape):
        c.fail(f"{where}.shards", f"shards do not tile the global shape {shape}")
    _check_disjoint(c, f"{where}.shards", shards)
    placement = t.get("placement")
    if placement is not None:
        _parse_placement(c, placement, f"{where}.placement", meshes)
    return TensorEntry(dtype, shape, shards, kind, placement)


PLACEMENT_KINDS = ("sharded", "replicated", "owned", "local")


def _parse_mesh(c: _Check, x: Any, where: str) -> dict:
    c.type_(x, dict, where)
    shape = _parse_shape(c, x.get("shape"), f"{where}.shape")
    ranks = c.type_(splitfmt.expand_ranks(x.get("ranks")), list, f"{where}.ranks")
    if not shape or len(ranks) != math.prod(shape) or len(ranks) > 1 << 20:
        c.fail(where, f"{len(ranks)} ranks for mesh shape {shape}")
    for r in ranks:
        c.int_(r, f"{where}.ranks", 0, 1 << 20)
    names = x.get("dim_names")
    if names is not None and (not isinstance(names, list) or len(names) != len(shape)
                              or not all(isinstance(n, str) and len(n) < 256 for n in names)):
        c.fail(f"{where}.dim_names", "expected one name per mesh dimension")
    return {"shape": shape, "dim_names": names, "ranks": ranks}


def _parse_placement(c: _Check, p: Any, where: str, meshes: list[dict]) -> None:
    c.type_(p, dict, where)
    if p.get("kind") not in PLACEMENT_KINDS:
        c.fail(f"{where}.kind", f"expected one of {PLACEMENT_KINDS}")
    if p["kind"] == "sharded":
        mesh = c.int_(p.get("mesh"), f"{where}.mesh", 0, len(meshes) - 1)
        pl = c.type_(p.get("placements"), list, f"{where}.placements")
        if len(pl) != len(meshes[mesh]["shape"]) or not all(
                isinstance(x, str) and len(x) < 256 for x in pl):
            c.fail(f"{where}.placements", "expected one placement name per mesh dimension")


def _check_disjoint(c: _Check, where: str, shards: list[Shard]) -> None:
    """No two shards overlap. With their sizes summing to the global size (checked by the
    caller) they then tile it exactly, so no element of a loaded tensor is left unwritten.
    A sweep along the axis with the most distinct offsets compares only shards that share
    a range of it: O(n log n) for 1-D layouts."""
    boxes = [(s.offsets, s.shape) for s in shards if math.prod(s.shape) > 0]
    if len(boxes) < 2:
        return
    ndim = len(boxes[0][0])
    if ndim == 0:
        c.fail(where, "several shards of a scalar")
    axis = max(range(ndim), key=lambda k: len({lo[k] for lo, _ in boxes}))
    boxes.sort(key=lambda b: b[0][axis])
    budget = MAX_SHARD_COMPARISONS
    for i, (lo, n) in enumerate(boxes):
        end = lo[axis] + n[axis]
        for j in range(i + 1, len(boxes)):
            lo2, n2 = boxes[j]
            if lo2[axis] >= end:
                break
            budget -= 1
            if budget < 0:
                c.fail(where, "shard layout too complex to validate")
            if all(a < b + m and b < a + k for a, k, b, m in zip(lo, n, lo2, n2)):
                c.fail(where, f"shards at {lo} and {lo2} overlap")


def _check_regions(c: _Check, files: list[FileEntry], tensors: dict) -> None:
    """Chunks never share stored bytes. This bounds what a manifest can claim: every raw
    byte is backed by distinct bytes of a file whose size is checked before reading."""
    regions: list[list[tuple[int, int, str, Chunk]]] = [[] for _ in files]
    for name, t in tensors.items():
        for s in t.shards:
            for ch in s.chunks:
                if ch.stored:
                    regions[ch.file].append((ch.offset, ch.stored, name, ch))
    for f, rs in zip(files, regions):
        rs.sort()
        for (a, n, name1, ch1), (b, _, name2, ch2) in zip(rs, rs[1:]):
            if b < a + n:
                w1, w2 = _where(tensors, name1, ch1), _where(tensors, name2, ch2)
                c.fail(f"files[{f.name}]", f"chunks {w1!r:.80} and {w2!r:.80} "
                                           f"(tensor:shard:chunk) share stored bytes")


def _where(tensors: dict, name: str, ch: Chunk) -> str:
    """'tensor:shard:chunk' of a chunk, for an error message."""
    for si, s in enumerate(tensors[name].shards):
        for ci, x in enumerate(s.chunks):
            if x is ch:
                return f"{name}:{si}:{ci}"
    return name


def _shape_ok(v: Any) -> bool:
    if type(v) is not list or len(v) > 64:
        return False
    for d in v:
        if type(d) is not int or not 0 <= d <= 1 << 48:
            return False
    return math.prod(v) * 16 <= MAX_INT


def _parse_shape(c: _Check, v: Any, where: str) -> list[int]:
    if _shape_ok(v):
        return v
    c.type_(v, list, where)
    if len(v) > 64:
        c.fail(where, "more than 64 dimensions")
    dims = [c.int_(d, where, 0, 1 << 48) for d in v]
    c.fail(where, f"shape {dims} is too large")


def _chunk_ok(ch: Any, files: list[FileEntry]) -> bool:
    """Every check of _parse_chunk in one expression, for the common valid chunk."""
    if type(ch) is not list or len(ch) != 7:
        return False
    f, off, stored, raw, codec, raw_hash, stored_hash = ch
    return (type(f) is int and 0 <= f < len(files)
            and type(off) is int and 0 <= off <= MAX_INT
            and type(stored) is int and 0 <= stored <= MAX_CHUNK_BYTES + (1 << 20)
            and type(raw) is int and 0 <= raw <= MAX_CHUNK_BYTES
            and type(codec) is int and 0 <= codec <= 2
            and (stored == raw if codec == CODEC_RAW else raw <= stored * MAX_ZSTD_RATIO)
            and off + stored <= files[f].size
            and type(raw_hash) is str and _HEX16(raw_hash) is not None
            and type(stored_hash) is str and _HEX16(stored_hash) is not None)


def _chunk(ch: list) -> Chunk:
    """The Chunk of a record _chunk_ok accepted (tuple.__new__ skips the class's Python
    __new__: a quarter less per chunk)."""
    return tuple.__new__(Chunk, (*ch[:5], int(ch[5], 16), int(ch[6], 16)))


def _parse_chunk(c: _Check, ch: Any, where: str, files: list[FileEntry]) -> Chunk:
    if _chunk_ok(ch, files):
        return _chunk(ch)
    if not isinstance(ch, list) or len(ch) != 7:
        c.fail(where, "a chunk is a list of 7 fields")
    if not files:
        c.fail(where, "chunk refers to a file but the manifest lists none")
    f = c.int_(ch[0], f"{where}.file", 0, len(files) - 1)
    off = c.int_(ch[1], f"{where}.offset")
    stored = c.int_(ch[2], f"{where}.stored", 0, MAX_CHUNK_BYTES + (1 << 20))
    raw = c.int_(ch[3], f"{where}.raw", 0, MAX_CHUNK_BYTES)
    codec = c.int_(ch[4], f"{where}.codec", 0, 2)
    if codec == CODEC_RAW and stored != raw:
        c.fail(where, f"raw chunk with stored length {stored} != raw length {raw}")
    if codec != CODEC_RAW and raw > stored * MAX_ZSTD_RATIO:
        c.fail(where, f"{stored} stored bytes cannot hold {raw} raw bytes of zstd")
    if off + stored > files[f].size:
        c.fail(where, f"bytes {off}..{off + stored} lie past the end of "
                      f"{files[f].name} ({files[f].size} bytes)")
    return Chunk(f, off, stored, raw, codec, c.hash_(ch[5], f"{where}.raw_hash"),
                 c.hash_(ch[6], f"{where}.stored_hash"))

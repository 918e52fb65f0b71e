"""Incremental checkpoints: chunks that did not change since a base checkpoint are not
written again.

Sharing is by hard link. The new checkpoint links the base's data file into its own
directory and its manifest records point into that link, so every checkpoint stays a
self-contained directory of ordinary files: load, verify, inspect and resharding need
nothing new, and the file system counts the references. Deleting a checkpoint (retention,
gc, or rm -r by hand) never breaks another, and a crash at any instant of a save or a
deletion loses nothing: links are made inside the staging directory before the commit,
and a committed checkpoint holds its own links. Committed data files are never modified
in place. Where links are impossible (another file system, no link support) the chunks are
written again: always correct, only not smaller.

Which chunks are unchanged is decided without reading old data: the native writer hashes
each chunk and skips it when the base manifest's raw hash for the same tensor block (same
name, dtype, offsets, shape) at the same chunk position and length is equal. A
`VersionCache` (opt-in) skips even the hashing for tensors whose storage and autograd
version counter are unchanged since this process saved them. It is opt-in because writes
through `.data` or numpy views do not bump the version counter.

`consolidate` exports any checkpoint as a standalone copy holding only its live chunks.
This module imports torch only inside the write path, so `consolidate` runs without it.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import stat
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import xxhash

from ..storage import commit
from ..storage import local as io, records
from ..errors import CorruptCheckpointError, DckptError, IncompleteCheckpointError
from ..format.layout import rank_file
from ..format.manifest import (Chunk, FileEntry, Manifest, Shard, TensorEntry, is_safe_name,
                               open_regular)

log = logging.getLogger("dckpt")

META_KEY = "incremental"
_LINK = re.compile(r"^ref-r\d+-(.+)$")
_STATS = ("new_bytes", "referenced_bytes", "new_chunks", "referenced_chunks", "unhashed_bytes")


read_manifest = records.read_manifest


# ---- the cheap path: tensors whose version counter did not move ------------------------

def fingerprint(t) -> tuple | None:
    """What must be equal for a tensor to hold the same bytes as when it was last saved,
    given that every write bumps its version counter. None: no such guarantee."""
    import torch
    if not isinstance(t, torch.Tensor) or t.is_inference():
        return None
    try:
        storage = t.untyped_storage()
        ref = weakref.ref(storage)  # a freed and reused allocation is not the same storage
    except (RuntimeError, TypeError):
        return None
    return (ref, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device, t._version)


def _same_tensor(old: tuple, now: tuple) -> bool:
    return old[0]() is not None and old[0]() is now[0]() and old[1:] == now[1:]


@dataclass
class VersionCache:
    """Per process and rank: tensor name -> (fingerprint, raw hashes and lengths of the
    chunks that stored it). A hit is only used when the base manifest holds exactly those
    hashes for that tensor, so a stale or foreign base can never be referenced by mistake."""
    entries: dict = field(default_factory=dict)
    pending: dict = field(default_factory=dict)

    def lookup(self, name: str, fp: tuple | None, shard: Shard | None) -> bool:
        hit = self.entries.get(name)
        return (fp is not None and shard is not None and hit is not None
                and _same_tensor(hit[0], fp) and hit[1] == _hashes(shard.chunks))

    def record(self, name: str, fp: tuple | None, chunks: list[Chunk]) -> None:
        if fp is not None:
            self.pending[name] = (fp, _hashes(chunks))

    def commit(self) -> None:
        """The save that recorded `pending` committed: its fingerprints become usable.
        Older entries stay; a hit is checked against the base's hashes anyway."""
        self.entries.update(self.pending)
        self.pending = {}

    def discard(self) -> None:
        self.pending = {}


def _hashes(chunks: list[Chunk]) -> list[tuple[int, int]]:
    return [(c.raw, c.raw_hash) for c in chunks]


@dataclass
class Base:
    """The checkpoint a save deduplicates against; `versions` enables the cheap path."""
    path: Path
    versions: VersionCache | None = None
    _manifest: Manifest | None = field(default=None, repr=False)

    @classmethod
    def of(cls, base) -> "Base | None":
        if base is None or isinstance(base, Base):
            return base
        return cls(Path(base))

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            self._manifest = read_manifest(self.path)
        return self._manifest

    def manifest_for(self, rank: int) -> Manifest:
        """The base as rank `rank` compares against it: of a split checkpoint the index and
        its own record file, other records read only where a lookup misses."""
        if self._manifest is None:
            self._manifest = records.read_for_rank(self.path, rank)
        return self._manifest

    @property
    def label(self) -> str:
        """What meta.incremental.base records (information only)."""
        return self.path.name

    @property
    def depth(self) -> int:
        """Incremental saves since the last full one, this base included."""
        d = self.manifest.meta.get(META_KEY)
        depth = d.get("depth") if isinstance(d, dict) else 0
        return depth if isinstance(depth, int) and not isinstance(depth, bool) else 0


# ---- the write path -------------------------------------------------------------------

def _old_shard(t: TensorEntry | None, leaf) -> Shard | None:
    """The block of the base's record `t` that holds what `leaf` holds, if any."""
    if t is None or t.kind != ("numpy" if leaf.is_numpy else "torch") or \
            t.dtype != leaf.dtype or t.shape != leaf.global_shape:
        return None
    shape = list(leaf.value.shape)
    for s in t.shards:  # one, unless sharded
        if s.offsets == leaf.offsets and s.shape == shape:
            return s
    return None


def _comparable(shard: Shard, chunk_size: int, links: "_Links") -> list[Chunk]:
    """The leading chunks of `shard` that line up with how a rewrite would cut it and can
    be linked. A prefix: the native writer compares position by position."""
    chunks = shard.chunks
    total, out = shard.raw_bytes, []
    for i, c in enumerate(chunks):
        if c.raw != min(chunk_size, total - i * chunk_size) or links.get(c.file) is None:
            break
        out.append(c)
    return out


def _link_name(base: Path, f: FileEntry, rank: int) -> str:
    """Names keep the file's origin, are unique per origin, and per rank, so that ranks
    never race on the same directory entry."""
    m = _LINK.match(f.name)
    origin = m.group(1) if m else f"{(f.dir or base.name)}-{f.name}"
    name = f"ref-r{rank}-{origin}"
    if not is_safe_name(name) or len(name) > 200:
        name = f"ref-r{rank}-{xxhash.xxh3_64_hexdigest(origin.encode())}.dckpt"
    return name


class _Links:
    """Base data files linked into the staging directory, made before writing, dropped
    again when no chunk ended up referring to them."""

    def __init__(self, base: Path, m: Manifest, tmp: Path, rank: int):
        self.base, self.m, self.tmp, self.rank = base, m, tmp, rank
        self.names: dict[int, str | None] = {}  # base file index -> link name, None: failed
        self.failure: str | None = None
        self.damaged = 0  # base chunks found damaged and written again

    def get(self, index: int) -> str | None:
        if index not in self.names:
            self.names[index] = self._link(self.m.files[index])
        return self.names[index]

    def _link(self, f: FileEntry) -> str | None:
        src, name = f.path(self.base), _link_name(self.base, f, self.rank)
        try:
            st = os.lstat(src)
            if not stat.S_ISREG(st.st_mode):  # a link would share a file outside the base
                raise OSError(errno.EINVAL, "not a regular file (a symbolic link?)")
            if st.st_size != f.size:  # a damaged base is not shared further
                raise OSError(errno.EINVAL, f"size differs from its manifest ({f.size})")
            # Never through a link swapped in meanwhile: the link itself would be linked,
            # and loads refuse it.
            try:
                os.link(src, self.tmp / name, follow_symlinks=False)
            except FileExistsError:
                if os.path.samefile(src, self.tmp / name):
                    return name
                # Two origins with one name: bases whose directories share a name, as in
                # Trainer's checkpoint-N/dckpt. The source's path tells them apart.
                where = xxhash.xxh3_64_hexdigest(str(src).encode())
                name = f"ref-r{self.rank}-{where}-{f.name}"[:200]
                os.link(src, self.tmp / name, follow_symlinks=False)
        except OSError as e:
            self.failure = f"cannot link {src}: {e.strerror or e}"
            log.warning("dckpt: %s; writing its unchanged chunks again", self.failure)
            return None
        return name

    def drop_unused(self, used: set[str]) -> None:
        for name in set(self.names.values()) - used - {None}:
            os.unlink(self.tmp / name)


def write_rank(base: Base, tmp: Path, fname: str, rank: int, leaves: list, names: list[str],
               opts, to_cpu: Callable, store, mode,
               syncs: commit.Syncs) -> tuple[list[list[Chunk]], list[FileEntry], dict]:
    """Write this rank's leaves into tmp/fname (one file per writer thread when it writes
    enough), referencing unchanged chunks of `base`; their fsyncs are left running in
    `syncs`.

    Returns each leaf's chunk records (file indices into the returned file list: this
    rank's new files first, fname and, when it wrote enough for one per writer thread, the
    rank's numbered files; then the links), the file list and the statistics for the
    manifest."""
    m = base.manifest_for(rank)
    links = _Links(base.path, m, tmp, rank)
    versions = base.versions
    # A storage record of views is a fresh tensor each save: its version counter does not
    # see writes through the views, so it is always hashed.
    fps = ([fingerprint(leaf.value) if not leaf.storage else None for leaf in leaves]
           if versions is not None else [None] * len(leaves))

    reused: dict[int, list[Chunk]] = {}  # leaf -> base records taken without hashing
    old: list[Shard | None] = []  # each leaf's block in the base, where it has one
    prev: list[list[int] | None] = []
    chunk_size, base_tensors = opts.chunk_size, m.tensors
    for i, (n, leaf) in enumerate(zip(names, leaves)):
        shard = _old_shard(base_tensors.get(n), leaf)
        old.append(shard)
        if shard is None:
            prev.append(None)
        elif versions is not None and versions.lookup(n, fps[i], shard) and \
                all(links.get(c.file) is not None for c in shard.chunks):
            reused[i] = shard.chunks
            prev.append(None)
        elif len(shard.chunks) == 1:  # the usual small tensor (_comparable, inlined)
            c = shard.chunks[0]
            prev.append([c.raw_hash] if c.raw <= chunk_size and links.get(c.file) is not None
                        else None)
        else:
            comparable = _comparable(shard, chunk_size, links)
            prev.append([c.raw_hash for c in comparable] if comparable else None)

    # The writer matches live data against the base's *recorded* hashes; the stored bytes
    # may have rotted since. So every base chunk the new checkpoint is about to link is read
    # and hashed (through the link: the very inode it will hold) before it is trusted: only
    # those, so a save that shares nothing reads nothing. A damaged one is written again
    # from memory, with the rest of its tensor (the writer compares by position), in a
    # rewrite of this rank's file: rot is rare, its cost only matters then.
    intact: set[tuple[int, int]] = set()  # (base file, offset) of chunks found intact
    # One file per writer thread when there is enough to write, as a full save does
    # (io.part_count): threads writing one file take turns on its inode lock. Decided once:
    # a rewrite (below) recreates the same files.
    todo = [i for i in range(len(leaves)) if i not in reused] if reused else range(len(leaves))
    expect = _expected_bytes(m, rank, leaves, todo, prev)
    parts = 1 if mode.direct else io.part_count(expect, opts)
    # The data files are fsynced below, once each is known to hold a chunk: a save that
    # changed nothing would otherwise pay an fsync for an empty file it then deletes. The
    # estimate keeps a much larger spare from being written over (and cut) by a small save.
    unsynced = replace(opts, fsync=False, synced_later=opts.fsync, expect=expect)
    names_own = [fname] + [rank_file(rank, p) for p in range(1, parts)]
    paths = [str(tmp / n) for n in names_own]
    while True:
        if reused:
            todo = [i for i in range(len(leaves)) if i not in reused]
            values, hashes = [to_cpu(leaves[i].value) for i in todo], [prev[i] for i in todo]
        else:  # the usual case (no version cache): every leaf, in order
            todo, values, hashes = range(len(leaves)), [to_cpu(x.value) for x in leaves], prev
        written = store.write_file(paths[0] if parts == 1 else paths, values, unsynced, mode,
                                   prev_hashes=hashes)
        picked = _pick(todo, written, reused, old, names, len(leaves))
        damaged = _first_damaged(store, base.path, m, links, picked, intact, opts.threads)
        if not damaged:
            break
        for i, c in damaged.items():
            if i in reused:  # hashed from now on, comparing only the chunks before c
                del reused[i]
                prev[i] = [x.raw_hash for x in _comparable(old[i], opts.chunk_size, links)]
            prev[i] = prev[i][:c] or None
        links.damaged += len(damaged)

    # Renumber: this rank's new files first (those that got a chunk), then the links used.
    # Two base entries of one origin (linked by two ranks) share one link name here.
    own_index = {f: k for k, f in enumerate(sorted(picked.new_files))}
    wrote = len(own_index)
    used = sorted({links.names[j] for j in picked.base_files})
    local = {j: used.index(links.names[j]) + wrote for j in picked.base_files}
    # Usually every record already names its file (a chunk just written names file 0, the
    # writer's file_index; a base chunk often keeps its index): then all are kept as they are.
    renumber = any(k != f for f, k in own_index.items()) or any(k != j for j, k in local.items())
    chunks = []
    for i, p in enumerate(picked.chunks):
        if not renumber:
            out = [c for c, _ in p]
            if old[i] is not None and out == old[i].chunks:
                # Unchanged: the base's very list, which tells the manifest builder that
                # the base's record holds for this leaf as it is (_write_rank).
                out = old[i].chunks
        else:
            out = [c if c[0] == (own_index[c[0]] if j is None else local[j]) else
                   Chunk(own_index[c[0]] if j is None else local[j], *c[1:]) for c, j in p]
        if versions is not None:
            versions.record(names[i], fps[i], out)
        chunks.append(out)
    stats = dict.fromkeys(_STATS, 0)
    stats["new_chunks"], stats["referenced_chunks"] = picked.new, picked.referenced
    stats["referenced_bytes"] = picked.referenced_bytes
    stats["unhashed_bytes"] = sum(leaves[i].nbytes for i in reused)
    links.drop_unused(set(used))
    sizes = {links.names[j]: m.files[j].size for j in local}

    own = [FileEntry(names_own[f], (tmp / names_own[f]).stat().st_size, rank)
           for f in sorted(own_index)]
    for f, name in enumerate(names_own):
        if f not in own_index:
            os.unlink(tmp / name)  # nothing (more) changed: no empty data file
        elif opts.fsync:
            syncs.start(tmp / name)
    stats["new_bytes"] = sum(f.size for f in own)
    files = own + [FileEntry(name, sizes[name], rank) for name in used]
    if links.failure:
        stats["fallback"] = links.failure
    if links.damaged:
        stats["damaged_base_chunks"] = links.damaged
    return chunks, files, stats


def _expected_bytes(m: Manifest, rank: int, leaves: list, todo: list[int],
                    prev: list) -> int:
    """What this save will likely write: the leaves with nothing to compare against, or
    as much as the base's own save of this rank wrote when that is more (how much changes
    is known only once hashed; a run changes about as much from one step to the next)."""
    fresh = sum(leaves[i].nbytes for i in todo if prev[i] is None)
    wrote_before = sum(f.size for f in m.files if f.rank == rank and not _LINK.match(f.name))
    bound = max(fresh, wrote_before)
    # 0: a base that wrote nothing and nothing new (an unchanged state saved again)
    return min(sum(leaves[i].nbytes for i in todo), bound) if bound else 0


@dataclass
class _Picked:
    """Each leaf's chunks as (record, index of its base file, or None when just written),
    the base chunks to read back before they are trusted (leaf, position, record), and
    counts for the statistics."""
    chunks: list
    linked: list = field(default_factory=list)
    new_files: set = field(default_factory=set)
    base_files: set = field(default_factory=set)
    new: int = 0
    referenced: int = 0
    referenced_bytes: int = 0


def _pick(todo: list[int], written: list, reused: dict[int, list[Chunk]],
          old: list, names: list[str], count: int) -> _Picked:
    """One pass over what the writer returned: a chunk it skipped (offset -1) is the
    base's record at that position, checked against what the writer hashed."""
    out = _Picked([None] * count)
    linked, base_files, stored = out.linked, out.base_files, 0
    for i, recs in zip(todo, written):
        p = []
        for c, r in enumerate(recs):
            if r.offset != -1:
                p.append((r, None))
                out.new_files.add(r.file)
            else:
                o = _unchanged(old[i], c, r, names[i])
                p.append((o, o.file))
                linked.append((i, c, o))
                base_files.add(o.file)
                stored += o.stored
        out.chunks[i] = p
        out.new += len(recs)
    out.new -= len(linked)  # of the leaves written: the chunks not skipped
    for i, recs in reused.items():
        out.chunks[i] = [(c, c.file) for c in recs]
        for c, ch in enumerate(recs):
            linked.append((i, c, ch))
            base_files.add(ch.file)
            stored += ch.stored
    out.referenced, out.referenced_bytes = len(linked), stored
    return out


def _first_damaged(store, base: Path, m: Manifest, links: "_Links", picked: _Picked,
                   intact: set, threads: int) -> dict[int, int]:
    """leaf -> position of its first linked base chunk whose stored bytes do not match
    their stored hash, read through the links made for them. When one is damaged, the
    chunks found intact are added to `intact` and not read again by the rewrite's check."""
    todo = [x for x in picked.linked if (x[2].file, x[2].offset) not in intact] if intact \
        else picked.linked
    if not todo:
        return {}
    files = sorted(picked.base_files)
    index = {j: k for k, j in enumerate(files)}
    paths = [str(links.tmp / links.names[j]) for j in files]
    if all(k == j for j, k in index.items()):  # the records name their files as they are
        records = [ch for _, _, ch in todo]
    else:
        records = [(index[ch.file], *ch[1:]) for _, _, ch in todo]  # tuples, as the core takes
    bad = {f[0] for f in store.verify_chunks(paths, records, [1] * len(records),
                                             threads=threads)}
    if not bad:  # the usual case: `intact` is only asked again after a damaged chunk
        return {}
    damaged: dict[int, int] = {}
    for k, (i, c, ch) in enumerate(todo):
        if k not in bad:
            intact.add((ch.file, ch.offset))
        elif c < damaged.get(i, c + 1):
            damaged[i] = c
            log.warning("dckpt: base %s: chunk at offset %d of %s fails its stored hash; not "
                        "shared, written again from memory (the base is damaged: verify it)",
                        base, ch.offset, m.files[ch.file].name)
    return damaged


def _unchanged(shard: Shard, c: int, rec: Chunk, name: str) -> Chunk:
    """The base record for chunk c, which the writer found unchanged."""
    old = shard.chunks[c]
    if old.raw != rec.raw or old.raw_hash != rec.raw_hash:  # the writer broke its contract
        raise DckptError(f"tensor '{name}' chunk {c}: skipped as unchanged, but its raw "
                         f"length/hash differ from the base's")
    return old


def summarize(base: Base, reports: list) -> dict:
    """The manifest's meta entry: what this save wrote and what it shares, over all ranks."""
    out: dict = {"base": base.label, "depth": base.depth + 1, **dict.fromkeys(_STATS, 0)}
    for rep in reports:
        stats = rep.stats or {}  # engine.checkpoint.WriteReport
        for k in _STATS:
            out[k] += int(stats.get(k, 0))
        if "fallback" in stats:
            out.setdefault("fallback", stats["fallback"])
        if stats.get("damaged_base_chunks"):
            out["damaged_base_chunks"] = (out.get("damaged_base_chunks", 0)
                                          + int(stats["damaged_base_chunks"]))
    return out


# ---- reference-aware accounting and export --------------------------------------------

def exclusive_bytes(paths: list[Path]) -> int:
    """Bytes that deleting `paths` would free: files whose every hard link lies inside."""
    seen: dict[tuple[int, int], list] = {}
    for p in paths:
        # Symbolic links are removed as links: what they point to is not freed.
        if p.is_symlink():
            continue
        files = [p] if p.is_file() else [f for f in p.rglob("*")
                                         if f.is_file() and not f.is_symlink()]
        for f in files:
            st = f.lstat()
            entry = seen.setdefault((st.st_dev, st.st_ino), [st.st_size, st.st_nlink, 0])
            entry[2] += 1
    return sum(size for size, nlink, links in seen.values() if links >= nlink)


def consolidate(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
                fsync: bool = True) -> Manifest:
    """Write the checkpoint at `src` as a standalone checkpoint at `dst`: one data file per
    rank holding only the chunks its manifest uses, each copied as stored (no re-encoding)
    after checking its stored hash. Works on any checkpoint; needs no torch."""
    src, dst = Path(src), Path(dst)
    m = read_manifest(src)
    tmp = commit.begin(dst, overwrite)
    try:
        out = _copy_chunks(src, m, tmp, fsync)
        commit.finish(tmp, dst, out, fsync)
    except BaseException:
        commit.abort(tmp)
        raise
    return out


def _copy_chunks(src: Path, m: Manifest, tmp: Path, fsync: bool) -> Manifest:
    ranks = sorted({f.rank for f in m.files})
    files = [FileEntry(rank_file(r), 0, r) for r in ranks]
    index = {r: i for i, r in enumerate(ranks)}
    handles = [commit.create_file(tmp / f.name) for f in files]
    copied: dict[tuple[int, int, int], Chunk] = {}  # (file, offset, stored) -> new record
    sources: dict[int, object] = {}
    try:
        for name, t in m.tensors.items():
            for shard in t.shards:
                for ci, c in enumerate(shard.chunks):
                    key = (c.file, c.offset, c.stored)
                    if key not in copied:
                        k = index[m.files[c.file].rank]
                        data = _read_stored(src, m, c, sources, name, ci)
                        copied[key] = Chunk(k, files[k].size, *c[2:])
                        handles[k].write(data)
                        files[k].size += len(data)
                    shard.chunks[ci] = copied[key]
        for h in handles:
            h.flush()
            if fsync:
                os.fsync(h.fileno())
    finally:
        for h in [*handles, *sources.values()]:
            h.close()
    meta = {k: v for k, v in m.meta.items() if k != META_KEY}
    meta["consolidated_from"] = src.name
    return Manifest(world_size=m.world_size, files=files, tensors=m.tensors, ranks=m.ranks,
                    counters=m.counters, metrics=m.metrics, meta=meta, created=m.created,
                    version=m.version)


def _open_data(path: Path, tensor: str, ci: int) -> int:
    """A data file opened as loads open them: no symbolic link, no FIFO."""
    try:
        return open_regular(path)[0]
    except ValueError as e:
        raise IncompleteCheckpointError(f"tensor '{tensor}' chunk {ci}: {path} {e}", str(path),
                                        tensor, ci) from None


def _read_stored(src: Path, m: Manifest, c: Chunk, handles: dict, tensor: str,
                 ci: int) -> bytes:
    path = m.files[c.file].path(src)
    try:
        if c.file not in handles:
            handles[c.file] = os.fdopen(_open_data(path, tensor, ci), "rb")
        fh = handles[c.file]
        fh.seek(c.offset)
        data = fh.read(c.stored)
    except OSError as e:
        raise IncompleteCheckpointError(f"tensor '{tensor}' chunk {ci}: cannot read {path}: "
                                        f"{e.strerror or e}", str(path), tensor, ci) from None
    if len(data) != c.stored:
        raise IncompleteCheckpointError(
            f"tensor '{tensor}' chunk {ci}: {path} ends before offset {c.offset + c.stored}",
            str(path), tensor, ci, c.offset)
    actual = xxhash.xxh3_64_intdigest(data)
    if actual != c.stored_hash:
        raise CorruptCheckpointError(
            f"tensor '{tensor}' chunk {ci} in {path} at offset {c.offset}: stored hash "
            f"mismatch (expected {c.stored_hash:016x}, got {actual:016x})", str(path), tensor,
            ci, c.offset, c.stored_hash, actual)
    return data


__all__ = ["Base", "VersionCache", "consolidate", "exclusive_bytes", "summarize",
           "write_rank"]

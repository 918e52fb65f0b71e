"""Integrity checks: the manifest parses, every data file is there, every chunk hashes right.

Checksums run through the native core (`io.verify_chunks`) over chunks sorted by file and
offset, so the disk sees sequential reads; batches of about `BATCH_BYTES` keep a progress
bar moving without idling the reader threads for long.
"""
from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from ...errors import (CorruptCheckpointError, FormatVersionError, IncompleteCheckpointError,
                       ManifestError)
from ...format.manifest import (CODEC_NAMES, FORMAT_VERSION, HASH_ALGORITHM, MANIFEST_NAME, Chunk,
                                Manifest, read_manifest_bytes)
from ...format.units import human_size as _size
from ...storage.records import parse, read_records  # with the native record check
from .report import ERROR, PASS, WARNING, CheckpointReport, Location

BATCH_BYTES = 256 << 20


def file_path(ckpt: Path, m: Manifest, index: int) -> Path:
    f = m.files[index]
    return ckpt.parent / f.dir / f.name if f.dir else ckpt / f.name


def check_structure(ckpt: Path, rep: CheckpointReport) -> Manifest | None:
    """Group 1: the manifest is there, parses, validates, and its version is supported."""
    g = "structure"
    mpath = ckpt / MANIFEST_NAME
    if not os.path.lexists(mpath):
        staged = [p.name for p in ckpt.glob(MANIFEST_NAME + ".tmp")]
        why = (" (a manifest.json.tmp lies beside it: the save crashed while committing)"
               if staged else " (the save never committed, or the manifest was deleted)")
        rep.add(g, "structure.manifest", ERROR, f"no {MANIFEST_NAME}: not a committed "
                f"checkpoint{why}", Location(file=MANIFEST_NAME))
        return None
    try:
        data = read_manifest_bytes(mpath)
    except OSError as e:
        rep.add(g, "structure.manifest", ERROR, f"cannot read {MANIFEST_NAME}: {e.strerror}",
                Location(file=MANIFEST_NAME))
        return None
    except ManifestError as e:  # a link, a FIFO, a device, oversized: refused unread
        rep.add(g, "structure.manifest", ERROR, str(e), Location(file=MANIFEST_NAME))
        return None
    if not data:
        rep.add(g, "structure.manifest", ERROR, f"{MANIFEST_NAME} is empty (0 bytes)",
                Location(file=MANIFEST_NAME))
        return None
    try:
        m = parse(data, MANIFEST_NAME)
    except FormatVersionError as e:
        rep.add(g, "structure.version", ERROR, str(e), Location(file=MANIFEST_NAME))
        return None
    except (ManifestError, CorruptCheckpointError) as e:
        hint = ""
        if not data.rstrip().endswith(b"}"):
            hint = f" ({len(data)} bytes, it does not end where JSON must: truncated?)"
        rep.add(g, "structure.manifest", ERROR, f"{e}{hint}", Location(file=MANIFEST_NAME))
        return None
    if not records_check(m, lambda: read_records(m, ckpt), rep):
        return None
    return manifest_passed(m, rep)


def manifest_passed(m: Manifest, rep: CheckpointReport) -> Manifest:
    """The structure checks' passes once the manifest (and its records) validated."""
    rep.add("structure", "structure.manifest", PASS,
            f"{MANIFEST_NAME} parses and validates ({HASH_ALGORITHM} self-hash ok): "
            f"{len(m.tensors)} tensors in {len(m.files)} file(s), world size {m.world_size}",
            Location(file=MANIFEST_NAME))
    rep.add("structure", "structure.version", PASS,
            f"format version {m.version} (this dckpt reads up to {FORMAT_VERSION})")
    rep.stats["tensors"] = len(m.tensors)
    rep.stats["files"] = len(m.files)
    return m


def check_files(ckpt: Path, m: Manifest, rep: CheckpointReport) -> set[int]:
    """Group 2: every data file present, not empty, the size the manifest records.
    Returns the indices of files whose chunks can be checked (present, not empty)."""
    g = "files"
    usable: set[int] = set()
    good, good_bytes = 0, 0
    for i, f in enumerate(m.files):
        p = file_path(ckpt, m, i)
        shown = f"{f.dir}/{f.name}" if f.dir else f.name
        loc = Location(file=shown, rank=f.rank)
        try:
            st = p.lstat()
            size = st.st_size
        except FileNotFoundError:
            rep.add(g, "files.present", ERROR, f"{shown} (rank {f.rank}) is missing: "
                    f"{_tensors_in(m, i)} lost", loc)
            continue
        except OSError as e:
            rep.add(g, "files.present", ERROR, f"{shown}: {e.strerror}", loc)
            continue
        if not stat.S_ISREG(st.st_mode):
            what = ("a symbolic link (refused: a checkpoint holds only regular files; "
                    "replace the link with a copy of the file)" if stat.S_ISLNK(st.st_mode)
                    else "not a regular file")
            rep.add(g, "files.present", ERROR, f"{shown} (rank {f.rank}) is {what}: "
                    f"{_tensors_in(m, i)} unreadable", loc)
            continue
        if size == 0 and f.size > 0:
            rep.add(g, "files.empty", ERROR, f"{shown} (rank {f.rank}) is empty; the manifest "
                    f"records {f.size} bytes", loc)
            continue
        usable.add(i)
        if size_check(f, size, shown, loc, rep):
            good += 1
            good_bytes += size
    files_present(m, good, good_bytes, rep)
    return usable


def records_check(m: Manifest, read, rep: CheckpointReport) -> bool:
    """structure.records: of a split checkpoint, every rank's record file, read by `read()`
    and checked against the index's hash; False when one is damaged or missing."""
    if m.split is None:
        return True
    try:
        read()
    except (ManifestError, CorruptCheckpointError, IncompleteCheckpointError) as e:
        name = str(getattr(e, "path", None) or MANIFEST_NAME).rpartition("/")[2]
        rep.add("structure", "structure.records", ERROR, str(e), Location(file=name))
        return False
    rep.add("structure", "structure.records", PASS,
            f"{m.split.count} record file(s) match the index's {HASH_ALGORITHM} hashes and "
            "validate", Location(file=MANIFEST_NAME))
    return True


def size_check(f, size: int, shown: str, loc: Location, rep: CheckpointReport) -> bool:
    """files.size of a present data file; True when it has exactly the recorded size."""
    if size < f.size:
        rep.add("files", "files.size", ERROR, f"{shown} (rank {f.rank}) is truncated: {size} "
                f"of {f.size} bytes", loc)
    elif size > f.size:
        rep.add("files", "files.size", WARNING, f"{shown} (rank {f.rank}) has "
                f"{size - f.size} bytes more than recorded ({f.size}); they are not covered "
                "by any hash", loc)
    else:
        return True
    return False


def files_present(m: Manifest, good: int, good_bytes: int, rep: CheckpointReport) -> None:
    """The files.present summary once every data file was looked at."""
    if good:
        rep.add("files", "files.present", PASS, f"{good} of {len(m.files)} data file(s) "
                f"present with the recorded sizes ({_size(good_bytes)})")
    elif not m.files:
        rep.add("files", "files.present", PASS, "no data files (the state holds no tensors)")


def _tensors_in(m: Manifest, index: int) -> str:
    names = sorted({n for n, t in m.tensors.items() for s in t.shards for c in s.chunks
                    if c.file == index})
    head = ", ".join(f"'{n}'" for n in names[:3])
    return f"{len(names)} tensor(s) ({head}{', ...' if len(names) > 3 else ''})"


@dataclass
class _Item:
    tensor: str
    shard: int
    chunk: int
    record: Chunk
    elem_size: int


def chunk_items(m: Manifest, files: set[int]) -> list[_Item]:
    """Every chunk in the given files, in (file, offset) order: one sequential pass."""
    items = [_Item(name, si, ci, c, t.itemsize)
             for name, t in m.tensors.items() for si, s in enumerate(t.shards)
             for ci, c in enumerate(s.chunks) if c.file in files]
    items.sort(key=lambda it: (it.record.file, it.record.offset))
    return items


def total_stored(m: Manifest) -> int:
    return sum(c.stored for t in m.tensors.values() for s in t.shards for c in s.chunks)


def check_checksums(ckpt: Path, m: Manifest, usable: set[int], rep: CheckpointReport,
                    deep: bool = False, threads: int = 0, progress=None, store=None,
                    paths: list[str] | None = None) -> None:
    """Group 3: stored-bytes hash of every chunk (deep: also decode and check raw hashes).
    store, paths: the backend and the files' locations (an object store's URLs); by
    default the local files of `ckpt`."""
    from ... import storage  # the native core (torch too); everything above works without it
    store = store or storage.for_path(ckpt)

    g = "checksums"
    items = chunk_items(m, usable)
    skipped = sum(len(s.chunks) for t in m.tensors.values() for s in t.shards) - len(items)
    paths = paths or [str(file_path(ckpt, m, i)) for i in range(len(m.files))]
    t0 = time.perf_counter()
    bad = 0
    checked_bytes = 0
    for batch in _batches(items):
        failures = store.verify_chunks(paths, [it.record for it in batch],
                                    [it.elem_size for it in batch], deep=deep, threads=threads)
        for index, kind, expected, actual, message in failures:
            it = batch[index]
            bad += 1
            rep.add(g, "checksums.chunk", ERROR, _failure_text(it, kind, expected, actual,
                                                                message, m),
                    Location(file=m.files[it.record.file].name, rank=m.files[it.record.file].rank,
                             tensor=it.tensor, shard=it.shard, chunk=it.chunk,
                             offset=it.record.offset))
        done = sum(it.record.stored for it in batch)
        checked_bytes += done
        if progress is not None:
            progress(done)
    seconds = time.perf_counter() - t0
    rep.stats["chunks"] = len(items) + skipped
    rep.stats["chunks_checked"] = len(items)
    rep.stats["bytes_checked"] = checked_bytes
    rep.stats["seconds"] = round(seconds, 6)
    what = "stored and raw hashes (decoded)" if deep else "stored-bytes hashes"
    if not bad and items:
        rate = f", {checked_bytes / seconds / 1e9:.2f} GB/s" if seconds > 0.05 else ""
        note = f"; {skipped} chunk(s) in missing or empty files not checked" if skipped else ""
        rep.add(g, "checksums.chunk", PASS, f"{len(items)} chunk(s), {_size(checked_bytes)}: "
                f"{what} match ({seconds:.2f} s{rate}){note}")


def _batches(items: list[_Item]):
    batch, size = [], 0
    for it in items:
        batch.append(it)
        size += it.record.stored
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _failure_text(it: _Item, kind: str, expected: int, actual: int, message: str,
                  m: Manifest) -> str:
    where = (f"tensor '{it.tensor}'" + (f" shard {it.shard}" if it.shard else "")
             + f" chunk {it.chunk} in {m.files[it.record.file].name} at offset "
             f"{it.record.offset} ({it.record.stored} bytes, "
             f"{CODEC_NAMES.get(it.record.codec, it.record.codec)})")
    if kind in ("stored_hash", "raw_hash"):
        which = "stored" if kind == "stored_hash" else "raw"
        return f"{where}: {which} hash mismatch (expected {expected:016x}, got {actual:016x})"
    if kind == "corrupt_frame":
        return f"{where}: undecodable zstd frame"
    if kind == "out_of_bounds":
        return f"{where}: lies past the end of the file (truncated)"
    return f"{where}: {message}"



def stray_temporaries(ckpt: Path) -> list[str]:
    """Half-written files a crashed durable write leaves inside a checkpoint directory."""
    try:
        return sorted(e.name for e in os.scandir(ckpt) if e.name.endswith(".tmp"))
    except OSError:
        return []

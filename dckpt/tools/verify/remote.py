"""verify for checkpoints in object storage (s3://... and any fsspec URL).

The same groups of checks as for a directory, from one listing of the prefix and ranged
reads: the manifest object (its size checked before it is downloaded), every data object
present with its recorded size, every chunk's hash (storage/remote.py fetches each chunk
and the native core checks it), metadata, step counts and completeness. A prefix is a
checkpoint when it holds a manifest object; a root when step-* prefixes lie under it. A
step prefix without a manifest is an upload that never committed: absent to every reader,
reported as a warning (gc removes it).
"""
from __future__ import annotations

from pathlib import PurePosixPath

import numpy as np

from ... import storage
from ...errors import CheckpointNotFoundError, CorruptCheckpointError, DckptError, \
    FormatVersionError, ManifestError
from ...format.layout import parse_step_dir
from ...format.manifest import MANIFEST_NAME, Manifest
from ...storage import objectstore
from ...storage.records import parse, read_records
from ...storage.remote import read_manifest_bytes
from . import integrity
from .report import ERROR, PASS, WARNING, Check, CheckpointReport, Location, Report


def scan(url: str, storage_options: dict | None = None) -> tuple[str, dict, list]:
    """("checkpoint" | "root", {relative name: size} of every object under `url`, the step
    names under it, oldest first). CheckpointNotFoundError when it is neither."""
    store = storage.for_path(url, storage_options).store
    objects = {o.url[len(url) + 1:]: o.size for o in store.list(url)}
    if MANIFEST_NAME in objects:
        return "checkpoint", objects, []
    steps = sorted({n.split("/", 1)[0] for n in objects if "/" in n
                    and parse_step_dir(n.split("/", 1)[0]) is not None},
                   key=parse_step_dir)
    if steps:
        return "root", objects, steps
    if objects:
        raise CheckpointNotFoundError(
            f"{objectstore.redact(url)} holds {len(objects)} object(s) but no {MANIFEST_NAME}: "
            "not a committed checkpoint (an upload that never finished), nor a root of step-* "
            "checkpoints")
    raise CheckpointNotFoundError(f"{objectstore.redact(url)}: no objects under this prefix")


def verify_url(url: str, *, deep: bool = False, strict: bool = False, threads: int = 0,
               latest_only: bool = False, checksums: bool = True, progress=None,
               storage_options: dict | None = None) -> Report:
    from . import _check_parsed
    url = url.rstrip("/")
    backend = storage.for_path(url, storage_options)
    kind, objects, steps = scan(url, storage_options)
    report = Report(objectstore.redact(url), kind, deep, strict)
    if kind == "checkpoint":
        targets = [(url, objects)]
    else:
        committed = [s for s in steps if f"{s}/{MANIFEST_NAME}" in objects]
        uncommitted = [s for s in steps if s not in committed]
        report.latest = parse_step_dir(committed[-1]) if committed else None
        add = report.checks.append
        if committed:
            add(Check("root", "root.steps", PASS, f"{len(committed)} committed checkpoint(s), "
                      f"newest step {report.latest}"))
        else:
            add(Check("root", "root.steps", ERROR, f"no committed checkpoint under {report.path}"))
        if uncommitted:
            add(Check("root", "root.temporaries", WARNING,
                      f"{len(uncommitted)} step prefix(es) without a manifest (uploads that "
                      f"never committed: absent to readers; `dckpt gc` removes them): "
                      f"{', '.join(uncommitted[:3])}"))
        chosen = committed[-1:] if latest_only else committed
        targets = [(objectstore.join(url, s), {n[len(s) + 1:]: z for n, z in objects.items()
                                               if n.startswith(s + "/")}) for s in chosen]
    parsed = []
    for ckpt, objs in targets:
        name = objectstore.split(ckpt)[1]
        rep = CheckpointReport(objectstore.redact(ckpt), parse_step_dir(name))
        parsed.append((ckpt, objs, rep, _structure(backend, ckpt, rep, storage_options)))
        report.checkpoints.append(rep)
    total = sum(integrity.total_stored(m) for *_, m in parsed if m is not None)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    for ckpt, objs, rep, m in parsed:
        if m is None:
            continue
        paths = [backend.file_url(ckpt, f) for f in m.files]
        sizes = [objs.get(f.name) if not f.dir else backend.size(p)
                 for f, p in zip(m.files, paths)]
        usable = _files(m, sizes, rep)
        _check_parsed(PurePosixPath(objectstore.split(ckpt)[1]), m, rep, deep, threads,
                      checksums, advance, store=backend, paths=paths, usable=usable,
                      read_bytes=_scalar_reader(backend, paths, m))
    return report


def _structure(backend, ckpt: str, rep: CheckpointReport,
               storage_options: dict | None = None) -> Manifest | None:
    g = "structure"
    try:
        data = read_manifest_bytes(backend.store, ckpt)
    except CheckpointNotFoundError:
        rep.add(g, "structure.manifest", ERROR, f"no {MANIFEST_NAME} object: not a committed "
                "checkpoint (the upload never committed, or the manifest was deleted)",
                Location(file=MANIFEST_NAME))
        return None
    except DckptError as e:
        rep.add(g, "structure.manifest", ERROR, str(e), Location(file=MANIFEST_NAME))
        return None
    try:
        m = parse(data, MANIFEST_NAME)
    except FormatVersionError as e:
        rep.add(g, "structure.version", ERROR, str(e), Location(file=MANIFEST_NAME))
        return None
    except (ManifestError, CorruptCheckpointError) as e:
        rep.add(g, "structure.manifest", ERROR, str(e), Location(file=MANIFEST_NAME))
        return None
    if not integrity.records_check(
            m, lambda: read_records(m, ckpt, storage_options=storage_options), rep):
        return None
    return integrity.manifest_passed(m, rep)


def _files(m: Manifest, sizes: list, rep: CheckpointReport) -> set[int]:
    """Group 2 from the listing: each data object present with its recorded size."""
    g, usable, good, good_bytes = "files", set(), 0, 0
    for i, (f, size) in enumerate(zip(m.files, sizes)):
        shown = f"{f.dir}/{f.name}" if f.dir else f.name
        loc = Location(file=shown, rank=f.rank)
        if size is None:
            rep.add(g, "files.present", ERROR, f"{shown} (rank {f.rank}) is missing: "
                    f"{integrity._tensors_in(m, i)} lost", loc)
            continue
        usable.add(i)
        if integrity.size_check(f, size, shown, loc, rep):
            good += 1
            good_bytes += size
    integrity.files_present(m, good, good_bytes, rep)
    return usable


def _scalar_reader(backend, paths: list[str], m: Manifest):
    """The raw bytes of a (small) tensor, read and checked by the remote backend."""
    def read(name: str) -> bytes:
        entry = m.tensors[name]
        shard = entry.shards[0]
        if shard.raw_bytes > 1 << 20:
            raise ValueError(f"{shard.raw_bytes} bytes is not a scalar")
        buf = np.empty(shard.raw_bytes, np.uint8)
        backend.read_into(paths, [buf], [entry.itemsize], [shard.chunks], [name], True, 1)
        return buf.tobytes()
    return read

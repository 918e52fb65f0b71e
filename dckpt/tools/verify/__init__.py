"""Verify a checkpoint (or every checkpoint under a manager root) before trusting it.

    report = dckpt.verify.verify("run/step-000001000")       # or verify("run")
    report.ok, report.status, report.to_json()

Six groups of checks, each pass / warning / error: structure, data files, checksums (stored
hashes; `deep` also decodes and checks raw hashes), metadata consistency, training-state
consistency, completeness per rank. Everything but the checksums reads only the manifest.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ...engine import gcpause
from ...errors import CheckpointNotFoundError, DckptError, NotACheckpointError
from ...format import anatomy
from ...format.layout import (FAILED_MARK, LATEST_NAME, SPARE_DIR, aside_target, is_set_aside,
                              is_staging, not_a_checkpoint, parse_step_dir)
from ...format.manifest import MANIFEST_NAME, Manifest
from . import integrity, training
from .report import (COMPLETE, ERROR, INCOMPLETE, PARTIAL, PASS, SCHEMA, WARNING, Check,
                     CheckpointReport, Location, Report)

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


def classify_path(path: Path) -> str:
    """"checkpoint" or "root"; raises CheckpointNotFoundError when it is neither."""
    if not path.exists():
        raise CheckpointNotFoundError(f"{path} does not exist")
    if not path.is_dir():
        raise NotACheckpointError(not_a_checkpoint(path) or f"{path} is not a directory (a "
                                  f"checkpoint is a directory holding {MANIFEST_NAME})", str(path))
    names = os.listdir(path)
    if (MANIFEST_NAME in names or f"{MANIFEST_NAME}.tmp" in names
            or any(n.startswith("rank-") and n.endswith(".dckpt") for n in names)
            or parse_step_dir(path.name) is not None):
        return "checkpoint"
    if LATEST_NAME in names or any(parse_step_dir(n) is not None or is_staging(n) for n in names):
        return "root"
    raise CheckpointNotFoundError(f"{path} is neither a dckpt checkpoint (no {MANIFEST_NAME}) "
                                  "nor a manager root (no step-* directories)")


def step_dirs(root: Path) -> list[Path]:
    """Every step-N directory under a root, committed or not, oldest first."""
    found = [(parse_step_dir(p.name), p) for p in root.iterdir() if p.is_dir()]
    return [p for s, p in sorted((s, p) for s, p in found if s is not None)]


@gcpause.during
def verify(path: str | os.PathLike, *, deep: bool = False, strict: bool = False,
           threads: int = 0, latest_only: bool = False, checksums: bool = True,
           progress: Progress | None = None, storage_options: dict | None = None) -> Report:
    """Verify a checkpoint directory or a manager root (every step; with latest_only, the
    one a resume would use). checksums=False skips the checksum pass (every other check
    still runs). Raises CheckpointNotFoundError when `path` is neither; every problem inside one
    is a check in the report. `path` may be an object store URL (tools/verify/remote.py;
    storage_options as for dckpt.save)."""
    from ...storage.objectstore import is_url
    if is_url(path):
        from .remote import verify_url
        return verify_url(path, deep=deep, strict=strict, threads=threads,
                          latest_only=latest_only, checksums=checksums, progress=progress,
                          storage_options=storage_options)
    path = Path(path)
    kind = classify_path(path)
    report = Report(str(path), kind, deep, strict)
    if kind == "checkpoint":
        targets = [path]
    else:
        targets = step_dirs(path)
        _check_root(path, targets, report)
        if latest_only:
            targets = [p for p in targets if parse_step_dir(p.name) == report.latest]
    parsed = []
    for ckpt in targets:
        rep = CheckpointReport(str(ckpt), parse_step_dir(ckpt.name))
        parsed.append((ckpt, rep, integrity.check_structure(ckpt, rep)))
        report.checkpoints.append(rep)
    total = sum(integrity.total_stored(m) for _, _, m in parsed if m is not None)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    for ckpt, rep, m in parsed:
        if m is not None:
            _check_parsed(ckpt, m, rep, deep, threads, checksums, advance)
    return report


def verify_checkpoint(path: str | os.PathLike, **kwargs) -> CheckpointReport:
    """The report of one checkpoint directory (see verify)."""
    report = verify(path, **kwargs)
    if report.kind != "checkpoint":
        raise NotACheckpointError(not_a_checkpoint(Path(path))
                                  or f"{path} is a manager root, not a checkpoint", str(path))
    return report.checkpoints[0]


def _check_parsed(ckpt: Path, m: Manifest, rep: CheckpointReport, deep: bool, threads: int,
                  checksums: bool, advance, store=None, paths: list[str] | None = None,
                  usable: set[int] | None = None, read_bytes=None) -> None:
    """The checks after the manifest parsed. For an object store (tools/verify/remote.py)
    the caller passes its backend, the objects' URLs, the usable files it found in its
    listing, and how to read a small tensor's bytes; `ckpt` is then only a name."""
    if usable is None:
        usable = integrity.check_files(ckpt, m, rep)
    if checksums:
        integrity.check_checksums(ckpt, m, usable, rep, deep, threads, advance, store, paths)
    views = []
    try:
        views = [anatomy.rank_view(m, r) for r in range(m.world_size)]
        for problem in (p for v in views for p in anatomy.bad_views(m, v)):
            rep.add("structure", "structure.tree", ERROR, f"state tree: {problem}")
    except DckptError as e:
        rep.add("structure", "structure.tree", ERROR, f"state tree: {e}")
    training.check_metadata(ckpt, m, rep, views[0] if views else None)
    if views:
        # Tensors already reported damaged or lost are not read again for their step counts.
        damaged = {c.location.tensor for c in rep.checks if c.level == ERROR and c.location}
        damaged |= {n for n, t in m.tensors.items()
                    if any(c.file not in usable for s in t.shards for c in s.chunks)}
        training.check_training(ckpt, m, rep, views[0], damaged, read_bytes)
        training.check_completeness(m, views, rep)


def _check_root(root: Path, steps: list[Path], report: Report) -> None:
    def add(id_: str, level: str, message: str, file: str | None = None) -> None:
        report.checks.append(Check("root", id_, level, message,
                                   Location(file=file) if file else None))

    committed = [p for p in steps if (p / MANIFEST_NAME).is_file()]
    # What a resume uses: the newest committed step that repair did not set aside.
    resumable = [p for p in committed if not is_set_aside(p)]
    newest = parse_step_dir(resumable[-1].name) if resumable else None
    report.latest = newest
    if not committed:
        add("root.steps", ERROR, f"no committed checkpoint under {root}")
    else:
        add("root.steps", PASS, f"{len(committed)} committed checkpoint(s), newest step {newest}")
    for p in committed:
        if is_set_aside(p):
            add("root.steps", WARNING, f"{p.name} was set aside by `dckpt repair` (failed "
                f"verification; {FAILED_MARK} says why): resume skips it", p.name)
    parked = sorted(p.name for p in root.iterdir() if aside_target(p.name) is not None)
    if parked:
        add("root.parked", WARNING, f"checkpoint(s) parked by an interrupted overwrite: "
            f"{', '.join(parked[:3])}; opening a CheckpointManager on the root or `dckpt "
            "repair` puts them back")
    uncommitted = [p.name for p in steps if p not in committed]
    if uncommitted:
        add("root.steps", ERROR, f"step directories without a manifest: {', '.join(uncommitted)}")
    latest = root / LATEST_NAME
    try:
        text = latest.read_text().strip()
    except FileNotFoundError:
        if committed:
            add("root.latest", WARNING, f"no '{LATEST_NAME}' pointer (resume falls back to the "
                f"newest step, {newest}); `dckpt repair` rewrites it", LATEST_NAME)
        text = None
    except (OSError, UnicodeDecodeError) as e:
        add("root.latest", WARNING, f"'{LATEST_NAME}' is unreadable ({e}); `dckpt repair` "
            "rewrites it", LATEST_NAME)
        text = None
    if text is not None:
        pointed = parse_step_dir(text)
        if pointed is None or not (root / text / MANIFEST_NAME).is_file():
            add("root.latest", WARNING, f"'{LATEST_NAME}' names {text[:60]!r}, which is not a "
                f"committed checkpoint (resume uses step {newest}); `dckpt repair` rewrites it",
                LATEST_NAME)
        elif pointed != newest:
            add("root.latest", WARNING, f"'{LATEST_NAME}' names step {pointed} but step {newest} "
                "is newer (resume uses the newest); `dckpt repair` rewrites it", LATEST_NAME)
        else:
            add("root.latest", PASS, f"'{LATEST_NAME}' names step {pointed}, the newest",
                LATEST_NAME)
    # A live manager's spare files (storage/spares.py) are no interrupted save.
    temps = sorted(p.name for p in root.iterdir() if is_staging(p.name) and p.name != SPARE_DIR)
    if temps:
        n = len(temps)
        shown = ", ".join(temps[:3]) + (", ..." if n > 3 else "")
        add("root.temporaries", WARNING, f"{n} incomplete temporar{'y' if n == 1 else 'ies'} "
            f"from interrupted (or still running) saves ({shown}): never resumed from; "
            "`dckpt gc` or `dckpt repair` removes them")


__all__ = ["verify", "verify_checkpoint", "classify_path", "step_dirs", "Report",
           "CheckpointReport", "Check", "Location", "SCHEMA", "PASS", "WARNING", "ERROR",
           "COMPLETE", "PARTIAL", "INCOMPLETE"]

"""Repair what can be repaired without guessing, keeping a backup of everything touched.

- a damaged `latest` pointer (missing, unreadable, naming an absent or older step) is
  rewritten to name the newest committed step that passes verification; newer steps that
  fail it are marked (FAILED_MARK in their directory, nothing deleted) so that a resume,
  `latest_step()` and `verify --latest` use the same step the pointer names;
- a copy parked as `.step-N.old-*` by an overwrite that crashed is put back (or, when the
  overwrite finished, moved into the backup);
- incomplete temporaries of interrupted saves (and stray `*.tmp` files) are moved into the
  backup (deleted with backup=False);
- checkpoints that lack RNG streams (imported from formats that never saved them) get
  streams seeded now from one recorded seed. They cannot make the past reproducible, only
  the future: the manifest says so under meta["rng_seeded_now"], and `verify` warns.

Data files are never modified. A manifest is rewritten only after its checkpoint passes
verification (structure, files, checksums); a checkpoint that fails is left as it is.
Backups go to PATH/.dckpt-backup/<time>/, mirroring the paths they came from.
"""
from __future__ import annotations

import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..storage import commit
from ..storage import records
from ..errors import ManifestError
from ..format import anatomy
from ..format import tree as treecodec
from ..format.layout import (FAILED_MARK, LATEST_NAME, SPARE_DIR, aside_target, is_set_aside,
                             is_staging, parse_step_dir)
from ..format.manifest import MANIFEST_NAME

SCHEMA = "dckpt.repair/1"
BACKUP_DIR = ".dckpt-backup"


@dataclass
class Action:
    kind: str  # "latest" | "temporary" | "rng" | "set-aside" | "parked"
    target: str  # relative to the repaired path
    detail: str
    done: bool = False
    refused: str | None = None  # why it was not done

    def to_json(self) -> dict:
        return {"kind": self.kind, "target": self.target, "detail": self.detail,
                "done": self.done, "refused": self.refused}


@dataclass
class RepairReport:
    path: str
    kind: str  # "checkpoint" | "root"
    dry_run: bool
    backup: str | None = None
    actions: list[Action] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(a.refused for a in self.actions)

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "path": self.path, "kind": self.kind, "dry_run": self.dry_run,
                "ok": self.ok, "backup": self.backup,
                "actions": [a.to_json() for a in self.actions]}


class _Backup:
    """Created on first use; keeps relative paths so a restore is a plain copy back."""

    def __init__(self, base: Path, enabled: bool, report: RepairReport):
        self.base, self.enabled, self.report = base, enabled, report
        self.dir: Path | None = None

    def _target(self, src: Path) -> Path:
        if self.dir is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            d = self.base / BACKUP_DIR / stamp
            n = 1
            while d.exists():
                n += 1
                d = self.base / BACKUP_DIR / f"{stamp}-{n}"
            # Explicit modes: Path.mkdir's default 0o777 is world-writable under umask 0.
            commit.make_dirs(d)
            self.dir = d
            self.report.backup = str(d)
        dst = self.dir / src.relative_to(self.base)
        commit.make_dirs(dst.parent)
        return dst

    def copy(self, src: Path) -> None:
        if self.enabled:
            dst = self._target(src)
            shutil.copy2(src, dst)
            _fsync_file(dst)

    def remove(self, src: Path) -> None:
        """Move `src` into the backup (a rename, no copy), or delete it without backup."""
        if self.enabled:
            os.rename(src, self._target(src))
        elif src.is_dir() and not src.is_symlink():
            shutil.rmtree(src)
        else:
            src.unlink()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def repair(path: str | os.PathLike, *, backup: bool = True, dry_run: bool = False,
           add_rng: bool = True, seed: int | None = None, threads: int = 0) -> RepairReport:
    """Repair a checkpoint directory or a manager root; see the module docstring."""
    from ..manager.lock import RootLock
    from ..manager.manager import LOCK_WAIT
    from .verify import classify_path, step_dirs
    path = Path(path)
    kind = classify_path(path)
    report = RepairReport(str(path), kind, dry_run)
    saver = _Backup(path, backup, report)
    verified: dict[Path, tuple] = {}
    # A checkpoint of a manager root is locked through its root: a job overwriting it must
    # not have the old manifest written over its new checkpoint.
    root = path if kind == "root" else path.parent if parse_step_dir(path.name) is not None \
        else None
    lock = None
    if not dry_run and root is not None:
        # The verification (reading checkpoints: long) runs first as a dry run without the
        # lock, so a job's save waits only for the short changes, which verify again only
        # what was replaced meanwhile.
        scratch = RepairReport(str(path), kind, True)
        _run(path, kind, scratch, _Backup(path, False, scratch), add_rng, seed, threads,
             verified, step_dirs)
        # As "repair", not "save": a job's save meeting it waits instead of failing.
        lock = RootLock(root, "repair", wait=LOCK_WAIT).acquire()
    try:
        _run(path, kind, report, saver, add_rng, seed, threads, verified, step_dirs)
    finally:
        if lock is not None:
            lock.release()
    return report


def _run(path: Path, kind: str, report: RepairReport, saver: "_Backup", add_rng: bool,
         seed: int | None, threads: int, verified: dict, step_dirs) -> None:
    if kind == "root":
        _parked(path, report, saver)
    ckpts = [path] if kind == "checkpoint" else step_dirs(path)
    _temporaries(path, kind, ckpts, report, saver)
    if add_rng:
        _add_rng(path, ckpts, report, saver, seed, threads, verified)
    if kind == "root":
        _latest(path, ckpts, report, saver, threads, verified)


def _problem(ckpt: Path, threads: int, cache: dict) -> str | None:
    """None when the checkpoint passes structure, file and checksum checks; else the first
    error. (Consistency warnings do not block a repair: they are about training, not bytes.)"""
    sig = _signature(ckpt)
    if ckpt not in cache or cache[ckpt][0] != sig:
        from .verify import verify
        rep = verify(ckpt, threads=threads).checkpoints[0]
        errors = [c for c in rep.checks if c.level == "error"
                  and c.group in ("structure", "files", "checksums")]
        cache[ckpt] = (sig, errors[0].message if errors else None)
    return cache[ckpt][1]


def _signature(ckpt: Path) -> tuple | None:
    """Changes when the checkpoint is replaced (a commit renames a new directory in, with a
    new manifest) or its manifest rewritten: a verification made before is then stale."""
    try:
        st = os.lstat(ckpt / MANIFEST_NAME)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _rel(base: Path, p: Path) -> str:
    return str(p.relative_to(base)) if p != base else "."


def _temporaries(base: Path, kind: str, ckpts: list[Path], report: RepairReport,
                 saver: _Backup) -> None:
    found = []
    if kind == "root":
        # Not a live manager's spare files (storage/spares.py): nothing interrupted them.
        found += [p for p in sorted(base.iterdir())
                  if is_staging(p.name) and p.name != SPARE_DIR
                  or (p.is_file() and p.name.endswith(".tmp"))]
    for ckpt in ckpts:
        found += [p for p in sorted(ckpt.iterdir()) if p.is_file() and p.name.endswith(".tmp")]
    for p in found:
        where = "moved into the backup" if saver.enabled else "deleted (--no-backup)"
        a = Action("temporary", _rel(base, p), f"incomplete temporary of an interrupted "
                   f"write: {where}")
        report.actions.append(a)
        if not report.dry_run:
            try:
                saver.remove(p)
            except FileNotFoundError:
                # A live job's retention removes its retired steps in the background,
                # outside the root lock: this one finished first.
                a.detail += " (gone meanwhile: its owner removed it)"
            a.done = True


def _add_rng(base: Path, ckpts: list[Path], report: RepairReport, saver: _Backup,
             seed: int | None, threads: int, verified: dict) -> None:
    for ckpt in ckpts:
        mpath = ckpt / MANIFEST_NAME
        try:
            m = records.read_manifest(ckpt)
        except Exception:
            continue  # unreadable manifests are reported by the latest check and by verify
        lacking = {r: [s for s in anatomy.BASE_STREAMS if s not in _streams(e)]
                   for r, e in enumerate(m.ranks)}
        lacking = {r: s for r, s in lacking.items() if s}
        if not lacking:
            continue
        streams = sorted({s for v in lacking.values() for s in v})
        a = Action("rng", _rel(base, mpath), f"add RNG stream(s) {', '.join(streams)} to "
                   f"{len(lacking)} rank(s), seeded now (marked in the manifest: the past "
                   "stays unreproducible)")
        report.actions.append(a)
        why = _problem(ckpt, threads, verified)
        if why is not None:
            a.refused = f"the checkpoint fails verification, so it is left unchanged: {why}"
            continue
        if report.dry_run:
            continue
        seed_used = seed if seed is not None else secrets.randbits(62)
        for r, missing in lacking.items():
            fresh = _seeded_streams(seed_used + r)
            current = treecodec.decode(m.ranks[r].get("rng")) if isinstance(
                m.ranks[r].get("rng"), dict) else {}
            current.update({s: fresh[s] for s in missing})
            m.ranks[r]["rng"] = treecodec.encode(current)
        m.meta[anatomy.RNG_SEEDED_NOW] = {
            "by": "dckpt repair", "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seed": seed_used, "seed_of_rank": "seed + rank",
            "streams": {str(r): s for r, s in lacking.items()},
            "note": "RNG streams seeded when repaired, not saved by the run: resuming from "
                    "here is reproducible, the original run's randomness is lost"}
        saver.copy(mpath)
        commit.write_file_durably(mpath, m.to_bytes())
        a.detail += f"; seed {seed_used}"
        a.done = True


def _streams(entry: dict) -> set[str]:
    try:
        rng = treecodec.decode(entry.get("rng"))
    except ManifestError:
        return set()
    return set(rng) if isinstance(rng, dict) else set()


def _seeded_streams(seed: int) -> dict:
    """RNG states from `seed`, leaving this process's own generators as they were."""
    from ..state import rng
    saved = rng.capture()
    try:
        rng.seed_everything(seed)
        return rng.capture()
    finally:
        rng.restore(saved)


def _latest(root: Path, ckpts: list[Path], report: RepairReport, saver: _Backup,
            threads: int, verified: dict) -> None:
    pointer = root / LATEST_NAME
    try:
        text = pointer.read_text().strip()
    except FileNotFoundError:
        text, state = None, "is missing"
    except (OSError, UnicodeDecodeError):
        text, state = None, "is unreadable"
    target, failing = None, []
    for p in reversed([p for p in ckpts if (p / MANIFEST_NAME).is_file()]):  # newest first
        why = _problem(p, threads, verified)
        if why is None:
            target = p
            break
        failing.append((p, why))
    if target is not None:
        _set_aside(root, target, failing, report)
    if text is not None:
        if target is not None and text == target.name:
            return  # already right
        committed = parse_step_dir(text) is not None and (root / text / MANIFEST_NAME).is_file()
        state = f"names {text[:60]!r}" + ("" if committed else ", not a committed checkpoint")
    shown = [f"{p.name} ({why})" for p, why in failing[:3]]
    if target is None:
        if failing or text is None:
            report.actions.append(Action(
                "latest", LATEST_NAME, f"'{LATEST_NAME}' {state}",
                refused="no committed checkpoint passes verification"
                        + (f": {'; '.join(shown)}" if failing else "")))
        return
    detail = f"'{LATEST_NAME}' {state} -> {target.name} (newest verified step)"
    if failing:
        detail += f"; newer but failing verification: {', '.join(shown)}"
    a = Action("latest", LATEST_NAME, detail)
    report.actions.append(a)
    if report.dry_run:
        return
    if pointer.is_file():
        saver.copy(pointer)
    commit.write_file_durably(pointer, f"{target.name}\n".encode())
    a.done = True


def _set_aside(root: Path, target: Path, failing: list, report: RepairReport) -> None:
    """Mark the newer checkpoints that fail verification, so that a resume (latest_step,
    restore, verify --latest) uses `target` as `latest` now says; unmark `target` if an
    earlier repair had marked it and it passes now. Nothing is deleted."""
    for p, why in failing:
        if is_set_aside(p):
            continue
        a = Action("set-aside", _rel(root, p / FAILED_MARK),
                   f"{p.name} fails verification ({why}): marked, so resume uses "
                   f"{target.name}; delete the mark to undo")
        report.actions.append(a)
        if not report.dry_run:
            commit.write_file_durably(p / FAILED_MARK, f"dckpt repair: {why}\n".encode())
            a.done = True
    if is_set_aside(target):
        a = Action("set-aside", _rel(root, target / FAILED_MARK),
                   f"{target.name} passes verification now: mark removed")
        report.actions.append(a)
        if not report.dry_run:
            (target / FAILED_MARK).unlink()
            a.done = True


def _parked(root: Path, report: RepairReport, saver: _Backup) -> None:
    """Copies an overwrite parked as `.NAME.old-*` and did not finish (no RENAME_EXCHANGE):
    put back where the step is missing, else moved into the backup (the overwrite did
    finish). What a manager opening the root does (commit.recover), with a backup."""
    for p in sorted(root.iterdir()):
        name = aside_target(p.name)
        if name is None:
            continue
        if (root / name).exists():
            a = Action("parked", p.name, f"copy of {name} parked by an overwrite that "
                       "completed: " + ("moved into the backup" if saver.enabled
                                        else "deleted (--no-backup)"))
        else:
            a = Action("parked", p.name, f"copy of {name} parked by an overwrite that crashed "
                       f"before its replacement arrived: put back as {name}")
        report.actions.append(a)
        if report.dry_run:
            continue
        if (root / name).exists():
            saver.remove(p)
        else:
            os.rename(p, root / name)
            commit.fsync_dir(root)
        a.done = True


__all__ = ["repair", "RepairReport", "Action", "BACKUP_DIR"]

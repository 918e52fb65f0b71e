"""Repair what can be repaired without guessing, keeping a backup of everything touched.

- a damaged `latest` pointer (missing, unreadable, naming an absent or older step) is
  rewritten to name the newest committed step that passes verification;
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

from . import commit
from .errors import ManifestError
from .format import anatomy
from .format import tree as treecodec
from .format.layout import LATEST_NAME, is_staging, parse_step_dir
from .format.manifest import MANIFEST_NAME, parse, read_manifest_bytes

SCHEMA = "dckpt.repair/1"
BACKUP_DIR = ".dckpt-backup"


@dataclass
class Action:
    kind: str  # "latest" | "temporary" | "rng"
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
            d.mkdir(parents=True)
            self.dir = d
            self.report.backup = str(d)
        dst = self.dir / src.relative_to(self.base)
        dst.parent.mkdir(parents=True, exist_ok=True)
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
    from .manager.lock import RootLock
    from .verify import classify_path, step_dirs
    path = Path(path)
    kind = classify_path(path)
    report = RepairReport(str(path), kind, dry_run)
    saver = _Backup(path, backup, report)
    lock = None if dry_run or kind == "checkpoint" else RootLock(path).acquire()
    try:
        ckpts = [path] if kind == "checkpoint" else step_dirs(path)
        _temporaries(path, kind, ckpts, report, saver)
        verified: dict[Path, str | None] = {}
        if add_rng:
            _add_rng(path, ckpts, report, saver, seed, threads, verified)
        if kind == "root":
            _latest(path, ckpts, report, saver, threads, verified)
    finally:
        if lock is not None:
            lock.release()
    return report


def _problem(ckpt: Path, threads: int, cache: dict) -> str | None:
    """None when the checkpoint passes structure, file and checksum checks; else the first
    error. (Consistency warnings do not block a repair: they are about training, not bytes.)"""
    if ckpt not in cache:
        from .verify import verify
        rep = verify(ckpt, threads=threads).checkpoints[0]
        errors = [c for c in rep.checks if c.level == "error"
                  and c.group in ("structure", "files", "checksums")]
        cache[ckpt] = errors[0].message if errors else None
    return cache[ckpt]


def _rel(base: Path, p: Path) -> str:
    return str(p.relative_to(base)) if p != base else "."


def _temporaries(base: Path, kind: str, ckpts: list[Path], report: RepairReport,
                 saver: _Backup) -> None:
    found = []
    if kind == "root":
        found += [p for p in sorted(base.iterdir()) if is_staging(p.name)
                  or (p.is_file() and p.name.endswith(".tmp"))]
    for ckpt in ckpts:
        found += [p for p in sorted(ckpt.iterdir()) if p.is_file() and p.name.endswith(".tmp")]
    for p in found:
        where = "moved into the backup" if saver.enabled else "deleted (--no-backup)"
        a = Action("temporary", _rel(base, p), f"incomplete temporary of an interrupted "
                   f"write: {where}")
        report.actions.append(a)
        if not report.dry_run:
            saver.remove(p)
            a.done = True


def _add_rng(base: Path, ckpts: list[Path], report: RepairReport, saver: _Backup,
             seed: int | None, threads: int, verified: dict) -> None:
    for ckpt in ckpts:
        mpath = ckpt / MANIFEST_NAME
        try:
            m = parse(read_manifest_bytes(mpath), str(mpath))
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
    from . import rng
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
        failing.append(f"{p.name} ({why})")
    if text is not None:
        if target is not None and text == target.name:
            return  # already right
        committed = parse_step_dir(text) is not None and (root / text / MANIFEST_NAME).is_file()
        state = f"names {text[:60]!r}" + ("" if committed else ", not a committed checkpoint")
    if target is None:
        if failing or text is None:
            report.actions.append(Action(
                "latest", LATEST_NAME, f"'{LATEST_NAME}' {state}",
                refused="no committed checkpoint passes verification"
                        + (f": {'; '.join(failing[:3])}" if failing else "")))
        return
    detail = f"'{LATEST_NAME}' {state} -> {target.name} (newest verified step)"
    if failing:
        detail += f"; newer but failing verification: {', '.join(failing[:3])}"
    a = Action("latest", LATEST_NAME, detail)
    report.actions.append(a)
    if report.dry_run:
        return
    if pointer.is_file():
        saver.copy(pointer)
    commit.write_file_durably(pointer, f"{target.name}\n".encode())
    a.done = True


__all__ = ["repair", "RepairReport", "Action", "BACKUP_DIR"]

"""CheckpointManager: numbered checkpoints under one root, retention, exact resume.

    root/step-000001000/   committed (manifest.json present)
    root/.step-...tmp-*    in progress or crashed: ignored by restore, removed by gc
    root/latest            names the newest committed step; written after commit
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import checkpoint, commit, dist
from ..errors import (CheckpointNotFoundError, DckptError, LockError, StateMismatchError,
                      StorageError)
from ..format import tree as treecodec
from ..format.layout import (LATEST_NAME, is_committed, is_set_aside, is_staging,
                             parse_step_dir, step_dir)
from .. import rng
from ..incremental import Base, VersionCache, exclusive_bytes
from .async_save import AsyncOptions, AsyncSaver, SaveHandle, commit_group
from .lock import RootLock
from .retention import Retention

log = logging.getLogger("dckpt")

# Seconds a save (or gc) waits for a short holder of the root lock: another process's
# manager clearing temporaries as it opens. Another save is refused at once.
LOCK_WAIT = 30.0


@dataclass
class ResumeReport:
    step: int
    path: Path
    epoch: int | None
    step_in_epoch: int | None
    metrics: dict
    counters: dict
    components: dict[str, str]  # restored component -> kind
    rng_streams: list[str]
    missing_allowed: list[str] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # world-size change, RNG not restored

    def summary(self) -> str:
        parts = [f"resumed step {self.step} from {self.path}"]
        if self.epoch is not None:
            parts.append(f"epoch {self.epoch}" + (f", step {self.step_in_epoch} in epoch"
                                                  if self.step_in_epoch is not None else ""))
        comps = ", ".join(f"{k} ({v})" for k, v in self.components.items())
        parts.append(f"restored: {comps}; rng: {', '.join(self.rng_streams) or 'none'}")
        if self.missing_allowed:
            parts.append(f"NOT restored (allowed): {', '.join(self.missing_allowed)}")
        parts.append(f"{self.bytes / 1e6:.1f} MB in {self.seconds:.2f} s")
        parts += [f"NOTE: {n}" for n in self.notes]
        return "; ".join(parts)


class CheckpointManager:
    def __init__(self, root: str | os.PathLike, *, retention: Retention | None = None,
                 keep_last: int | None = None, keep_best: int = 0, metric: str | None = None,
                 mode: str = "min", keep_every: int | None = None,
                 compression: str | int | None = None, shuffle: bool = True,
                 chunk_size: int | None = None, threads: int = 0, fsync: bool = True,
                 verify: bool = True, incremental: bool = True, full_every: int | None = None,
                 trust_versions: bool = False, group=None, remove_staging: bool = True,
                 async_save: bool | AsyncOptions = False):
        """incremental: share chunks unchanged since the latest checkpoint instead of writing
        them again (dckpt/incremental.py); full_every: every K-th save is written in full;
        trust_versions: skip hashing tensors whose storage and version counter did not change
        since this manager saved them (unsafe if the state is written through `.data`; no
        effect with async saves, which write from staging copies);
        remove_staging: clear incomplete temporaries now (off for tools that only look);
        async_save: True or AsyncOptions(...) makes save() take a snapshot and return a
        SaveHandle while a worker writes and commits it (dckpt/manager/async_save.py)."""
        if full_every is not None and (not isinstance(full_every, int) or full_every < 1):
            raise ValueError("full_every must be a positive integer or None")
        self.root = Path(root)
        self.incremental, self.full_every = incremental, full_every
        self._versions = VersionCache() if trust_versions and not async_save else None
        self.retention = retention or Retention(keep_last, keep_best, metric, mode, keep_every)
        self.save_options = {"compression": compression, "shuffle": shuffle, "threads": threads,
                             "fsync": fsync}
        if chunk_size:
            self.save_options["chunk_size"] = chunk_size
        self.verify, self.threads, self.group = verify, threads, group
        self.is_writer = dist.rank(group) == 0
        if self.is_writer:
            commit.make_dirs(self.root)
            if remove_staging:  # off for tools that only look (dckpt gc --dry-run)
                try:
                    with RootLock(self.root, "cleanup"):
                        self._remove_staging()
                except LockError:
                    # Another process is saving here: its staging directory is live, not
                    # debris, and a reader must not fail. A second writer learns of the
                    # first at save() (LockError).
                    log.info("dckpt: %s is being written by another process; temporaries "
                             "left to it", self.root)
        self._saver = None
        if async_save:
            opts = async_save if isinstance(async_save, AsyncOptions) else AsyncOptions()
            self._commit_group = commit_group(group)
            self._saver = AsyncSaver(opts, group)
        dist.barrier(group)

    # ---- what is there -------------------------------------------------------------------
    def path(self, step: int) -> Path:
        return self.root / step_dir(step)

    def steps(self) -> list[int]:
        """Committed steps, oldest first."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            s = parse_step_dir(p.name)
            if s is not None and is_committed(p):
                out.append(s)
        return sorted(out)

    def latest_step(self) -> int | None:
        """The newest committed step, skipping those `dckpt repair` set aside as failing
        verification; the `latest` pointer is a hint checked against disk."""
        pointed = self._read_latest()
        steps = [s for s in self.steps() if not is_set_aside(self.path(s))]
        if pointed is not None and steps and pointed == steps[-1]:
            return pointed
        return steps[-1] if steps else None

    def _read_latest(self) -> int | None:
        try:
            text = (self.root / LATEST_NAME).read_text().strip()
        except OSError:
            return None
        s = parse_step_dir(text)
        return s if s is not None and is_committed(self.root / text) else None

    # ---- save ----------------------------------------------------------------------------
    def save(self, step: int, state: Any, metrics: dict | None = None, *,
             epoch: int | None = None, step_in_epoch: int | None = None,
             loss_history: list[float] | None = None, counters: dict | None = None,
             overwrite: bool = False, full: bool = False) -> checkpoint.SaveResult | SaveHandle:
        """Save `state` as checkpoint `step` with this rank's RNG streams; apply retention.
        full: write every chunk even when the manager saves incrementally.

        Synchronous: returns the SaveResult once committed. Async: returns a SaveHandle once
        the snapshot (tensors, state dicts, RNG streams, data position) is taken."""
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, not {step!r}")
        metrics = dict(metrics or {})
        ctr = {"step": step, "epoch": epoch, "step_in_epoch": step_in_epoch,
               "loss_history": list(loss_history or []), **(counters or {})}
        rank_state = {"rng": rng.capture(own_device_only=dist.active(self.group))}
        if self._saver is not None:
            return self._saver.submit(
                step, state, rank_state,
                lambda snap: self._persist(step, snap, ctr, metrics, overwrite, full,
                                           self._commit_group, self._saver.options.writer_threads))
        return self._persist(step, lambda: checkpoint.snapshot(state, rank_state), ctr,
                             metrics, overwrite, full, self.group, self.threads)

    def _persist(self, step: int, snap, ctr: dict, metrics: dict, overwrite: bool, full: bool,
                 group, threads: int) -> checkpoint.SaveResult:
        """Write and commit `snap` (see checkpoint.write), apply retention, then move
        `latest`. Collective over `group`: the training group, or the async worker's own."""
        ctr = {**ctr, "best": self._best_with(step, metrics)}
        lock = RootLock(self.root, wait=LOCK_WAIT).acquire() if self.is_writer else None
        try:
            # [base name or None, why the save is full although incremental, or None]
            base, full_note = dist.broadcast_json(
                list(self._base_name(full)) if self.is_writer else None, 0, group)
            try:
                result = checkpoint.write(
                    snap, self.path(step), counters=ctr, metrics=metrics, overwrite=overwrite,
                    group=group, base=Base(self.root / base, self._versions) if base else None,
                    # Recorded so `dckpt ls` / `dckpt gc` apply the policy the run used.
                    meta={"retention": asdict(self.retention)},
                    **{**self.save_options, "threads": threads})
            except BaseException:
                if self._versions is not None:
                    self._versions.discard()
                raise
            if self._versions is not None:
                self._versions.commit()
            if full_note:
                result.notes.append(full_note)
            if self.is_writer:
                self._apply_retention()
                try:
                    self._write_latest(step)
                except StorageError as e:
                    # Committed already, and `latest` is only a hint checked against the
                    # steps on disk: a full disk here must not report the save as failed.
                    log.warning("dckpt: step %d is committed but 'latest' was not moved: %s",
                                step, e)
        finally:
            if lock:
                lock.release()
        dist.barrier(group)
        log.info("dckpt: saved step %d (%.1f MB) in %.2f s", step, result.bytes / 1e6,
                 result.seconds)
        return result

    # ---- async service -------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> bool:
        """Wait for pending async saves (True when none is left); raises their failures."""
        return self._saver.wait(timeout) if self._saver is not None else True

    def close(self, timeout: float | None = None) -> None:
        """Finish pending async saves and stop the worker; raises failures and, after
        `timeout`, unfinished saves (AsyncSaveError)."""
        if self._saver is not None:
            self._saver.close(timeout)

    def prepare(self, state: Any) -> int:
        """Allocate the async staging buffers for `state` now; returns their bytes."""
        return self._saver.prepare(state) if self._saver is not None else 0

    @property
    def staging_bytes(self) -> int:
        """Host memory held for async snapshots (at most max_in_flight x state size)."""
        return self._saver.pool.nbytes if self._saver is not None else 0

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _base_name(self, full: bool) -> tuple[str | None, str | None]:
        """(the committed checkpoint the next save shares unchanged chunks with, if any;
        why there is none although the save would be incremental)."""
        latest = self.latest_step() if self.incremental and not full else None
        if latest is None:
            return None, None
        try:
            depth = Base(self.path(latest)).depth  # parses the base's manifest
        except DckptError as e:
            # A damaged newest checkpoint must not fail every later save: this one is
            # written in full, sharing nothing with it.
            note = (f"written in full, not incrementally: the newest checkpoint "
                    f"{self.path(latest)} is unreadable ({e}); verify or repair it")
            log.warning("dckpt: step %s", note)
            return None, note
        if self.full_every and depth + 1 >= self.full_every:
            return None, None
        return step_dir(latest), None

    def _best_with(self, step: int, metrics: dict) -> dict | None:
        name = self.retention.metric
        if not name:
            return None
        known = {s: self._metrics(s) for s in self.steps()}
        known[step] = metrics
        best = self.retention.best(known, 1)
        return {"metric": name, "mode": self.retention.mode, "step": best[0],
                "value": known[best[0]][name]} if best else None

    def _metrics(self, step: int) -> dict:
        try:
            return checkpoint.read_manifest(self.path(step)).metrics
        except DckptError:
            return {}

    def _write_latest(self, step: int) -> None:
        commit.write_file_durably(self.root / LATEST_NAME, f"{step_dir(step)}\n".encode(),
                                  self.save_options["fsync"])

    def retention_plan(self) -> dict[int, list[str]]:
        """step -> reasons it is kept; an empty list means retention deletes it."""
        # Manifests are read only when a metric decides: each save would otherwise parse
        # every kept one, a cost that grows with the run and dwarfs a small incremental save.
        read = self._metrics if self.retention.metric else (lambda s: {})
        plan = self.retention.reasons({s: read(s) for s in self.steps()})
        # The step a resume uses is never deleted, also when newer ones were set aside by
        # repair as failing verification (the "newest" rule keeps those).
        resume = self.latest_step()
        if resume is not None and not plan.get(resume, ["kept"]):
            plan[resume].append("newest resumable")
        return plan

    def _doomed(self) -> tuple[list[int], list[int]]:
        """(steps retention deletes, steps it would delete but that are symbolic links: the
        data lies outside the root, so neither it nor the link is touched)."""
        doomed = [s for s, why in self.retention_plan().items() if not why]
        links = [s for s in doomed if self.path(s).is_symlink()]
        for s in links:
            log.warning("dckpt: %s is a symbolic link to %s: retention does not delete "
                        "through it; remove the link by hand to drop it", self.path(s),
                        os.readlink(self.path(s)))
        return [s for s in doomed if s not in links], links

    def _apply_retention(self, dry_run: bool = False) -> list[int]:
        doomed, _ = self._doomed()
        if not dry_run:
            for s in doomed:
                # Rename first so a crash mid-delete leaves debris gc recognizes, not a
                # half-deleted directory that still looks committed.
                trash = self.root / f".{step_dir(s)}.tmp-deleting"
                try:
                    os.rename(self.path(s), trash)
                except OSError as e:
                    # The new step is committed; a step another process removed (or one
                    # that cannot be moved) must not make its save fail.
                    log.warning("dckpt: retention could not delete %s: %s", self.path(s),
                                e.strerror or e)
                    continue
                shutil.rmtree(trash, ignore_errors=True)
        return doomed

    def _temporaries(self) -> list[Path]:
        """Staging directories and the half-written `latest` a crash leaves behind."""
        return [p for p in self.root.iterdir()
                if is_staging(p.name) or p.name == LATEST_NAME + ".tmp"]

    def _remove_staging(self) -> list[Path]:
        for name in commit.recover(self.root):
            log.warning("dckpt: %s was moved aside by an overwrite that crashed; put back",
                        name)
        gone = self._temporaries()
        for p in gone:
            # A link is removed, never what it points to.
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        return gone

    def gc(self, dry_run: bool = False) -> dict:
        """Apply retention and remove incomplete temporaries; reports what (would be) freed."""
        self.wait()  # the async worker holds the root lock while it commits
        # As "gc", not "save": a job's save meeting it waits instead of failing.
        with RootLock(self.root, "gc", wait=LOCK_WAIT):
            staging = self._temporaries()
            doomed, links = self._doomed()
            # Hard-linked data shared with kept checkpoints is not freed.
            freed = exclusive_bytes(staging + [self.path(s) for s in doomed])
            if not dry_run:
                self._remove_staging()
                self._apply_retention()
                latest = self.latest_step()
                if latest is not None and self._read_latest() != latest:
                    self._write_latest(latest)
        return {"removed_steps": doomed, "removed_temporaries": [p.name for p in staging],
                "kept_links": links, "freed_bytes": freed, "dry_run": dry_run}

    # ---- restore -------------------------------------------------------------------------
    def restore(self, state: dict, step: int | None = None, *,
                allow_missing: bool | list[str] = False, keys: list[str] | None = None,
                restore_rng: bool = True) -> ResumeReport:
        """Restore `state` in place from `step` (default: latest committed)."""
        t0 = time.perf_counter()
        self.wait()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointNotFoundError(f"no committed checkpoint under {self.root}")
        path = self.path(step)
        m = checkpoint.read_manifest(path)
        r = dist.rank(self.group)
        rank_entry = m.ranks[r] if r < m.world_size else None
        rng_state = treecodec.decode(rank_entry.get("rng")) if rank_entry else None
        wants_rng = restore_rng and not (allow_missing is True or "rng" in (allow_missing or []))
        if wants_rng and not rng_state and rank_entry is not None:
            raise StateMismatchError([f"{path}: no RNG streams for rank {r}; pass "
                                      "allow_missing=['rng'] to resume without them"])
        try:  # collective: a rank that fails to load (corrupt chunk) fails every rank
            # RNG streams are checked before any read: a malformed one leaves state untouched.
            rng_setters = rng.prepare(rng_state) if (restore_rng and rng_state) else []
            # The manifest parsed above, not a second read: an overwrite in between must
            # not pair this version's counters and RNG streams with another's tensors.
            report, failure = checkpoint.load(
                path, into=state, keys=keys, verify=self.verify, threads=self.threads,
                allow_missing=allow_missing, group=self.group, manifest=m), None
        except Exception as e:
            failure = e
        dist.raise_if_any_failed(failure, self.group, f"restore of {path}")
        for _, set_stream in rng_setters:
            set_stream()
        streams = [name for name, _ in rng_setters]
        notes = list(report.notes)
        if restore_rng and rank_entry is None:
            # A new rank has no streams of its own; copying another rank's would make two
            # ranks draw the same numbers. It keeps the streams this process seeded.
            notes.append(f"rank {r} did not exist in the {m.world_size}-rank checkpoint: its "
                         "RNG streams were NOT restored (left as this process seeded them)")
            log.warning("dckpt: %s", notes[-1])
        c = m.counters
        out = ResumeReport(step=step, path=path, epoch=c.get("epoch"),
                           step_in_epoch=c.get("step_in_epoch"), metrics=m.metrics, counters=c,
                           components=report.components, rng_streams=streams,
                           missing_allowed=report.missing_allowed, bytes=report.bytes,
                           seconds=time.perf_counter() - t0, notes=notes)
        log.info("dckpt: %s", out.summary())
        return out

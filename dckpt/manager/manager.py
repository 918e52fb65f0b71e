"""CheckpointManager: numbered checkpoints under one root, retention, exact resume.

    root/step-000001000/   committed (manifest.json present)
    root/.step-...tmp-*    in progress or crashed: ignored by restore, removed by gc
    root/latest            names the newest committed step; written after commit
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..engine import checkpoint, gcpause
from ..storage import commit, spares
from ..distributed import collective as dist
from ..storage import local as io
from ..storage import objectstore
from ..errors import (CheckpointNotFoundError, CorruptCheckpointError, DckptError,
                      DistributedError, FormatVersionError, IncompleteCheckpointError,
                      InvalidArgumentError, LockError, ManifestError, StateMismatchError,
                      StepOrderError, StorageError)
from ..format import tree as treecodec
from ..format.layout import (LATEST_NAME, MANIFEST_NAME, SPARE_DIR, is_committed, is_set_aside,
                             is_staging, parse_step_dir, step_dir)
from ..state import rng
from ..engine.incremental import Base, VersionCache, exclusive_bytes
from .async_save import AsyncOptions, AsyncSaver, SaveHandle, commit_group
from .lock import RootLock
from .memory_tier import MemoryTier
from .messages import GcReport, RestoreHit, SaveDecision, StepRequest
from .preemption import Preemption
from .remote_tier import LOCAL, REMOTE, RemoteTier
from ..state.restore import partly_overwritten
from .retention import Retention

log = logging.getLogger("dckpt")

# Seconds a save (or gc) waits for a short holder of the root lock: another process's
# manager clearing temporaries as it opens. Another save is refused at once.
LOCK_WAIT = 30.0


@dataclass
class ResumeReport:
    """What CheckpointManager.restore() restored and where the run stands: `step`,
    `epoch` and `step_in_epoch` (as passed to save()), `counters` (all of them, with
    loss_history and your own), `metrics`, the restored components and RNG streams, and
    `notes` (world-size change, components left out, RNG not restored)."""
    step: int
    path: Path | str  # a URL for the remote tier
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
    # With a memory tier: rank -> where its bytes came from ("tier": memory | replica |
    # durable, "from", "seconds", "bytes"), the same on every rank.
    sources: dict[int, dict] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for a log: step, epoch, what was restored, bytes, time and notes."""
        parts = [f"resumed step {self.step} from {self.path}"]
        if self.epoch is not None:
            parts.append(f"epoch {self.epoch}" + (f", step {self.step_in_epoch} in epoch"
                                                  if self.step_in_epoch is not None else ""))
        comps = ", ".join(f"{k} ({v})" for k, v in self.components.items())
        parts.append(f"restored: {comps}; rng: {', '.join(self.rng_streams) or 'none'}")
        if self.missing_allowed:
            parts.append(f"NOT restored (allowed): {', '.join(self.missing_allowed)}")
        parts.append(f"{self.bytes / 1e6:.1f} MB in {self.seconds:.2f} s")
        if self.sources:  # with a memory tier: where each rank's bytes came from
            parts.append("ranks' bytes from: " + ", ".join(
                f"{q} {v['tier']} ({v['seconds']:.2f} s)" for q, v in self.sources.items()))
        parts += [f"NOTE: {n}" for n in self.notes]
        return "; ".join(parts)


# ---- Resuming one checkpoint: CheckpointManager.restore and the accelerate integration's
# load_state both go through load_step() and resumed().
@dataclass
class Attempt:
    """One try at restoring a checkpoint on this rank: what it got, and what it raised."""
    path: Path | str  # a URL for the remote tier
    manifest: Any = None  # the Manifest, read once
    rank_entry: dict | None = None  # this rank's entry (None: a rank the save did not have)
    rng_setters: list = field(default_factory=list)  # (stream, set it) once all went well
    report: Any = None  # the RestoreReport of checkpoint.load
    failure: Exception | None = None


def load_step(state: dict, path: Path, *, rank: int, restore_rng: bool = True,
              allow_missing: bool | list[str] = False, keys: list[str] | None = None,
              strict: bool = True, verify: bool = True, threads: int = 0, group=None,
              manifest=None, rng_hint: str = "; pass allow_missing=['rng'] to resume "
                                              "without them",
              storage_options: dict | None = None, local_shards: bool = False) -> Attempt:
    """Restore `state` in place from the checkpoint at `path`, on this rank. The manifest
    is read once (or `manifest` used): an overwrite in between must not pair one version's
    counters and RNG streams with another's tensors. This rank's RNG streams are checked
    before any tensor is read (a malformed one leaves the state untouched) but set only by
    resumed(), once every rank succeeded. Never raises: the failure is in the Attempt, for
    the caller to share with the other ranks (fall back, or raise). local_shards: `path` is
    this rank's own single-rank part (the memory tier; see checkpoint.load)."""
    a = Attempt(path if objectstore.is_url(path) else Path(path))
    try:
        a.manifest = m = manifest or checkpoint.read_manifest(path, storage_options, rank=rank)
        a.rank_entry = m.ranks[rank] if rank < m.world_size else None
        rng_state = treecodec.decode(a.rank_entry.get("rng")) if a.rank_entry else None
        wants_rng = restore_rng and not (allow_missing is True or "rng" in (allow_missing or []))
        if wants_rng and not rng_state and a.rank_entry is not None:
            raise StateMismatchError([f"{path}: no RNG streams for rank {rank}{rng_hint}"])
        a.rng_setters = rng.prepare(rng_state) if (restore_rng and rng_state) else []
        a.report = checkpoint.load(path, into=state, keys=keys, verify=verify, threads=threads,
                                   allow_missing=allow_missing, strict=strict, group=group,
                                   manifest=m, storage_options=storage_options,
                                   local_shards=local_shards)
    except Exception as e:
        a.failure = e
    return a


def resumed(a: Attempt, step: int, *, rank: int, restore_rng: bool = True,
            epoch: int | None = None, step_in_epoch: int | None = None,
            notes: list[str] | None = None) -> ResumeReport:
    """Set the RNG streams of a successful Attempt and describe where the run stands."""
    for _, set_stream in a.rng_setters:
        set_stream()
    notes = [*(notes or []), *a.report.notes]
    if restore_rng and a.rank_entry is None:
        # A new rank has no streams of its own; copying another rank's would make two
        # ranks draw the same numbers. It keeps the streams this process seeded.
        notes.append(f"rank {rank} did not exist in the {a.manifest.world_size}-rank "
                     "checkpoint: its RNG streams were NOT restored (left as this process "
                     "seeded them)")
        log.warning("dckpt: %s", notes[-1])
    c = a.manifest.counters
    return ResumeReport(step=step, path=a.path, epoch=epoch, step_in_epoch=step_in_epoch,
                        metrics=a.manifest.metrics, counters=c, components=a.report.components,
                        rng_streams=[name for name, _ in a.rng_setters],
                        missing_allowed=a.report.missing_allowed, bytes=a.report.bytes,
                        notes=notes)


def _damaged(e: Exception) -> bool:
    """A failure an older checkpoint may not have: its data or manifest is damaged (not a
    newer format, a mismatching state or an I/O error, which an older one shares)."""
    return isinstance(e, (CorruptCheckpointError, IncompleteCheckpointError, ManifestError,
                          CheckpointNotFoundError)) and not isinstance(e, FormatVersionError)


def _hit(e: Exception | None) -> RestoreHit | None:
    """What a rank's failed restore attempt tells the others."""
    if e is None:
        return None
    return RestoreHit(f"{type(e).__name__}: {e}", _damaged(e),
                      getattr(e, "live_state_changed", False))


def _remove_dirs(paths: list[Path]) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


class _ManifestCache:
    """The manifest of the step this manager committed last, trusted only while the file
    on disk is the one written: its identity (device, inode, size, modification and change
    times) is compared at each use. Any rewrite by another process (a commit renames a new
    file into place; an edit changes mtime and ctime; ctime cannot be set back) makes the
    next save read and validate the manifest again. Single-manifest checkpoints only: of a
    split one the manager holds no parsed records to reuse."""

    def __init__(self):
        self._path: Path | None = None
        self._id: tuple | None = None
        self._manifest = None

    @staticmethod
    def _identity(path: Path) -> tuple | None:
        try:
            st = os.stat(path / MANIFEST_NAME)
        except OSError:
            return None
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def remember(self, path: Path, result) -> None:
        m = getattr(result, "_manifest", None)
        ident = self._identity(path) if m is not None and m.split is None else None
        self._path, self._id, self._manifest = (path, ident, m) if ident else (None, None,
                                                                                 None)

    def get(self, path: Path):
        """The cached manifest of `path`, or None (read it from disk)."""
        if self._path != path or self._id is None or self._identity(path) != self._id:
            return None
        return self._manifest


class CheckpointManager:
    """Numbered checkpoints of one run under `root`, with retention and exact resume.

        mgr = dckpt.CheckpointManager("runs/exp1", keep_last=3, keep_best=1, metric="loss")
        if mgr.latest_step() is not None:
            report = mgr.restore(state)     # report.step, report.epoch: where to go on
        mgr.save(step, state, metrics={"loss": loss}, epoch=epoch)

    Each save(step, ...) commits root/step-<step> atomically with this process's RNG
    streams, then applies the retention policy (keep_last, keep_best by `metric` in
    `mode`, keep_every) and moves `latest`. restore(state) puts the newest committed step
    (or `step=`) back into the live objects in place. Collective under torch.distributed
    (every rank calls save/restore). Options are described in __init__.
    """

    @dist.collective
    def __init__(self, root: str | os.PathLike, *, retention: Retention | None = None,
                 keep_last: int | None = None, keep_best: int = 0, metric: str | None = None,
                 mode: str = "min", keep_every: int | None = None,
                 compression: str | int | None = None, shuffle: bool = True,
                 chunk_size: int | None = None, threads: int = 0, fsync: bool = True,
                 verify: bool = True, incremental: bool = True, full_every: int | None = None,
                 trust_versions: bool = False, group=None, remove_staging: bool = True,
                 async_save: bool | AsyncOptions = False, save_on=None,
                 remote: str | None = None, storage_options: dict | None = None,
                 keep_last_remote: int | None = None,
                 memory: str | os.PathLike | None = None, replicas: int = 1,
                 durable_every: int = 10, node: str | None = None, memory_keep: int = 2,
                 recycle: bool = True):
        """incremental: share chunks unchanged since the latest checkpoint instead of writing
        them again (dckpt/engine/incremental.py); full_every: every K-th save is written in full;
        trust_versions: skip hashing tensors whose storage and version counter did not change
        since this manager saved them (unsafe if the state is written through `.data`; no
        effect with async saves, which write from staging copies);
        remove_staging: clear incomplete temporaries now (off for tools that only look);
        async_save: True or AsyncOptions(...) makes save() take a snapshot and return a
        SaveHandle while a worker writes and commits it (dckpt/manager/async_save.py); call
        prepare(state) once after construction to allocate (and fault in) the staging
        buffers there, not inside the first save;
        save_on: a signal, signals or a Preemption(...): save_if_preempted(step, state) at
        each step boundary then saves at a step all ranks agree on and exits
        (dckpt/manager/preemption.py, docs/preemption.md);
        remote: a URL ("s3://bucket/exp1") each committed step is uploaded to in the
        background (dckpt/manager/remote_tier.py, docs/STORAGE.md), with storage_options for
        its file system and keep_last_remote (default: keep_last) for its retention.
        memory: a node-local (tmpfs) path, `{node}` standing for the node: every save is
        committed there and copied to `replicas` partner ranks on other nodes, every
        `durable_every`-th save also under `root`; `memory_keep` steps stay in memory; `node`
        overrides the node id (dckpt/manager/memory_tier.py, docs/RECOVERY.md).
        recycle: the unshared data files of the step retention retired last are kept (in a
        hidden directory of the root, removed by close()) and the next save writes over
        them instead of creating new files, which spares the kernel new pages and blocks
        (dckpt/storage/spares.py); False deletes them with their step. Async saves that
        write with O_DIRECT (AsyncOptions.direct, the default) do not recycle."""
        if full_every is not None and (not isinstance(full_every, int) or full_every < 1):
            raise ValueError("full_every must be a positive integer or None")
        io.WriteOptions(compression, shuffle).validate()  # an unknown codec, at once
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
        failure = None
        if self.is_writer:
            try:
                self._open_root(remove_staging)
            except Exception as e:
                failure = e
        dist.raise_if_any_failed(failure, group, f"opening {self.root}")
        self._remote = None
        if remote is not None:
            kept = (self.retention if keep_last_remote is None
                    else replace(self.retention, keep_last=keep_last_remote))
            self._remote = RemoteTier(self.root, str(remote), storage_options=storage_options,
                                      retention=kept, group=group)
        self._tier = None if memory is None else MemoryTier(
            memory, replicas=replicas, durable_every=durable_every, node=node,
            keep=memory_keep, group=group)
        # Per save, under the root lock: one listing of the root instead of one per question
        # (the base, the order check, retention, `latest`), since the lock keeps other
        # writers out while it is held (_persist). Per thread: an async save runs on its
        # worker while the training thread may ask steps() or latest_step(), and gets the
        # disk's answer, not the save's memo.
        self._memo = threading.local()
        # The manifest this manager last committed, keyed by the identity of its file on
        # disk (_ManifestCache): the next incremental save compares against it without
        # reading and parsing it again, and reads it anew when the file was replaced.
        self._written = _ManifestCache()
        self._latest = commit.OwnFile(self.root / LATEST_NAME)
        # Removes the directories of steps retention retired (_apply_retention).
        self._deleter: threading.Thread | None = None
        self._saver = None
        if async_save:
            opts = async_save if isinstance(async_save, AsyncOptions) else AsyncOptions()
            self._commit_group = commit_group(group)
            self._saver = AsyncSaver(opts, group)
        # Where retired data files wait for the next save to write over them, and what
        # removes that directory at close() or when the process exits (storage/spares.py).
        # Not for saves that bypass the page cache (async, direct): they never take one.
        direct = self._saver is not None and self._saver.options.direct
        self._spares = self.root / SPARE_DIR if recycle and not direct else None
        self._spares_gone = None
        self.preemption = None
        if save_on is not None:
            self.preemption = Preemption.of(save_on)
            self.preemption.install(group)
            newest = self.latest_step()
            if newest is not None:
                self.preemption.check_grace(self._save_seconds(newest), f"the save of {newest}")

    def _open_root(self, remove_staging: bool) -> None:
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

    # ---- what is there -------------------------------------------------------------------
    def path(self, step: int) -> Path:
        """The directory of checkpoint `step` (committed or not)."""
        return self.root / step_dir(step)

    def steps(self) -> list[int]:
        """Committed steps, oldest first."""
        listing = self._listing
        if listing is not None:
            if "steps" not in listing:
                listing["steps"] = self._scan()
            return list(listing["steps"])
        return self._scan()

    @property
    def _listing(self) -> dict | None:
        """This thread's listing of the root during a save (None: ask the disk)."""
        return getattr(self._memo, "listing", None)

    def _scan(self) -> list[int]:
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
        listing = self._listing
        if listing is None:
            steps = [s for s in self.steps() if not is_set_aside(self.path(s))]
        else:  # asked twice per save (the base, retention): each step's marker looked up once
            aside = listing.setdefault("aside", {})
            for s in self.steps():
                if s not in aside:
                    aside[s] = is_set_aside(self.path(s))
            steps = [s for s in self.steps() if not aside[s]]
        if pointed is not None and steps and pointed == steps[-1]:
            return pointed
        return steps[-1] if steps else None

    @dist.collective
    def newest_step(self) -> int | None:
        """latest_step(), or a newer step of the remote tier or of some rank's memory tier:
        whether restore() has something to start from (a machine whose local root is empty
        resumes from the remote; a rank on a replaced node holds nothing, its partners do).
        Collective with remote= or memory=: every rank gets the same answer."""
        if self._remote is None and self._tier is None:
            return self.latest_step()
        failure, found = None, []
        try:
            found = [x for x in (self.latest_step(),) if x is not None]
            if self._tier is not None:
                found += [x for x in (self._tier.newest(),) if x is not None]
            if self._remote is not None and self.is_writer:
                found += [s for s, where in self._reachable().items() if REMOTE in where]
        except Exception as e:
            failure = e
        found = [x for f in dist.exchange(found, failure, self.group, "newest step") for x in f]
        return max(found) if found else None

    def _read_latest(self) -> int | None:
        listing = self._listing
        if listing is not None:
            if "latest" not in listing:
                listing["latest"] = self._read_pointer()
            return listing["latest"]
        return self._read_pointer()

    def _read_pointer(self) -> int | None:
        try:
            text = (self.root / LATEST_NAME).read_text().strip()
        except OSError:
            return None
        s = parse_step_dir(text)
        return s if s is not None and is_committed(self.root / text) else None

    # ---- save ----------------------------------------------------------------------------
    @gcpause.during  # as checkpoint.write: the save's objects die unpromoted (gcpause.py)
    @dist.collective
    def save(self, step: int, state: Any, metrics: dict | None = None, *,
             epoch: int | None = None, step_in_epoch: int | None = None,
             loss_history: list[float] | None = None, counters: dict | None = None,
             overwrite: bool = False, full: bool = False,
             durable: bool | None = None) -> checkpoint.SaveResult | SaveHandle:
        """Save `state` as checkpoint `step` with this rank's RNG streams; apply retention.
        full: write every chunk even when the manager saves incrementally. durable: with a
        memory tier, whether this save also goes under `root` (default: every
        durable_every-th save).

        Synchronous: returns the SaveResult once committed. Async: returns a SaveHandle once
        the snapshot (tensors, state dicts, RNG streams, data position) is taken."""
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise InvalidArgumentError(f"step must be a non-negative int, not {step!r}")
        # Numbers now, for keep_best. checkpoint.write refuses what is not one, on every rank;
        # a single process is told here already, even before an async snapshot is taken.
        metrics = {k: checkpoint.as_number(v) for k, v in (metrics or {}).items()}
        if not dist.active(self.group):
            checkpoint.plain_metrics(metrics)
        started = time.time()
        ctr = {"step": step, "epoch": epoch, "step_in_epoch": step_in_epoch,
               "loss_history": list(loss_history or []), **(counters or {})}
        rank_state = {"rng": rng.capture(own_device_only=dist.active(self.group))}
        to_root = self._tier is None or self._tier.durable_due(durable)
        if self._saver is not None:
            return self._saver.submit(
                step, state, rank_state,
                lambda snap: self._commit(step, snap, ctr, metrics, overwrite, full,
                                          self._commit_group, self._saver.options.writer_threads,
                                          started, self._saver.options.mode, to_root))
        return self._commit(step, lambda: checkpoint.snapshot(state, rank_state), ctr,
                            metrics, overwrite, full, self.group, self.threads, started,
                            durable=to_root)

    @dist.collective
    def _commit(self, step: int, snap, ctr: dict, metrics: dict, overwrite: bool, full: bool,
                group, threads: int, started: float | None = None,
                mode: io.Background = io.FOREGROUND, durable: bool = True):
        """The memory tier first (when there is one), then `root` when `durable`."""
        if self._tier is not None:
            snap, result = self._tier.save(step, snap, ctr, metrics, group, threads, mode)
            if not durable:
                return result
        return self._persist(step, snap, ctr, metrics, overwrite, full, group, threads,
                             started, mode)

    @dist.collective
    def _persist(self, step: int, snap, ctr: dict, metrics: dict, overwrite: bool, full: bool,
                 group, threads: int, started: float | None = None,
                 mode: io.Background = io.FOREGROUND) -> checkpoint.SaveResult:
        """Write and commit `snap` (see checkpoint.write), apply retention, then move
        `latest`. Collective over `group`: the training group, or the async worker's own.
        What rank 0 does alone (the lock, choosing the base, retention, `latest`) ends in an
        exchange, so its failure is every rank's error at once."""
        lock = decided = failure = None
        if self.is_writer:
            try:
                lock = RootLock(self.root, wait=LOCK_WAIT).acquire()
                self._memo.listing = {}  # valid while the lock is held: see __init__
                newest = self.latest_step()
                base = self._base_name(full, newest)  # (name, note)
                decided = SaveDecision(*base, self._best_with(step, metrics), newest)
            except Exception as e:
                failure = e
        try:
            # Rank 0 decides under the root lock (so a run sharing the root cannot slip a
            # newer step in between); every rank gets the decision and refuses alike.
            decided = SaveDecision.of(dist.exchange(
                decided.to_json() if decided else None, failure, group,
                f"save of step {step}: lock")[0])
            base, best, newest = decided.base, decided.best, decided.newest
            if newest is not None and step < newest:
                raise StepOrderError(
                    f"refusing to save step {step} under {self.root}: it already holds step "
                    f"{newest}, and retention keeps the newest steps, so step {step} would be "
                    "deleted as soon as it was written. Resume from there "
                    f"(restore() returns step {newest}) and save a step above {newest}, or "
                    "save this run under another root (or remove the newer checkpoints)",
                    step, newest)
            ctr = {**ctr, "best": best}
            try:
                result = checkpoint.write(
                    snap, self.path(step), counters=ctr, metrics=metrics, overwrite=overwrite,
                    group=group, base=self._base(base) if base else None,
                    # Recorded so `dckpt ls` / `dckpt gc` apply the policy the run used.
                    # save_started: with the manifest's `created`, how long a save takes
                    # (save_on='s grace-period warning at the next start).
                    meta={"retention": asdict(self.retention), "save_started": started},
                    mode=mode, spares=self._spares, **{**self.save_options, "threads": threads})
            except BaseException:
                if self._versions is not None:
                    self._versions.discard()
                raise
            if self._versions is not None:
                self._versions.commit()
            if self.is_writer:
                self._written.remember(self.path(step), result)
                listing = self._listing
                if listing is not None and "steps" in listing:
                    listing["steps"] = sorted({*listing["steps"], step})
            if decided.full_note:  # why the save is full although incremental
                result.notes.append(decided.full_note)
            failure = None
            if self.is_writer:
                try:
                    # Moved first, so that retention can protect whatever `latest` names.
                    self._move_latest(step)
                    self._apply_retention(saved=step, background=True)
                except Exception as e:
                    failure = e
            dist.raise_if_any_failed(failure, group, f"save of step {step}: retention")
            if self._remote is not None:
                self._remote.submit(step)  # in the background: training does not wait
        finally:
            self._memo.listing = None
            if lock:
                lock.release()
        if log.isEnabledFor(logging.INFO):  # the sizes are counted for it
            log.info("dckpt: saved step %d (%.1f MB, %.1f MB of it by this rank) in %.2f s",
                     step, result.bytes / 1e6, result.rank_bytes / 1e6, result.seconds)
        if self.preemption is not None and started is not None:
            self.preemption.check_grace(time.time() - started, f"the save of step {step}")
        return result

    # ---- preemption (save_on=) -----------------------------------------------------------
    def should_save(self, step: int) -> bool:
        """True at the step boundary where every rank agreed to save because of a save_on
        signal (call it at every boundary, on every rank; no collective, one store lookup
        per call under torch.distributed). False without save_on."""
        return self.preemption is not None and self.preemption.due(step)

    @property
    def preempted(self) -> bool:
        """Whether this process received a save_on signal."""
        return self.preemption is not None and self.preemption.signalled is not None

    def save_if_preempted(self, step: int, state: Any, *, exit: bool = True,
                          **save_kwargs) -> bool:
        """At a step boundary: when should_save(step), save `state` as `step` (save()'s
        keyword arguments pass through), wait for async saves to commit, and exit with
        the Preemption's exit code (exit=False: return True instead)."""
        if not self.should_save(step):
            return False
        self.save(step, state, **{"durable": True, **save_kwargs})  # the node may not come back
        self._wait_saves()
        log.warning("dckpt: preemption checkpoint of step %d committed under %s", step,
                    self.root)
        if exit:
            raise SystemExit(self.preemption.code)
        return True

    def _save_seconds(self, step: int) -> float | None:
        """How long the save of `step` took (None if it did not record its start)."""
        try:
            m = checkpoint.read_index(self.path(step))
            return m.created - float(m.meta["save_started"])
        except (DckptError, KeyError, TypeError, ValueError, OSError):
            return None

    # ---- async service -------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> bool:
        """Wait for pending async saves, then for uploads to the remote tier and the
        removal of retired steps (True when none is left); raises the failures of saves
        and uploads (AsyncSaveError, UploadError)."""
        start = time.monotonic()

        def left() -> float | None:
            return None if timeout is None else max(0.0, timeout - (time.monotonic() - start))

        done = self._saver.wait(timeout) if self._saver is not None else True
        if self._remote is not None:
            done = self._remote.wait(left()) and done
        deleter = self._deleter
        if deleter is not None:
            deleter.join(left())
            done = not deleter.is_alive() and done
        return done

    def close(self, timeout: float | None = None) -> None:
        """Finish pending async saves and uploads and stop the workers; raises failures
        and, after `timeout`, unfinished saves (AsyncSaveError) or uploads (UploadError)."""
        try:
            if self._saver is not None:
                self._saver.close(timeout)
        finally:
            try:
                if self._remote is not None:
                    self._remote.close(timeout)
            finally:
                self._join_deleter()
                self._latest.close()
                if self._spares_gone is not None:
                    self._spares_gone()  # the root keeps only its checkpoints

    def _wait_saves(self) -> None:
        """Wait for the async saves only (their commits hold the root lock); uploads go on
        (a preemption's grace period is for the local commit)."""
        if self._saver is not None:
            self._saver.wait()

    def tiers(self) -> dict[int, set[str]]:
        """Committed steps -> where they are: {"local"}, {"remote"} or both. Without
        remote= every step is {"local"}."""
        out = {s: {LOCAL} for s in self.steps()}
        for s in self._remote.steps() if self._remote is not None else ():
            out.setdefault(s, set()).add(REMOTE)
        return dict(sorted(out.items()))

    def upload_report(self, step: int):
        """What the upload of `step` by this rank moved (remote_tier.UploadReport: bytes
        sent, bytes copied server-side, objects), or None."""
        return self._remote.reports.get(step) if self._remote is not None else None

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

    def _base(self, name: str) -> Base:
        """The base `name`, with its manifest from the cache when the file on disk is the
        one this manager wrote (then it is neither read nor parsed again)."""
        path = self.root / name
        return Base(path, self._versions, _manifest=self._written.get(path))

    def _base_name(self, full: bool, latest: int | None) -> tuple[str | None, str | None]:
        """(the committed checkpoint the next save shares unchanged chunks with, if any;
        why there is none although the save would be incremental). latest: latest_step()."""
        if not self.incremental or full or latest is None:
            return None, None
        try:
            depth = self._base(step_dir(latest)).depth  # parses the base's manifest
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
            return checkpoint.read_index(self.path(step)).metrics
        except DckptError:
            return {}

    def _move_latest(self, step: int) -> None:
        try:
            self._write_latest(step)
        except StorageError as e:
            # Committed already, and `latest` is only a hint checked against the steps on
            # disk: a full disk here must not report the save as failed.
            log.warning("dckpt: step %d is committed but 'latest' was not moved: %s", step, e)

    def _write_latest(self, step: int) -> None:
        # Not fsynced, and written in place while it is this manager's own file
        # (commit.OwnFile): `latest` is a hint that every reader checks against the
        # committed steps on disk (latest_step), and the step it names was made durable by
        # its own commit (data, manifest and both directories fsynced). After a crash, or
        # read while it is rewritten, the pointer may be older, missing, empty or cut
        # short; each reads as "no hint" or a step that is not the newest, and the newest
        # committed step is still found and kept (retention never deletes it).
        try:
            self._latest.write(f"{step_dir(step)}\n".encode())
        except OSError as e:
            self._latest.close()
            raise StorageError(f"writing {self.root / LATEST_NAME} failed: "
                               f"{e.strerror or e}", str(self.root / LATEST_NAME)) from None
        if self._listing is not None:
            self._listing["latest"] = step  # the memo is this thread's own

    def _fix_latest(self) -> None:
        latest = self.latest_step()
        if latest is not None and self._read_latest() != latest:
            self._write_latest(latest)

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

    def _doomed(self, saved: int | None = None) -> tuple[list[int], list[int]]:
        """(steps retention deletes, steps it would delete but that are symbolic links: the
        data lies outside the root, so neither it nor the link is touched). Never the step
        just saved nor the one `latest` names, whatever the policy says: a save must not
        report success for a checkpoint it then deletes, nor leave `latest` naming nothing."""
        keep = {saved, self._read_latest(), *(self._remote.pending() if self._remote else ())}
        doomed = [s for s, why in self.retention_plan().items() if not why and s not in keep]
        links = [s for s in doomed if self.path(s).is_symlink()]
        for s in links:
            log.warning("dckpt: %s is a symbolic link to %s: retention does not delete "
                        "through it; remove the link by hand to drop it", self.path(s),
                        os.readlink(self.path(s)))
        return [s for s in doomed if s not in links], links

    def _apply_retention(self, dry_run: bool = False, saved: int | None = None,
                         background: bool = False) -> list[int]:
        """Retire the steps the policy drops: each is renamed aside at once (from then on
        no checkpoint), then its directory removed, here or, with `background`, by a
        thread while training goes on: unlinking a step's files frees its page cache,
        4 ms of a 14 MB save's 24 on ext4 and seconds for large steps (Orbax deletes in
        the background too). A crash mid-removal leaves debris the next start clears."""
        doomed, _ = self._doomed(saved)
        if dry_run:
            return doomed
        self._join_deleter()  # one removal at a time, in retirement order
        trash = []
        for s in doomed:
            # Rename first so a crash mid-delete leaves debris gc recognizes, not a
            # half-deleted directory that still looks committed.
            aside = self.root / f".{step_dir(s)}.tmp-deleting"
            try:
                os.rename(self.path(s), aside)
            except OSError as e:
                # The new step is committed; a step another process removed (or one
                # that cannot be moved) must not make its save fail.
                log.warning("dckpt: retention could not delete %s: %s", self.path(s),
                            e.strerror or e)
                continue
            trash.append(aside)
        if background and trash and self._spares is not None:
            # Renames only: the files kept are out of the removal's way before it starts.
            if sum(spares.keep(aside, self._spares) for aside in trash) and \
                    self._spares_gone is None:
                self._spares_gone = weakref.finalize(self, shutil.rmtree, self._spares, True)
        if background and trash:
            self._deleter = threading.Thread(target=_remove_dirs, args=(trash,),
                                             name="dckpt-retention")
            self._deleter.start()
        else:
            _remove_dirs(trash)
        return doomed

    def _join_deleter(self) -> None:
        if self._deleter is not None:
            self._deleter.join()
            self._deleter = None

    def _temporaries(self) -> list[Path]:
        """Staging directories and the half-written `latest` a crash leaves behind (a
        staging name now; `latest.tmp` from dckpt before 2026-12). Spare files are none."""
        return [p for p in self.root.iterdir()
                if is_staging(p.name) and p.name != SPARE_DIR or p.name == LATEST_NAME + ".tmp"]

    def _remove_staging(self) -> list[Path]:
        for name in commit.recover(self.root):
            log.warning("dckpt: %s was moved aside by an overwrite that crashed; put back",
                        name)
        gone = self._temporaries()
        # And the spare files a run left (storage/spares.py): only a live manager uses them.
        spare = self.root / SPARE_DIR
        for p in gone + ([spare] if os.path.lexists(spare) else []):
            # A link is removed, never what it points to.
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        return gone

    @dist.collective
    def gc(self, dry_run: bool = False) -> dict:
        """Apply retention and remove incomplete temporaries; reports what (would be) freed.
        Collective: rank 0 does it, every rank gets its report or its error."""
        self._wait_saves()  # the async worker holds the root lock while it commits
        self._join_deleter()  # its directories would count as debris
        report = failure = None
        if self.is_writer:
            try:
                report = self._gc(dry_run)
            except Exception as e:
                failure = e
        return dist.exchange(report and report.to_json(), failure, self.group,
                             f"gc of {self.root}")[0]

    def _gc(self, dry_run: bool) -> GcReport:
        # As "gc", not "save": a job's save meeting it waits instead of failing.
        with RootLock(self.root, "gc", wait=LOCK_WAIT):
            staging = self._temporaries()
            if not dry_run:
                self._fix_latest()  # first: retention spares what `latest` names
            doomed, links = self._doomed()
            # Hard-linked data shared with kept checkpoints is not freed.
            spare = [self.root / SPARE_DIR] if (self.root / SPARE_DIR).is_dir() else []
            freed = exclusive_bytes(staging + spare + [self.path(s) for s in doomed])
            if not dry_run:
                self._remove_staging()
                self._apply_retention()
                self._fix_latest()
        return GcReport(doomed, [p.name for p in staging], links, freed, dry_run)

    # ---- restore -------------------------------------------------------------------------
    def _candidates(self, step: int | None) -> list[list]:
        """The [step, tier] every rank tries, in order: the step asked for, or rank 0's
        committed steps newest first (ranks that each listed the root could pick different
        steps while a save commits, or where nodes see different roots); of each, the local
        copy first, then the remote one. Ranks asking for different steps are an error."""
        failure = listed = None
        try:
            if self.is_writer and (step is None or self._remote is not None):
                listed = [[s, t] for s, where in reversed(self._reachable().items())
                          for t in (LOCAL, REMOTE) if t in where and step in (None, s)]
                if not listed and step is None:
                    raise CheckpointNotFoundError(f"no committed checkpoint under {self.root}"
                                                  + (f" nor under {self._remote.url}"
                                                     if self._remote is not None else ""))
        except Exception as e:
            failure = e
        asked = [StepRequest.of(a) for a in dist.exchange(
            StepRequest(step, listed).to_json(), failure, self.group,
            f"restore from {self.root}: step")]
        chosen, listed = asked[0].step, asked[0].listed
        differ = sorted({a.step for a in asked if a.step is not None and a.step != chosen})
        if differ:
            raise StateMismatchError([f"ranks asked to restore different steps of {self.root}: "
                                      f"rank 0 step {chosen}, others {differ}"])
        return listed or [[chosen, LOCAL]]

    def _reachable(self) -> dict[int, set[str]]:
        """tiers() for a restore: a remote that cannot be listed leaves the local steps."""
        try:
            return self.tiers()
        except DckptError as e:
            log.warning("dckpt: the remote tier %s cannot be listed (%s); restoring from the "
                        "local steps only", self._remote.url, e)
            return {s: {LOCAL} for s in self.steps()}

    def _location(self, step: int, tier: str) -> Path | str:
        return self.path(step) if tier == LOCAL else self._remote.step_url(step)

    @dist.collective
    def restore(self, state: dict, step: int | None = None, *,
                allow_missing: bool | list[str] = False, keys: list[str] | None = None,
                restore_rng: bool = True, strict: bool = True) -> ResumeReport:
        """Restore `state` in place from `step` (default: the newest committed one).

        Every component of `state` must be in the checkpoint (allow_missing= names those
        that may not be); components of the checkpoint left out of `state` (or `keys`) are
        named in the report's notes. An optimizer or scheduler of another class than the
        saved one is refused (StateMismatchError) unless strict=False. The training
        position is in the report: `report.step`, `report.epoch`, `report.step_in_epoch`,
        and the counters passed to save() in `report.counters`.

        Without `step`, a newest checkpoint found damaged (corrupt or missing data, damaged
        manifest) is skipped for the next older one, which is restored completely, and the
        report's notes say so: a failed read may have overwritten part of the live state
        already, and this puts all of it back from one checkpoint."""
        t0 = time.perf_counter()
        self._wait_saves()
        if self._tier is not None:
            return self._tier.restore(self, state, step, allow_missing=allow_missing, keys=keys,
                                      restore_rng=restore_rng, strict=strict, t0=t0)
        candidates = self._candidates(step)
        r = dist.rank(self.group)
        skipped, changed = [], False
        for i, (step, tier) in enumerate(candidates):
            path = self._location(step, tier)
            attempt = load_step(state, path, rank=r, restore_rng=restore_rng,
                                allow_missing=allow_missing, keys=keys, strict=strict,
                                verify=self.verify, threads=self.threads, group=self.group,
                                storage_options=(self._remote.storage_options
                                                 if tier == REMOTE else None))
            failure = attempt.failure
            # Collective: a rank that fails to load (corrupt chunk) fails every rank, and
            # every rank falls back alike (each learns what every rank hit).
            mine = _hit(failure)
            if dist.active(self.group):
                hit = [RestoreHit.of(h) for h in dist.all_gather_json(
                    mine and mine.to_json(), self.group, f"restore of {path}")]
            else:
                hit = [mine]
            bad = [(rk, h) for rk, h in enumerate(hit) if h]
            if not bad:
                break
            changed = changed or any(h.live_state_changed for _, h in bad)
            if i + 1 < len(candidates) and all(h.damaged for _, h in bad):
                skipped.append(f"step {step} ({tier}) could not be restored (rank "
                               f"{bad[0][0]}: {bad[0][1].error.splitlines()[0]})")
                log.warning("dckpt: %s; falling back to step %d (%s)", skipped[-1],
                            *candidates[i + 1])
                continue
            if failure is None:
                failure = DistributedError(f"restore of {path}: rank {bad[0][0]} failed: "
                                           f"{bad[0][1].error}", bad[0][0])
            if skipped and changed and not getattr(failure, "live_state_changed", False):
                partly_overwritten(failure)  # by an attempt before this one
            raise failure
        notes = []
        if skipped:
            notes.append(f"fell back to step {step} ({tier}), the newest intact checkpoint: "
                         + "; ".join(skipped) + f". Everything restored comes from step "
                         f"{step}, including what the failed attempt had overwritten")
        c = attempt.manifest.counters
        out = resumed(attempt, step, rank=r, restore_rng=restore_rng, epoch=c.get("epoch"),
                      step_in_epoch=c.get("step_in_epoch"), notes=notes)
        out.seconds = time.perf_counter() - t0
        log.info("dckpt: %s", out.summary())
        return out

"""The remote tier: every committed local checkpoint is copied to object storage in the
background (CheckpointManager(root, remote="s3://bucket/exp1")).

    local root/step-000000100/   committed as always; training waits only for this
    remote     step-000000100/   the same files, then manifest.json last: the remote commit

Who uploads what. Every rank uploads the data files the manifest says it wrote (a file's
`rank`), from a worker thread of its own: training never waits for an upload. Rank 0's
worker then waits, through the process group's key-value store (a key per rank and upload,
polled: no collective, so nothing of it can interleave with the training's), until every
rank reported, and uploads the manifest only when all succeeded. The manifest object is
the commit: a reader (restore, `latest`, tiers()) takes a remote step only where it finds
its manifest, so an upload interrupted at any point leaves nothing that is picked.
Every rank's worker then learns the outcome from rank 0, so wait() means the same on all.

Only new bytes travel. An incremental save shares unchanged data with its base by hard
links (dckpt.engine.incremental): a data file of step N is the very inode of a file of an
earlier step. A file whose inode this process already uploaded is copied server-side from
that earlier object (no byte of it crosses the client's link); only if that object is gone
(remote retention deleted it) are its bytes sent again. Each remote step thus holds all its
own objects: deleting one never breaks another, and retention needs no reference count.

Retention (`keep_last_remote` and the manager's other rules; default the local policy) runs
on rank 0 after each remote commit. It deletes a step's manifest first, so a step is
absent before any of its data goes. The step just uploaded is never deleted.

Failures. Every object operation is retried with exponential backoff; an upload that still
fails is logged at once (ERROR) and raised by the next wait() or close() as UploadError
naming the step and the object. The local tier is not touched by an upload, and local
retention keeps a step until its upload finished (succeeded or failed).
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
import uuid
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from ..distributed import collective as dist
from ..errors import DckptError, DistributedError, UploadError
from ..format.layout import parse_step_dir, step_dir
from ..format.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES
from ..storage import objectstore, records
from .async_save import _OPEN as _SAVERS
from .retention import Retention

log = logging.getLogger("dckpt")

LOCAL, REMOTE = "local", "remote"
REPORTS_KEPT = 64  # upload reports kept for upload_report(): the newest steps'


@dataclass
class UploadReport:
    """What the upload of one step moved: `sent` bytes over the client's link, `copied`
    bytes server-side from objects of earlier steps, the objects written."""
    step: int
    sent: int = 0
    copied: int = 0
    objects: list[str] = field(default_factory=list)


def committed_steps(listing: list[str]) -> list[int]:
    """The remote steps whose manifest is there (the commit), oldest first."""
    out = []
    for k in listing:
        head, _, name = k.partition("/")
        s = parse_step_dir(head)
        if s is not None and name == MANIFEST_NAME:
            out.append(s)
    return sorted(out)


@dataclass
class _Job:
    seq: int
    step: int
    done: threading.Event = field(default_factory=threading.Event)
    error: UploadError | None = None
    reported: bool = False


class RemoteTier:
    """One manager's uploads to `url`: a worker thread, its queue and remote retention.
    Constructed on every rank of `group` (collective: rank 0's token names the store keys
    of this manager's uploads). Object requests go through dckpt.storage.objectstore,
    which retries them with backoff (DCKPT_REMOTE_RETRIES, DCKPT_REMOTE_BACKOFF)."""

    def __init__(self, root: Path, url: str, *, storage_options: dict | None,
                 retention: Retention, group=None):
        self.root = Path(root)
        self.url = url.rstrip("/")
        self.storage_options = storage_options
        self.store = objectstore.connect(self.url, storage_options)
        self.retention = retention
        self.group = group
        self.rank, self.world = dist.rank(group), dist.world_size(group)
        token = uuid.uuid4().hex[:16] if self.rank == 0 else None
        self.token = dist.broadcast_json(token, 0, group, "remote tier: token")
        self.reports: dict[int, UploadReport] = {}
        # (device, inode, size, mtime) of a file this process uploaded -> its object: a hard
        # link to it in a later step is copied server-side from there. The mtime tells a
        # reused inode number (a deleted file's) from the same file.
        self._uploaded: dict[tuple, str] = {}
        self._seeded = False
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._jobs: list[_Job] = []  # submitted and not reported
        self._seq = 0
        self._closed = True
        self._serving = False  # a worker thread takes jobs (set and cleared under _cond)
        with self._cond:
            self._start()
        _OPEN.add(self)

    def _start(self) -> None:
        """(Re)start the worker, under _cond: at construction, and at a save after close()
        (a worker still finishing the queue of a close() that timed out goes on)."""
        self._closed = False
        if not self._serving:
            self._serving = True
            threading.Thread(target=self._run, name="dckpt-upload", daemon=True).start()

    # ---- the training side ---------------------------------------------------------------
    def submit(self, step: int) -> None:
        """Upload the committed local step `step` in the background. Every rank calls it
        for every step, in the same order (at the end of a save)."""
        with self._cond:
            if self._closed:
                self._start()
            self._seq += 1
            job = _Job(self._seq, step)
            self._queue.append(job)
            self._jobs.append(job)
            self._cond.notify_all()

    def pending(self) -> set[int]:
        """Steps whose upload has not finished: local retention keeps them meanwhile."""
        with self._cond:
            return {j.step for j in self._jobs if not j.done.is_set()}

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for every upload submitted (False on timeout); raises UploadError for a
        failed one not reported yet."""
        with self._cond:
            jobs = list(self._jobs)
        deadline = None if timeout is None else time.monotonic() + timeout
        finished = True
        for j in jobs:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not j.done.wait(left):
                finished = False
                break
        self._raise_failed()
        return finished

    def close(self, timeout: float | None = None) -> None:
        """Finish the pending uploads and stop the worker; raises what failed, and
        UploadError for uploads unfinished after `timeout`."""
        try:
            finished = self.wait(timeout)
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
        if not finished:
            steps = sorted(self.pending())
            raise UploadError(f"upload(s) of step(s) {steps} to {self.url} unfinished after "
                              f"{timeout} s; the local checkpoints are complete", steps[0])

    def _raise_failed(self) -> None:
        with self._cond:
            failed = [j for j in self._jobs if j.done.is_set() and j.error and not j.reported]
            for j in failed:
                j.reported = True
            self._jobs = [j for j in self._jobs if not j.done.is_set()]
        if len(failed) > 1:  # one error for all of them, typed as the first
            first = failed[0].error
            e = UploadError(f"{len(failed)} uploads failed: " + "; ".join(
                str(j.error) for j in failed), first.step, first.object)
            raise e from first
        if failed:
            raise failed[0].error

    # ---- what the remote holds -----------------------------------------------------------
    def listing(self, below: str = "") -> list[str]:
        """Every object name below the remote root (or its sub-prefix `below`), relative to
        the root. Compared as the file system's keys: a listing may spell the protocol
        part of its URLs otherwise than they were given (memory:///x for memory://x)."""
        root = self.store._key(self.url).rstrip("/") + "/"
        prefix = objectstore.join(self.url, below) if below else self.url
        return [k[len(root):] for o in self.store.list(prefix)
                if (k := self.store._key(o.url)).startswith(root)]

    def steps(self) -> list[int]:
        """Committed remote steps (manifest present), oldest first."""
        return committed_steps(self.listing())

    def step_url(self, step: int) -> str:
        return objectstore.join(self.url, step_dir(step))

    def manifest(self, step: int):
        """The remote manifest of `step`, parsed and validated."""
        url = objectstore.join(self.step_url(step), MANIFEST_NAME)
        return records.parse(self.store.get_bytes(url, MAX_MANIFEST_BYTES), url)

    # ---- the worker ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    self._serving = False
                    return
                job = self._queue.popleft()
            try:
                self._upload(job)
            except UploadError as e:
                job.error = e
            except BaseException as e:  # anything else fails this upload too, never the loop
                job.error = UploadError(f"upload of step {job.step} to {self.url} failed: "
                                        f"{type(e).__name__}: {e}", job.step)
                job.error.__cause__ = e
            if job.error is not None:
                log.error("dckpt: %s; the local checkpoint %s is complete", job.error,
                          self.root / step_dir(job.step))
            job.done.set()

    def _upload(self, job: _Job) -> None:
        step = job.step
        path = self.root / step_dir(step)
        keys = _Keys(self.token, job.seq, self.world)
        report = self.reports[step] = UploadReport(step)
        for old in sorted(self.reports)[:-REPORTS_KEPT]:
            del self.reports[old]
        failure = None
        if not self._seeded:
            self._seeded = True
            self._seed()
        try:
            if self.rank == 0:
                self._begin(step, keys)
            else:
                keys.await_value(keys.began, self._peer_wait(),
                                 f"upload of step {step}: begin", self.group)
            m = records.read_manifest(path)
            mine = [(f.path(path), self._file_url(step, f)) for f in m.files
                    if f.rank == self.rank]
            mine += [(path / name, objectstore.join(self.step_url(step), name))
                     for name, _, r in _record_files(m) if r == self.rank]
            # Server-side copies first: a copy's source may be an object of this very
            # prefix (an overwritten step linking its predecessor's files) that an upload
            # of this step is about to replace.
            mine.sort(key=lambda lf: self._source(lf[0]) is None)
            for local, url in mine:
                self._put_file(step, local, url, report)
        except UploadError as e:
            failure = e
        except Exception as e:
            failure = UploadError(f"upload of step {step} to {self.url} failed: "
                                  f"{type(e).__name__}: {e}", step)
        if self.rank == 0:
            self._commit(step, keys, failure, report)
            return
        try:
            keys.post(self.rank, failure)
            # Read also after a failure of its own: the last reader removes the keys.
            outcome = keys.await_value(keys.outcome, self._peer_wait(),
                                       f"upload of step {step}: commit", self.group)
            keys.done_reading()
        except DistributedError as e:
            raise failure or UploadError(f"upload of step {step} to {self.url}: {e}",
                                         step) from e
        if failure is not None:
            raise failure
        if outcome:
            raise UploadError(outcome["message"], step, outcome.get("object"))

    def _seed(self, newest: int = 2) -> None:
        """A manager reopened on a root whose steps are uploaded already (a resumed run):
        its files' inodes are mapped to their objects, so the next incremental step copies
        its shared data server-side instead of sending it. Only for the `newest` steps
        both tiers hold whose remote manifest is byte for byte the local one (it records
        the hash of every chunk, so equal manifests mean equal data files)."""
        try:
            listing = self.listing()
            both = [s for s in committed_steps(listing)
                    if (self.root / step_dir(s) / MANIFEST_NAME).is_file()][-newest:]
            present = set(listing)
            for s in both:
                name = step_dir(s)
                local = (self.root / name / MANIFEST_NAME).read_bytes()
                url = objectstore.join(self.step_url(s), MANIFEST_NAME)
                if self.store.get_bytes(url, MAX_MANIFEST_BYTES) != local:
                    continue
                for f in records.parse(local, str(self.root / name)).files:
                    if f.rank == self.rank and f.dir is None and f"{name}/{f.name}" in present:
                        self._uploaded_to(_ident(os.stat(self.root / name / f.name)),
                                          objectstore.join(self.step_url(s), f.name))
        except Exception as e:  # only an optimisation: the bytes travel instead
            log.info("dckpt: the remote tier %s could not be matched with the local steps "
                     "(%s: %s); shared data will be uploaded again", self.url,
                     type(e).__name__, e)

    def _file_url(self, step: int, f) -> str:
        # A file of a sibling directory (`dir`) lies under that step's prefix remotely too.
        return objectstore.join(self.url, f.dir or step_dir(step), f.name)

    def _begin(self, step: int, keys: "_Keys") -> None:
        """Rank 0, before any rank writes: a committed remote step of the same number (an
        overwrite) stops being committed before its objects are replaced."""
        url = objectstore.join(self.step_url(step), MANIFEST_NAME)
        try:
            if self.store.exists(url):
                self.store.delete([url])
        except Exception as e:
            raise UploadError(f"upload of step {step}: cannot retract the remote manifest "
                              f"{url} of the step it replaces: {type(e).__name__}: {e}",
                              step, url) from e
        finally:
            # Posted also when this failed: the others upload and learn the outcome.
            keys.post_began()

    def _source(self, local: Path) -> str | None:
        """The object this process uploaded `local`'s inode to, if any."""
        try:
            return self._uploaded.get(_ident(os.stat(local)))
        except OSError:
            return None

    def _uploaded_to(self, ident: tuple, url: str) -> None:
        # `url` now holds this file: an entry of another file naming it is stale.
        for k in [k for k, v in self._uploaded.items() if v == url and k != ident]:
            del self._uploaded[k]
        self._uploaded[ident] = url

    def _put_file(self, step: int, local: Path, url: str, report: UploadReport) -> None:
        try:
            st = os.stat(local)
        except OSError as e:
            raise UploadError(f"upload of step {step}: cannot read {local}: "
                              f"{e.strerror or e}", step, url) from e
        ident = _ident(st)
        src = self._uploaded.get(ident)
        if src is not None and src != url:
            try:
                self.store.copy(src, url)
                info = self.store.info(url)
                if info is None or info.size != st.st_size:
                    raise OSError(f"{url} holds {info and info.size} bytes after the copy, "
                                  f"not {st.st_size}")
                report.copied += st.st_size
                report.objects.append(url)
                self._uploaded_to(ident, url)  # the newer object outlives the older
                return
            except Exception as e:  # gone (remote retention), or refused: the bytes travel
                log.info("dckpt: server-side copy of %s failed (%s); uploading the file",
                         src, e)
        try:
            self.store.put_file(local, url)
        except Exception as e:
            raise UploadError(f"upload of step {step}: object {url} failed: "
                              f"{type(e).__name__}: {e}", step, url) from e
        report.sent += st.st_size
        report.objects.append(url)
        self._uploaded_to(ident, url)

    def _commit(self, step: int, keys: "_Keys", failure: UploadError | None,
                report: UploadReport) -> None:
        """Rank 0: every rank's outcome, then the manifest (the remote commit), then the
        outcome for the others, then retention."""
        try:  # also after a failure of its own: every rank's key is read (and removed)
            posted = keys.gather(self._peer_wait(), f"upload of step {step}", self.group)
            bad = [(r, p) for r, p in enumerate(posted) if p]
            if bad and failure is None:
                r, p = bad[0]
                failure = UploadError(f"rank {r}: {p['message']}", step, p.get("object"))
        except DistributedError as e:
            failure = failure or UploadError(f"upload of step {step} to {self.url}: {e}", step)
        if failure is None:
            local = self.root / step_dir(step) / MANIFEST_NAME
            url = objectstore.join(self.step_url(step), MANIFEST_NAME)
            try:
                self._check_objects(step)
                self.store.put_file(local, url)
                report.sent += local.stat().st_size
                report.objects.append(url)
            except UploadError as e:
                failure = e
            except Exception as e:
                failure = UploadError(f"upload of step {step}: manifest object {url} failed: "
                                      f"{type(e).__name__}: {e}", step, url)
        try:
            keys.publish_outcome(failure)
        except Exception as e:  # the others then fail on the store themselves
            log.warning("dckpt: the outcome of the upload of step %d could not be posted "
                        "for the other ranks: %s", step, e)
        if failure is not None:
            raise failure
        log.info("dckpt: step %d uploaded to %s (%.1f MB sent, %.1f MB copied server-side)",
                 step, self.step_url(step), report.sent / 1e6, report.copied / 1e6)
        try:
            self.apply_retention(saved=step)
        except Exception as e:  # the upload is committed: retention failing does not undo it
            log.warning("dckpt: remote retention under %s failed: %s: %s", self.url,
                        type(e).__name__, e)

    def _check_objects(self, step: int) -> None:
        """Rank 0, before the commit: every data object the manifest names is there with
        its size (one listing; each upload was checked already, this checks them all)."""
        name = step_dir(step)
        root = self.store._key(self.url).rstrip("/") + "/"
        sizes = {self.store._key(o.url)[len(root):]: o.size
                 for o in self.store.list(self.step_url(step))}
        m = records.read_manifest(self.root / name)
        for file, size in [(f.name, f.size) for f in m.files if f.dir is None] + [
                (n, size) for n, size, _ in _record_files(m)]:
            url, key = objectstore.join(self.step_url(step), file), f"{name}/{file}"
            if sizes.get(key) != size:
                got = "absent" if key not in sizes else f"{sizes[key]} bytes"
                raise UploadError(f"upload of step {step}: object {url} is {got}, its "
                                  f"manifest says {size} bytes; not committed", step, url)

    def _peer_wait(self) -> float:
        # An upload of gigabytes may take longer than any collective deadline: a peer is
        # waited for as long as its heartbeat goes on (a dead one fails within
        # DCKPT_PEER_TIMEOUT seconds).
        return float("inf")

    # ---- retention -----------------------------------------------------------------------
    def plan(self, listing: list[str] | None = None) -> dict[int, list[str]]:
        """Remote step -> reasons retention keeps it (empty: deleted)."""
        steps = committed_steps(self.listing() if listing is None else listing)
        read = self._metrics if self.retention.metric else (lambda s: {})
        return self.retention.reasons({s: read(s) for s in steps})

    def _metrics(self, step: int) -> dict:
        try:  # the local copy's manifest is the same file, and no request
            return records.read_manifest(self.root / step_dir(step)).metrics
        except (DckptError, OSError):
            try:
                return self.manifest(step).metrics
            except Exception:
                return {}

    def apply_retention(self, saved: int | None = None) -> list[int]:
        """Delete the remote steps the policy drops (never `saved`): each one's manifest
        first, so it is absent before its data objects go. Every remote step holds all its
        objects (shared data was copied, not referenced), so no deletion breaks another.
        Rank 0 only."""
        listing = self.listing()
        doomed = [s for s, why in self.plan(listing).items() if not why and s != saved]
        for s in doomed:
            name = step_dir(s)
            self.store.delete([objectstore.join(self.url, name, MANIFEST_NAME)])
            self.store.delete([objectstore.join(self.url, k) for k in listing
                               if k.startswith(name + "/") and k != f"{name}/{MANIFEST_NAME}"])
            log.info("dckpt: remote retention deleted %s", self.step_url(s))
        if saved is not None:
            self._remove_debris(listing, saved)
        return doomed

    def _remove_debris(self, listing: list[str], saved: int) -> None:
        """Objects no committed step names: the data of failed uploads of steps before
        `saved` (every rank finished those: uploads run in order, and `saved` committed
        after all of them), and objects of an earlier version of `saved` its new manifest
        does not name."""
        committed = set(committed_steps(listing))
        named = {f"{step_dir(saved)}/{MANIFEST_NAME}"}
        m = records.read_manifest(self.root / step_dir(saved))
        named |= {f"{step_dir(saved)}/{f.name}" for f in m.files if f.dir is None}
        named |= {f"{step_dir(saved)}/{n}" for n, _, _ in _record_files(m)}
        debris = []
        for k in listing:
            s = parse_step_dir(k.partition("/")[0])
            if s is None:
                continue
            if (s < saved and s not in committed) or (s == saved and k not in named):
                debris.append(objectstore.join(self.url, k))
        if debris:
            self.store.delete(debris)
            log.info("dckpt: removed %d object(s) of unfinished uploads under %s",
                     len(debris), self.url)


# ---- interpreter exit: uploads submitted and not waited for are finished (and logged) ----
_OPEN: "weakref.WeakSet[RemoteTier]" = weakref.WeakSet()


def _drain_at_exit() -> None:
    # Runs before async_save's exit handler: the background saves are waited for here
    # (their commits submit uploads), then the uploads.
    for saver in list(_SAVERS):  # failures stay for async_save's exit handler to report
        saver.settle(saver.options.exit_timeout)
    for tier in list(_OPEN):
        if tier._closed:
            continue
        pending = sorted(tier.pending())
        if pending:
            log.warning("dckpt: at exit: finishing the upload(s) of step(s) %s to %s",
                        pending, tier.url)
        try:
            tier.close()
        except UploadError as e:
            log.error("dckpt: at exit: %s; the local checkpoint is complete", e)


# The object store client runs requests through concurrent.futures, which refuses new work
# once the interpreter's threading shutdown began: the uploads must finish before that.
# threading._register_atexit callbacks run at that point, newest first, so this one runs
# before concurrent.futures' own (imported here first).
if hasattr(threading, "_register_atexit"):
    import concurrent.futures.thread  # noqa: F401 - registers its exit hook before ours
    threading._register_atexit(_drain_at_exit)
else:  # pragma: no cover - other interpreters
    atexit.register(_drain_at_exit)


class _Keys:
    """The store keys of one upload (sequence number `seq` of this manager): `began`
    (rank 0 retracted what it replaces), one per rank with its outcome, and rank 0's
    final outcome. Values are JSON; null means success."""

    def __init__(self, token: str, seq: int, world: int):
        self.base = f"dckpt/upload/{token}/{seq}"
        self.world = world
        self.began = f"{self.base}/began"
        self.outcome = f"{self.base}/outcome"

    def _store(self):
        return dist._store() if self.world > 1 else None

    def rank_key(self, r: int) -> str:
        return f"{self.base}/rank/{r}"

    def post_began(self) -> None:
        if self.world > 1:
            self._store().set(self.began, "null")

    def post(self, r: int, failure: UploadError | None) -> None:
        try:
            self._store().set(self.rank_key(r), json.dumps(_wire(failure)))
        except Exception as e:  # the store went away with rank 0
            raise DistributedError(f"the process group's store failed ({e})", 0) from None

    def gather(self, limit: float, what: str, group) -> list:
        """Rank 0: every other rank's posted outcome (index 0: None)."""
        if self.world == 1:
            return [None]
        return [None] + [self.await_value(self.rank_key(r), limit, what, group, r)
                         for r in range(1, self.world)]

    def publish_outcome(self, failure: UploadError | None) -> None:
        if self.world > 1:
            store = self._store()
            store.set(self.outcome, json.dumps(_wire(failure)))
            for r in range(1, self.world):
                store.delete_key(self.rank_key(r))

    def done_reading(self) -> None:
        """A rank other than 0 read the outcome; the last one removes the shared keys."""
        store = self._store()
        if store.add(f"{self.base}/read", 1) == self.world - 1:
            for k in (self.began, self.outcome, f"{self.base}/read"):
                store.delete_key(k)

    def await_value(self, key: str, limit: float, what: str, group, peer: int = 0):
        """Poll the store for `key` (the worker's own thread: training is not involved);
        a peer whose heartbeat stopped, or `limit` seconds, raise DistributedError."""
        store = self._store()
        start = last = time.monotonic()
        beat_key = f"dckpt/alive/{dist._global_rank(group, peer)}"
        beats = None
        pause = 0.001
        while True:
            try:
                if store.check([key]):
                    return json.loads(store.get(key))
                now = time.monotonic()
                if now - last >= dist.BEAT_SECONDS:
                    count = store.add(beat_key, 0)
                    if beats is None or count != beats[0]:
                        beats = (count, now)
                    elif count and now - beats[1] >= dist.peer_timeout():
                        raise DistributedError(f"{what}: rank {peer} stopped responding", peer)
                    last = now
            except DistributedError:
                raise
            except Exception as e:  # the store went away with rank 0
                raise DistributedError(f"{what}: the process group's store failed ({e})",
                                       0) from None
            if time.monotonic() - start >= limit:
                raise DistributedError(f"{what}: rank {peer} did not report within "
                                       f"{limit:.0f} s", peer)  # never with the default
            time.sleep(pause)
            pause = min(pause * 2, 0.05)


def _record_files(m) -> list[tuple[str, int, int]]:
    """(name, size, rank) of the record files of a split checkpoint (docs/FORMAT.md,
    version 3): objects of the step like its data files, each uploaded by its rank."""
    if m.split is None:
        return []
    return [(ref.name, ref.size, r) for r, ref in
            ((r, m.split.ref(r)) for r in range(m.split.count))]


def _ident(st: os.stat_result) -> tuple:
    """A file's identity across hard links: the mtime tells a reused inode number (of a
    deleted file) from the same file."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _wire(failure: UploadError | None) -> dict | None:
    if failure is None:
        return None
    return {"message": str(failure), "object": failure.object}

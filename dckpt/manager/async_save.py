"""The background checkpoint service behind CheckpointManager(async_save=...).

save() takes the snapshot on the caller's thread: the non-tensor state (state_dict()s, data
position, RNG streams) is encoded, the tensors are copied into a staging arena
(dckpt.state.staging), and a SaveHandle comes back. One worker thread per manager then
writes each snapshot through the native core (GIL released), commits it, applies retention
and moves `latest`, in save() order.

Bounds: at most `max_in_flight` saves are admitted (each holds one staging arena, so host
memory is bounded by max_in_flight x state size, reported as staging_bytes). A save() that
finds every slot taken either waits for one (when_busy="wait", the default: no checkpoint
is lost, training is held meanwhile) or is skipped (when_busy="skip": returns a handle with
skipped=True; with several ranks, all skip if any rank is busy, so every rank's worker runs
the same commits).

Errors: a failed save is never committed (the commit protocol aborts its staging
directory) and its error is raised, as AsyncSaveError, by handle.wait()/result() or else by
the next save(), wait() or close(); one still unreported at interpreter exit (or a save
unfinished after exit_timeout) is logged at ERROR and the process ends with status
EXIT_STATUS_ON_FAILURE (1; 143 after SIGTERM) through os._exit, after flushing logging and
stdio: exit handlers registered before dckpt was imported are then skipped.

Shutdown: wait() and close(); at interpreter exit every open saver finishes its pending
saves (or reports them unfinished after AsyncOptions.exit_timeout). SIGTERM, where the
program left its default action in place, raises SystemExit(143) in the main thread, so
the program unwinds and the exit path finishes the saves. A process killed outright leaves
at most a hidden staging directory, removed by the next manager on that root.

Distributed: the commit's collectives run on a gloo group of the manager's own, used only
by the worker, so they never interleave with the training's collectives.
"""
from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch.distributed as tdist

from ..engine import checkpoint
from ..distributed import collective as dist, sharding
from ..storage import local as io
from ..engine.checkpoint import SaveResult, Snapshot
from ..errors import AsyncSaveError, DckptError
from ..state.staging import Staged, StagingPool, layout, on_cuda
from .deferred import StepGate, optimizers_in, owned_storages, storage_key

log = logging.getLogger("dckpt")


@dataclass(frozen=True)
class AsyncOptions:
    """How CheckpointManager(async_save=AsyncOptions(...)) runs its background saves.

    max_in_flight: saves admitted at once (each holds a staging copy of the state).
    when_busy: "wait" (block save() until a slot frees) or "skip" (drop this save).
    snapshot: "immediate" (save() returns once every tensor is copied) or "deferred"
        (parameters and optimizer states are copied while forward/backward run; the next
        optimizer.step() waits for that copy; see dckpt.manager.deferred for the contract).
    threads: native writer threads; None: half of this rank's cores, at least 1 (on 2 cores
        one, which leaves the other to training).
    nice: the writer thread's nice increment (Linux: per thread; the native pool's helper
        threads keep the priority of the thread that started them); 0 keeps its priority.
    direct: write the data files with O_DIRECT from the staging arena where the filesystem
        allows it (not tmpfs): no kernel copy into the page cache and no writeback of GBs
        of dirty pages competing with training for memory bandwidth. Files stay fsync'd.
    duty: share of the time the writer spends writing, in (0, 1]; it sleeps the rest
        between chunks, so a save takes about 1/duty times its plain write time and the
        training step keeps most of the memory bandwidth (dckpt.storage.local.Background).
    handle_sigterm: install the SIGTERM handler described above (main thread only, and only
        where SIGTERM still has its default action).
    exit_timeout: seconds to wait for pending saves at exit (None: as long as they take).
    A commit collective waits for the other ranks at most dckpt.distributed.collective.collective_timeout().
    """
    max_in_flight: int = 1
    when_busy: str = "wait"
    snapshot: str = "immediate"
    threads: int | None = None
    nice: int = 10
    direct: bool = True
    duty: float = 0.25
    handle_sigterm: bool = True
    exit_timeout: float | None = None

    def __post_init__(self):
        if not isinstance(self.max_in_flight, int) or self.max_in_flight < 1:
            raise ValueError("max_in_flight must be an int >= 1")
        if self.when_busy not in ("wait", "skip"):
            raise ValueError(f"when_busy must be 'wait' or 'skip', not {self.when_busy!r}")
        if self.snapshot not in ("immediate", "deferred"):
            raise ValueError(f"snapshot must be 'immediate' or 'deferred', not {self.snapshot!r}")
        if (self.threads is not None and self.threads < 0) or self.nice < 0:
            raise ValueError("threads and nice must be >= 0")
        self.mode  # validates duty

    @property
    def mode(self) -> io.Background:
        """How the worker's saves write (passed down to the storage writes)."""
        return io.Background(self.direct, self.duty)

    @property
    def writer_threads(self) -> int:
        """Threads the background writer uses: `threads`, or a share of the cores."""
        if self.threads is not None:
            return self.threads
        cores = io.default_threads()
        return max(1, (dist.threads_per_rank(0, cores) or cores) // 2)


class SaveHandle:
    """What an async save() returns.

    done(): finished (committed, failed or skipped). wait(timeout): True once finished,
    False on timeout; raises AsyncSaveError if the save failed. result(timeout): the
    SaveResult (None when skipped); raises TimeoutError if still running.
    blocked_seconds: how long training was held by this save (inside save(), plus the wait
    of the next optimizer step for a deferred snapshot). staging_bytes: host memory of the
    staging pool when the snapshot was taken.
    """

    def __init__(self, step: int, skipped: bool = False):
        self.step = step
        self.skipped = skipped
        self.blocked_seconds = 0.0
        self.staging_bytes = 0
        self._done = threading.Event()
        self._result: SaveResult | None = None
        self._error: BaseException | None = None
        self._reported = False
        if skipped:
            self._done.set()

    def done(self) -> bool:
        """True once the save finished: committed, failed or skipped."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """True once finished, False on timeout; raises AsyncSaveError if it failed."""
        if not self._done.wait(timeout):
            return False
        if self._error is not None:
            self._reported = True
            raise AsyncSaveError(f"background save of step {self.step} failed and was not "
                                 f"committed: {_describe(self._error)}", [self.step]) \
                from self._error
        return True

    def result(self, timeout: float | None = None) -> SaveResult | None:
        """The SaveResult (None when skipped); raises TimeoutError if still running."""
        if not self.wait(timeout):
            raise TimeoutError(f"save of step {self.step} is still running")
        return self._result

    def exception(self) -> BaseException | None:
        """The error that failed the save, if it finished with one; else None."""
        return self._error if self.done() else None

    def __repr__(self) -> str:
        state = ("skipped" if self.skipped else "failed" if self._error is not None
                 else "committed" if self.done() else "running")
        return f"<SaveHandle step={self.step} {state} blocked={self.blocked_seconds:.3f}s>"


@dataclass
class _Job:
    handle: SaveHandle
    snap: Snapshot
    staged: Staged
    write: Callable[[Snapshot], SaveResult]


class AsyncSaver:
    """One manager's worker thread, its staging pool and its admission policy."""

    def __init__(self, options: AsyncOptions, group=None):
        self.options = options
        self.group = group  # the training group: only for the skip consensus in save()
        self.pool = StagingPool(options.max_in_flight)
        self.gate = StepGate()
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._in_flight: list[SaveHandle] = []  # admitted and not finished, in save() order
        self._failed: list[SaveHandle] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="dckpt-async-save", daemon=True)
        self._thread.start()
        _open(self)

    # ---- the caller's side ---------------------------------------------------------------
    @property
    def pending(self) -> list[int]:
        with self._cond:
            return [h.step for h in self._in_flight]

    def submit(self, step: int, state: Any, rank_state: dict,
               write: Callable[[Snapshot], SaveResult]) -> SaveHandle:
        """Snapshot `state` now; `write(snapshot)` commits it on the worker."""
        t0 = time.perf_counter()
        self._raise_failed()
        if self._closed:
            raise DckptError("this manager's async saver is closed")
        handle = SaveHandle(step)
        if not self._admit(handle):
            log.warning("dckpt: save of step %d skipped: %d save(s) still in flight (steps %s)",
                        step, len(self._in_flight), self.pending)
            return SaveHandle(step, skipped=True)
        try:
            self._raise_failed()  # the save we waited for may just have failed
            snap = checkpoint.snapshot(state, rank_state)
            staged = self._stage(snap, state, handle)
        except BaseException:
            with self._cond:
                self._in_flight.remove(handle)
                self._cond.notify_all()
            raise
        # The worker writes the staged copies, not the live tensors: a new snapshot (the
        # one taken is left as it was).
        snap = replace(snap, flat=replace(snap.flat, leaves=staged.leaves))
        handle.staging_bytes = self.pool.nbytes
        handle.blocked_seconds = time.perf_counter() - t0
        with self._cond:
            self._queue.append(_Job(handle, snap, staged, write))
            self._cond.notify_all()
        return handle

    def _admit(self, handle: SaveHandle) -> bool:
        with self._cond:
            full = len(self._in_flight) >= self.options.max_in_flight
        if self.options.when_busy == "skip":
            # Every rank must run the same commits: skip if any rank is busy.
            if any(dist.all_gather_json(full, self.group)):
                return False
        with self._cond:
            self._cond.wait_for(lambda: len(self._in_flight) < self.options.max_in_flight)
            self._in_flight.append(handle)
        return True

    def _stage(self, snap: Snapshot, state: Any, handle: SaveHandle) -> Staged:
        pinned = any(on_cuda(leaf) for leaf in snap.leaves)
        order = storage_order(snap.leaves)
        arena = self.pool.acquire(layout(snap.leaves, order)[1], pinned)
        try:
            staged = Staged(snap.leaves, arena, order)
            everything = list(range(len(snap.leaves)))
            if self.options.snapshot == "deferred":
                opts = optimizers_in(state)
                owned = owned_storages(opts)
                later = [i for i in everything if storage_key(snap.leaves[i].value) in owned]
                staged.copy_now(sorted(set(everything) - set(later)))
                if later:
                    self.gate.hold(opts, staged, handle)
                    staged.defer(later)
                elif not opts:
                    log.warning("dckpt: deferred snapshot found no optimizer in the state; "
                                "every tensor was copied inside save()")
            else:
                staged.copy_now(everything)
            return staged
        except BaseException:
            self.pool.release(arena)
            raise

    def prepare(self, state: Any) -> int:
        """Allocate every staging arena for `state` now (a first allocation faults its pages
        in: ~1 s per GB here), so the first save is as quick as the later ones."""
        leaves = checkpoint.snapshot(state).leaves
        need, pinned = layout(leaves, storage_order(leaves))[1], any(on_cuda(x) for x in leaves)
        with self._cond:
            self._cond.wait_for(lambda: not self._in_flight)
            arenas = [self.pool.acquire(need, pinned) for _ in range(self.options.max_in_flight)]
            for a in arenas:
                self.pool.release(a)
        return self.pool.nbytes

    def settle(self, timeout: float | None = None) -> bool:
        """Wait for every admitted save, leaving failures unreported (the exit handler
        reports them); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._in_flight, timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for every admitted save; False on timeout. Raises unreported failures."""
        with self._cond:
            finished = self._cond.wait_for(lambda: not self._in_flight, timeout)
        self._raise_failed()
        return finished

    def close(self, timeout: float | None = None) -> None:
        """Finish the pending saves and stop the worker. Raises AsyncSaveError for failed
        saves not reported yet, or for saves unfinished after `timeout`."""
        if self._closed:
            self._raise_failed()
            return
        try:
            with self._cond:
                finished = self._cond.wait_for(lambda: not self._in_flight, timeout)
                unfinished = [h.step for h in self._in_flight]
                self._closed = True
                self._cond.notify_all()
            if finished:
                self._thread.join()
                self.gate.detach()
                self.pool.close()
            self._raise_failed()
            if not finished:
                raise AsyncSaveError(
                    f"{len(unfinished)} background save(s) unfinished after {timeout} s "
                    f"(steps {unfinished}); none of them is committed unless it completes, "
                    "and the previous checkpoint stays intact", unfinished)
        finally:
            _closed(self)

    def _raise_failed(self) -> None:
        with self._cond:
            fresh = [h for h in self._failed if not h._reported]
            self._failed.clear()
        for h in fresh:
            h._reported = True
        if fresh:
            steps = [h.step for h in fresh]
            raise AsyncSaveError(
                f"background save(s) of step(s) {steps} failed and were not committed: "
                + "; ".join(f"step {h.step}: {_describe(h._error)}" for h in fresh),
                steps) from fresh[0]._error

    # ---- the worker ----------------------------------------------------------------------
    def _run(self) -> None:
        if self.options.nice:
            try:  # Linux: the nice value is per thread; the native write runs on this one
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.options.nice)
            except (OSError, AttributeError):
                pass
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return
                job = self._queue.popleft()
            self._execute(job)

    def _execute(self, job: _Job) -> None:
        result = error = None
        try:
            job.staged.wait_copied()
            result = job.write(job.snap)
        except BaseException as e:  # kept for the caller: never lost, never committed
            error = e
            log.error("dckpt: background save of step %d failed: %s", job.handle.step,
                      _describe(e))
        finally:
            self.pool.release(job.staged.arena)
            h = job.handle
            with self._cond:
                # Slot first, then the handle: whoever wakes on the handle finds it free.
                h._result, h._error = result, error
                self._in_flight.remove(h)
                if error is not None:
                    self._failed.append(h)
                h._done.set()
                self._cond.notify_all()


def storage_order(leaves: list) -> list[int]:
    """The order one rank that writes all its leaves stores them in its data file: the
    order sharding.assign gives them (sharding.write_order). The staging layout follows it
    so that the O_DIRECT write sends large tensors straight from the arena; where the plan
    differs (several ranks sharing replicated tensors), only the speed does."""
    return sorted(range(len(leaves)),
                  key=lambda i: sharding.write_order(leaves[i].nbytes, leaves[i].name))


def _describe(e: BaseException | None) -> str:
    return f"{type(e).__name__}: {e}"


def commit_group(group=None):
    """A gloo group over the ranks of `group` for the worker's commit collectives: dckpt's
    collectives keep a sequence per group (dckpt.distributed.collective), so the worker's never interleave with
    those the training thread runs on `group`, and nothing of it touches the training's own
    backend (NCCL, say) from a second thread.

    Collective: every rank of `group` calls it in the same order (CheckpointManager's
    constructor is collective already)."""
    if not dist.active(group):
        return group
    if group is None or group is tdist.group.WORLD:
        return tdist.new_group(backend="gloo")
    return tdist.new_group(ranks=tdist.get_process_group_ranks(group), backend="gloo",
                           use_local_synchronization=True)


# ---- process-wide: interpreter exit and SIGTERM ------------------------------------------
_OPEN: "weakref.WeakSet[AsyncSaver]" = weakref.WeakSet()
_SIGTERM = {"installed": False, "previous": None, "exiting": False}
_LOCK = threading.Lock()


def _open(saver: AsyncSaver) -> None:
    with _LOCK:
        _OPEN.add(saver)
        if (saver.options.handle_sigterm and not _SIGTERM["installed"]
                and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)):
            _SIGTERM["previous"] = signal.signal(signal.SIGTERM, _on_sigterm)
            _SIGTERM["installed"] = True


def _closed(saver: AsyncSaver) -> None:
    with _LOCK:
        _OPEN.discard(saver)
        if (_SIGTERM["installed"] and not _OPEN
                and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) is _on_sigterm):
            signal.signal(signal.SIGTERM, _SIGTERM["previous"] or signal.SIG_DFL)
            _SIGTERM["installed"] = False


def _on_sigterm(signum, frame) -> None:
    # Waiting here could deadlock on a lock the interrupted code holds; unwinding releases
    # every lock, and the exit path (below) then finishes the pending saves.
    if _SIGTERM["exiting"]:
        return  # a repeated SIGTERM while the exit path finishes the saves
    _SIGTERM["exiting"] = True
    pending = [s for saver in list(_OPEN) for s in saver.pending]
    log.warning("dckpt: SIGTERM: exiting after %d pending save(s) %s", len(pending), pending)
    raise SystemExit(128 + signum)


# The exit status of a process whose background saves failed (or were unfinished) without
# the program ever being told (no wait(), close() or later save() raised it).
EXIT_STATUS_ON_FAILURE = 1


@atexit.register
def _finish_at_exit() -> None:
    failed = False
    for saver in list(_OPEN):
        try:
            saver.close(saver.options.exit_timeout)
        except AsyncSaveError as e:
            log.error("dckpt: at exit: %s", e)
            failed = True
    if failed:
        # A log line alone let a job whose last checkpoint was never committed exit 0 and
        # count as a success. An exit handler cannot change the status except by ending
        # the process: flush what would be lost, then exit (SIGTERM keeps its 143).
        status = 128 + signal.SIGTERM if _SIGTERM["exiting"] else EXIT_STATUS_ON_FAILURE
        print(f"dckpt: a background save failed and was never reported to the program "
              f"(see above); exiting with status {status}", file=sys.stderr)
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        os._exit(status)

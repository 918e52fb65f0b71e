"""Rank, world and the few collectives a checkpoint needs. No-ops when not distributed.

The collectives exchange small JSON documents (never pickle) through the process group's
key-value store rather than through the communication backend: they then work the same over
gloo and NCCL without device syncs. A rank that raises inside a dckpt operation posts its
error for the others, and every rank beats a heartbeat in the store, so a failed or dead rank
is every rank's error within seconds; only a live rank that has not arrived yet is waited
for up to the long collective deadline.
"""
from __future__ import annotations

import functools
import inspect
import json
import os
import queue
import threading
import time
from contextlib import contextmanager
from typing import Any

import torch.distributed as tdist

from ..errors import DistributedError

TIMEOUT_ENV = "DCKPT_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT = 1800.0  # like torch's own default: a slow rank may be writing gigabytes
PEER_TIMEOUT_ENV = "DCKPT_PEER_TIMEOUT"
DEFAULT_PEER_TIMEOUT = 10.0  # a rank silent this long is dead (or stopped), not slow
BEAT_SECONDS = 1.0
_timeout_override: list[float] = []
# Per group: dckpt operations begun, how deep the caller is inside the current one, and the
# exchanges made in it so far. Every rank makes the same operation calls, so the numbers
# agree even after a rank left one halfway (see operation()).
_operations: dict[str, int] = {}
_depth: dict[str, int] = {}
_sequence: dict[str, int] = {}
_heartbeat: dict[int, threading.Thread] = {}  # pid -> the thread beating for this process
# This process's key cleaner (see _clean_up): (pid, the store it cleans, its job queue).
_cleaner: list[tuple[int, Any, queue.SimpleQueue | None]] = []


def active(group=None) -> bool:
    return tdist.is_available() and tdist.is_initialized() and world_size(group) > 1


def rank(group=None) -> int:
    return tdist.get_rank(group) if tdist.is_available() and tdist.is_initialized() else 0


def world_size(group=None) -> int:
    return tdist.get_world_size(group) if tdist.is_available() and tdist.is_initialized() else 1


def collective_timeout() -> float:
    """Seconds a rank waits for live peers at a dckpt collective ($DCKPT_COLLECTIVE_TIMEOUT)."""
    if _timeout_override:
        return _timeout_override[-1]
    return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))


def peer_timeout() -> float:
    """Seconds without a heartbeat after which a peer counts as dead ($DCKPT_PEER_TIMEOUT)."""
    return float(os.environ.get(PEER_TIMEOUT_ENV, DEFAULT_PEER_TIMEOUT))


@contextmanager
def timeout(seconds: float):
    """Override collective_timeout() within a block."""
    _timeout_override.append(float(seconds))
    try:
        yield
    finally:
        _timeout_override.pop()


def _group_key(group) -> str:
    g = group if group is not None else tdist.group.WORLD
    return getattr(g, "group_name", None) or "default"


def group_key(group=None) -> str:
    """A name for `group`, the same on every rank (for per-group caches)."""
    return _group_key(group)


def _store():
    return tdist.distributed_c10d._get_default_store()


@contextmanager
def operation(group=None):
    """One collective dckpt call (a save, a restore, a commit): its exchanges are numbered
    from 0 under an operation number of its own. Every rank makes the same operation calls,
    so a rank that left the previous one halfway (it raised before an exchange the others
    made) pairs its next exchanges with theirs again instead of shifting by the ones it
    skipped. An exception leaving the outermost operation is posted for the peers, which
    raise it from whatever exchange of the operation they wait in, within a poll interval,
    instead of waiting for the collective deadline. Nested calls join the outer operation."""
    if not active(group):
        yield
        return
    gkey = _group_key(group)
    outer = not _depth.get(gkey)
    if outer:
        _operations[gkey] = _operations.get(gkey, 0) + 1
        _sequence[gkey] = 0
        start_heartbeat()
    _depth[gkey] = _depth.get(gkey, 0) + 1
    try:
        yield
    except BaseException as e:
        if outer:
            _post_abort(group, gkey, e)
        raise
    finally:
        _depth[gkey] -= 1


def collective(fn):
    """Run `fn` as one operation() over its group: its `group` argument, else `self.group`."""
    params = list(inspect.signature(fn).parameters.values())
    names = [p.name for p in params]
    # Where `group` comes in (several calls per save: no signature binding at each one).
    at = names.index("group") if "group" in names else None
    positional = at is not None and params[at].kind in (
        inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if at is None:
            group = getattr(args[0], "group", None)
        elif positional and len(args) > at:
            group = args[at]
        else:
            group = kwargs.get("group")  # not given: None, as the default of every user
        with operation(group):
            return fn(*args, **kwargs)
    return wrapper


def _op_key(gkey: str) -> str:
    return f"dckpt/{gkey}/{_operations.get(gkey, 0)}"


def _post_abort(group, gkey: str, e: BaseException) -> None:
    """Post the first failure of this operation: the rank that failed (for a dead or silent
    peer this rank found, that peer), which rank saw it, and the error. Survivors of a death
    then learn it from the first one to notice, before that one may exit and take the store
    (rank 0) with it."""
    me = rank(group)
    failed = e.rank if isinstance(e, DistributedError) and e.rank is not None else me
    try:
        key = f"{_op_key(gkey)}/abort"
        if _store().add(f"{key}/n", 1) == 1:  # the first poster wins
            _store().set(key, json.dumps({"rank": failed, "by": me,
                                          "error": f"{type(e).__name__}: {e}"}))
    except Exception:
        pass  # the store is gone: the peers learn it from their own store calls


def start_heartbeat() -> None:
    """Beat for this process in the store from a daemon thread (idempotent), so that peers
    waiting at a collective can tell a dead rank from a slow one (see _wait)."""
    if not active() or os.getpid() in _heartbeat:
        return
    store, key = _store(), _alive_key(tdist.get_rank())

    def beat() -> None:
        while True:
            try:
                store.add(key, 1)
            except Exception:
                return  # the store went away with rank 0: the job is over
            time.sleep(BEAT_SECONDS)

    t = threading.Thread(target=beat, name="dckpt-heartbeat", daemon=True)
    t.start()
    _heartbeat[os.getpid()] = t


def _alive_key(global_rank: int) -> str:
    return f"dckpt/alive/{global_rank}"


# Bytes of JSON this process has sent and received through the collectives below (values
# only, not the store's framing), so a save can say what its exchanges cost (SaveResult).
_traffic = [0, 0]


def traffic() -> tuple[int, int]:
    """(bytes sent, bytes received) by this process's collectives so far."""
    return _traffic[0], _traffic[1]


def all_gather_json(obj: Any, group=None, what: str = "exchange") -> list:
    """Every rank's `obj`, in rank order, on every rank. Raises DistributedError naming the
    first rank that failed or died, or that did not arrive within collective_timeout();
    `what` names the step."""
    return _exchange_json(obj, group, what, None, None)


def gather_json(obj: Any, root: int = 0, group=None, what: str = "gather") -> list | None:
    """Every rank's `obj` in rank order on `root`, None elsewhere. Only `root` waits:
    the others post theirs and go on (a later exchange, such as broadcast_json of the
    outcome, tells them how it went). Each rank sends its own value and only `root`
    receives: what lets rank 0 collect a small summary of each rank at scale."""
    return _exchange_json(obj, group, what, root, None)


def _exchange_json(obj: Any, group, what: str, root: int | None, src: int | None):
    if not active(group):
        return [obj] if src is None else obj
    with operation(group):
        store = _store()
        gkey = _group_key(group)
        seq = _sequence[gkey]
        _sequence[gkey] = seq + 1
        base = f"{_op_key(gkey)}/{seq}"
        n, me = world_size(group), rank(group)
        keys = [f"{base}/{r}" for r in range(n)]
        try:
            text = json.dumps(obj if src is None or me == src else None)
            store.set(keys[me], text)
            _traffic[0] += len(text)
            if src is not None:
                # A broadcast: every rank posts (the others an empty value) and waits for
                # all, so a rank failing here fails every rank, src included, as in any
                # exchange; each reads src's value only. A live src may itself have been
                # waiting out the deadline on a peer (gather_json): the others give it a
                # little longer, so that they learn from its abort post which rank failed.
                _wait(store, keys, group, what,
                      grace=2 * BEAT_SECONDS + 0.25 * collective_timeout())
                text = store.get(keys[src])
                if me != src:
                    _traffic[1] += len(text)
                _clean_up(keys, f"{base}/read", n)
                return json.loads(text)
            if root is not None and me != root:
                return None
            _wait(store, keys, group, what)
            texts = store.multi_get(keys)
            _traffic[1] += sum(len(t) for t in texts)
            values = [json.loads(v) for v in texts]
            if root is not None:
                _clean_up(keys)
            else:
                _clean_up(keys, f"{base}/read", n)  # the last reader cleans up
        except DistributedError:
            raise
        except Exception as e:  # the store itself failed: its host (rank 0) is gone
            raise DistributedError(f"dckpt {what}: the process group's store failed ({e}); "
                                   "rank 0, which hosts it, probably died", 0) from None
        return values


def _clean_up(keys: list[str], readers: str | None = None, n: int = 0) -> None:
    """Delete an exchange's keys from the store once it is over: at once when `readers` is
    None, else when this is the n-th rank to count itself in `readers` (the last reader).
    A thread of this process does it with a store client of its own, so that no exchange
    waits for these round trips (three to five a save, on rank 0's path to the commit).
    Where the store cannot be cloned, they are made here."""
    store = _store()
    if not _cleaner or _cleaner[0][0] != os.getpid() or _cleaner[0][1] is not store:
        if _cleaner and _cleaner[0][0] == os.getpid() and _cleaner[0][2] is not None:
            _cleaner[0][2].put(None)  # the process group was made anew: the old one ends
        _cleaner[:] = [(os.getpid(), store, _start_cleaner(store))]
    jobs = _cleaner[0][2]
    if jobs is None:
        _delete(store, keys, readers, n)
    else:
        jobs.put((keys, readers, n))


def _start_cleaner(store) -> queue.SimpleQueue | None:
    try:
        own = store.clone()
    except Exception:  # a store type without clone(): clean up inline
        return None
    jobs: queue.SimpleQueue = queue.SimpleQueue()

    def run() -> None:
        while (job := jobs.get()) is not None:
            try:
                _delete(own, *job)
            except Exception:
                return  # the store went away with rank 0: the job is over

    threading.Thread(target=run, name="dckpt-store-cleanup", daemon=True).start()
    return jobs


def _delete(store, keys: list[str], readers: str | None, n: int) -> None:
    if readers is not None:
        if store.add(readers, 1) != n:
            return
        keys = [*keys, readers]
    for k in keys:
        store.delete_key(k)


def _wait(store, keys: list[str], group, what: str, ranks: list[int] | None = None,
          grace: float = 0.0) -> None:
    """Poll until every key is set. Each round also looks for a failure a peer posted in
    this operation and for peers whose heartbeat stopped: either raises at once. Only a
    live, silent peer (one still computing, or that never called dckpt) is waited for up to
    collective_timeout(). Polling with check() keeps the store's client free for the
    heartbeat thread (a blocking wait holds it)."""
    _watch(store, lambda: store.check(keys),
           lambda: [ranks[i] if ranks else i for i, k in enumerate(keys)
                    if not store.check([k])],
           f"{keys[0].rsplit('/', 2)[0]}/abort", group, what, grace)


def wait_until(done, peers, group=None, what: str = "transfer") -> None:
    """Inside an operation(): poll `done()` (a point-to-point transfer completing, say)
    under the same watch as an exchange: a failure posted in this operation or a peer of
    `peers()` (group ranks it still waits for) whose heartbeat stopped raises at once, and
    after collective_timeout() the missing peers are named. A new kind of collective step
    is then fail-fast like the exchanges."""
    if not active(group):
        return
    _watch(_store(), done, peers, f"{_op_key(_group_key(group))}/abort", group, what)


def _watch(store, done, missing_now, abort_key: str, group, what: str,
           grace: float = 0.0) -> None:
    limit, dead_after = collective_timeout() + grace, peer_timeout()
    start = time.monotonic()
    beats: dict[int, tuple[int, float]] = {}  # missing rank -> (beat count, when it changed)
    pause, next_look = 0.0002, start + BEAT_SECONDS
    missing: list[int] = []
    while not done():
        now = time.monotonic()
        if store.check([abort_key]):
            if done():  # the exchange completed before the failure: no error here
                break
            post = json.loads(store.get(abort_key))
            failed, by = post["rank"], post["by"]
            seen = "" if by == failed else f" (as rank {by} found)"
            raise DistributedError(f"dckpt {what}: rank {failed} failed{seen}: {post['error']}",
                                   failed)
        if now >= next_look:
            next_look = now + BEAT_SECONDS
            missing = list(missing_now())
            for r in missing:
                count = store.add(_alive_key(_global_rank(group, r)), 0)
                seen = beats.get(r)
                if seen is None or seen[0] != count:
                    beats[r] = (count, now)
                elif count and now - seen[1] >= dead_after:
                    raise DistributedError(
                        f"dckpt {what}: rank {r} stopped responding (no heartbeat for "
                        f"{now - seen[1]:.0f} s): it died or its process is stopped; "
                        f"${PEER_TIMEOUT_ENV} sets how long a silent rank is waited for", r)
            if now - start >= limit:
                raise DistributedError(
                    f"dckpt {what}: rank(s) {missing} did not arrive within {limit:.0f} s "
                    "(they hang, or skipped the collective call)", missing[0] if missing else None)
        time.sleep(pause)
        pause = min(pause * 2, 0.02)


def _global_rank(group, r: int) -> int:
    if group is None or group is tdist.group.WORLD:
        return r
    return tdist.get_global_rank(group, r)


def broadcast_json(obj: Any, src: int = 0, group=None, what: str = "broadcast") -> Any:
    """`obj` of rank `src` on every rank."""
    return _exchange_json(obj, group, what, None, src)


def barrier(group=None, what: str = "barrier") -> None:
    if active(group):
        all_gather_json(None, group, what)


def exchange(value: Any, failure: BaseException | None, group=None, what: str = "step") -> list:
    """Collective: every rank's `value` when no rank failed; otherwise every rank raises (its
    own error, or one naming the first failed rank), so no rank carries on alone into a
    collective that never completes."""
    if not active(group):
        if failure is not None:
            raise failure
        return [value]
    msg = [None, f"{type(failure).__name__}: {failure}"] if failure is not None else [value, None]
    gathered = all_gather_json(msg, group, what)
    if failure is not None:
        raise failure
    bad = [(r, e) for r, (_, e) in enumerate(gathered) if e]
    if bad:
        raise DistributedError(f"{what}: rank {bad[0][0]} failed: {bad[0][1]}", bad[0][0])
    return [v for v, _ in gathered]


def raise_if_any_failed(failure: BaseException | None, group=None, what: str = "step") -> None:
    """exchange() without a value."""
    exchange(None, failure, group, what)


def local_world_size() -> int:
    """Ranks sharing this machine, as launchers (torchrun) announce it; 1 when unknown."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def threads_per_rank(threads: int, all_cores: int) -> int:
    """`threads`, or for 0 (= all cores) this rank's share of the cores when several ranks
    share the machine: N ranks with a pool of every core each would oversubscribe it N-fold."""
    if threads:
        return threads
    local = local_world_size()
    return 0 if local <= 1 else max(1, all_cores // local)

"""Rank, world and the few collectives a checkpoint needs. No-ops when not distributed.

The collectives exchange small JSON documents (never pickle) through the process group's
key-value store rather than through the communication backend: they then work the same over
gloo and NCCL without device syncs, and every wait has a deadline after which the error names
the ranks that never arrived. A rank that dies mid-save cannot hang the others.
"""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch.distributed as tdist

from .errors import DistributedError

TIMEOUT_ENV = "DCKPT_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT = 1800.0  # like torch's own default: a slow rank may be writing gigabytes
_timeout_override: list[float] = []
_sequence: dict[str, int] = {}  # per group: collectives so far, the same count on every rank


def active(group=None) -> bool:
    return tdist.is_available() and tdist.is_initialized() and world_size(group) > 1


def rank(group=None) -> int:
    return tdist.get_rank(group) if tdist.is_available() and tdist.is_initialized() else 0


def world_size(group=None) -> int:
    return tdist.get_world_size(group) if tdist.is_available() and tdist.is_initialized() else 1


def collective_timeout() -> float:
    """Seconds a rank waits for the others at a dckpt collective ($DCKPT_COLLECTIVE_TIMEOUT)."""
    if _timeout_override:
        return _timeout_override[-1]
    return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))


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


def all_gather_json(obj: Any, group=None, what: str = "exchange") -> list:
    """Every rank's `obj`, in rank order, on every rank. Raises DistributedError naming the
    ranks that did not arrive within collective_timeout(); `what` names the step."""
    if not active(group):
        return [obj]
    store = tdist.distributed_c10d._get_default_store()
    gkey = _group_key(group)
    seq = _sequence.get(gkey, 0)
    _sequence[gkey] = seq + 1
    base = f"dckpt/{gkey}/{seq}"
    n, me = world_size(group), rank(group)
    keys = [f"{base}/{r}" for r in range(n)]
    limit = collective_timeout()
    try:
        store.set(keys[me], json.dumps(obj))
        _wait(store, keys, limit, what)
        values = [json.loads(v) for v in store.multi_get(keys)]
        if store.add(f"{base}/read", 1) == n:  # the last reader cleans up
            for k in [*keys, f"{base}/read"]:
                store.delete_key(k)
    except DistributedError:
        raise
    except Exception as e:  # the store itself failed: its host (rank 0) is gone
        raise DistributedError(f"dckpt {what}: the process group's store failed ({e}); "
                               "rank 0, which hosts it, probably died", 0) from None
    return values


def _wait(store, keys: list[str], limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    try:
        store.wait(keys, timedelta(seconds=limit))
        return
    except Exception:
        if time.monotonic() < deadline - 1.0:
            raise  # not a timeout: the store broke
    missing = [r for r, k in enumerate(keys) if not store.check([k])]
    if not missing:
        return
    raise DistributedError(f"dckpt {what}: rank(s) {missing} did not arrive within "
                           f"{limit:.0f} s (they died, hang, or skipped the collective call)",
                           missing[0])


def broadcast_json(obj: Any, src: int = 0, group=None, what: str = "broadcast") -> Any:
    """`obj` of rank `src` on every rank."""
    if not active(group):
        return obj
    return all_gather_json(obj if rank(group) == src else None, group, what)[src]


def barrier(group=None, what: str = "barrier") -> None:
    if active(group):
        all_gather_json(None, group, what)


def raise_if_any_failed(failure: BaseException | None, group=None, what: str = "step") -> None:
    """Collective: if any rank failed, every rank raises (its own error, or one naming the
    first failed rank), so no rank carries on alone into a collective that never completes."""
    if not active(group):
        if failure is not None:
            raise failure
        return
    errors = all_gather_json(None if failure is None else f"{type(failure).__name__}: {failure}",
                             group, what)
    if failure is not None:
        raise failure
    bad = [(r, e) for r, e in enumerate(errors) if e]
    if bad:
        raise DistributedError(f"{what}: rank {bad[0][0]} failed: {bad[0][1]}", bad[0][0])


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

"""Keep Python's cyclic garbage collector from running during a synchronous save or load.

A save holds tens of thousands of small objects for its duration (offers, chunk records,
the all-gathered reports, the manifest), and so do a load and a verification (the parsed
manifest, the decoded tree, the planned reads). Every collection that runs while they
are alive promotes them a generation, and the promotions add up to a full collection of
the whole heap every few calls: in a process that has imported torch that costs 0.1-0.4 s on this
machine, more than a 0.8 GB save to /dev/shm or a 1 GB load from the page cache takes.
With the collector paused, those objects die by reference count when the call returns and
are never promoted. Nothing of the call's own is left for the collector (no cycles), so
pausing defers no work.

Pausing is process-wide, so only calls on the main thread pause: a background (async) save
must not stop collection for a training loop that keeps allocating meanwhile. Nested and
overlapping pauses count, and the collector is re-enabled only if it was enabled before.
"""
from __future__ import annotations

import functools
import gc
import threading

_lock = threading.Lock()
_depth = 0
_resume = False  # whether the collector was enabled when the outermost pause began


def _enter() -> None:
    global _depth, _resume
    with _lock:
        if _depth == 0:
            _resume = gc.isenabled()
            gc.disable()
        _depth += 1


def _leave() -> None:
    global _depth
    with _lock:
        _depth -= 1
        if _depth == 0 and _resume:
            gc.enable()


def during(fn):
    """Decorator: run `fn` with the collector paused when called on the main thread."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return fn(*args, **kwargs)
        _enter()
        try:
            return fn(*args, **kwargs)
        finally:
            _leave()
    return wrapper

"""Staging: reusable host memory that holds a consistent copy of a state's tensors.

An async save copies every tensor leaf into a staging arena and writes from there while
training changes the live tensors. An arena is one block per in-flight save, kept and reused
by the next save (a first touch of fresh pages costs ~0.35 GB/s on a VM, a copy into warm
ones 5-10 GB/s), re-allocated only when a state outgrows it.

Copies:
- CPU tensors inside save(): torch copy_, which runs on every intra-op thread.
- CPU tensors deferred to the background: numpy copyto on one copier thread (the GIL is
  released), which leaves the training threads their cores; an optimizer step that finds
  copies left helps with torch copy_ from the other end of the list.
- CUDA tensors: the arena is pinned host memory; copies are non_blocking on a side stream
  that first waits for the current stream, so they read what every kernel queued before
  save() wrote. An event per device marks their end: save() synchronizes on it (immediate),
  or the current stream waits on it before the optimizer step (deferred), with no CPU stall.
"""
from __future__ import annotations

import logging
import mmap
import threading
from collections import deque
from dataclasses import replace

import numpy as np
import torch

from ..storage import local as io
from .flatten import Leaf

log = logging.getLogger("dckpt")

ALIGN = 256  # bytes between staged tensors: keeps every dtype view aligned
DIRECT_ALIGN = 4096  # what an O_DIRECT write needs of its source (csrc/fileio.h)
CONGRUENT_MIN = 64 << 10  # smaller leaves are packed: their bytes are few


def layout(leaves: list[Leaf], order: list[int] | None = None) -> tuple[list[int], int]:
    """Offsets of each leaf's bytes in an arena, and the arena size they need.

    Leaves are ALIGN-aligned, except that a large one sits at the offset, modulo
    DIRECT_ALIGN, its bytes will have in the data file when the leaves are stored back to
    back in `order` (indices into leaves; default: as listed). An O_DIRECT write then sends
    it straight from the arena; placed otherwise it still works, through a bounce buffer.
    It costs at most DIRECT_ALIGN bytes per large leaf."""
    in_file = [0] * len(leaves)
    pos = 0
    for i in range(len(leaves)) if order is None else order:
        in_file[i] = pos
        pos += leaves[i].nbytes
    offsets, total = [], 0
    for leaf, want in zip(leaves, in_file):
        at = -(-total // ALIGN) * ALIGN
        if leaf.nbytes >= CONGRUENT_MIN and want % io.elem_size(leaf.value) == 0:
            at = total + (want - total) % DIRECT_ALIGN  # a multiple of the element size
        offsets.append(at)
        total = at + leaf.nbytes
    return offsets, total


def on_cuda(leaf: Leaf) -> bool:
    return not leaf.is_numpy and leaf.value.device.type == "cuda"


class Arena:
    """One block of host memory, its pages faulted in by the kernel at allocation
    (MAP_POPULATE: ~3x faster than faulting them in during the first copy). `pinned` page-
    locks it for CUDA (cudaHostRegister; exact size, unlike the power-of-two caching pinned
    allocator, which is the fallback)."""

    def __init__(self, nbytes: int, pinned: bool = False):
        self.nbytes = max(nbytes, ALIGN)
        self.pinned = pinned
        self._map = _anonymous_map(self.nbytes)
        self.data = torch.frombuffer(self._map, dtype=torch.uint8)
        self._registered = pinned and _cuda_register(self.data)
        if pinned and not self._registered:
            self._map = None
            self.data = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=True)

    def close(self) -> None:
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self.data.data_ptr())
            self._registered = False
        self.data = None
        self._map = None  # unmapped once no staged view refers to it any more


def _anonymous_map(nbytes: int) -> mmap.mmap:
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(-1, nbytes, flags=flags)


def _cuda_register(t: torch.Tensor) -> bool:
    try:
        rc = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel(), 0)
    except Exception as e:  # an old or odd runtime: fall back to the caching allocator
        log.debug("dckpt: cudaHostRegister unavailable (%s)", e)
        return False
    return int(rc) == 0


class StagingPool:
    """Arenas for at most `slots` saves in flight. Thread-safe: saves acquire, the worker
    releases. `nbytes` is the host memory it holds: the bound an async save adds."""

    def __init__(self, slots: int):
        self.slots = slots
        self._free: list[Arena] = []
        self._in_use: list[Arena] = []
        self._lock = threading.Lock()
        self.allocations = 0  # arenas ever allocated: stays at `slots` for a steady state

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(a.nbytes for a in self._free + self._in_use)

    def acquire(self, nbytes: int, pinned: bool) -> Arena:
        with self._lock:
            if len(self._in_use) >= self.slots:
                raise RuntimeError("staging pool exhausted: more saves admitted than slots")
            fits = [a for a in self._free if a.nbytes >= nbytes and a.pinned >= pinned]
            arena = min(fits, key=lambda a: a.nbytes) if fits else None
            if arena is not None:
                self._free.remove(arena)
            elif self._free and len(self._free) + len(self._in_use) >= self.slots:
                self._free.pop(0).close()  # outgrown: replaced, never kept beside
        if arena is None:
            arena = Arena(nbytes, pinned)
            self.allocations += 1
            log.info("dckpt: async staging arena of %.1f MB%s (pool: %.1f MB for %d save(s) "
                     "in flight)", arena.nbytes / 1e6, " pinned" if pinned else "",
                     self.nbytes / 1e6 + arena.nbytes / 1e6, self.slots)
        with self._lock:
            self._in_use.append(arena)
        return arena

    def release(self, arena: Arena) -> None:
        with self._lock:
            self._in_use.remove(arena)
            self._free.append(arena)

    def close(self) -> None:
        with self._lock:
            for a in self._free:
                a.close()
            self._free.clear()


class Staged:
    """One save's copies of `leaves` in `arena`. `leaves` (staged) are what gets written;
    `order` is the order they will be stored in (see layout())."""

    def __init__(self, sources: list[Leaf], arena: Arena, order: list[int] | None = None):
        offsets, total = layout(sources, order)
        assert total <= arena.nbytes
        self.arena = arena
        self.sources = sources
        self.leaves = [replace(leaf, value=_view(arena.data, off, leaf))
                       for leaf, off in zip(sources, offsets)]
        self._events: dict[torch.device, "torch.cuda.Event"] = {}
        self.copied = threading.Event()  # the deferred CPU copies are final
        self.copied.set()
        self._copy_error: BaseException | None = None
        self._lock = threading.Lock()
        self._todo: deque[int] = deque()  # deferred CPU copies not started yet
        self._left = 0  # deferred CPU copies not finished yet

    def copy_now(self, indices: list[int]) -> None:
        """Copy these leaves and return when their staged bytes are final."""
        gpu = [i for i in indices if on_cuda(self.sources[i])]
        events = self._enqueue_cuda(gpu) if gpu else {}
        for i in indices:
            if not on_cuda(self.sources[i]):
                _copy(self.leaves[i].value, self.sources[i].value)
        for ev in events.values():
            ev.synchronize()

    def defer(self, indices: list[int]) -> None:
        """Start copying these leaves in the background and return: CUDA copies are queued
        on the side stream; CPU copies run on a thread of their own at the caller's
        priority (the write may run niced), one leaf at a time from the front of a shared
        list. A gate() that finds copies left takes leaves from the back and copies them
        with every intra-op thread, so a held optimizer step waits as little as it can."""
        gpu = [i for i in indices if on_cuda(self.sources[i])]
        if gpu:
            self._events = self._enqueue_cuda(gpu, keep_sources=True)
        self._todo = deque(i for i in indices if not on_cuda(self.sources[i]))
        self._left = len(self._todo)
        if self._left:
            self.copied.clear()
            threading.Thread(target=self._copy_leaves, args=(deque.popleft, _copy_one_thread),
                             name="dckpt-deferred-copy", daemon=True).start()

    def _copy_leaves(self, take, copy) -> None:
        while True:
            with self._lock:
                if not self._todo:
                    return
                i = take(self._todo)
            try:
                copy(self.leaves[i].value, self.sources[i].value)
            except BaseException as e:  # handed to the worker, which fails the save
                self._copy_error = e
            with self._lock:
                self._left -= 1
                if self._left == 0 or self._copy_error is not None:
                    self.copied.set()  # even on failure: a held step is never stuck

    def wait_copied(self) -> None:
        """On the worker: return when every staged byte is final; raise if a copy failed."""
        self.copied.wait()
        for ev in self._events.values():
            ev.synchronize()
        if self._copy_error is not None:
            raise self._copy_error

    def gate(self) -> None:
        """Before the live tensors of a deferred copy change: the CPU copies are finished
        (helping the background thread), and each CUDA device's current stream waits, on
        the GPU, for its copies."""
        self._copy_leaves(deque.pop, _copy)
        self.copied.wait()
        for dev, ev in self._events.items():
            torch.cuda.current_stream(dev).wait_event(ev)

    def _enqueue_cuda(self, indices: list[int], keep_sources: bool = False) -> dict:
        if not self.arena.pinned:
            raise RuntimeError("CUDA tensors need a pinned staging arena")
        by_dev: dict[torch.device, list[int]] = {}
        for i in indices:
            by_dev.setdefault(self.sources[i].value.device, []).append(i)
        events = {}
        for dev, idx in by_dev.items():
            side = _side_stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for i in idx:
                    src = self.sources[i].value
                    self.leaves[i].value.copy_(src, non_blocking=True)
                    if keep_sources:  # the caller may free it before the copy ran
                        src.record_stream(side)
                ev = torch.cuda.Event()
                ev.record(side)
            events[dev] = ev
        return events


_SIDE_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


def _side_stream(dev: torch.device) -> "torch.cuda.Stream":
    if dev not in _SIDE_STREAMS:
        _SIDE_STREAMS[dev] = torch.cuda.Stream(dev)
    return _SIDE_STREAMS[dev]


def _view(arena: torch.Tensor, offset: int, leaf: Leaf):
    buf = arena[offset: offset + leaf.nbytes]
    v = leaf.value
    if leaf.is_numpy:
        return buf.numpy().view(v.dtype).reshape(v.shape)
    return buf.view(v.dtype).view(v.shape)


def _copy(dst, src) -> None:
    if isinstance(dst, np.ndarray):
        np.copyto(dst, src)
    else:
        dst.copy_(src)


def _copy_one_thread(dst, src) -> None:
    """numpy copies on the calling thread only, with the GIL released."""
    if isinstance(src, torch.Tensor) and not src.is_contiguous():
        dst.copy_(src)
        return
    np.copyto(io.byte_view(dst), io.byte_view(src))

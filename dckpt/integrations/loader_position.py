"""Exact position of accelerate's prepared data loaders, so a resume continues mid-epoch.

accelerate's own save_state stores no position for a plain shuffled loader: `skip_first_batches`
skips the right number of batches, but of a new shuffle order, because the generator the
order was drawn from is not saved. Here each prepared loader gets a small subclass (its
class is swapped in place, so the object the user holds keeps working) that records, when an
epoch's iteration starts, the random states its order is drawn from, and counts the batches
it hands out. On resume it restores those states, re-creates the same order, advances only
the index sampler past the consumed batches (no sample is loaded twice), then puts every
generator back where the checkpoint left it.

Positions are stored in units of the underlying (global) batches, so a checkpoint of a run on
N processes resumes on M processes when split_batches=True, or when without it N/M is whole.
"""
from __future__ import annotations

from typing import Any

import torch

from ..state import rng
from ..state.data import generator_states, set_generator_states

_SUBCLASSES: dict[type, type] = {}
# DataLoaderAdapter hides __class__ behind a read-only property; object's own setter swaps it.
_SET_CLASS = object.__dict__["__class__"].__set__


def _index_sampler(loader):
    """The innermost sampler that draws the order (a RandomSampler when shuffling)."""
    bs = loader.sampler if _is_batch_sampler(loader.sampler) else loader.batch_sampler
    while getattr(bs, "batch_sampler", None) is not None:  # BatchSamplerShard -> BatchSampler
        bs = bs.batch_sampler
    return getattr(bs, "sampler", None)


def _is_batch_sampler(s) -> bool:
    return isinstance(s, torch.utils.data.BatchSampler)


def _units(loader) -> int:
    """Underlying batches per batch this process yields (processes, unless batches are split)."""
    bs = loader.sampler if _is_batch_sampler(loader.sampler) else loader.batch_sampler
    if getattr(bs, "split_batches", True):
        return 1
    return int(getattr(bs, "num_processes", 1))


def _generators(loader) -> dict[str, torch.Generator]:
    gens = {}
    sampler = _index_sampler(loader)
    if getattr(sampler, "generator", None) is not None:
        gens["sampler"] = sampler.generator
    base = loader.base_dataloader
    if base.generator is not None and base.generator is not gens.get("sampler"):
        gens["loader"] = base.generator
    return gens


def _private_states(loader) -> dict[str, bytes]:
    return generator_states(_generators(loader))


def _set_private(loader, states: dict[str, bytes]) -> None:
    gens = _generators(loader)
    if "sampler" in states and "sampler" not in gens:
        # Saved on several processes (accelerate gives the sampler a private generator there),
        # resumed on one (it does not): give the sampler one so the order stays the same.
        sampler = _index_sampler(loader)
        if sampler is not None and hasattr(sampler, "generator"):
            sampler.generator = gens["sampler"] = torch.Generator()
    set_generator_states(gens, states)


class _BaseHook:
    """Stands in for the base DataLoader for one __iter__ call. It builds the real iterator,
    over an index sampler that drops the first `skip` batches when resuming (indices only:
    nothing is loaded), and wraps it to record the random state before each fetch."""

    def __init__(self, owner, real, skip: int, resumed):
        self._owner, self._real, self._skip, self._resumed = owner, real, skip, resumed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def __iter__(self):
        real = self._owner.base_dataloader = self._real  # one shot
        if getattr(real, "_initial_iter_for_state_dict", False):
            # torchdata's StatefulDataLoader builds its next iterator early, whenever its
            # state_dict() is read (accelerate reads it at every batch): build it here instead,
            # at the recorded start of the epoch, so the original and the resumed run agree.
            real._initial_iter_for_state_dict, real._iterator = False, None
        if not self._skip:
            return _Fetches(real.__iter__(), self._owner, None)
        # The index sampler is swapped before the iterator exists, since worker processes
        # prefetch indices as soon as it is built. DataLoader refuses attribute writes after
        # __init__, hence object.__setattr__; the original is put back at once.
        attr = "batch_sampler" if real._auto_collation else "sampler"
        original = getattr(real, attr)
        object.__setattr__(real, attr, _Skip(original, self._skip, self._resumed["skipped"]))
        try:
            it = real.__iter__()
        finally:
            object.__setattr__(real, attr, original)
        return _Fetches(it, self._owner, self._resumed)


class _Skip:
    """Drops the first `skip` batches of indices, then calls `skipped()`. The wrapped sampler
    is iterated exactly when and how the original run iterated it, so its random draws keep
    their order relative to the loader's own (base seed): a sampler that draws in iter()
    (torchdata's) draws there, one that draws on its first next() (torch's) draws there."""

    def __init__(self, batches, skip: int, skipped):
        self.batches, self.skip, self.skipped = batches, skip, skipped

    def __iter__(self):
        return self._rest(iter(self.batches))

    def _rest(self, it):
        for _ in range(self.skip):
            next(it, None)
        self.skipped()
        yield from it

    def __len__(self) -> int:
        return max(len(self.batches) - self.skip, 0)


class _Fetches:
    """The base iterator. accelerate's DataLoaderShard fetches one batch ahead: when a
    checkpoint is taken after batch k-1, batch k was already fetched, and with it any random
    draws the dataset made (augmentations). So the global random state before each fetch is
    recorded, and on resume batch k is fetched from that state; every stream is then put
    back to the checkpoint's (`resumed`, called after the first fetch)."""

    def __init__(self, it, owner, resumed):
        self._it, self._owner, self._resumed = it, owner, resumed

    def __iter__(self):
        return self

    def __next__(self):
        resumed, self._resumed = self._resumed, None
        if resumed is None:
            self._owner._dckpt_fetch_rng = rng.capture()
            return next(self._it)
        self._owner._dckpt_fetch_rng = resumed["fetch_rng"]
        try:
            return next(self._it)  # batch k, from the recorded state (see _Skip, skipped)
        finally:
            resumed["ready"]()


class PositionMixin:
    """Placed in front of the loader's own class; see the module docstring."""

    def _dckpt_init(self) -> None:
        self._dckpt_batches = 0
        self._dckpt_epoch = int(getattr(self, "iteration", 0))
        self._dckpt_start: dict | None = None
        self._dckpt_fetch_rng: dict | None = None
        self._dckpt_running = False
        self._dckpt_pending: dict | None = None

    def __iter__(self):
        pending, self._dckpt_pending = self._dckpt_pending, None
        base = self.base_dataloader
        real = base._real if isinstance(base, _BaseHook) else base
        if pending is not None and pending["batches"] > 0:
            skip, resumed = pending["batches"], self._dckpt_resume(pending)
        else:
            if pending is not None:
                self._dckpt_set_epoch(pending["epoch"])
            self._dckpt_epoch = int(getattr(self, "iteration", 0))
            self._dckpt_batches = 0
            self._dckpt_start = {"global": rng.capture(), **_private_states(self)}
            skip, resumed = 0, None
        self.base_dataloader = _BaseHook(self, real, skip, resumed)
        self._dckpt_running = True
        for batch in super().__iter__():
            self._dckpt_batches += 1
            yield batch
        self._dckpt_running = False
        self._dckpt_epoch += 1
        self._dckpt_batches = 0

    def _dckpt_set_epoch(self, epoch: int) -> None:
        if hasattr(self, "iteration"):
            self.iteration = epoch

    def _dckpt_resume(self, pending: dict) -> dict:
        """Go back to the start of the checkpoint's epoch, so the same order is drawn."""
        epoch, batches = pending["epoch"], pending["batches"]
        self._dckpt_set_epoch(epoch)
        self._dckpt_epoch, self._dckpt_batches = epoch, batches
        self._dckpt_start = start = pending["epoch_start"]
        now = rng.capture()  # the checkpoint's streams, restored by load_state
        rng.restore(start["global"])
        _set_private(self, {k: v for k, v in start.items() if k != "global"})

        def skipped():  # the order is drawn: batch k is fetched next
            if pending.get("fetch_rng") is not None:
                rng.restore(pending["fetch_rng"])

        def ready():  # batch k is fetched: the streams continue from the checkpoint
            _set_private(self, pending["current"])
            rng.restore(now)

        return {"fetch_rng": pending.get("fetch_rng"), "skipped": skipped, "ready": ready}

    # ---- position as a state dict --------------------------------------------------------
    def dckpt_position(self) -> dict:
        units = _units(self)
        current = _private_states(self)
        batches, epoch = self._dckpt_batches, self._dckpt_epoch
        if not self._dckpt_running:
            epoch, batches = int(getattr(self, "iteration", epoch)), 0
        else:
            try:
                if batches >= len(self):  # the epoch is complete: resume at the next one
                    epoch, batches = epoch + 1, 0
            except TypeError:
                pass
        out = {"epoch": epoch, "batches": batches * units, "current": current}
        if batches:
            out["epoch_start"] = self._dckpt_start
            out["fetch_rng"] = self._dckpt_fetch_rng
        return out

    def dckpt_load_position(self, state: dict) -> None:
        units = _units(self)
        if state["batches"] % units:
            raise ValueError(f"the checkpoint's data position ({state['batches']} batches) "
                             f"does not fall on a batch of this loader ({units} per batch); "
                             "use split_batches=True to change the number of processes")
        pending = dict(state, batches=state["batches"] // units)
        _set_private(self, state["current"])
        self._dckpt_set_epoch(state["epoch"])
        self._dckpt_epoch, self._dckpt_batches = state["epoch"], 0
        self._dckpt_running = False
        self._dckpt_pending = pending

    def dckpt_pending_batches(self) -> int | None:
        return self._dckpt_pending["batches"] if self._dckpt_pending else None


def track_position(loader):
    """Make a prepared loader (an accelerate DataLoaderAdapter) record its position, in place.
    Returns the same object."""
    if isinstance(loader, PositionMixin):
        return loader
    if not hasattr(loader, "base_dataloader"):
        raise TypeError(f"{type(loader).__name__} is not a data loader prepared by accelerate")
    cls = type(loader)
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        sub = _SUBCLASSES[cls] = type(cls.__name__, (PositionMixin, cls),
                                      {"__module__": __name__, "__reduce__": cls.__reduce__})
    _SET_CLASS(loader, sub)
    loader._dckpt_init()
    return loader


class LoaderState:
    """The position of a tracked loader as a checkpoint component (state_dict protocol)."""

    def __init__(self, loader):
        self.loader = track_position(loader)

    def state_dict(self) -> dict:
        return self.loader.dckpt_position()

    def load_state_dict(self, state: dict) -> None:
        self.loader.dckpt_load_position(state)

"""Data position: resume a shuffled DataLoader at the exact next batch.

A torch DataLoader draws its shuffle order from a random generator when an epoch's iterator
starts. `ResumableLoader` records the generators' states at that moment and counts the
batches handed out; on resume it re-creates the same order and skips the consumed batches
by advancing the index sampler only (no sample is loaded twice), then puts the generators
back where the checkpoint left them.
"""
from __future__ import annotations

import random
from typing import Any, Sequence

import torch


def _generators(loader) -> dict[str, torch.Generator]:
    gens = {}
    if getattr(loader, "generator", None) is not None:
        gens["loader"] = loader.generator
    sampler_gen = getattr(getattr(loader, "sampler", None), "generator", None)
    if sampler_gen is not None and sampler_gen is not gens.get("loader"):
        gens["sampler"] = sampler_gen
    return gens


def _get_states(loader) -> dict[str, bytes]:
    states = {"global": torch.get_rng_state().numpy().tobytes()}
    for k, g in _generators(loader).items():
        states[k] = g.get_state().numpy().tobytes()
    return states


def _set_states(loader, states: dict[str, bytes]) -> None:
    def as_tensor(b: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(b), dtype=torch.uint8)
    torch.set_rng_state(as_tensor(states["global"]))
    for k, g in _generators(loader).items():
        if k in states:
            g.set_state(as_tensor(states[k]))


class ResumableLoader:
    """Wraps a map-style DataLoader; iterate it as the loader itself, one epoch per iter().

    state_dict(): epoch, batches consumed in the current epoch, generator states at the start
    of the epoch and now. A DistributedSampler's set_epoch() is called for you.
    """

    def __init__(self, loader: torch.utils.data.DataLoader):
        if getattr(loader, "num_workers", 0) and loader.persistent_workers:
            raise ValueError("persistent workers keep their own state; use workers that "
                             "restart with each epoch")
        self.loader = loader
        self.epoch = 0
        self.batches = 0
        self._epoch_start: dict[str, bytes] | None = None
        self._pending: dict | None = None
        self._active = False

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self):
        sampler = getattr(self.loader, "sampler", None)
        if self._pending is not None:
            st, self._pending = self._pending, None
            self.epoch, self.batches = st["epoch"], st["batches"]
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.epoch)
            now = _get_states(self.loader)
            _set_states(self.loader, st["epoch_start"])
            self._epoch_start = st["epoch_start"]
            it = iter(self.loader)
            for _ in range(self.batches):  # advance indices only: no sample is loaded
                next(it._sampler_iter)
            # Private generators continue from the checkpoint; the global stream is left
            # as it was before iter() (the manager restores it from the RNG component).
            _set_states(self.loader, {**st["current"], "global": now["global"]})
        else:
            if self._active or self.batches:
                self.epoch += 1
            self.batches = 0
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.epoch)
            self._epoch_start = _get_states(self.loader)
            it = iter(self.loader)
        self._active = True
        for batch in it:
            self.batches += 1
            yield batch
        self._active = False
        self.epoch += 1
        self.batches = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches,
                "epoch_start": self._epoch_start or _get_states(self.loader),
                "current": _get_states(self.loader)}

    def load_state_dict(self, state: dict) -> None:
        self._pending = dict(state)
        self.epoch, self.batches = state["epoch"], state["batches"]
        self._active = False


def deterministic_split(items: Sequence | int, fractions: Sequence[float] = (0.9, 0.1),
                        seed: int = 0) -> list[list]:
    """Split items (or range(n)) by fractions with a private seeded shuffle.

    The same on every run and resume, whatever the global random state."""
    pool = list(range(items)) if isinstance(items, int) else list(items)
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions {fractions} must be non-negative and sum to 1")
    random.Random(seed).shuffle(pool)
    out, start = [], 0
    for i, f in enumerate(fractions):
        end = len(pool) if i == len(fractions) - 1 else start + round(f * len(pool))
        out.append(pool[start:end])
        start = end
    return out

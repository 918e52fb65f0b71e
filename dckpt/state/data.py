"""Data position: resume a shuffled DataLoader at the exact next batch.

A torch DataLoader draws its shuffle order from a random generator when an epoch's iterator
starts. `ResumableLoader` records the generators' states at that moment and counts the
batches handed out; on resume it re-creates the same order and skips the consumed batches
by advancing the index sampler only (no sample is loaded twice), then puts the generators
back where the checkpoint left them.

`ResumableDistributedSampler` is a drop-in DistributedSampler that records the *global*
position in the epoch's order, so a job resumed on a different number of ranks continues
the epoch with no sample skipped or repeated.
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


# The generator-state helpers of every data-position tracker (ResumableLoader here, the
# accelerate loaders' in integrations/loader_position.py): each finds its own generators.
def generator_states(gens: dict[str, torch.Generator]) -> dict[str, bytes]:
    """Each named generator's state, as bytes (what the safe tree stores)."""
    return {k: g.get_state().numpy().tobytes() for k, g in gens.items()}


def set_generator_states(gens: dict[str, torch.Generator], states: dict[str, bytes]) -> None:
    """Put back the saved states of the named generators that have one."""
    for k, g in gens.items():
        if k in states:
            g.set_state(state_tensor(states[k]))


def state_tensor(b: bytes) -> torch.Tensor:
    """A generator state (bytes) as the uint8 tensor torch takes."""
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def _get_states(loader) -> dict[str, bytes]:
    return {"global": torch.get_rng_state().numpy().tobytes(),
            **generator_states(_generators(loader))}


def _set_states(loader, states: dict[str, bytes]) -> None:
    torch.set_rng_state(state_tensor(states["global"]))
    set_generator_states(_generators(loader), states)


class ResumableLoader:
    """Wraps a map-style DataLoader; iterate it as the loader itself, one epoch per iter().

    state_dict(): epoch, batches consumed in the current epoch, generator states at the start
    of the epoch and now. A DistributedSampler's set_epoch() is called for you.
    """

    __module__ = "dckpt.data"  # the type name checkpoints record: stable across moves (and the public path)

    def __init__(self, loader: torch.utils.data.DataLoader):
        if getattr(loader, "num_workers", 0) and loader.persistent_workers:
            raise ValueError("persistent workers keep their own state; use workers that "
                             "restart with each epoch")
        self.loader = loader
        self.epoch = 0
        self.batches = 0
        self._base = 0  # batches already counted when the current iteration began (resume)
        self._epoch_start: dict[str, bytes] | None = None
        self._pending: dict | None = None
        self._active = False

    def __len__(self) -> int:
        """Samples this rank gets in the next iteration (a resumed one: the rest's share)."""
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
            if isinstance(sampler, ResumableDistributedSampler):
                self._base = self.batches  # the sampler itself starts at its saved position
            else:
                for _ in range(self.batches):  # advance indices only: no sample is loaded
                    next(it._sampler_iter)
            # Private generators continue from the checkpoint; the global stream is left
            # as it was before iter() (the manager restores it from the RNG component).
            _set_states(self.loader, {**st["current"], "global": now["global"]})
        else:
            if self._active or self.batches:
                self.epoch += 1
            self.batches = self._base = 0
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
        self.batches = self._base = 0

    def state_dict(self) -> dict:
        out = {"epoch": self.epoch, "batches": self.batches,
               "epoch_start": self._epoch_start or _get_states(self.loader),
               "current": _get_states(self.loader)}
        sampler = getattr(self.loader, "sampler", None)
        if isinstance(sampler, ResumableDistributedSampler):
            # Count what training consumed, not what worker prefetching pulled from the sampler.
            taken = (self.batches - self._base) * (self.loader.batch_size or 1)
            out["sampler"] = sampler.state_dict(taken if self._active else None)
        return out

    def load_state_dict(self, state: dict) -> None:
        self._pending = dict(state)
        self.epoch, self.batches = state["epoch"], state["batches"]
        self._active = False
        sampler = getattr(self.loader, "sampler", None)
        if "sampler" in state and isinstance(sampler, ResumableDistributedSampler):
            sampler.load_state_dict(state["sampler"])


class ResumableDistributedSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that resumes mid-epoch, on the same or another number of ranks.

    An epoch's global order is the permutation DistributedSampler draws (seed + epoch); rank
    r of W takes positions r, r + W, r + 2W, ... of it, so once every rank has drawn k
    samples the first k * W positions are consumed. state_dict() records that global
    position; after load_state_dict() on M ranks the rest of the order is dealt out the same
    way over M ranks, so no sample of the epoch is skipped or drawn twice (apart from the
    usual DistributedSampler padding of the last round so all ranks get equal shares).
    Call set_epoch() as with DistributedSampler; calling it with the resumed epoch keeps the
    resume position. Inside a ResumableLoader the position counts the batches training
    received, so worker prefetching does not move it.
    """

    __module__ = "dckpt.data"  # the type name checkpoints record: stable across moves (and the public path)

    def __init__(self, dataset, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        super().__init__(dataset, num_replicas, rank, shuffle, seed, drop_last)
        self._resume_at = 0  # global position the next iteration starts from
        self._start = 0  # global position the current iteration started from
        self._yielded = 0  # samples this rank handed out in the current iteration

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.dataset)))
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.dataset), generator=g).tolist()

    def _rest(self, start: int) -> list[int]:
        """The epoch's order from `start`, cut or padded to a multiple of the world size."""
        rest = self._order()[start:]
        n = len(rest)
        if self.drop_last:
            return rest[: n - n % self.num_replicas]
        pad = -n % self.num_replicas
        while pad > 0 and rest:
            rest += rest[:pad]
            pad = -len(rest) % self.num_replicas
        return rest

    def __iter__(self):
        self._start, self._resume_at, self._yielded = self._resume_at, 0, 0
        for i in self._rest(self._start)[self.rank::self.num_replicas]:
            self._yielded += 1
            yield i

    def __len__(self) -> int:
        """Samples this rank gets in the next iteration (a resumed one: the rest's share)."""
        return len(self._rest(self._resume_at)) // self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._resume_at = 0
        super().set_epoch(epoch)

    def position(self, taken: int | None = None) -> int:
        """Global position in the epoch's order once every rank took `taken` samples of the
        current iteration (default: as many as this rank handed out)."""
        taken = self._yielded if taken is None else taken
        if self._resume_at:  # loaded, not iterated yet
            return self._resume_at
        return min(self._start + taken * self.num_replicas, len(self.dataset))

    def state_dict(self, taken: int | None = None) -> dict:
        return {"epoch": self.epoch, "position": self.position(taken), "seed": self.seed,
                "shuffle": self.shuffle, "size": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != len(self.dataset) or state["shuffle"] != self.shuffle or \
                state["seed"] != self.seed:
            raise ValueError(
                f"sampler state is for {state['size']} samples, shuffle={state['shuffle']}, "
                f"seed={state['seed']}; this sampler has {len(self.dataset)}, "
                f"shuffle={self.shuffle}, seed={self.seed}")
        self.epoch = state["epoch"]
        self._resume_at = self._start = state["position"]
        self._yielded = 0


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

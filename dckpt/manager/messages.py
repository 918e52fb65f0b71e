"""What the ranks of a CheckpointManager tell each other: one frozen dataclass per exchange.

Each is made on the rank that knows it, becomes JSON (to_json) only as it goes through
dist.exchange / all_gather_json, and is read back with `of` on every rank, so the fields of
a message are named in one place instead of by position at both ends. The exchanges, in
the order a call makes them:

- save (`CheckpointManager._persist`): "lock", rank 0's SaveDecision taken under the root
  lock; then the save protocol's own exchanges (engine/checkpoint.py); then "retention".
- restore: "step", every rank's StepRequest (rank 0 also lists the committed steps); then
  per attempt "restore of <path>", every rank's RestoreHit (None where it restored).
- gc: rank 0's GcReport, which gc() returns as JSON (its public form).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SaveDecision:
    """Rank 0's decision under the root lock before a save writes: the checkpoint the save
    shares unchanged chunks with (a directory name under the root, or None), why the save
    is full although incremental (or None), the best checkpoint by the retention metric
    with this one counted (the manifest's counters["best"]), and the newest committed step."""
    base: str | None
    full_note: str | None
    best: dict | None
    newest: int | None

    def to_json(self) -> dict:
        return {"base": self.base, "full_note": self.full_note, "best": self.best,
                "newest": self.newest}

    @classmethod
    def of(cls, v: "SaveDecision | dict") -> "SaveDecision":
        if isinstance(v, SaveDecision):
            return v
        return cls(v["base"], v["full_note"], v["best"], v["newest"])


@dataclass(frozen=True)
class StepRequest:
    """A rank's restore request: the step it asks for (None: the newest), and on rank 0 the
    [step, tier] pairs to try in order (newest first, of each the local copy then the
    remote one; None elsewhere)."""
    step: int | None
    listed: list[list] | None

    def to_json(self) -> dict:
        return {"step": self.step, "listed": self.listed}

    @classmethod
    def of(cls, v: "StepRequest | dict") -> "StepRequest":
        if isinstance(v, StepRequest):
            return v
        return cls(v["step"], v["listed"])


@dataclass(frozen=True)
class RestoreHit:
    """Why a rank's restore attempt failed: the error as text, whether it shows the
    checkpoint damaged (so every rank may fall back to an older step), and whether the
    attempt had already written into the live state."""
    error: str
    damaged: bool
    live_state_changed: bool

    def to_json(self) -> dict:
        return {"error": self.error, "damaged": self.damaged,
                "live_state_changed": self.live_state_changed}

    @classmethod
    def of(cls, v: "RestoreHit | dict | None") -> "RestoreHit | None":
        if v is None or isinstance(v, RestoreHit):
            return v
        return cls(v["error"], v["damaged"], v["live_state_changed"])


@dataclass(frozen=True)
class GcReport:
    """What gc removed (or, dry, would remove): the steps retention dropped, the staging
    leftovers, the steps retention would drop but left because they are symbolic links,
    and the bytes freed."""
    removed_steps: list[int]
    removed_temporaries: list[str]
    kept_links: list[int]
    freed_bytes: int
    dry_run: bool

    def to_json(self) -> dict:
        return {"removed_steps": self.removed_steps,
                "removed_temporaries": self.removed_temporaries,
                "kept_links": self.kept_links, "freed_bytes": self.freed_bytes,
                "dry_run": self.dry_run}

"""The verification report: checks with a level, grouped, and an overall status.

The JSON form is a stable schema (`SCHEMA`): every object of a kind always carries the same
keys, absent values are null, so scripts can rely on them. docs/CLI.md documents it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

SCHEMA = "dckpt.verify/1"

PASS, WARNING, ERROR = "pass", "warning", "error"
LEVELS = (PASS, WARNING, ERROR)

# Check groups in report order, with their titles.
GROUPS = {
    "root": "manager root",
    "structure": "structure",
    "files": "data files",
    "checksums": "checksums",
    "metadata": "metadata consistency",
    "training": "training-state consistency",
    "completeness": "completeness",
}

COMPLETE, PARTIAL, INCOMPLETE = "COMPLETE", "PARTIAL", "INCOMPLETE"


@dataclass
class Location:
    """Where a problem is: as much of file / rank / tensor / shard / chunk / offset as known."""
    file: str | None = None
    rank: int | None = None
    tensor: str | None = None
    shard: int | None = None
    chunk: int | None = None
    offset: int | None = None

    def to_json(self) -> dict:
        return {"file": self.file, "rank": self.rank, "tensor": self.tensor,
                "shard": self.shard, "chunk": self.chunk, "offset": self.offset}

    def describe(self) -> str:
        parts = []
        if self.tensor is not None:
            parts.append(f"tensor '{self.tensor}'")
        if self.shard:
            parts.append(f"shard {self.shard}")
        if self.chunk is not None:
            parts.append(f"chunk {self.chunk}")
        if self.file is not None:
            parts.append(f"in {self.file}")
        if self.offset is not None:
            parts.append(f"at offset {self.offset}")
        return " ".join(parts)


@dataclass
class Check:
    group: str
    id: str  # stable identifier, e.g. "files.present"; docs/CLI.md lists them
    level: str
    message: str
    location: Location | None = None

    def to_json(self) -> dict:
        return {"group": self.group, "id": self.id, "level": self.level,
                "message": self.message,
                "location": self.location.to_json() if self.location else None}


def summarize(checks: list[Check]) -> dict:
    return {"passed": sum(c.level == PASS for c in checks),
            "warnings": sum(c.level == WARNING for c in checks),
            "errors": sum(c.level == ERROR for c in checks)}


def is_ok(checks: list[Check], strict: bool) -> bool:
    bad = (WARNING, ERROR) if strict else (ERROR,)
    return not any(c.level in bad for c in checks)


@dataclass
class RankCompleteness:
    rank: int
    components: dict[str, str]  # key -> kind
    rng_streams: list[str]
    missing: list[str]  # training parts not found (model, optimizer, scheduler, rng, data)

    def to_json(self) -> dict:
        return {"rank": self.rank, "components": self.components,
                "rng_streams": self.rng_streams, "missing": self.missing}


@dataclass
class CheckpointReport:
    path: str
    step: int | None = None
    checks: list[Check] = field(default_factory=list)
    ranks: list[RankCompleteness] = field(default_factory=list)
    stats: dict = field(default_factory=lambda: {
        "tensors": 0, "files": 0, "chunks": 0, "chunks_checked": 0, "bytes_checked": 0,
        "seconds": 0.0})

    def add(self, group: str, id_: str, level: str, message: str,
            location: Location | None = None) -> Check:
        c = Check(group, id_, level, message, location)
        self.checks.append(c)
        return c

    @property
    def status(self) -> str:
        """INCOMPLETE: damaged or no model; PARTIAL: resumable but a training part is
        missing (optimizer, scheduler, RNG streams, data position); COMPLETE otherwise."""
        if any(c.level == ERROR for c in self.checks) or not self.ranks:
            return INCOMPLETE
        if any("model" in r.missing for r in self.ranks):
            return INCOMPLETE
        if any(r.missing for r in self.ranks):
            return PARTIAL
        return COMPLETE

    def ok(self, strict: bool) -> bool:
        return is_ok(self.checks, strict)

    def to_json(self, strict: bool) -> dict:
        return {"path": self.path, "step": self.step, "status": self.status,
                "ok": self.ok(strict), "summary": summarize(self.checks),
                "checks": [c.to_json() for c in self.checks],
                "ranks": [r.to_json() for r in self.ranks], "stats": dict(self.stats)}


@dataclass
class Report:
    """What `verify` found under one path: a checkpoint, or a manager root's checkpoints."""
    path: str
    kind: str  # "checkpoint" | "root"
    deep: bool = False
    strict: bool = False
    checks: list[Check] = field(default_factory=list)  # root-level checks
    checkpoints: list[CheckpointReport] = field(default_factory=list)
    latest: int | None = None  # the step a resume would use (roots)

    def all_checks(self) -> list[Check]:
        return [*self.checks, *(c for r in self.checkpoints for c in r.checks)]

    @property
    def ok(self) -> bool:
        return is_ok(self.checks, self.strict) and all(
            r.ok(self.strict) for r in self.checkpoints) and bool(self.checkpoints)

    @property
    def status(self) -> str:
        """The status of the checkpoint a resume would use (the newest, for a root)."""
        if not self.checkpoints:
            return INCOMPLETE
        chosen = [r for r in self.checkpoints if r.step == self.latest] or self.checkpoints[-1:]
        return chosen[0].status

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "path": self.path, "kind": self.kind, "deep": self.deep,
                "strict": self.strict, "ok": self.ok, "status": self.status,
                "latest": self.latest, "summary": summarize(self.all_checks()),
                "checks": [c.to_json() for c in self.checks],
                "checkpoints": [r.to_json(self.strict) for r in self.checkpoints]}

"""Which committed checkpoints to keep. A small policy object, decided from manifests alone."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Retention:
    """keep_last: newest N; keep_best: best K by `metric` (`mode` "min" or "max");
    keep_every: steps divisible by K. None/0 disables a rule; all None keeps everything.
    The newest checkpoint and the best ones are never deleted."""
    keep_last: int | None = None
    keep_best: int = 0
    metric: str | None = None
    mode: str = "min"
    keep_every: int | None = None

    def __post_init__(self):
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', not {self.mode!r}")
        if self.keep_best and not self.metric:
            raise ValueError("keep_best needs the name of a metric")
        for name in ("keep_last", "keep_best", "keep_every"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f"{name} must be a non-negative integer")

    @property
    def keeps_all(self) -> bool:
        """No policy set: every checkpoint is kept."""
        return not self.keep_last and not self.keep_best and not self.keep_every

    def best(self, metrics: dict[int, dict], k: int) -> list[int]:
        """The k best steps by the metric (ties: the newer wins)."""
        scored = []
        for step, m in metrics.items():
            v = m.get(self.metric) if self.metric else None
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                scored.append((v if self.mode == "min" else -v, -step, step))
        return [s for _, _, s in sorted(scored)[:k]]

    def reasons(self, metrics: dict[int, dict]) -> dict[int, list[str]]:
        """step -> why it is kept (empty list: to delete). `metrics` maps every committed step."""
        steps = sorted(metrics)
        why: dict[int, list[str]] = {s: [] for s in steps}
        if not steps:
            return why
        if self.keeps_all:
            for s in steps:
                why[s].append("keep all")
            return why
        why[steps[-1]].append("newest")
        if self.keep_last:
            for s in steps[-self.keep_last:]:
                why[s].append(f"last {self.keep_last}")
        if self.metric:
            for s in self.best(metrics, max(self.keep_best, 1)):
                why[s].append(f"best {self.metric}")
        if self.keep_every:
            for s in steps:
                if s % self.keep_every == 0:
                    why[s].append(f"every {self.keep_every}")
        return why

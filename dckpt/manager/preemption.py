"""Checkpoint on preemption: a signal (SIGTERM, SLURM's SIGUSR1) becomes one save at a step
every rank agrees on, then a clean exit.

    mgr = dckpt.CheckpointManager("runs/exp1", save_on=signal.SIGTERM)
    for step in range(start, steps):
        train_step()
        mgr.save_if_preempted(step, state)     # one line: saves, commits, exits when signalled

How ranks agree without a collective per step. The signal handler only sets a flag (Python
runs it between bytecodes on the main thread; it never interrupts a save). At the next step
boundary the rank that saw the flag posts a target step, its own step + `margin`, in the
process group's key-value store; the first rank to post wins (compare-and-set), so every
rank reads the same target. Each boundary, every rank looks the key up (one store lookup,
about a loopback round trip, and no collective over the backend); the rank whose step
reaches the target saves it with the others. That needs every rank to reach boundary
`target` only after the target was posted: true when ranks are at most `margin - 1` steps
apart, which synchronous data parallel training (DDP, FSDP, ZeRO: a collective in every
step) guarantees for margin 2. A rank found past the target raises PreemptionError (on
every rank, through the save the others wait in) instead of saving a different step.

Exit code: 128 + the signal number by default (143 for SIGTERM, 138 for SIGUSR1), the code a
shell reports for a process that signal ended, so a scheduler treats the job as preempted;
`exit_code=` sets another. A second signal during the save only sets the flag again: the
save commits atomically or not at all either way (a SIGKILL after the launcher's grace period,
30 s for torchrun, leaves the previous checkpoint as it was).
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Iterable

from ..distributed import collective as dist
from ..errors import InvalidArgumentError, PreemptionError

log = logging.getLogger("dckpt")

DEFAULT_MARGIN = 2


class Preemption:
    """Signals that ask for a checkpoint and an exit; see the module docstring.

    signals: one signal or several; margin: steps between the boundary where a rank first
    sees a signal and the step every rank saves (>= 1); exit_code: the process's exit status
    after the save (default 128 + signal number); grace: seconds the scheduler gives between
    the signal and the kill: a save that took longer is warned about (at start, from the
    newest checkpoint, and after each save)."""

    def __init__(self, signals: int | Iterable[int] = signal.SIGTERM, *,
                 margin: int = DEFAULT_MARGIN, exit_code: int | None = None,
                 grace: float | None = None):
        sigs = [signals] if isinstance(signals, int) else list(signals)
        if not sigs or not all(isinstance(s, int) for s in sigs):
            raise InvalidArgumentError(f"save_on: expected signal numbers, not {signals!r}")
        if not isinstance(margin, int) or margin < 1:
            raise InvalidArgumentError(f"margin must be a positive int, not {margin!r}")
        self.signals = [signal.Signals(s) for s in sigs]
        self.margin, self.exit_code, self.grace = margin, exit_code, grace
        self.received: list[int] = []  # appended by the handler: one list op, signal-safe
        self.target: int | None = None
        self.agreed_signal: int | None = None  # the signal of the rank that posted the target
        self.group = None
        self._key = "dckpt/preempt"
        self._previous: dict = {}

    @classmethod
    def of(cls, save_on) -> "Preemption":
        """A Preemption from save_on=: itself, a signal or a list of signals."""
        return save_on if isinstance(save_on, Preemption) else cls(save_on)

    def install(self, group=None) -> None:
        """Set the handlers (main thread only: Python delivers signals there)."""
        if threading.current_thread() is not threading.main_thread():
            raise InvalidArgumentError("save_on= needs the manager to be created on the main "
                                       "thread: Python runs signal handlers only there")
        self.group = group
        self._key = f"dckpt/preempt/{dist._group_key(group)}" if dist.active(group) else ""
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handler)

    def uninstall(self) -> None:
        """Put the previous handlers back."""
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _handler(self, signum, frame) -> None:
        # Only a flag: the training step (or a save) in progress runs on undisturbed.
        self.received.append(signum)

    @property
    def signalled(self) -> int | None:
        """The first signal this process received, or None."""
        return self.received[0] if self.received else None

    @property
    def code(self) -> int:
        """The exit status after the preemption save."""
        if self.exit_code is not None:
            return self.exit_code
        return 128 + int(self.agreed_signal or self.signalled or self.signals[0])

    def due(self, step: int) -> bool:
        """True at the step every rank saves (called at every step boundary, by every rank,
        with the same step numbers)."""
        if self.target is None:
            self.target = self._find_target(step)
        if self.target is None or step < self.target:
            return False
        if step > self.target:
            # Raised inside an operation so a peer waiting in the save learns it at once.
            with dist.operation(self.group):
                raise PreemptionError(
                    f"a preemption save was agreed for step {self.target}, but this rank "
                    f"(rank {dist.rank(self.group)}) is already at step {step}: ranks were "
                    f"more than {self.margin - 1} step(s) apart. Pass a larger margin "
                    "(Preemption(margin=...)) or check the step numbers every rank passes",
                    self.target, step)
        return True

    def _find_target(self, step: int) -> int | None:
        if not dist.active(self.group):
            if not self.received:
                return None
            self.agreed_signal = self.received[0]
            return step
        store = dist._store()
        if self.received:
            # compare_set: the first rank to post wins; everyone reads the winner's value.
            posted = store.compare_set(self._key, "", f"{step + self.margin} {self.received[0]}")
        elif store.check([self._key]):
            posted = store.get(self._key)
        else:
            return None
        target, self.agreed_signal = (int(v) for v in posted.split())
        log.warning("dckpt: rank %d: signal %s received by a rank; checkpoint at step %d, "
                    "then exit", dist.rank(self.group),
                    signal.Signals(self.agreed_signal).name, target)
        return target

    def check_grace(self, seconds: float | None, what: str) -> None:
        """Warn when a save took longer than the grace period."""
        if self.grace is not None and seconds is not None and seconds > self.grace:
            log.warning("dckpt: %s took %.1f s, longer than the %.1f s grace period of "
                        "save_on: a preemption save would be killed before it commits. Save "
                        "less (incremental=True, async_save) or ask the scheduler for a longer "
                        "grace period", what, seconds, self.grace)

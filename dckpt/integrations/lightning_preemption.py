"""Checkpoint on preemption for Lightning: a signal becomes one committed checkpoint of the
step in progress, at an optimizer step every rank agrees on, then an exit.

    from dckpt.integrations.lightning import DckptCheckpointIO, PreemptionCheckpoint
    trainer = L.Trainer(..., plugins=[DckptCheckpointIO()],
                        callbacks=[ModelCheckpoint(save_last=True),
                                   PreemptionCheckpoint(save_on=signal.SIGTERM)])
    trainer.fit(model, ckpt_path="last")

A Callback, not an argument of the plugin: a CheckpointIO is called only when Lightning
saves or loads, has no handle on the Trainer, and so never sees a step boundary.

The agreement is dckpt/manager/preemption.py's: the handler only sets a flag; at each
optimizer step's end (on_train_batch_end after the step) every rank looks up one key in
the process group's store, no collective; the rank that saw the signal posts "save at step
S + margin" there. At the agreed step every rank calls trainer.save_checkpoint (Lightning's
own checkpoint dict, loops and callbacks included; rank 0 writes it through the dckpt
plugin and commits), waits for an async plugin's commit, and raises SystemExit(128 +
signal), through Lightning's exception path (on_exception hooks, teardown). An agreed step
that ends an epoch is saved one step later, inside the next epoch (why: on_train_batch_end);
when training ends first, nothing is saved and fit returns.

Where: `last.ckpt` in the first ModelCheckpoint's directory (the name it gives its last
checkpoint), so that fit(ckpt_path="last"), which takes the newest last*.ckpt there, resumes
from it; or dirpath=/filename= (then resume with ckpt_path=that path).

Lightning's own SIGTERM handling (its SignalConnector) is replaced, not chained, for the
signals given, from the start of the sanity check or of training until training ends:
Lightning's handler broadcasts a tensor from inside the signal handler (a collective that
can interleave with DDP's) and makes the loops raise SIGTERMException at the next batch,
which ends the process with status 0 and no checkpoint. So trainer.received_sigterm stays
False while this callback holds the signal; Lightning's handlers come back when fit ends.

Exactness mid-epoch needs a data loader Lightning can resume (state_dict/load_state_dict:
torchdata's StatefulDataLoader, dckpt.data.ResumableLoader), and the RNG streams restored
after the resumed run made its data iterator (which draws from the global generator): the
plugin keeps a mid-epoch checkpoint's streams and this callback restores them just before
the first batch.
"""
from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO

from ..errors import InvalidArgumentError
from ..manager.preemption import Preemption
from ..state import rng
from .lightning import DckptCheckpointIO, save_seconds

log = logging.getLogger("dckpt")


class PreemptionCheckpoint(Callback):
    """save_on: a signal, signals or a dckpt.Preemption(signals, margin=2, exit_code=None,
    grace=None); dirpath/filename: where the checkpoint goes (default: last.ckpt in the
    first ModelCheckpoint's directory). Needs DckptCheckpointIO (or its async variant) as
    the Trainer's plugin."""

    def __init__(self, save_on=signal.SIGTERM, *, dirpath: str | os.PathLike | None = None,
                 filename: str | None = None):
        self.preemption = Preemption.of(save_on)
        self.dirpath, self.filename = dirpath, filename
        self._io: DckptCheckpointIO | None = None
        self._installed = False
        self._last_step = -1
        self._postponed = False  # the agreed step was an epoch's last: save at the next

    # ---- set up ----------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        io = trainer.strategy.checkpoint_io
        inner = io.checkpoint_io if isinstance(io, AsyncCheckpointIO) else io
        if not isinstance(inner, DckptCheckpointIO):
            raise InvalidArgumentError(
                f"PreemptionCheckpoint needs the dckpt plugin, found {type(io).__name__}: "
                "L.Trainer(plugins=[DckptCheckpointIO()], ...) (a preemption save must "
                "commit atomically)")
        self._io = inner
        inner.preemption, inner.defer_rng = self.preemption, True
        # Last among the callbacks, as Lightning orders its own checkpoint callbacks: the
        # save must see what every other callback changed at the end of the batch. A new
        # list: Lightning is iterating the current one to call setup.
        trainer.callbacks = [c for c in trainer.callbacks if c is not self] + [self]

    def path(self, trainer) -> Path:
        """Where the preemption checkpoint is written."""
        if self.dirpath is not None:
            return Path(self.dirpath) / f"{self.filename or 'last'}.ckpt"
        mc = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)),
                  None)
        if mc is None or mc.dirpath is None:
            raise InvalidArgumentError(
                "PreemptionCheckpoint: no ModelCheckpoint to put last.ckpt beside; pass "
                "dirpath= (and resume with fit(ckpt_path=<that file>))")
        name = self.filename or mc.CHECKPOINT_NAME_LAST
        return Path(mc.dirpath) / f"{name}{mc.FILE_EXTENSION}"

    def _take_signals(self, trainer) -> None:
        # After Lightning's SignalConnector registered its handlers (they are replaced for
        # these signals, see the module docstring) and on the main thread.
        if self._installed:
            return
        self.preemption.install()
        self._installed = True
        self._last_step = trainer.global_step
        if trainer.is_global_zero and self.preemption.grace is not None:
            newest = trainer.ckpt_path or self.path(trainer)
            if Path(newest).is_dir():
                self.preemption.check_grace(save_seconds(newest), f"the save of {newest}")

    def _give_back(self) -> None:
        if self._installed:
            self.preemption.uninstall()
            self._installed = False

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._take_signals(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        self._take_signals(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._give_back()

    # ---- each batch ------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        io = self._io
        if io is not None and io.pending_rng is not None:
            streams, io.pending_rng = io.pending_rng, None
            rng.restore(streams)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step:  # accumulating: no optimizer step, no boundary
            return
        self._last_step = step
        if not (self._postponed or self.preemption.due(step)):
            return
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            # An epoch's last step (the same on every rank): saved one step later, inside
            # the next epoch. A checkpoint here would be resumed into the next epoch with
            # the RNG streams restored before the loader is rebuilt, and building a loader
            # may draw from the global generator (StatefulDataLoader's sampler seed):
            # inside an epoch the streams wait for the first batch, which is exact.
            self._postponed = True
            return
        self._save_and_exit(trainer, step)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._postponed or self.preemption.target is not None or \
                self.preemption.signalled is not None:
            log.warning("dckpt: training ended at step %d, before the preemption checkpoint "
                        "was due: nothing to save", trainer.global_step)
        self._give_back()

    def _save_and_exit(self, trainer, step: int) -> None:
        path = self.path(trainer)
        trainer.save_checkpoint(path)
        io = trainer.strategy.checkpoint_io
        if trainer.is_global_zero and isinstance(io, AsyncCheckpointIO):
            io.teardown()  # waits for the commit; raises its failure
        trainer.strategy.barrier("dckpt preemption checkpoint")
        code = self.preemption.code
        log.warning("dckpt: rank %d: preemption checkpoint of step %d committed as %s; "
                    "exiting with %d", trainer.global_rank, step, path, code)
        raise SystemExit(code)

"""dckpt for Lightning: a CheckpointIO plugin, ModelCheckpoint and the loops unchanged.

    from dckpt.integrations.lightning import DckptCheckpointIO
    trainer = L.Trainer(..., plugins=[DckptCheckpointIO()])
    trainer.fit(model, ckpt_path="last")

Each `.ckpt` Lightning names (`epoch=1-step=20.ckpt`, `last.ckpt`) becomes a dckpt
checkpoint directory of that name: Lightning's whole checkpoint dict (weights, optimizer and
scheduler states, loop progress, callback states, hyperparameters) plus the RNG streams of
the saving process, committed atomically (a `last.ckpt` being rewritten is replaced in one
rename: a crash leaves the previous one) and verified on load. No pickle on either path.

RNG: Lightning itself saves no RNG state, so a resumed run draws other dropout masks and
other shuffles than an uninterrupted one. The plugin saves the saving process's streams and
restores them when the checkpoint is loaded, before training continues. Lightning saves
from global rank 0 only; every rank restores rank 0's streams, which is exact when all
ranks' streams are alike at a checkpoint: `L.seed_everything(seed)` seeds every rank alike
and DDP ranks draw alike (same model, same dropout shapes; DistributedSampler shuffles
by seed and epoch, not from the global stream). Ranks seeded differently resume with
rank 0's streams (a warning says so once per load).

Lightning calls save_checkpoint on global rank 0 alone, so the save is not a collective:
it runs over a process group of this rank only (dckpt's collectives then have no peer to
wait for).

Checkpoint on preemption is a Callback shipped with the plugin, PreemptionCheckpoint
(dckpt/integrations/lightning_preemption.py): a CheckpointIO is called only when Lightning
saves or loads, never at a step boundary, and has no handle on the Trainer.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.plugins.io import AsyncCheckpointIO

from ..engine import checkpoint
from ..errors import DckptError, InvalidArgumentError
from ..state import rng
from ..format import tree as treecodec

log = logging.getLogger("dckpt")

# The RNG streams an async save captured when it was asked for, carried to the writer thread
# in the checkpoint dict under this key (removed before writing).
_RNG_KEY = "__dckpt_rng__"


def _own_group():
    """A process group of this rank alone (None when not distributed)."""
    import torch.distributed as tdist
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return None
    # use_local_synchronization: only the members (this rank) take part in creating it.
    return tdist.new_group([tdist.get_rank()], use_local_synchronization=True)


class DckptCheckpointIO(CheckpointIO):
    """Lightning CheckpointIO writing and reading dckpt checkpoints (module docstring).
    save_options: keyword arguments for dckpt.save (compression, threads, fsync);
    restore_rng: restore the saved RNG streams on load (default True)."""

    def __init__(self, restore_rng: bool = True, **save_options):
        if "save_on" in save_options:
            raise InvalidArgumentError(
                "save_on= goes to the callback shipped with this plugin: "
                "L.Trainer(plugins=[DckptCheckpointIO()], callbacks=[PreemptionCheckpoint("
                "save_on=signal.SIGTERM)]); a CheckpointIO is not called at step boundaries")
        self.save_options = save_options
        self.restore_rng = restore_rng
        self._group = None
        self._group_made = False
        # Set by PreemptionCheckpoint: its Preemption (grace-period warning after each save),
        # and whether a mid-epoch checkpoint's RNG streams wait for the first batch.
        self.preemption = None
        self.defer_rng = False
        self.pending_rng = None

    def _local(self):
        if not self._group_made:
            self._group, self._group_made = _own_group(), True
        return self._group

    def save_checkpoint(self, checkpoint_dict: dict[str, Any], path, storage_options=None):
        if storage_options is not None:
            raise TypeError("DckptCheckpointIO takes no storage_options; pass dckpt.save "
                            "options to DckptCheckpointIO(...)")
        started = time.time()
        state = dict(checkpoint_dict)
        streams = state.pop(_RNG_KEY, None) or rng.capture()
        path = Path(path)
        if path.is_symlink():  # ModelCheckpoint(save_last="link") made it: not ours to follow
            path.unlink()
        # save_started: with the manifest's `created`, how long the save took (the
        # grace-period warning of PreemptionCheckpoint, at the next start too).
        checkpoint.save(state, path, overwrite=True, group=self._local(),
                        rank_state={"rng": streams}, meta={"save_started": started},
                        **self.save_options)
        if self.preemption is not None:
            self.preemption.check_grace(time.time() - started, f"the save of {path.name}")

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        path = Path(path)
        group = self._local()
        state = checkpoint.load(path, group=group)
        if self.restore_rng:
            m = checkpoint.read_manifest(path, rank=0)
            streams = treecodec.decode(m.ranks[0]["rng"])
            if self.defer_rng and mid_epoch(state):
                # Saved between two batches of an epoch: the resumed run makes its data
                # iterator (which draws from the global generator) before it continues, so
                # the streams go back just before the next batch (PreemptionCheckpoint).
                self.pending_rng = streams
            else:
                rng.restore(streams)
        if map_location is not None:
            state = _move(state, map_location if not callable(map_location) else None)
        return state

    def remove_checkpoint(self, path) -> None:
        p = Path(path)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def save_seconds(path) -> float | None:
    """How long the save of the dckpt checkpoint at `path` took (None: unknown)."""
    try:
        m = checkpoint.read_manifest(path)
        return m.created - float(m.meta["save_started"])
    except (DckptError, KeyError, TypeError, ValueError, OSError):
        return None


def mid_epoch(state: dict) -> bool:
    """Whether Lightning's checkpoint dict was saved between two training batches of an
    epoch (not after its last batch), from the fit loop's progress."""
    try:
        progress = state["loops"]["fit_loop"]["epoch_loop.batch_progress"]
        return not progress["is_last_batch"] and progress["current"]["processed"] > 0
    except (KeyError, TypeError):
        return False


class AsyncDckptCheckpointIO(AsyncCheckpointIO):
    """DckptCheckpointIO in Lightning's AsyncCheckpointIO: the checkpoint's tensors are
    cloned and the RNG streams captured when Lightning asks for the save, then a worker
    thread writes and commits it while training goes on. Lightning raises a failed save at
    the next save or at the end of fit."""

    def __init__(self, restore_rng: bool = True, **save_options):
        super().__init__(DckptCheckpointIO(restore_rng=restore_rng, **save_options))

    def save_checkpoint(self, checkpoint_dict, path, storage_options=None) -> None:
        # Now, not in the thread: training goes on drawing from the streams meanwhile.
        self.checkpoint_io._local()  # and the process group is made on this thread
        super().save_checkpoint({**checkpoint_dict, _RNG_KEY: rng.capture()}, path,
                                storage_options)


def _move(obj, device):
    """Tensors of `obj` moved to `device` (a device or its name; a callable map_location
    is not applied: dckpt loads to the CPU)."""
    import torch
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_move(v, device) for v in obj]
    return obj


# The preemption callback shipped with the plugin, importable from here too (it imports the
# plugin, so it comes last).
from .lightning_preemption import PreemptionCheckpoint  # noqa: E402

__all__ = ["AsyncDckptCheckpointIO", "DckptCheckpointIO", "PreemptionCheckpoint"]

"""The checkpointing systems compared: dckpt and the tools users would pick instead.

Each system saves the workload's live state to a path, loads it back into the live model
and optimizer (what a resume does), and, where its format has checksums, verifies the
files. Every save is held to the same durability: files and directories fsync'd (peers
that do not sync themselves are synced by fsync_tree, inside the timed region).
"""
from __future__ import annotations

import json
import os
import warnings
import zipfile
from pathlib import Path

import torch

from .measure import disk_usage, fsync_tree
from .workloads import Workload


class System:
    name = ""
    peer = True  # False for dckpt's own configurations
    can_verify = False
    loads = True  # False where another system already measures the very same load path

    def before_save(self, w: Workload, path: Path) -> None:
        """Untimed set-up of one save (a manager, a previous checkpoint); must leave the
        workload's state as it found it."""

    def save(self, w: Workload, path: Path) -> None:
        raise NotImplementedError

    def load(self, w: Workload, path: Path) -> None:
        raise NotImplementedError

    def size(self, path: Path) -> int:
        """Bytes of the checkpoint the timed save wrote."""
        return disk_usage(path)

    def verify(self, path: Path) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Untimed, after one save's measurements and before its directory is removed:
        end what still works in it (the manager's removal of retired steps)."""

    def close(self, w: Workload) -> None:
        """Drop what the system keeps for a workload (accelerate's prepared objects)."""


class Dckpt(System):
    peer = False
    can_verify = True

    def __init__(self, compression: str | int | None = None, label: str = "dckpt",
                 verify: bool = True):
        self.compression, self.name, self.verify_on_load = compression, label, verify
        self.can_verify = verify  # unchecked: `dckpt verify` is the checked one's

    def save(self, w: Workload, path: Path) -> None:
        import dckpt
        dckpt.save(w.state(), path, compression=self.compression)

    def load(self, w: Workload, path: Path) -> None:
        import dckpt
        dckpt.load(path, into=w.state(), verify=self.verify_on_load)

    def verify(self, path: Path) -> None:
        verify_dckpt(path)


class DckptManager(System):
    """CheckpointManager.save, what a training loop calls: incremental by default (every
    tensor hashed before it is written, unchanged chunks linked from the previous
    checkpoint), one data file per rank, RNG streams and counters, retention (keep_last=2,
    as a training job sets it). The manager is made before the timed save, once per run as
    a training job makes it.

    changed=False: the first save into an empty root. changed=True: a save in a run's
    steady state where every tensor differs from the previous checkpoint: three untimed
    saves, of the bitwise-inverted state (Workload.perturb, undone right after), the state,
    and the inverted state again, come first, so the timed save hashes everything, links
    nothing, and writes over the data file of the first, which retention retired after the
    third (dckpt/storage/spares.py) as it does at every save of a long run."""
    peer = False

    def __init__(self, changed: bool):
        self.changed = changed
        self.name = MANAGER_CHANGED if changed else MANAGER_FIRST
        self.loads = not changed  # the same restore path either way: measured once
        self._mgr = None
        self.last = None  # the timed save's SaveResult

    def before_save(self, w: Workload, path: Path) -> None:
        from dckpt import CheckpointManager
        self.close(w)
        self._mgr = CheckpointManager(path, keep_last=2)
        for step in (1, 2, 3) if self.changed else ():
            inverted = step != 2
            if inverted:
                w.perturb()
            try:
                self._mgr.save(step, w.state())
            finally:
                if inverted:
                    w.perturb()  # every bit flipped back: the state again
        self._mgr.wait()  # retention's removal of step 1's rest, before the timing

    @property
    def step(self) -> int:
        return 4 if self.changed else 1

    def save(self, w: Workload, path: Path) -> None:
        self.last = self._mgr.save(self.step, w.state())

    def load(self, w: Workload, path: Path) -> None:
        self._mgr.restore(w.state())  # the newest checkpoint, as a resume does

    def size(self, path: Path) -> int:
        return disk_usage(self._mgr.path(self.step))

    def finish(self) -> None:
        self.close(None)

    def close(self, w: Workload | None) -> None:
        if self._mgr is not None:
            self._mgr.close()
            self._mgr = None


MANAGER_FIRST = "dckpt manager, first save"
MANAGER_CHANGED = "dckpt manager, every tensor changed"


def verify_dckpt(path: Path) -> None:
    """What `dckpt verify` does: every stored chunk's hash, without loading tensors."""
    from dckpt.tools.verify import verify
    report = verify(path)
    if not report.ok:
        raise RuntimeError(f"{path}: verification failed ({report.status})")


class TorchSave(System):
    """torch.save of the state dicts; torch.load(weights_only=True, mmap=True) and copies
    into the live tensors: the fastest way torch offers to load into an existing model."""
    name = "torch.save"
    can_verify = True  # the zip records carry CRC-32s

    def save(self, w: Workload, path: Path) -> None:
        torch.save({"model": w.model.state_dict(), "optimizer": w.optimizer.state_dict()}, path)
        fsync_tree(path)

    def load(self, w: Workload, path: Path) -> None:
        sd = torch.load(path, weights_only=True, mmap=True)
        w.model.load_state_dict(sd["model"])
        load_optimizer_in_place(w.optimizer, sd["optimizer"]["state"],
                                sd["optimizer"]["param_groups"])

    def verify(self, path: Path) -> None:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
        if bad is not None:
            raise RuntimeError(f"{path}: CRC mismatch in {bad}")


class Safetensors(System):
    """safetensors save_file / load_file (mmap) of the flattened state, copied into the live
    tensors; optimizer hyperparameters travel as JSON in the header's metadata."""
    name = "safetensors"

    def save(self, w: Workload, path: Path) -> None:
        from safetensors.torch import save_file
        tensors, meta = _flat_tensors(w)
        save_file(tensors, str(path), metadata={"dckpt-bench": json.dumps(meta)})
        fsync_tree(path)

    def load(self, w: Workload, path: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["dckpt-bench"])
        model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        w.model.load_state_dict(model)
        state: dict = {}
        for key, v in tensors.items():
            if key.startswith("optim."):
                _, pid, field = key.split(".", 2)
                state.setdefault(int(pid), {})[field] = v
        load_optimizer_in_place(w.optimizer, state, meta["param_groups"])


def load_optimizer_in_place(opt: torch.optim.Optimizer, state: dict, param_groups: list) -> None:
    """Copy loaded optimizer tensors into the live ones, then hand over the hyperparameters.

    Loaders that map files (safetensors, torch.load(mmap=True)) return tensors backed by
    the file: handing those to load_state_dict would leave the moments unread until
    training touches them, so the bytes are copied where a resume needs them."""
    live = opt.state_dict()["state"]
    with torch.no_grad():
        for pid, per_param in state.items():
            for field, v in per_param.items():
                live[pid][field].copy_(v)
    opt.load_state_dict({"state": live, "param_groups": param_groups})


def _flat_tensors(w: Workload) -> tuple[dict, dict]:
    tensors = {f"model.{k}": v for k, v in w.model.state_dict().items()}
    osd = w.optimizer.state_dict()
    for pid, per_param in osd["state"].items():
        for field, v in per_param.items():
            tensors[f"optim.{pid}.{field}"] = v
    return tensors, {"param_groups": osd["param_groups"]}


class Dcp(System):
    """torch.distributed.checkpoint with FileSystemWriter(thread_count=n, sync_files=True);
    load is in place into the live state dicts, then load_state_dict."""

    def __init__(self, threads: int):
        self.threads = threads
        self.name = f"DCP {threads}t"
        self.loads = threads == 1  # writer threads change the files, not how they are read

    def save(self, w: Workload, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        sd = {"model": w.model.state_dict(), "optimizer": w.optimizer.state_dict()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(sd, storage_writer=dcp.FileSystemWriter(
                str(path), thread_count=self.threads, sync_files=True))
        fsync_tree(path)  # the directory entries; the files are already synced

    def load(self, w: Workload, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        sd = {"model": w.model.state_dict(), "optimizer": w.optimizer.state_dict()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(sd, storage_reader=dcp.FileSystemReader(str(path)))
        w.model.load_state_dict(sd["model"])
        w.optimizer.load_state_dict(sd["optimizer"])


class Accelerate(System):
    """accelerate's Accelerator.save_state / load_state (safetensors model, torch.save
    optimizer, RNG states), on the objects returned by prepare()."""
    name = "accelerate"

    def __init__(self):
        self._prepared: dict[int, object] = {}

    def _accelerator(self, w: Workload):
        acc = self._prepared.get(id(w))
        if acc is None:
            from accelerate import Accelerator
            acc = Accelerator(cpu=True)
            acc.prepare(w.model, w.optimizer)
            self._prepared[id(w)] = acc
        return acc

    def save(self, w: Workload, path: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._accelerator(w).save_state(str(path), safe_serialization=True)
        fsync_tree(path)

    def load(self, w: Workload, path: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._accelerator(w).load_state(str(path))

    def close(self, w: Workload) -> None:
        acc = self._prepared.pop(id(w), None)
        if acc is not None:
            acc.free_memory()


def catalogue() -> list[System]:
    """Every single-process system of a run, dckpt's configurations first."""
    # "dckpt unchecked" loads without checksums: what checking every byte costs, same run.
    # DCP writes with one thread (its default) and with one per core (its best).
    return [Dckpt(None, "dckpt"), Dckpt(None, "dckpt unchecked", verify=False),
            DckptManager(False), DckptManager(True),
            Dckpt(1, "dckpt zstd-1"), Dckpt(3, "dckpt zstd-3"),
            TorchSave(), Safetensors(), Dcp(1), Dcp(max(2, len(os.sched_getaffinity(0)))),
            Accelerate()]


__all__ = ["System", "Dckpt", "DckptManager", "MANAGER_FIRST", "MANAGER_CHANGED", "TorchSave", "Safetensors", "Dcp", "Accelerate", "catalogue",
           "verify_dckpt"]

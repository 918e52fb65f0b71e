"""Load a folder written by accelerate's own save_state into a live Accelerator.

It lets an existing run move to dckpt: DckptAccelerator.load_state(old_folder) restores it,
the next save_state writes dckpt. The files are read by dckpt.convert's accelerate reader:
torch.load(weights_only=True), which builds only tensors and plain containers, plus plain
numpy arrays for the RNG files. A file that needs real unpickling (a pickled sampler object,
a custom object's exotic state) runs code from the file: it is refused with
UnsafePickleError unless the caller passes allow_pickle=True for files it trusts.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from ..state import rng
from ..tools.convert.sources import read_accelerate_state
from ..tools.convert.torchfiles import PickleRequired, rng_from_legacy
from ..tools.convert.torchfiles import load as load_weights_only
from ..errors import IncompleteCheckpointError, UnsafePickleError
from ..manager import ResumeReport
from ..state.flatten import component_kind

log = logging.getLogger("dckpt")

_MARKERS = ("model.safetensors", "pytorch_model.bin", "optimizer.bin", "random_states_0.pkl")


def looks_like(path: Path) -> bool:
    return any((path / name).is_file() for name in _MARKERS)


def _suffix(i: int) -> str:
    return "" if i == 0 else f"_{i}"


def _fit_prefix(state: dict, live_keys: set) -> dict:
    """accelerate saves DDP models with their 'module.' prefix; fit it to the live model."""
    if set(state) == live_keys:
        return state
    stripped = {k.removeprefix("module."): v for k, v in state.items()}
    if set(stripped) == live_keys:
        return stripped
    added = {f"module.{k}": v for k, v in state.items()}
    return added if set(added) == live_keys else state


def load(accelerator, path: Path, models: list, *, allow_pickle: bool = False,
         **load_model_func_kwargs) -> ResumeReport:
    """Restore `accelerator` from accelerate's save_state folder `path`: the same files, in
    the same order, as accelerate's own load_state. Returns what was restored (its step is
    set by the caller, from the live optimizers)."""
    from accelerate.data_loader import IterableDatasetShard
    from accelerate.utils import DistributedType
    if accelerator.distributed_type == DistributedType.FSDP:
        raise NotImplementedError("reading accelerate's FSDP checkpoint folders is not supported;"
                                  " load it with accelerate, then save_state with dckpt")
    imported = read_accelerate_state(path)
    restored: dict = {}
    notes: list[str] = []

    def component(key: str, filename: str):
        if key in imported.components:
            return imported.components[key][1]
        return _unpickle(path / filename, allow_pickle, imported.notes)

    for i, model in enumerate(models):
        state = component(f"model{_suffix(i)}", f"model{_suffix(i)}.safetensors")
        model.load_state_dict(_fit_prefix(state, set(model.state_dict())),
                              **load_model_func_kwargs)
        restored[f"model{_suffix(i)}"] = "model"
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(component("scaler", "scaler.pt"))
        restored["scaler"] = "scaler"
    for i, opt in enumerate(accelerator._optimizers):
        opt.load_state_dict(component(f"optimizer{_suffix(i)}", f"optimizer{_suffix(i)}.bin"))
        restored[f"optimizer{_suffix(i)}"] = "optimizer"
    for i, sched in enumerate(accelerator._schedulers):
        sched.load_state_dict(component(f"scheduler{_suffix(i)}", f"scheduler{_suffix(i)}.bin"))
        restored[f"scheduler{_suffix(i)}"] = "scheduler"
    for i, loader in enumerate(accelerator._dataloaders):
        sampler_file = path / f"sampler{_suffix(i)}.bin"
        if isinstance(loader.dataset, IterableDatasetShard) and sampler_file.is_file():
            loader.set_sampler(_unpickle(sampler_file, allow_pickle, imported.notes))
        key = f"dl_state_dict{_suffix(i)}"
        if getattr(loader, "use_stateful_dataloader", False) and (path / f"{key}.bin").is_file():
            loader.load_state_dict(component(key, f"{key}.bin"))
            restored[f"dataloader{_suffix(i)}"] = "data"
        else:
            notes.append(f"accelerate stored no position for data loader {i}: it starts its "
                         "epoch from the beginning")
            log.warning("dckpt: %s: %s", path, notes[-1])
    streams = _load_rng(accelerator, path, allow_pickle, notes)
    custom = [p for p in path.iterdir() if re.search(r"^custom_checkpoint_\d+\.pkl$", p.name)]
    if len(custom) != len(accelerator._custom_objects):
        raise RuntimeError(
            f"Number of custom checkpoints in folder {path} does not match the number of "
            f"registered objects:\n\tFound checkpoints: {len(custom)}\n\tRegistered objects: "
            f"{len(accelerator._custom_objects)}\nPlease make sure to only load checkpoints "
            "from folders that were created with the same set of registered objects.")
    for i, obj in enumerate(accelerator._custom_objects):
        obj.load_state_dict(component(f"custom_{i}", f"custom_checkpoint_{i}.pkl"))
        restored[f"custom_{i}"] = component_kind(obj)
    return ResumeReport(step=0, path=path, epoch=None, step_in_epoch=None, metrics={},
                        counters=dict(imported.counters), components=restored,
                        rng_streams=streams, notes=notes,
                        bytes=sum(p.stat().st_size for p in path.iterdir() if p.is_file()))


def _unpickle(path: Path, allow_pickle: bool, notes: list[str]):
    """A file the weights-only reader refused: real unpickling, only when allowed."""
    if not path.is_file():
        raise IncompleteCheckpointError(f"{path} is missing", str(path))
    if not allow_pickle:
        note = next((n for n in notes if path.name in n), "")
        needs = re.search(r"\(it pickles [^)]*\)", note)
        raise UnsafePickleError(
            f"{path} can only be read by unpickling it, which runs code from the file"
            f"{' ' + needs.group(0) if needs else ''}. If you trust this file, pass "
            "allow_pickle=True (load_state(..., allow_pickle=True))", str(path))
    log.warning("dckpt: unpickling %s (allow_pickle=True)", path)
    return torch.load(path, map_location="cpu", weights_only=False)


def _load_rng(accelerator, path: Path, allow_pickle: bool, report_notes: list[str]) -> list:
    """This process's random states (and accelerator.step); returns the restored streams."""
    f = path / f"random_states_{accelerator.process_index}.pkl"
    if not f.is_file():
        report_notes.append(f"no {f.name}: random states not restored")
        log.warning("dckpt: %s", report_notes[-1])  # as accelerate
        return []
    try:
        states = load_weights_only(f)
    except PickleRequired as e:  # e.g. a generator object in the file: only unpickling reads it
        states = _unpickle(f, allow_pickle, [str(e)])
    notes: list[str] = []
    streams = rng_from_legacy(states, notes, f.name)
    if notes or not streams:
        raise ValueError(f"{f}: unreadable random states: {'; '.join(notes) or 'none found'}")
    if isinstance(states.get("step"), int):
        accelerator.step = states["step"]
    return rng.restore(streams)

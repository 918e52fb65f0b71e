"""Read a folder written by accelerate's own save_state into a live Accelerator.

It lets an existing run move to dckpt: DckptAccelerator.load_state(old_folder) restores it,
the next save_state writes dckpt. accelerate's files other than model.safetensors are
pickles. Each is opened with torch.load(weights_only=True), whose unpickler builds only
tensors and plain containers; random_states_*.pkl also needs numpy arrays, allowed by name
(numpy's array reconstructor, ndarray, dtype) and checked for shape afterwards. A file that
needs anything more (a pickled sampler object, a custom object's exotic state) is refused
with UnsafePickleError unless the caller passes allow_pickle=True for files it trusts.
"""
from __future__ import annotations

import logging
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import UnsafePickleError

log = logging.getLogger("dckpt")

_NUMBERED = re.compile(r"[\/]?([0-9]+)(?=[^\/]*$)")  # accelerate's checkpoint_<n> ordering
_MARKERS = ("model.safetensors", "pytorch_model.bin", "optimizer.bin", "random_states_0.pkl")


def looks_like(path: Path) -> bool:
    return any((path / name).is_file() for name in _MARKERS)


def newest_numbered(root: Path) -> Path | None:
    """accelerate's automatic naming (checkpoint_<n>): the highest n, as accelerate picks."""
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _NUMBERED.search(p.name)) and looks_like(p)]
    return max(found)[1] if found else None


def _numpy_globals() -> list:
    core = getattr(np, "_core", None) or np.core
    dtype_classes = [type(np.dtype(t)) for t in ("uint32", "int64", "float64")]
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, *dtype_classes]


def read(path: Path, allow_pickle: bool = False, numpy_arrays: bool = False):
    """torch.load(weights_only=True); real unpickling only with allow_pickle."""
    try:
        if numpy_arrays:
            with torch.serialization.safe_globals(_numpy_globals()):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not allow_pickle:
            try:
                needs = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            except Exception:
                needs = []
            raise UnsafePickleError(
                f"{path} can only be read by unpickling it, which runs code from the file"
                + (f" (it refers to {', '.join(needs[:6])})" if needs else "")
                + ". If you trust this file, pass allow_pickle=True "
                "(load_state(..., allow_pickle=True)).", str(path)) from e
        log.warning("dckpt: unpickling %s (allow_pickle=True)", path)
        return torch.load(path, map_location="cpu", weights_only=False)


def _fit_prefix(state: dict, live_keys: set) -> dict:
    """accelerate saves DDP models with their 'module.' prefix; fit it to the live model."""
    keys = set(state)
    if keys == live_keys:
        return state
    stripped = {k.removeprefix("module."): v for k, v in state.items()}
    if set(stripped) == live_keys:
        return stripped
    added = {f"module.{k}": v for k, v in state.items()}
    return added if set(added) == live_keys else state


def _name(stem: str, i: int, ext: str) -> str:
    return f"{stem}{'' if i == 0 else f'_{i}'}.{ext}"


def load(accelerator, path: Path, models: list, *, allow_pickle: bool = False,
         load_kwargs: dict | None = None, **load_model_func_kwargs) -> None:
    """Restore `accelerator` from accelerate's save_state folder `path` (as accelerate's own
    load_state does, same files, same order)."""
    from accelerate.utils import DistributedType
    if accelerator.distributed_type == DistributedType.FSDP:
        raise NotImplementedError("reading accelerate's FSDP checkpoint folders is not supported;"
                                  " load it with accelerate, then save_state with dckpt")
    for i, model in enumerate(models):
        safe = path / _name("model", i, "safetensors")
        if safe.is_file():
            from safetensors.torch import load_file
            state = load_file(str(safe))
        else:
            state = read(path / _name("pytorch_model", i, "bin"), allow_pickle)
        state = _fit_prefix(state, set(model.state_dict()))
        model.load_state_dict(state, **load_model_func_kwargs)
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(read(path / "scaler.pt", allow_pickle))
    for i, opt in enumerate(accelerator._optimizers):
        opt.load_state_dict(read(path / _name("optimizer", i, "bin"), allow_pickle))
    for i, sched in enumerate(accelerator._schedulers):
        sched.load_state_dict(read(path / _name("scheduler", i, "bin"), allow_pickle))
    for i, loader in enumerate(accelerator._dataloaders):
        _load_loader(loader, path, i, allow_pickle)
    _load_rng(accelerator, path)
    custom = sorted(p for p in path.iterdir() if re.search(r"^custom_checkpoint_\d+\.pkl$", p.name))
    if len(custom) != len(accelerator._custom_objects):
        raise RuntimeError(
            f"Number of custom checkpoints in folder {path} does not match the number of "
            f"registered objects:\n\tFound checkpoints: {len(custom)}\n\tRegistered objects: "
            f"{len(accelerator._custom_objects)}\nPlease make sure to only load checkpoints "
            "from folders that were created with the same set of registered objects.")
    for i, obj in enumerate(accelerator._custom_objects):
        obj.load_state_dict(read(path / f"custom_checkpoint_{i}.pkl", allow_pickle))


def _load_loader(loader, path: Path, i: int, allow_pickle: bool) -> None:
    sampler_file = path / _name("sampler", i, "bin")
    if sampler_file.is_file():  # a pickled SeedableRandomSampler (iterable datasets)
        loader.set_sampler(read(sampler_file, allow_pickle))
    state_file = path / ("dl_state_dict.bin" if i == 0 else f"dl_state_dict_{i}.bin")
    if getattr(loader, "use_stateful_dataloader", False) and state_file.is_file():
        loader.load_state_dict(read(state_file, allow_pickle))
    elif not sampler_file.is_file():
        log.warning("dckpt: accelerate stored no position for data loader %d in %s; it "
                    "starts its epoch from the beginning", i, path)


def _load_rng(accelerator, path: Path) -> None:
    f = path / f"random_states_{accelerator.process_index}.pkl"
    if not f.is_file():
        log.warning("dckpt: no %s: random states not restored", f.name)  # as accelerate
        return
    states = read(f, numpy_arrays=True)
    if "step" in states:
        accelerator.step = int(states["step"])
    random.setstate(states["random_state"])
    kind, keys, pos, has_gauss, cached = states["numpy_random_seed"]
    keys = np.asarray(keys)
    if kind != "MT19937" or keys.shape != (624,) or keys.dtype != np.uint32:
        raise ValueError(f"{f}: not a numpy MT19937 state")
    np.random.set_state((kind, keys, int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(states["torch_manual_seed"])
    if "torch_cuda_manual_seed" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"])

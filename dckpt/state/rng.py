"""Capture and restore every random stream a training step draws from.

Python `random`, numpy's global generator, torch's CPU generator and, when CUDA is present,
the generator of every CUDA device, or in a distributed job only that of the rank's own
device (restored onto the rank's current device, whatever its index). States are plain
bytes/ints so they live in the manifest's safe tree, not in data files.
"""
from __future__ import annotations

import random
from typing import Callable

import numpy as np
import torch

from ..errors import DckptError, ManifestError, StateMismatchError

STREAMS = ("python", "numpy", "torch", "cuda")


def capture(own_device_only: bool = False) -> dict:
    """own_device_only: store the CUDA stream of the current device only (one per rank)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"kind": kind, "keys": keys.astype("<u4").tobytes(), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state().numpy().tobytes(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        if own_device_only:
            dev = torch.cuda.current_device()
            state["cuda_device"] = {"index": dev,
                                    "state": torch.cuda.get_rng_state(dev).numpy().tobytes()}
        else:
            state["cuda"] = [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()]
    return state


def restore(state: dict, streams: tuple[str, ...] = STREAMS) -> list[str]:
    """Restore the given streams present in `state`; returns the names restored.

    Every stream is checked on a scratch generator first, so a malformed state (a damaged
    or hostile checkpoint) raises ManifestError and leaves all global streams untouched."""
    setters = prepare(state, streams)
    for _, apply in setters:
        apply()
    return [name for name, _ in setters]


def prepare(state, streams: tuple[str, ...] = STREAMS) -> list[tuple[str, Callable[[], None]]]:
    """Validate `state`; returns (stream, setter) pairs that cannot fail. ManifestError else."""
    if not isinstance(state, dict):
        raise ManifestError(f"RNG state is a {type(state).__name__}, not a dict", field="rng")
    out = []
    for name, key, make in (("python", "python", _python), ("numpy", "numpy", _numpy),
                            ("torch", "torch", _torch), ("cuda", "cuda", _cuda),
                            ("cuda", "cuda_device", _cuda_device)):
        if name not in streams or key not in state:
            continue
        if name == "cuda" and not torch.cuda.is_available():
            continue
        try:
            out.append((name, make(state[key])))
        except DckptError:
            raise
        except Exception as e:  # whatever the scratch generator refused
            raise ManifestError(f"RNG state of stream '{name}' is malformed: "
                                f"{type(e).__name__}: {e}", field="rng") from None
    return out


def _python(p: dict):
    value = (p["version"], tuple(p["state"]), p["gauss"])
    random.Random().setstate(value)
    return lambda: random.setstate(value)


def _numpy(n: dict):
    keys = np.frombuffer(n["keys"], dtype="<u4").astype(np.uint32)
    value = (n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"])
    np.random.RandomState().set_state(value)
    return lambda: np.random.set_state(value)


def _torch_state(data) -> torch.Tensor:
    if not isinstance(data, bytes):
        raise TypeError(f"expected bytes, got {type(data).__name__}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def _torch(data):
    value = _torch_state(data)
    torch.Generator().set_state(value)
    return lambda: torch.set_rng_state(value)


def _cuda(saved):
    if not isinstance(saved, list):
        raise TypeError(f"expected a list, got {type(saved).__name__}")
    if len(saved) != torch.cuda.device_count():
        raise StateMismatchError([f"checkpoint holds {len(saved)} CUDA RNG states but "
                                  f"{torch.cuda.device_count()} devices are visible"])
    values = [_torch_state(s) for s in saved]
    for i, v in enumerate(values):
        torch.Generator(device=f"cuda:{i}").set_state(v)
    return lambda: torch.cuda.set_rng_state_all(values)


def _cuda_device(saved: dict):
    """One rank's own device stream, restored onto its current device whatever the index."""
    value = _torch_state(saved["state"])
    dev = torch.cuda.current_device()
    torch.Generator(device=f"cuda:{dev}").set_state(value)
    return lambda: torch.cuda.set_rng_state(value, dev)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy, torch (CPU and every CUDA device) from one integer."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)

"""Capture and restore every random stream a training step draws from.

Python `random`, numpy's global generator, torch's CPU generator and, when CUDA is present,
the generator of every CUDA device, or in a distributed job only that of the rank's own
device (restored onto the rank's current device, whatever its index). States are plain
bytes/ints so they live in the manifest's safe tree, not in data files.
"""
from __future__ import annotations

import random

import numpy as np
import torch

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
    """Restore the given streams present in `state`; returns the names restored."""
    done = []
    if "python" in streams and "python" in state:
        p = state["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
        done.append("python")
    if "numpy" in streams and "numpy" in state:
        n = state["numpy"]
        keys = np.frombuffer(n["keys"], dtype="<u4").astype(np.uint32)
        np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
        done.append("numpy")
    if "torch" in streams and "torch" in state:
        torch.set_rng_state(torch.frombuffer(bytearray(state["torch"]), dtype=torch.uint8))
        done.append("torch")
    if "cuda" in streams and "cuda" in state and torch.cuda.is_available():
        saved = state["cuda"]
        if len(saved) != torch.cuda.device_count():
            raise ValueError(f"checkpoint holds {len(saved)} CUDA RNG states but "
                             f"{torch.cuda.device_count()} devices are visible")
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in saved])
        done.append("cuda")
    if "cuda" in streams and "cuda_device" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(state["cuda_device"]["state"]),
                                                  dtype=torch.uint8),
                                 torch.cuda.current_device())
        done.append("cuda")
    return done


def seed_everything(seed: int) -> None:
    """Seed Python, numpy, torch (CPU and every CUDA device) from one integer."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)

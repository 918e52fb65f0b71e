"""dckpt: complete, verifiable, fast checkpoints for PyTorch training.

Imports are lazy so `dckpt.format` (and `dckpt inspect`) work without torch or the compiled
core; `dckpt.save` etc. load them on first use.
"""
from importlib import import_module

from .errors import *  # noqa: F401,F403

__version__ = "0.1.0"

_LAZY = {
    "save": "checkpoint", "load": "checkpoint", "read_manifest": "checkpoint",
    "SaveResult": "checkpoint",
    "CheckpointManager": "manager", "ResumeReport": "manager", "Retention": "manager",
    "AsyncOptions": "manager", "SaveHandle": "manager",
    "seed_everything": "rng",
}
_MODULES = {"rng": "rng", "data": "data"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    if name in _MODULES:
        return import_module(f".{_MODULES[name]}", __name__)
    raise AttributeError(f"module 'dckpt' has no attribute {name!r}")


__all__ = [*_LAZY, *_MODULES]

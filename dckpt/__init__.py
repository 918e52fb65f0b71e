"""dckpt: complete, verifiable, fast checkpoints for PyTorch training.

    mgr = dckpt.CheckpointManager("runs/exp1", keep_last=3)
    report = mgr.restore(state)          # if mgr.latest_step() is not None
    mgr.save(step, state, metrics={"loss": loss}, epoch=epoch)

    dckpt.save(state, "ckpt"); dckpt.load("ckpt", into=state)

Imports are lazy so `dckpt.format` (and `dckpt inspect`) work without torch or the compiled
core; `dckpt.save` etc. load them on first use. The error types (dckpt.DckptError and its
subclasses) are importable at once.
"""
from importlib import import_module
from typing import TYPE_CHECKING

from . import errors as _errors

__version__ = "0.1.0"

_LAZY = {
    "save": "checkpoint", "load": "checkpoint", "read_manifest": "checkpoint",
    "SaveResult": "checkpoint", "RestoreReport": "checkpoint",
    "CheckpointManager": "manager", "ResumeReport": "manager", "Retention": "manager",
    "AsyncOptions": "manager", "SaveHandle": "manager", "Preemption": "manager",
    "seed_everything": "rng", "export": "tools.export",
}
_MODULES = {"rng": "rng", "data": "data"}
# Every error class of dckpt.errors, under its own name (dckpt.StateMismatchError, ...).
_ERRORS = sorted(n for n, v in vars(_errors).items()
                 if isinstance(v, type) and issubclass(v, Exception)
                 and v.__module__ == _errors.__name__)
globals().update({n: getattr(_errors, n) for n in _ERRORS})

if TYPE_CHECKING:  # what the lazy names are, for type checkers (the package ships py.typed)
    from . import data, rng
    from .checkpoint import RestoreReport, SaveResult, load, read_manifest, save
    from .errors import *  # noqa: F401,F403
    from .manager import (AsyncOptions, CheckpointManager, Preemption, ResumeReport, Retention,
                          SaveHandle)
    from .rng import seed_everything
    from .tools.export import export


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    if name in _MODULES:
        return import_module(f".{_MODULES[name]}", __name__)
    raise AttributeError(f"module 'dckpt' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public API (lazy names included), not the helpers of this module."""
    return sorted([*__all__, "__version__"])


__all__ = [*_LAZY, *_MODULES, *_ERRORS, "errors"]

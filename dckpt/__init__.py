"""dckpt: complete, verifiable, fast checkpoints for PyTorch training.

    mgr = dckpt.CheckpointManager("runs/exp1", keep_last=3)
    report = mgr.restore(state)          # if mgr.latest_step() is not None
    mgr.save(step, state, metrics={"loss": loss}, epoch=epoch)

    dckpt.save(state, "ckpt"); dckpt.load("ckpt", into=state)

Imports are lazy so `dckpt.format` (and `dckpt inspect`) work without torch or the compiled
core; `dckpt.save` etc. load them on first use. The error types (dckpt.DckptError and its
subclasses) are importable at once.

The package is layered (docs/ARCHITECTURE.md): cli, integrations, tools, manager, engine,
distributed | state, storage, format; each imports only the layers below it (checked by
import-linter, pyproject.toml). Only this file, __main__ and errors sit at the top.
"""
import importlib.abc
import importlib.util
import sys
from importlib import import_module
from typing import TYPE_CHECKING

from . import errors as _errors

__version__ = "0.1.0"

_LAZY = {
    "save": "engine.checkpoint", "load": "engine.checkpoint", "read_manifest": "engine.checkpoint",
    "SaveResult": "engine.checkpoint", "RestoreReport": "engine.checkpoint",
    "CheckpointManager": "manager", "ResumeReport": "manager", "Retention": "manager",
    "AsyncOptions": "manager", "SaveHandle": "manager", "Preemption": "manager",
    "seed_everything": "state.rng", "export": "tools.export",
}
_MODULES = {"rng": "state.rng", "data": "state.data"}
# The module paths the docs give users (README, docs/CLI.md), kept importable after the
# modules moved into their layers: `from dckpt.data import ResumableLoader`, `dckpt.verify.verify`.
# One alias table instead of a compatibility file per path at the top of the package.
_ALIASES = {**_MODULES, "verify": "tools.verify", "repair": "tools.repair", "diff": "tools.diff",
            "convert": "tools.convert", "incremental": "engine.incremental"}


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import dckpt.data` imports dckpt.state.data and registers it under both names."""

    def find_spec(self, name, path=None, target=None):
        prefix, _, leaf = name.rpartition(".")
        if prefix == __name__ and leaf in _ALIASES:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        module = import_module(f".{_ALIASES[spec.name.rpartition('.')[2]]}", __name__)
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module):
        # Already executed under its own name; importlib has just set the alias's spec on
        # it: give back its own, so relative imports inside it keep resolving.
        module.__spec__ = module.__spec__.loader_state


# First: an editable install elsewhere (a finder for "dckpt.*") must not answer these names.
sys.meta_path.insert(0, _AliasFinder())
# Every error class of dckpt.errors, under its own name (dckpt.StateMismatchError, ...).
_ERRORS = sorted(n for n, v in vars(_errors).items()
                 if isinstance(v, type) and issubclass(v, Exception)
                 and v.__module__ == _errors.__name__)
globals().update({n: getattr(_errors, n) for n in _ERRORS})

if TYPE_CHECKING:  # what the lazy names are, for type checkers (the package ships py.typed)
    from .state import data, rng
    from .engine.checkpoint import RestoreReport, SaveResult, load, read_manifest, save
    from .errors import *  # noqa: F401,F403
    from .manager import (AsyncOptions, CheckpointManager, Preemption, ResumeReport, Retention,
                          SaveHandle)
    from .state.rng import seed_everything
    from .tools.export import export


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    if name in _ALIASES:
        return import_module(f".{name}", __name__)
    raise AttributeError(f"module 'dckpt' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public API (lazy names included), not the helpers of this module."""
    return sorted([*__all__, "__version__"])


__all__ = [*_LAZY, *_MODULES, *_ERRORS, "errors"]

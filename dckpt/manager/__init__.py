"""Numbered checkpoints under a root (CheckpointManager): steps, retention, the root lock,
the async save service and resume. May import engine, distributed, state, storage, format
and errors; never tools, integrations or cli.

Imports are lazy so `Retention` (used by `dckpt ls`) loads without torch."""
from importlib import import_module

_WHERE = {"CheckpointManager": "manager", "ResumeReport": "manager", "Retention": "retention",
          "AsyncOptions": "async_save", "SaveHandle": "async_save", "Preemption": "preemption"}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'dckpt.manager' has no attribute {name!r}")


__all__ = list(_WHERE)

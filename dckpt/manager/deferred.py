"""Deferred snapshots: copy parameters and optimizer states while forward and backward run.

Parameters and optimizer states do not change between one optimizer step and the next, so
their copy need not hold training: AsyncOptions(snapshot="deferred") copies them in the
background and holds only the next step() of the optimizers that own them, through an
optimizer step pre-hook, until the copy is complete.

The contract, which the caller promises:
    Between save() and the next step() of every optimizer found in the saved state, the
    parameters of those optimizers and their optimizer states change only through that
    step(): no in-place edits of weights, no load_state_dict(), no weight averaging into
    them, no optimizer.step() on another thread.
Everything else (buffers such as BatchNorm statistics, which forward changes, tensors of
models without an optimizer in the state, loose tensors) is copied inside save(), and the
non-tensor state (state dicts, data position, RNG streams) is captured there too.

Optimizers are found among the state's values (nested dicts/lists/tuples, three levels);
wrappers with an `.optimizer` attribute (accelerate's AcceleratedOptimizer) are unwrapped so
the hook sits where step() really runs. On CUDA the held step does not block the CPU: the
current stream waits, on the GPU, for the side stream's copies.
"""
from __future__ import annotations

import time
import weakref
from typing import Any

import torch

MAX_DEPTH = 3


def optimizers_in(state: Any) -> list[torch.optim.Optimizer]:
    found: list[torch.optim.Optimizer] = []

    def walk(v: Any, depth: int) -> None:
        if isinstance(v, torch.optim.Optimizer):
            while isinstance(getattr(v, "optimizer", None), torch.optim.Optimizer):
                v = v.optimizer
            if not any(v is f for f in found):
                found.append(v)
        elif depth < MAX_DEPTH and isinstance(v, dict):
            for x in v.values():
                walk(x, depth + 1)
        elif depth < MAX_DEPTH and isinstance(v, (list, tuple)):
            for x in v:
                walk(x, depth + 1)

    walk(state, 0)
    return found


def storage_key(t) -> tuple | None:
    """Which memory a tensor lives in; the state_dict() views of a parameter share it."""
    if not isinstance(t, torch.Tensor):
        return None
    if hasattr(t, "to_local"):  # DTensor: its local shard is what the optimizer updates
        t = t.to_local()
    if t.numel() == 0:
        return None
    return (t.device.type, t.device.index, t.untyped_storage().data_ptr())


def owned_storages(optimizers: list[torch.optim.Optimizer]) -> set[tuple]:
    """Storages that only these optimizers' step() changes: parameters and their states."""
    keys = set()
    for opt in optimizers:
        for group in opt.param_groups:
            keys.update(storage_key(p) for p in group["params"])
        for per_param in opt.state.values():
            keys.update(storage_key(v) for v in per_param.values())
    keys.discard(None)
    return keys


class StepGate:
    """Step pre-hooks that hold an optimizer's step() until pending deferred copies are done.

    The wait counts as blocked time of the save that caused it."""

    def __init__(self):
        self._hooks: "weakref.WeakKeyDictionary[torch.optim.Optimizer, Any]" = \
            weakref.WeakKeyDictionary()
        self._pending: list = []  # (Staged, SaveHandle) whose copies a step must wait for

    def hold(self, optimizers: list[torch.optim.Optimizer], staged, handle) -> None:
        for opt in optimizers:
            if opt not in self._hooks:
                self._hooks[opt] = opt.register_step_pre_hook(self._before_step)
        self._pending.append((staged, handle))

    def _before_step(self, optimizer, args, kwargs) -> None:
        while self._pending:
            staged, handle = self._pending.pop(0)
            t0 = time.perf_counter()
            staged.gate()
            handle.blocked_seconds += time.perf_counter() - t0

    def detach(self) -> None:
        self._before_step(None, (), {})
        for hook in list(self._hooks.values()):
            hook.remove()
        self._hooks.clear()

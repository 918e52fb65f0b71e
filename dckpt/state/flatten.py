"""Split a training state into a safe tree and a list of tensors to write.

Objects with state_dict() (models, optimizers, schedulers, scalers, loaders, user objects)
are replaced by their state dicts, tagged with their type so restore knows to call
load_state_dict(). Tensors and arrays become named references; a tensor that is the very
same view as an earlier one (tied weights) becomes a reference to the earlier name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import UnsupportedStateError
from ..format.dtypes import numpy_itemsize
from ..format.tree import ArrayRef, DtypeRef, ObjectState, TensorRef
from .tensors import TORCH_NAMES, dtype_name, view_key


@dataclass
class Leaf:
    """One tensor to store: the local data and where it sits in the global tensor."""
    name: str
    value: torch.Tensor | np.ndarray
    global_shape: list[int]
    offsets: list[int]
    replicated: bool = False  # identical on every rank: written once in total

    @property
    def is_numpy(self) -> bool:
        return isinstance(self.value, np.ndarray)

    @property
    def dtype(self) -> str:
        return self.value.dtype.str if self.is_numpy else dtype_name(self.value.dtype)

    @property
    def nbytes(self) -> int:
        return self.value.nbytes if self.is_numpy else self.value.numel() * self.value.element_size()


@dataclass
class Flat:
    tree: Any
    leaves: list[Leaf] = field(default_factory=list)
    components: dict[str, str] = field(default_factory=dict)  # top-level key -> type name


def has_state_dict(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(
        getattr(obj, "load_state_dict", None))


def type_name(obj: Any) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def flatten(state: Any, tensor_hook=None) -> Flat:
    """`tensor_hook(tensor, path) -> Leaf | None` lets the dist layer describe DTensors."""
    flat = Flat(tree=None)
    seen: dict[tuple, str] = {}
    names: set[str] = set()

    def unique(path: str) -> str:
        name, n = path or "value", 1
        while name in names:
            n += 1
            name = f"{path}~{n}"
        names.add(name)
        return name

    def walk(v: Any, path: str) -> Any:
        if isinstance(v, torch.Tensor):
            key = view_key(v)
            if key is not None and key in seen:
                return TensorRef(seen[key])
            name = unique(path)
            leaf = tensor_hook(v, name) if tensor_hook else None
            if leaf is None:
                if v.dtype not in TORCH_NAMES:
                    raise UnsupportedStateError(f"tensor at '{path}' has unsupported dtype {v.dtype}", path)
                if v.layout != torch.strided:  # sparse, sparse CSR, jagged, ...
                    raise UnsupportedStateError(f"tensor at '{path}' has layout {v.layout}; "
                                                "only dense tensors are stored", path)
                leaf = Leaf(name, v.detach(), list(v.shape), [0] * v.dim())
            flat.leaves.append(leaf)
            if key is not None:
                seen[key] = name
            return TensorRef(name)
        if isinstance(v, np.ndarray):
            if numpy_itemsize(v.dtype.str) is None:
                raise UnsupportedStateError(
                    f"numpy array at '{path}' has dtype {v.dtype}; only numeric and bool "
                    "arrays can be stored without pickle", path)
            name = unique(path)
            flat.leaves.append(Leaf(name, v, list(v.shape), [0] * v.ndim))
            return ArrayRef(name)
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, torch.dtype):
            return DtypeRef(dtype_name(v))
        if isinstance(v, dict):
            return {k: walk(x, f"{path}/{k}" if path else str(k)) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x, f"{path}/{i}" if path else str(i)) for i, x in enumerate(v)]
        if isinstance(v, tuple):
            return tuple(walk(x, f"{path}/{i}" if path else str(i)) for i, x in enumerate(v))
        if has_state_dict(v) and not isinstance(v, type):
            v = unwrap(v)
            return ObjectState(type_name(v), walk(v.state_dict(), path))
        if isinstance(v, torch.utils.data.DataLoader):
            raise UnsupportedStateError(
                f"DataLoader at '{path}' has no state; wrap it in dckpt.data.ResumableLoader "
                "(or use torchdata's StatefulDataLoader) to save its position", path)
        return v  # scalars; anything else is refused with its path by tree.encode

    flat.tree = walk(state, "")
    if isinstance(state, dict):
        flat.components = {str(k): component_kind(v) for k, v in state.items()}
    return flat


WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap(v: Any) -> Any:
    """The module inside DDP / DataParallel (whose state dict keys gain `module.`) and
    torch.compile (`_orig_mod.`), so a checkpoint names tensors as the plain module does and
    loads into it, wrapped or not, as torch.distributed.checkpoint's state_dict helpers do.
    OptimizedModule is recognised by name: importing torch._dynamo costs seconds."""
    while True:
        if isinstance(v, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            v = v.module
        elif type(v).__name__ == "OptimizedModule" and isinstance(
                getattr(v, "_orig_mod", None), torch.nn.Module):
            v = v._orig_mod
        else:
            return v


def without_wrapper_prefixes(saved: dict, live_keys) -> dict:
    """`saved` with the wrapper prefixes an older checkpoint recorded (every key starting
    with `module.` or `_orig_mod.`, none matching the live module) taken off."""
    changed = True
    while changed and saved and not any(k in live_keys for k in saved):
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(isinstance(k, str) and k.startswith(prefix) for k in saved):
                saved = {k[len(prefix):]: v for k, v in saved.items()}
                changed = True
    return saved


def component_kind(v: Any) -> str:
    """A coarse label for reports and completeness checks."""
    if isinstance(v, torch.nn.Module):
        return "model"
    if isinstance(v, torch.optim.Optimizer):
        return "optimizer"
    if isinstance(v, torch.optim.lr_scheduler.LRScheduler):
        return "scheduler"
    if type(v).__name__ == "GradScaler":
        return "scaler"
    if hasattr(v, "__iter__") and has_state_dict(v):
        return "data"
    if has_state_dict(v):
        return "object"
    if isinstance(v, (torch.Tensor, np.ndarray)):
        return "tensor"
    return "value"

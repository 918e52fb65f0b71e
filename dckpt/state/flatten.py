"""Split a training state into a safe tree and a list of tensors to write.

Objects with state_dict() (models, optimizers, schedulers, scalers, loaders, user objects)
are replaced by their state dicts, tagged with their type so restore knows to call
load_state_dict(). Tensors and arrays become named references; a tensor that is the very
same view as an earlier one (tied weights) becomes a reference to the earlier name.

Tensors that are different views of one storage (parameters as views of a flat buffer, as
in ZeRO and Megatron; `t` and `t[2:5]`) are stored once: one storage record holds the bytes
they span, and each becomes a view reference (offset, shape, strides) into it, so a load
gives views of one storage again, as torch.load does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import UnsupportedStateError
from ..format.dtypes import numpy_itemsize
from ..format.tree import ArrayRef, DtypeRef, ObjectState, TensorRef, ViewRef
from .tensors import TORCH_NAMES, dtype_name, view_key


class _once:
    """functools.cached_property without its per-instance lock (Python < 3.12 takes one on
    every first access: thousands of leaves a save, each asked once per save)."""

    def __init__(self, f):
        self.f, self.name = f, f.__name__

    def __get__(self, obj, cls=None):
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.f(obj)
        return value


@dataclass
class Leaf:
    """One tensor to store: the local data and where it sits in the global tensor."""
    name: str
    value: torch.Tensor | np.ndarray
    global_shape: list[int]
    offsets: list[int]
    replicated: bool = False  # identical on every rank: written once in total
    # a storage record made for views (see share_storages): a fresh tensor object whose
    # version counter does not follow writes through the views
    storage: bool = False

    # Cached: asked per leaf by the plan, the offer, the writer and the manifest, each save.
    # A leaf's value may be replaced (by its host copy) but never by one of another dtype.
    @_once
    def is_numpy(self) -> bool:
        return isinstance(self.value, np.ndarray)

    @_once
    def dtype(self) -> str:
        if self.is_numpy:
            return self.value.dtype.str
        # The table first: asked per leaf by the plan and the writer, and dtype_name (the
        # same lookup, which raises naming an unknown dtype) would be one more call.
        name = TORCH_NAMES.get(self.value.dtype)
        return name if name is not None else dtype_name(self.value.dtype)

    @property
    def nbytes(self) -> int:
        return self.value.nbytes if self.is_numpy else self.value.numel() * self.value.element_size()


@dataclass
class Flat:
    tree: Any
    leaves: list[Leaf] = field(default_factory=list)
    components: dict[str, str] = field(default_factory=dict)  # top-level key -> type name
    views: int = 0  # tensors stored as views of a shared storage record


# Values that flatten keeps as they are (exact types: a subclass, an IntEnum say, takes the
# general path).
_PLAIN = frozenset({int, float, str, bool, type(None)})


def has_state_dict(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(
        getattr(obj, "load_state_dict", None))


def type_name(obj: Any) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def flatten(state: Any, tensor_hook=None) -> Flat:
    """`tensor_hook(tensor, path) -> Leaf | None` lets the dist layer describe DTensors;
    it is asked about tensors of a subclass only (a DTensor is one, a plain tensor never)."""
    flat = Flat(tree=None)
    # (leaf, (storage address, device)) of plain tensors (not DTensor shards) with data:
    # those may share a storage
    plain: list[tuple[int, tuple]] = []
    seen: dict[tuple, str] = {}
    names: set[str] = set()

    def unique(path: str) -> str:
        name, n = path or "value", 1
        while name in names:
            n += 1
            name = f"{path}~{n}"
        names.add(name)
        return name

    def tensor(v: torch.Tensor, path: str) -> TensorRef:
        key = view_key(v)
        if key is not None and key in seen:
            return TensorRef(seen[key])
        name = unique(path)
        leaf = tensor_hook(v, name) if tensor_hook and type(v) is not torch.Tensor else None
        if leaf is None:
            dtype = TORCH_NAMES.get(v.dtype)
            if dtype is None:
                raise UnsupportedStateError(
                    f"tensor at '{path}' has unsupported dtype {v.dtype}", path)
            if v.layout != torch.strided:  # sparse, sparse CSR, jagged, ...
                raise UnsupportedStateError(f"tensor at '{path}' has layout {v.layout}; "
                                            "only dense tensors are stored", path)
            # A plain tensor that needs no grad is its own detached self: no new object.
            value = v if type(v) is torch.Tensor and not v.requires_grad else v.detach()
            shape = list(v.shape)
            leaf = Leaf(name, value, shape, [0] * len(shape))
            # Known here already: what the cached properties would compute per leaf.
            cached = leaf.__dict__
            cached["dtype"], cached["is_numpy"] = dtype, False
            if key is not None:  # not empty, not meta: may share its storage
                # The storage's address (cheaper than untyped_storage()), and device.
                plain.append((len(flat.leaves),
                              (key[1] - v.storage_offset() * v.element_size(), key[0])))
        flat.leaves.append(leaf)
        if key is not None:
            seen[key] = name
        return TensorRef(name)

    def walk(v: Any, path: str) -> Any:
        if type(v) in _PLAIN:
            return v
        if isinstance(v, torch.Tensor):
            return tensor(v, path)
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
            # A state dict's values are mostly plain tensors: those go straight to tensor().
            return {k: (tensor if type(x) is torch.Tensor else walk)(
                x, f"{path}/{k}" if path else str(k)) for k, x in v.items()}
        if isinstance(v, list):
            # Lists of plain values (a sampler's order, a param group's indices: thousands of
            # ints) in one step, copied: the tree must not change with the live list.
            if all(type(x) in _PLAIN for x in v):
                return v.copy() if type(v) is list else list(v)
            return [walk(x, f"{path}/{i}" if path else str(i)) for i, x in enumerate(v)]
        if isinstance(v, tuple):
            if all(type(x) in _PLAIN for x in v):
                return tuple(v)
            return tuple(walk(x, f"{path}/{i}" if path else str(i)) for i, x in enumerate(v))
        if has_state_dict(v) and not isinstance(v, type):
            v = unwrap(v)
            return ObjectState(type_name(v), walk(v.state_dict(), path))
        if isinstance(v, torch.utils.data.DataLoader):
            raise UnsupportedStateError(
                f"DataLoader at '{path}' has no state; wrap it in dckpt.data.ResumableLoader "
                "(or use torchdata's StatefulDataLoader) to save its position", path)
        return v  # scalars; anything else is refused with its path by tree.encode

    try:
        flat.tree = walk(state, "")
    finally:
        # walk refers to itself through its closure: without this the Flat, its leaves and
        # their tensors would live on in a reference cycle until the next full collection.
        walk = tensor = None  # noqa: F841
    share_storages(flat, plain, unique)
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


# A group of views is stored as one record only when the bytes they span are at most this
# many times their own: two small slices at the ends of a big buffer that is not part of
# the state are stored apart (unaliased on load), not as the whole buffer.
MAX_SPAN_RATIO = 2


def share_storages(flat: Flat, plain: list[tuple[int, tuple]], unique) -> None:
    """Replace plain tensors that are different views of one storage by one storage record
    and view references into it (see the module docstring). plain: (leaf index, (storage
    address, device)) of the candidates, as flatten found them."""
    groups: dict[tuple, list[int]] = {}
    for i, where in plain:
        group = groups.get(where)
        if group is None:
            groups[where] = [i]
        else:
            group.append(i)
    views: dict[str, ViewRef] = {}  # member's name -> its view of the record
    drop: set[int] = set()
    for members in groups.values():
        if len(members) < 2:
            continue
        ts = [flat.leaves[i].value for i in members]
        starts = [t.storage_offset() * t.element_size() for t in ts]
        ends = [s + _extent(t) for s, t in zip(starts, ts)]
        dtypes = {t.dtype for t in ts}
        record = ts[0].dtype if len(dtypes) == 1 else torch.uint8
        # Offsets must be whole elements of every view: with mixed dtypes the record starts
        # on a 16-byte boundary (the largest element size), which is inside the storage.
        lo = min(starts) if len(dtypes) == 1 else min(starts) // 16 * 16
        isz = torch.empty(0, dtype=record).element_size()
        n = -(-(max(ends) - lo) // isz)
        if n * isz > MAX_SPAN_RATIO * sum(e - s for s, e in zip(starts, ends)):
            continue
        name = unique(f"{flat.leaves[members[0]].name}~storage")
        for i, t, s in zip(members, ts, starts):
            views[flat.leaves[i].name] = ViewRef(name, dtype_name(t.dtype),
                                                 (s - lo) // t.element_size(),
                                                 tuple(t.shape), tuple(t.stride()))
        # A view of the live memory, not a copy: written like any other leaf.
        base = torch.empty(0, dtype=record, device=ts[0].device).set_(
            ts[0].untyped_storage(), lo // isz, (n,), (1,))
        flat.leaves[members[0]] = Leaf(name, base, [n], [0], storage=True)
        drop.update(members[1:])
    if views:
        flat.leaves = [x for i, x in enumerate(flat.leaves) if i not in drop]
        flat.tree = _to_views(flat.tree, views)
        flat.views = len(views)


def _to_views(node: Any, views: dict[str, ViewRef]) -> Any:
    if type(node) is TensorRef:
        return views.get(node.name, node)
    if isinstance(node, dict):
        return {k: _to_views(v, views) for k, v in node.items()}
    if isinstance(node, list):
        return [_to_views(v, views) for v in node]
    if isinstance(node, tuple):
        return tuple(_to_views(v, views) for v in node)
    if isinstance(node, ObjectState):
        return ObjectState(node.type_name, _to_views(node.state, views))
    return node


def _extent(t: torch.Tensor) -> int:
    """Bytes from a tensor's first element to the end of its last."""
    last = sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return (last + 1) * t.element_size()


def component_kind(v: Any) -> str:
    """A coarse label for reports and completeness checks."""
    if type(v) is torch.Tensor:  # the common case first (a plain tensor has no state_dict)
        return "tensor"
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

"""Put a decoded checkpoint tree back: into live objects in place, or as plain values.

Restoring into live state is one walk over the checkpoint tree beside the live state. It
compares keys, shapes and dtypes and collects every problem; it requests reads straight
into the live tensors and allocates only what the live state lacks (e.g. a fresh
optimizer's moments, once their files are known to hold them); changes to live containers
and the load_state_dict() calls are only recorded. If anything mismatched, all of it is
reported at once, and no byte has been read and nothing live has changed. Otherwise the
recorded changes are made, the reads run, and each object gets its state.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..errors import DckptError, ManifestError, StateMismatchError
from ..format.manifest import Manifest, TensorEntry
from ..format.tree import ArrayRef, DtypeRef, ObjectState, TensorRef, ViewRef
from .flatten import component_kind, has_state_dict, type_name, unwrap, without_wrapper_prefixes
from .reading import TensorReader
from .tensors import dtype_name, numpy_dtype, torch_dtype

# dist installs a function (tensor) -> (local tensor, global shape, offsets) for DTensors.
BlockOf = Callable[[torch.Tensor], "tuple[torch.Tensor, list[int], list[int]] | None"]


@dataclass
class RestoreReport:
    """What dckpt.load(path, into=state) restored: components (key -> kind), tensors and
    bytes read, components allowed to be missing, components of the checkpoint not
    restored, and notes (world-size change, what was left out)."""
    components: dict[str, str] = field(default_factory=dict)  # key -> kind, restored
    missing_allowed: list[str] = field(default_factory=list)
    tensors: int = 0
    bytes: int = 0
    notes: list[str] = field(default_factory=list)  # e.g. a world-size change
    # components the checkpoint holds that were not restored (not asked for): key -> type
    not_restored: dict[str, str] = field(default_factory=dict)


_ABSENT = object()
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_CLASS_CHECKED = (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)
# Saved type names of wrappers, which do not say the class of what they wrap.
_WRAPPERS = ("dckpt.", "accelerate.")


class _Walk:
    def __init__(self, m: Manifest, reader: TensorReader, block_of: BlockOf | None,
                 tensor_names: dict[str, str] | None = None, strict: bool = True):
        self.m, self.reader, self.block_of = m, reader, block_of
        self.strict = strict
        self.alias = tensor_names or {}  # tree name -> manifest name (per-rank naming)
        self.problems: list[str] = []
        self.updates: list[Callable[[], Any]] = []  # changes to live containers, made last
        self.loaders: list[Callable[[], Any]] = []
        self.made: dict[str, Any] = {}
        self.restored: list[TensorEntry] = []  # one per tensor read, for the report
        self.copies: list[tuple] = []  # (live tensor, view of a read storage record)
        self.report = RestoreReport()
        self.touched = False

    def finish(self) -> None:
        """Raise every problem found, or make the recorded changes and run the reads."""
        if self.problems:
            raise StateMismatchError(self.problems)
        self.touched = True  # from here on a failure leaves live state partly changed
        for update in self.updates:
            update()
        self.reader.run()
        for live, view in self.copies:  # live views sharing memory get the same bytes
            live.copy_(view)
        self.report.tensors = len(self.restored)
        self.report.bytes = sum(e.nbytes for e in self.restored)

    def entry(self, ref, path: str):
        name = self.alias.get(ref.name, ref.name)
        e = self.m.tensors.get(name)
        if e is None:
            self.problems.append(f"{path}: tensor '{name}' is not in the checkpoint")
        return name, e

    def in_place(self, live: torch.Tensor, ref: TensorRef) -> bool:
        """Plan the read of the common tensor (a plain, contiguous CPU tensor, stored whole
        as it is live) straight into it; False for anything else, which tensor() takes.
        Thousands per state: this skips tensor()'s general path and the path string."""
        name = self.alias.get(ref.name, ref.name)
        e = self.m.tensors.get(name)
        if (e is None or e.kind != "torch" or len(e.shards) != 1 or not live.is_cpu
                or e.shards[0].shape != e.shape  # one block read so far of a split manifest
                or e.dtype != dtype_name(live.dtype) or e.shape != list(live.shape)
                or not live.is_contiguous()):
            return False
        self.reader.request_whole(name, e, live)
        self.restored.append(e)
        return True

    def tensor(self, live: Any, ref: TensorRef, path: str) -> Any:
        name, e = self.entry(ref, path)
        if e is None:
            return live
        if e.kind != "torch":
            self.problems.append(f"{path}: stored as a numpy array, live value is a tensor")
            return live
        if isinstance(live, torch.Tensor):
            # Only a tensor subclass can be a DTensor: skip the hook for the common types.
            block = (self.block_of(live) if self.block_of and type(live) not in _PLAIN
                     else None)
            local, gshape, offsets = block or (live, list(live.shape), None)
            if gshape != e.shape or dtype_name(live.dtype) != e.dtype:
                self.problems.append(f"{path}: live {dtype_name(live.dtype)}{gshape} vs "
                                     f"checkpoint {e.dtype}{e.shape}")
                return live
            self.reader.request(name, local, offsets)
            self.restored.append(e)
            return live
        if name not in self.made:
            # After checking its files and the load's ceiling: what the manifest declares.
            t = self.reader.allocate(name, e.nbytes,
                                     lambda: torch.empty(e.shape, dtype=torch_dtype(e.dtype)))
            self.reader.request(name, t)
            self.restored.append(e)
            self.made[name] = t
        return self.made[name]

    def view(self, live: Any, ref: ViewRef, path: str) -> Any:
        """A view into a storage record: a new tensor sharing the record's memory with the
        other views of it (as torch.load gives them back), or, for a live tensor, its bytes
        copied in after the read (the live tensors keep whatever aliasing they have)."""
        name, e = self.entry(ref, path)
        if e is None:
            return live
        if e.kind != "torch" or len(e.shape) != 1 or ref.extent() > e.nbytes:
            # Hostile or broken: the view would reach outside the bytes stored for it.
            raise ManifestError(f"{path}: view of {name!r} ({ref.dtype}, offset {ref.offset}, "
                                f"shape {list(ref.shape)}, stride {list(ref.stride)}) needs "
                                f"{ref.extent()} bytes of a 1-D storage record, the record "
                                f"is {e.kind} {e.dtype}{e.shape} ({e.nbytes} bytes)",
                                field="tree")
        if isinstance(live, torch.Tensor) and (
                list(live.shape) != list(ref.shape) or dtype_name(live.dtype) != ref.dtype
                or (self.block_of and type(live) not in _PLAIN and self.block_of(live))):
            self.problems.append(f"{path}: live {dtype_name(live.dtype)}{list(live.shape)} vs "
                                 f"checkpoint {ref.dtype}{list(ref.shape)} (a view)")
            return live
        base = self.tensor(None, TensorRef(ref.name), path)  # read once, shared by its views
        view = torch.empty(0, dtype=torch_dtype(ref.dtype)).set_(
            base.untyped_storage(), ref.offset, ref.shape, ref.stride)
        if isinstance(live, torch.Tensor):
            self.copies.append((live, view))
            return live
        return view

    def array(self, live: Any, ref: ArrayRef, path: str) -> Any:
        name, e = self.entry(ref, path)
        if e is None:
            return live
        if e.kind != "numpy":
            self.problems.append(f"{path}: stored as a tensor, live value is a numpy array")
            return live
        if name not in self.made:
            if (isinstance(live, np.ndarray) and live.flags.c_contiguous and live.flags.writeable
                    and live.dtype.str == e.dtype and list(live.shape) == e.shape):
                a = live
            else:
                a = self.reader.allocate(name, e.nbytes,
                                         lambda: np.empty(e.shape, dtype=numpy_dtype(e.dtype)))
            self.reader.request(name, a)
            self.restored.append(e)
            self.made[name] = a
        return self.made[name]

    def walk(self, live: Any, node: Any, path: str) -> Any:
        if isinstance(node, ViewRef):
            return self.view(live, node, path)
        if isinstance(node, TensorRef):
            return self.tensor(live, node, path)
        if isinstance(node, ArrayRef):
            return self.array(live, node, path)
        if isinstance(node, DtypeRef):
            return torch_dtype(node.name)
        if isinstance(node, ObjectState):
            if not has_state_dict(live):  # e.g. a plain state dict given as the live value
                return self.walk(live, node.state, path)
            wrapper, live = live, unwrap(live)  # the wrapper stays where the caller has it
            self.compare_class(node.type_name, live, path)
            live_sd = live.state_dict()
            module = isinstance(live, torch.nn.Module)
            saved = node.state
            if module:
                if isinstance(saved, dict):
                    saved = without_wrapper_prefixes(saved, live_sd)
                self.compare_module(live_sd, saved, path)
            changes = len(self.updates)
            value = self.walk(live_sd, saved, path)
            # A module whose every tensor was read in place into its own parameters and
            # buffers would only copy each onto itself: skip the call (~1 ms per 100 modules).
            if not (module and len(self.updates) == changes and _loads_by_default(live)):
                self.loaders.append((path, live, value))
            return wrapper
        if isinstance(node, dict):
            live_d = live if isinstance(live, dict) else {}
            out = {}
            for k, v in node.items():
                lv = live_d.get(k)
                if type(v) is TensorRef and type(lv) in _PLAIN and self.in_place(lv, v):
                    out[k] = lv
                else:
                    out[k] = self.walk(lv, v, f"{path}/{k}" if path else str(k))
            if isinstance(live, dict):
                if any(live.get(k, _ABSENT) is not v for k, v in out.items()):
                    self.updates.append(functools.partial(live.update, out))
                return live
            return out
        if isinstance(node, list):
            same = isinstance(live, list) and len(live) == len(node)
            out = [self.walk(live[i] if same else None, v, f"{path}/{i}")
                   for i, v in enumerate(node)]
            if same:
                self.updates.append(functools.partial(live.__setitem__, slice(None), out))
                return live
            return out
        if isinstance(node, tuple):
            same = isinstance(live, tuple) and len(live) == len(node)
            return tuple(self.walk(live[i] if same else None, v, f"{path}/{i}")
                         for i, v in enumerate(node))
        return node

    def compare_module(self, live_sd: dict, saved: Any, path: str) -> None:
        """A module takes exactly its own keys, and a tensor wherever it has one."""
        if not isinstance(saved, dict):
            self.problems.append(f"{path}: the checkpoint holds a {type(saved).__name__} "
                                 "where the module's state dict belongs")
            return
        self.compare_keys(live_sd, saved, path)
        for k, v in live_sd.items():
            if isinstance(v, torch.Tensor) and k in saved and not isinstance(saved[k], TensorRef):
                self.problems.append(f"{path}/{k}: the checkpoint holds a "
                                     f"{type(saved[k]).__name__}, the module a tensor")

    def compare_class(self, saved: str, live: Any, path: str) -> None:
        """An optimizer or scheduler takes only the state of its own class: AdamW's moments
        handed to SGD load without complaint and train with the wrong update rule. Saved
        wrappers (accelerate's, dckpt's imported or ZeRO states) name no inner class: any
        live class takes them; a live wrapper takes its inner class's state."""
        chain, obj = [], live
        while obj is not None and len(chain) < 4:
            chain.append(obj)
            obj = next((inner for a in ("optimizer", "scheduler", "optim")
                        if has_state_dict(inner := getattr(obj, a, None))), None)
        if (not any(isinstance(o, _CLASS_CHECKED) for o in chain)
                or saved.startswith(_WRAPPERS) or saved in {type_name(o) for o in chain}):
            return
        live_name = type_name(chain[-1])
        if self.strict:
            self.problems.append(
                f"{path}: the checkpoint holds the state of a {saved}, the live object is a "
                f"{live_name}; restore it into a {saved.rpartition('.')[2]} object, or "
                "pass strict=False to hand the state to its load_state_dict() anyway")
        else:
            self.report.notes.append(f"{path}: {saved} state loaded into a {live_name} "
                                     "(strict=False)")

    def compare_keys(self, live_sd: dict, saved: dict, path: str) -> None:
        missing = [k for k in live_sd if k not in saved]
        extra = [k for k in saved if k not in live_sd]
        if missing:
            self.problems.append(f"{path}: keys missing from the checkpoint: {missing[:8]}"
                                 + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
        if extra:
            self.problems.append(f"{path}: unexpected keys in the checkpoint: {extra[:8]}"
                                 + (f" (+{len(extra) - 8} more)" if len(extra) > 8 else ""))


def _loads_by_default(module: torch.nn.Module) -> bool:
    """Every part of the module saves and loads the default way: its state dict holds
    its own parameters and buffers (no override, no state-dict hook), and loading only
    copies the given tensors into them (no override, no load hook, no extra state)."""
    base = torch.nn.Module
    for m in module.modules():
        cls = type(m)
        if (cls.state_dict is not base.state_dict
                or cls._save_to_state_dict is not base._save_to_state_dict
                or cls.load_state_dict is not base.load_state_dict
                or cls._load_from_state_dict is not base._load_from_state_dict
                or cls.set_extra_state is not base.set_extra_state
                or m._state_dict_hooks or m._state_dict_pre_hooks
                or m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks):
            return False
    return True


def restore_into(live: dict, tree: Any, m: Manifest, reader: TensorReader,
                 allow_missing: bool | list[str] = False, block_of: BlockOf | None = None,
                 tensor_names: dict[str, str] | None = None,
                 strict: bool = True) -> RestoreReport:
    """Restore `tree` into the live state dict `live`; returns what was restored.
    strict=False lets an optimizer or scheduler take the state of another class."""
    if not isinstance(live, dict):
        raise TypeError("restore needs the live state as a dict of components")
    if not isinstance(tree, dict):
        raise StateMismatchError([f"the checkpoint's state is a {type(tree).__name__}, not a "
                                  "dict of components; load it without into="])
    missing = [k for k in live if k not in tree]
    allowed = missing if allow_missing is True else [k for k in missing if k in (allow_missing or [])]
    problems = [f"component '{k}' ({component_kind(live[k])}) is in the live state but not in "
                "the checkpoint; pass allow_missing=[...] to skip it" for k in missing
                if k not in allowed]
    subtree = {k: v for k, v in tree.items() if k in live}
    work = _Walk(m, reader, block_of, tensor_names, strict)
    work.walk(live, subtree, "")
    work.problems[:0] = problems
    try:
        work.finish()
        for path, obj, value in work.loaders:
            _load_state_dict(path, obj, value)
    except DckptError as e:
        if work.touched:
            raise partly_overwritten(e)
        raise
    work.report.components = {k: component_kind(live[k]) for k in subtree}
    work.report.missing_allowed = allowed
    left = {k: saved_kind(v) for k, v in tree.items() if k not in live}
    if left:
        work.report.not_restored = left
        work.report.notes.append(
            "in the checkpoint but not restored (not in the live state or keys): "
            + ", ".join(f"{k} ({t})" for k, t in left.items()))
    return work.report


def partly_overwritten(e: DckptError) -> DckptError:
    """`e`, of its own type, saying that the live state was changed before it was raised.
    Checking every chunk before the first write would leave it untouched but cost a second
    pass over the data on every load (docs/ARCHITECTURE.md, "Loading")."""
    e.live_state_changed = True
    e.args = (f"{e}\nThe live state was PARTLY OVERWRITTEN by this failed load (what was "
              "read before the failure holds the checkpoint's values): restore it completely "
              "from an intact checkpoint before training on (CheckpointManager.restore() "
              "falls back to the newest intact one by itself).",)
    return e


def saved_kind(node: Any) -> str:
    """A short label of a saved component: its class name, or the kind of value."""
    if isinstance(node, ObjectState):
        return node.type_name.rpartition(".")[2]
    if isinstance(node, (TensorRef, ArrayRef)):
        return "tensor"
    return type(node).__name__


def _load_state_dict(path: str, obj: Any, value: Any) -> None:
    """Hand an object its state; whatever it objects to becomes one typed error naming it."""
    try:
        obj.load_state_dict(value)
    except DckptError:
        raise
    except Exception as e:
        raise StateMismatchError([f"{path}: {type(obj).__name__}.load_state_dict rejected the "
                                  f"checkpoint's state: {type(e).__name__}: {e}"]) from e


def materialize(tree: Any, m: Manifest, reader: TensorReader,
                tensor_names: dict[str, str] | None = None) -> Any:
    """The tree as plain values: new tensors/arrays, objects as their state dicts."""
    w = _Walk(m, reader, None, tensor_names)
    out = w.walk(None, tree, "")
    w.finish()
    return out

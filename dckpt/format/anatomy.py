"""What a checkpoint holds, read from its manifest alone: components, counters, RNG streams.

Tools (verify, inspect, ls) need to tell the model from the optimizer without torch and
without reading tensor data. A component is recognised by the type its tree was recorded
with and, for state converted from plain dicts, by the shape of its state dict.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from .manifest import CODEC_RAW, Manifest
from .tree import ArrayRef, ObjectState, TensorRef, ViewRef, decode, refs

# The parts a training run needs to resume exactly, in report order.
TRAINING_PARTS = ("model", "optimizer", "scheduler", "rng", "data")
# RNG streams every process has; "cuda" exists only where CUDA was initialised.
BASE_STREAMS = ("python", "numpy", "torch")
# Manifest meta key set by `dckpt repair` when it adds RNG streams a legacy checkpoint lacked.
RNG_SEEDED_NOW = "rng_seeded_now"

_NUMPY_OF = {"float64": "<f8", "float32": "<f4", "float16": "<f2", "int64": "<i8",
             "int32": "<i4", "int16": "<i2", "int8": "|i1", "uint8": "|u1", "bool": "|b1"}


@dataclass
class Component:
    key: str
    kind: str  # model | optimizer | scheduler | scaler | data | object | tensor | value
    type_name: str | None  # recorded type ("torch.optim.adamw.AdamW"), None for plain dicts
    state: Any  # the decoded state (refs in place of tensors)

    @property
    def short_type(self) -> str | None:
        return self.type_name.rsplit(".", 1)[-1] if self.type_name else None


@dataclass
class RankView:
    rank: int
    components: list[Component]
    rng_streams: list[str]
    aliases: dict[str, str] = field(default_factory=dict)  # tree name -> manifest name

    def of_kind(self, kind: str) -> list[Component]:
        return [c for c in self.components if c.kind == kind]

    def model_key(self, component: str | None) -> str:
        """`component`, checked to be here, or the first model's key; ValueError saying
        which components there are (callers raise their own error type with it)."""
        keys = [c.key for c in self.components]
        if component is None:
            models = self.of_kind("model")
            if not models:
                raise ValueError(f"holds no model component (components: {', '.join(keys)}): "
                                 "name one")
            return models[0].key
        if component not in keys:
            raise ValueError(f"has no component {component!r} (it has {', '.join(keys)})")
        return component

    def missing(self) -> list[str]:
        have = {c.kind for c in self.components}
        if self.rng_streams:
            have.add("rng")
        return [p for p in TRAINING_PARTS if p not in have]


def rank_view(m: Manifest, rank: int) -> RankView:
    """Components and RNG streams of one rank. Raises ManifestError on a malformed tree."""
    entry = m.ranks[rank]
    tree = decode(entry.get("tree"))
    rng = decode(entry.get("rng"))
    streams = sorted(rng) if isinstance(rng, dict) else []
    aliases = entry.get("aliases") if isinstance(entry.get("aliases"), dict) else {}
    if isinstance(tree, dict) and _kind("", None, tree) != "model":
        comps = [classify(str(k), v) for k, v in tree.items()]
    else:
        comps = [classify("state", tree)]
    return RankView(rank, comps, streams, aliases)


def bad_views(m: Manifest, view: RankView) -> list[str]:
    """The views of a rank's state that reach outside their storage record, or name none
    (docs/FORMAT.md: $view); loads refuse them too."""
    out = []
    for c in view.components:
        for ref in refs(c.state):
            if type(ref) is not ViewRef:
                continue
            name = view.aliases.get(ref.name, ref.name)
            e = m.tensors.get(name)
            if e is None or e.kind != "torch" or len(e.shape) != 1 or ref.extent() > e.nbytes:
                out.append(f"rank {view.rank}: view of {name!r} in '{c.key}' needs "
                           f"{ref.extent()} bytes of a 1-D storage record; the manifest has "
                           + ("none" if e is None else f"{e.kind} {e.dtype}{e.shape}"))
    return out


def classify(key: str, node: Any) -> Component:
    type_name = node.type_name if isinstance(node, ObjectState) else None
    state = node.state if isinstance(node, ObjectState) else node
    return Component(key, _kind(key, type_name, state), type_name, state)


def _kind(key: str, type_name: str | None, state: Any) -> str:
    t = type_name or ""
    if "lr_scheduler" in t or _looks_like_scheduler(state):
        return "scheduler"
    if t.endswith("GradScaler") or _has(state, "scale", "growth_factor", "backoff_factor"):
        return "scaler"
    if _has(state, "state", "param_groups"):
        return "optimizer"
    if t.endswith("ResumableLoader") or _looks_like_loader(state):
        return "data"
    if _looks_like_weights(state):
        return "model"
    if isinstance(state, (TensorRef, ArrayRef)):
        return "tensor"
    if type_name is not None:
        return "object"
    if key.lower() in ("data", "loader", "dataloader", "sampler") and isinstance(state, dict):
        return "data"
    return "value"


def _has(state: Any, *keys: str) -> bool:
    return isinstance(state, dict) and all(k in state for k in keys)


def _looks_like_scheduler(state: Any) -> bool:
    return _has(state, "last_epoch") and (_has(state, "base_lrs") or _has(state, "_step_count")
                                           or _has(state, "min_lrs"))


def _looks_like_weights(state: Any) -> bool:
    """A flat state dict of tensors (a module's); a few extra entries (`_extra_state`) allowed."""
    if not isinstance(state, dict) or not state:
        return False
    tensors = sum(isinstance(v, TensorRef) for v in state.values())
    nested = any(isinstance(v, (dict, list, ObjectState)) for v in state.values())
    return tensors > 0 and not nested and tensors * 2 >= len(state)


def _looks_like_loader(state: Any) -> bool:
    # dckpt's ResumableLoader, torchdata's StatefulDataLoader.
    return _has(state, "epoch", "batches") or _has(state, "_num_yielded") or _has(
        state, "_sampler_iter_yielded")


# ---- training counters ------------------------------------------------------------------

def as_int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and math.isfinite(v) and v == int(v):
        return int(v)
    return None


def as_float(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


@dataclass
class OptimizerSteps:
    """The step count(s) an optimizer recorded for its parameters."""
    values: list[float]  # one per parameter with state; empty: no step count kept
    unread: list[tuple[str, str]]  # (tensor, why) for step tensors that could not be read
    skipped: int = 0  # step tensors the caller chose not to read

    @property
    def count(self) -> int | None:
        return int(max(self.values)) if self.values else None


def optimizer_steps(opt: Component, read_scalar) -> OptimizerSteps:
    """Per-parameter `step` of an optimizer state. `read_scalar(tree_name) -> float | None`
    reads a 0-d tensor (torch keeps Adam's step as one since 1.12; None skips it); plain
    numbers are used as is."""
    per_param = opt.state.get("state") if isinstance(opt.state, dict) else None
    out = OptimizerSteps([], [])
    if not isinstance(per_param, dict):
        return out
    for entry in per_param.values():
        step = entry.get("step") if isinstance(entry, dict) else None
        if type(step) is TensorRef:  # (a view is no step counter)
            try:
                value = read_scalar(step.name)
            except Exception as e:  # reported, never fatal: the checksum group names damage
                out.unread.append((step.name, str(e)))
                continue
            if value is None:
                out.skipped += 1
            else:
                out.values.append(float(value))
        elif as_float(step) is not None:
            out.values.append(float(step))
    return out


class ScalarReader:
    """read_scalar for optimizer_steps: a scalar stored as one raw chunk is read with one
    pread and checked against its hash (a step count per parameter: hundreds per
    checkpoint, so each data file is opened once, not once per scalar); anything else
    through the pure-Python reference reader (verified). Use it as a context manager."""

    def __init__(self, ckpt, m: Manifest, aliases: dict[str, str], read_bytes=None):
        """read_bytes(name) -> bytes: how to read a tensor's raw bytes (checked) where they
        are not local files (an object store); by default pread of the files."""
        self.ckpt, self.m, self.aliases = ckpt, m, aliases
        self._read_bytes = read_bytes
        self._fds: dict[int, int] = {}  # file index -> open descriptor

    def __enter__(self) -> "ScalarReader":
        return self

    def __exit__(self, *exc) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _raw_bytes(self, name: str) -> bytes:
        from .reader import read_tensor_bytes

        m = self.m
        if self._read_bytes is not None:
            return self._read_bytes(name)
        chunks = [ch for shard in m.tensors[name].shards for ch in shard.chunks]
        if len(chunks) != 1 or chunks[0].codec != CODEC_RAW:
            return read_tensor_bytes(self.ckpt, m, name).tobytes()
        ch = chunks[0]
        fd = self._fds.get(ch.file)
        if fd is None:
            fd = os.open(m.files[ch.file].path(self.ckpt),
                         os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
            self._fds[ch.file] = fd
        data = os.pread(fd, ch.stored, ch.offset)
        if len(data) != ch.stored or xxhash.xxh3_64_intdigest(data) != ch.raw_hash:
            raise ValueError(f"{name}: stored bytes at offset {ch.offset} are short or "
                             "fail their hash")
        return data

    def __call__(self, tree_name: str) -> float:
        name = self.aliases.get(tree_name, tree_name)
        entry = self.m.tensors[name]
        if len(entry.shape) > 1 or (entry.shape and entry.shape[0] != 1):
            raise ValueError(f"shape {entry.shape} is not a scalar")
        dtype = entry.dtype if entry.kind == "numpy" else _NUMPY_OF.get(entry.dtype)
        if dtype is None:
            raise ValueError(f"dtype {entry.dtype} is not a step counter type")
        return float(np.frombuffer(self._raw_bytes(name), dtype=dtype)[0])


@dataclass
class SchedulerInfo:
    type_name: str | None
    last_epoch: int | None
    step_count: int | None
    last_lr: list[float]
    base_lrs: list[float]
    max_lrs: list[float]  # cyclic / one-cycle peaks, when recorded


def scheduler_info(sched: Component) -> SchedulerInfo:
    s = sched.state if isinstance(sched.state, dict) else {}

    def floats(v) -> list[float]:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return [float(v)]
        if isinstance(v, (list, tuple)):
            return [float(x) for x in v if as_float(x) is not None]
        return []

    return SchedulerInfo(sched.type_name, as_int(s.get("last_epoch")),
                         as_int(s.get("_step_count")), floats(s.get("_last_lr")),
                         floats(s.get("base_lrs")), floats(s.get("max_lrs")))


def optimizer_lrs(opt: Component) -> tuple[list[float], list[float], list[float]]:
    """(lr, initial_lr, max_lr) per param group; max_lr only where a one-cycle schedule set it."""
    groups = opt.state.get("param_groups") if isinstance(opt.state, dict) else None
    lrs, initial, peak = [], [], []
    for g in groups if isinstance(groups, list) else []:
        if not isinstance(g, dict):
            continue
        if as_float(g.get("lr")) is not None:
            lrs.append(float(g["lr"]))
        if as_float(g.get("initial_lr")) is not None:
            initial.append(float(g["initial_lr"]))
        if as_float(g.get("max_lr")) is not None:
            peak.append(float(g["max_lr"]))
    return lrs, initial, peak


def loader_position(data: Component) -> tuple[int | None, int | None]:
    """(epoch, batches consumed in it) of a data component, when it records them."""
    s = data.state if isinstance(data.state, dict) else {}
    if "batches" in s:
        return as_int(s.get("epoch")), as_int(s.get("batches"))
    if "_num_yielded" in s:  # torchdata StatefulDataLoader
        return None, as_int(s.get("_num_yielded"))
    return as_int(s.get("epoch")), None


def tensor_count(node: Any) -> int:
    from .tree import refs
    return len(refs(node))

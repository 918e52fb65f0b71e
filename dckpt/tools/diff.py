"""Compare two checkpoints: tensors added, removed and changed, and non-tensor state.

Tensors whose stored chunks carry the same raw hashes are equal without being read (two
steps of a run share frozen weights, a copied checkpoint shares everything). The others
are read (verified) a batch at a time and compared in blocks, so memory stays bounded.

Relative difference is max|a - b| / max(|a|, |b|) over the tensor: it is defined where
elementwise ratios blow up near zero, and reads as "how big is the change against the
tensor's scale".
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..format import tree as treecodec
from ..format.manifest import Manifest, TensorEntry
from ..format.tree import ArrayRef, DtypeRef, ObjectState, TensorRef

SCHEMA = "dckpt.diff/1"
BLOCK = 1 << 22  # elements compared at a time
BATCH_BYTES = 256 << 20  # tensor bytes read at a time, per side


@dataclass
class TensorDiff:
    name: str
    change: str  # "added" | "removed" | "changed" | "retyped"
    a: str | None  # dtype[shape]
    b: str | None
    max_abs: float | None = None
    max_rel: float | None = None
    differing: int | None = None  # elements that differ
    numel: int | None = None

    def to_json(self) -> dict:
        return {"name": self.name, "change": self.change, "a": self.a, "b": self.b,
                "max_abs": _finite(self.max_abs), "max_rel": _finite(self.max_rel),
                "differing": self.differing, "numel": self.numel}


@dataclass
class ValueDiff:
    path: str
    a: str | None  # a short rendering; None: absent on that side
    b: str | None

    def to_json(self) -> dict:
        return {"path": self.path, "a": self.a, "b": self.b}


@dataclass
class DiffReport:
    a: str
    b: str
    atol: float = 0.0
    identical_tensors: int = 0
    unread_identical: int = 0  # of those, proven equal by hashes without reading
    tensors: list[TensorDiff] = field(default_factory=list)
    values: list[ValueDiff] = field(default_factory=list)
    meta: list[ValueDiff] = field(default_factory=list)  # provenance: shown, not a difference

    @property
    def same(self) -> bool:
        return not self.tensors and not self.values

    def to_json(self) -> dict:
        count = {k: sum(t.change == k for t in self.tensors)
                 for k in ("added", "removed", "changed", "retyped")}
        return {"schema": SCHEMA, "a": self.a, "b": self.b, "same": self.same,
                "atol": self.atol,
                "summary": {"identical": self.identical_tensors,
                            "identical_by_hash": self.unread_identical, **count,
                            "values": len(self.values)},
                "tensors": [t.to_json() for t in self.tensors],
                "values": [v.to_json() for v in self.values],
                "meta": [v.to_json() for v in self.meta]}


def _finite(v: float | None):
    if v is None or math.isfinite(v):
        return v
    return str(v)


def diff(a: str | os.PathLike, b: str | os.PathLike, *, atol: float = 0.0,
         threads: int = 0) -> DiffReport:
    from ..storage.records import read_manifest
    ma, mb = read_manifest(a), read_manifest(b)
    report = DiffReport(str(a), str(b), atol)
    from ..storage import location
    _diff_tensors(location(a), ma, location(b), mb, report, threads)
    _diff_state(ma, mb, report)
    return report


def _sig(t: TensorEntry) -> str:
    return f"{t.dtype}[{', '.join(map(str, t.shape))}]"


def _same_by_hash(x: TensorEntry, y: TensorEntry) -> bool:
    def layout(t):
        return [(s.offsets, s.shape, [(c.raw, c.raw_hash) for c in s.chunks]) for s in t.shards]
    return layout(x) == layout(y)


def _diff_tensors(pa: Path, ma: Manifest, pb: Path, mb: Manifest, report: DiffReport,
                  threads: int) -> None:
    to_read = []
    for name in sorted(set(ma.tensors) | set(mb.tensors)):
        x, y = ma.tensors.get(name), mb.tensors.get(name)
        if x is None or y is None:
            report.tensors.append(TensorDiff(name, "added" if x is None else "removed",
                                             _sig(x) if x else None, _sig(y) if y else None))
        elif (x.kind, x.dtype, x.shape) != (y.kind, y.dtype, y.shape):
            report.tensors.append(TensorDiff(name, "retyped", _sig(x), _sig(y)))
        elif _same_by_hash(x, y):
            report.identical_tensors += 1
            report.unread_identical += 1
        else:
            to_read.append(name)
    batch, nbytes = [], 0
    for name in to_read:
        batch.append(name)
        nbytes += ma.tensors[name].nbytes
        if nbytes >= BATCH_BYTES:
            _compare_batch(pa, ma, pb, mb, batch, report, threads)
            batch, nbytes = [], 0
    if batch:
        _compare_batch(pa, ma, pb, mb, batch, report, threads)
    order = {"changed": 0, "retyped": 1, "added": 2, "removed": 3}
    report.tensors.sort(key=lambda t: (order[t.change], t.name))


def _read(path: Path, m: Manifest, names: list[str], threads: int) -> list:
    import numpy as np
    import torch

    from ..state.reading import TensorReader
    from ..state.tensors import torch_dtype
    reader = TensorReader(path, m, verify=True, threads=threads)
    out = []
    for n in names:
        e = m.tensors[n]
        dest = (np.empty(e.shape, dtype=np.dtype(e.dtype)) if e.kind == "numpy"
                else torch.empty(e.shape, dtype=torch_dtype(e.dtype)))
        reader.request(n, dest)
        out.append(dest)
    reader.run()
    return out


def _compare_batch(pa, ma, pb, mb, names, report: DiffReport, threads: int) -> None:
    for name, x, y in zip(names, _read(pa, ma, names, threads), _read(pb, mb, names, threads)):
        max_abs, scale, differing, numel = compare(x, y)
        if differing == 0 or max_abs <= report.atol:
            report.identical_tensors += 1
            continue
        rel = max_abs / scale if scale > 0 else math.inf
        e = ma.tensors[name]
        report.tensors.append(TensorDiff(name, "changed", _sig(e), _sig(e), max_abs, rel,
                                         differing, numel))


def compare(x, y) -> tuple[float, float, int, int]:
    """(max |x - y|, max(|x|, |y|) over finite values, elements differing, numel).
    NaN equals NaN here: a checkpoint compared with its copy is identical."""
    import numpy as np
    import torch
    if isinstance(x, np.ndarray):
        x, y = torch.from_numpy(_numeric(x)), torch.from_numpy(_numeric(y))
    fx, fy = x.reshape(-1), y.reshape(-1)
    max_abs, scale, differing = 0.0, 0.0, 0
    for i in range(0, fx.numel(), BLOCK):
        a, b = fx[i:i + BLOCK], fy[i:i + BLOCK]
        if a.dtype == torch.bool:
            n = int((a != b).sum())
            differing += n
            max_abs = max(max_abs, 1.0 if n else 0.0)
            scale = 1.0
            continue
        if not a.is_complex():
            a, b = a.double(), b.double()
        both_nan = a.isnan() & b.isnan()
        neq = (a != b) & ~both_nan
        n = int(neq.sum())
        differing += n
        if n:
            d = (a - b).abs()
            d = torch.where(neq, d, torch.zeros_like(d))
            d = torch.where(d.isnan(), torch.full_like(d, math.inf), d)
            max_abs = max(max_abs, float(d.max()))
        for t in (a, b):
            mag = t.abs()
            mag = mag[mag.isfinite()]
            if mag.numel():
                scale = max(scale, float(mag.max()))
    return max_abs, scale, differing, fx.numel()


def _numeric(arr):
    import numpy as np
    if arr.dtype.kind in "biufc" and arr.dtype.str[1:] not in ("u2", "u4", "u8"):
        return arr
    return arr.astype(np.float64)


# ---- non-tensor state -------------------------------------------------------------------

def _diff_state(ma: Manifest, mb: Manifest, report: DiffReport) -> None:
    out = report.values
    if ma.world_size != mb.world_size:
        out.append(ValueDiff("world_size", str(ma.world_size), str(mb.world_size)))
    for r in range(min(ma.world_size, mb.world_size)):
        prefix = f"rank {r}: " if max(ma.world_size, mb.world_size) > 1 else ""
        ea, eb = ma.ranks[r], mb.ranks[r]
        _walk(treecodec.decode(ea.get("tree")), treecodec.decode(eb.get("tree")),
              prefix, out)
        _walk(treecodec.decode(ea.get("rng")), treecodec.decode(eb.get("rng")),
              prefix + "rng", out)
    for section in ("counters", "metrics"):
        _walk(getattr(ma, section), getattr(mb, section), section, out)
    _walk(ma.meta, mb.meta, "meta", report.meta)


def _join(path: str, key: Any) -> str:
    if not path:
        return str(key)
    return f"{path}{key}" if path.endswith(": ") else f"{path}/{key}"


def _walk(a: Any, b: Any, path: str, out: list[ValueDiff]) -> None:
    if isinstance(a, ObjectState) and isinstance(b, ObjectState):
        if a.type_name != b.type_name:
            out.append(ValueDiff(_join(path, "<type>"), a.type_name, b.type_name))
        _walk(a.state, b.state, path, out)
        return
    if isinstance(a, (TensorRef, ArrayRef)) and type(a) is type(b):
        if a != b:  # the tensors themselves are compared by name (views: and geometry)
            out.append(ValueDiff(path, _show(a), _show(b)))
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if k not in b:
                out.append(ValueDiff(_join(path, k), _show(a[k]), None))
            elif k not in a:
                out.append(ValueDiff(_join(path, k), None, _show(b[k])))
            else:
                _walk(a[k], b[k], _join(path, k), out)
        return
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and type(a) is type(b):
        if len(a) != len(b) and not _all_scalars(a, b):
            out.append(ValueDiff(_join(path, "<len>"), str(len(a)), str(len(b))))
        if len(a) == len(b) or not _all_scalars(a, b):
            for i, (x, y) in enumerate(zip(a, b)):
                _walk(x, y, _join(path, i), out)
            return
    if not _equal(a, b):
        out.append(ValueDiff(path or "<state>", _show(a), _show(b)))


def _all_scalars(a, b) -> bool:
    return all(not isinstance(v, (dict, list, tuple, ObjectState)) for v in (*a, *b))


def _equal(a: Any, b: Any) -> bool:
    if type(a) is not type(b) and not (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                       and not isinstance(a, bool) and not isinstance(b, bool)):
        return False
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _show(v: Any, width: int = 80) -> str:
    if isinstance(v, (TensorRef, ArrayRef)):
        return f"<tensor {v.name}>"
    if isinstance(v, DtypeRef):
        return f"<dtype {v.name}>"
    if isinstance(v, (bytes, bytearray)):
        import xxhash
        return f"<{len(v)} bytes {xxhash.xxh3_64_hexdigest(bytes(v))[:8]}>"
    if isinstance(v, ObjectState):
        return f"<{v.type_name}>"
    if isinstance(v, float):
        return f"{v:.8g}"
    if isinstance(v, (list, tuple)) and len(v) > 6 and _all_scalars(v, ()):
        return f"[{len(v)} items, last {_show(v[-1], 20)}]"
    text = repr(v)
    return text if len(text) <= width else text[:width - 3] + "..."

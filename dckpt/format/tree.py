"""The safe tree: non-tensor state as JSON, with no pickle and no code on load.

Plain JSON carries None, bools, ints, strings, finite floats, lists and string-keyed
dicts. Everything else is one tagged object `{"$tag": payload}` so decoding is exact:

    {"$float": "nan" | "inf" | "-inf"}   non-finite floats
    {"$tuple": [...]}                    tuples (torch.Size too)
    {"$dict": [[key, value], ...]}       dicts with non-str keys, keys starting with "$", or
                                         keys not in sorted order (kept in their order)
    {"$bytes": "<base64>"}               bytes
    {"$tensor": "name"}                  a torch tensor stored in the data files
    {"$view": "name", "dtype": "float32", "offset": 2, "shape": [3], "stride": [1]}
                                         a torch tensor that shares the storage record
                                         "name" with other tensors (a view): element
                                         offset, shape and strides into its bytes
    {"$ndarray": "name"}                 a numpy array stored in the data files
    {"$dtype": "float32"}                a torch.dtype (optimizers and AMP keep some)
    {"$object": "<type>", "state": ...}  an object restored via load_state_dict()
"""
from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Any

from ..errors import ManifestError, UnsupportedStateError
from .dtypes import ITEMSIZE

# Nesting deeper than this is refused on decode: a hostile manifest must not exhaust the stack.
MAX_DEPTH = 200


@dataclass(frozen=True)
class TensorRef:
    name: str


@dataclass(frozen=True)
class ViewRef(TensorRef):
    """A tensor that is a view into the storage record `name` (a 1-D tensor of the
    manifest holding the bytes that several tensors of the state share): `dtype`, element
    `offset`, `shape` and `stride` in elements of `dtype`, as torch's as_strided takes them.
    Views reference records only, never other views, so they cannot form cycles."""
    dtype: str = "uint8"
    offset: int = 0
    shape: tuple = ()
    stride: tuple = ()

    def extent(self) -> int:
        """Bytes of the storage record the view needs: its last element's end."""
        if any(s == 0 for s in self.shape):
            return 0
        last = self.offset + sum((s - 1) * st for s, st in zip(self.shape, self.stride))
        return (last + 1) * ITEMSIZE[self.dtype]


# Limits for a $view node of a hostile manifest (torch allows 64 dims).
MAX_VIEW_DIMS = 64
MAX_VIEW_INT = 1 << 62


@dataclass(frozen=True)
class ArrayRef:
    name: str


@dataclass(frozen=True)
class DtypeRef:
    name: str


@dataclass
class ObjectState:
    """state_dict() of an object (model, optimizer, ...) and the type it came from."""
    type_name: str
    state: Any


def _join(path: str, key: Any) -> str:
    return f"{path}/{key}" if path else str(key)


def encode(value: Any, path: str = "") -> Any:
    """Tree of safe values and refs -> JSON-ready structure. Raises UnsupportedStateError."""
    if type(value) is TensorRef:  # the most common node
        return {"$tensor": value.name}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        return {"$float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, ViewRef):
        return {"$view": value.name, "dtype": value.dtype, "offset": value.offset,
                "shape": list(value.shape), "stride": list(value.stride)}
    if isinstance(value, TensorRef):
        return {"$tensor": value.name}
    if isinstance(value, ArrayRef):
        return {"$ndarray": value.name}
    if isinstance(value, DtypeRef):
        return {"$dtype": value.name}
    if isinstance(value, ObjectState):
        return {"$object": value.type_name, "state": encode(value.state, path)}
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    # Lists of plain ints (RNG states: 625 of them for Python's random) in one step: each
    # encodes to itself. Exact types only: a bool or an int subclass takes the general path.
    if isinstance(value, tuple):
        if all(type(v) is int for v in value):
            return {"$tuple": list(value)}
        return {"$tuple": [encode(v, _join(path, i)) for i, v in enumerate(value)]}
    if isinstance(value, list):
        if all(type(v) is int for v in value):
            return list(value)
        return [encode(v, _join(path, i)) for i, v in enumerate(value)]
    if isinstance(value, dict):
        # The manifest's JSON has sorted keys: a dict in another order is stored as pairs,
        # so it comes back in its own order.
        keys = list(value)
        if all(isinstance(k, str) and not k.startswith("$") for k in keys) and all(
                a < b for a, b in zip(keys, keys[1:])):
            # The leaves a state dict is made of (tensors, strings, ints) inline: a model's
            # state is hundreds of tensor references, encoded at every save, and the key
            # path is only needed by what can fail.
            out = {}
            for k, v in value.items():
                t = type(v)
                if t is TensorRef:
                    out[k] = {"$tensor": v.name}
                elif t is str or t is int or v is None or t is bool:
                    out[k] = v
                else:
                    out[k] = encode(v, _join(path, k))
            return out
        pairs = []
        for k, v in value.items():
            if k is not None and not isinstance(k, (str, int, float, bool, tuple)):
                raise UnsupportedStateError(
                    f"dict key {k!r} of type {type(k).__name__} at '{path or '/'}' "
                    "cannot be stored without pickle", path or "/")
            t = type(v)  # as above: the common leaves inline (a model's keys are not sorted)
            pairs.append([k if type(k) is str else encode(k, path),
                          {"$tensor": v.name} if t is TensorRef else
                          v if t is str or t is int or v is None or t is bool else
                          encode(v, _join(path, k))])
        return {"$dict": pairs}
    raise UnsupportedStateError(
        f"value of type {type(value).__module__}.{type(value).__qualname__} at "
        f"'{path or '/'}' cannot be stored without pickle; convert it to "
        "dict/list/tuple/str/int/float/bool/None/bytes/tensor/ndarray, or give it "
        "state_dict()/load_state_dict()", path or "/")


_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def decode(node: Any, depth: int = 0) -> Any:
    """JSON structure -> tree of safe values and refs. Raises ManifestError on bad input."""
    if depth > MAX_DEPTH:
        raise ManifestError(f"state tree nested deeper than {MAX_DEPTH}", field="tree")
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [decode(v, depth + 1) for v in node]
    if not isinstance(node, dict):
        raise ManifestError(f"unexpected JSON value of type {type(node).__name__}", field="tree")
    if len(node) == 1 and type(node.get("$tensor")) is str:  # most nodes: one per tensor
        return TensorRef(node["$tensor"])
    tags = [k for k in node if k.startswith("$")]
    if not tags:
        return {k: decode(v, depth + 1) for k, v in node.items()}
    if len(tags) != 1:
        raise ManifestError(f"tagged node with several tags {tags}", field="tree")
    tag = tags[0]
    payload = node[tag]
    if tag == "$object":
        if set(node) != {"$object", "state"} or not isinstance(payload, str):
            raise ManifestError("malformed $object node", field="tree")
        return ObjectState(payload, decode(node["state"], depth + 1))
    if tag == "$view":
        return _decode_view(node)
    if len(node) != 1:
        raise ManifestError(f"tagged node {tag} has extra keys", field="tree")
    if tag == "$float":
        if payload not in _NONFINITE:
            raise ManifestError(f"bad $float payload {payload!r}", field="tree")
        return _NONFINITE[payload]
    if tag == "$tuple":
        if not isinstance(payload, list):
            raise ManifestError("$tuple payload must be a list", field="tree")
        return tuple(decode(v, depth + 1) for v in payload)
    if tag == "$dict":
        if not isinstance(payload, list):
            raise ManifestError("$dict payload must be a list of pairs", field="tree")
        out = {}
        for pair in payload:
            if not isinstance(pair, list) or len(pair) != 2:
                raise ManifestError("$dict payload must be a list of pairs", field="tree")
            k, v = pair
            if type(k) is str:
                key = k
            else:
                key = decode(k, depth + 1)
                try:
                    hash(key)
                except TypeError:
                    raise ManifestError(f"unhashable $dict key {key!r}", field="tree") from None
            # A state dict's values are mostly tensor references: no call for those.
            if type(v) is dict and len(v) == 1 and type(v.get("$tensor")) is str:
                out[key] = TensorRef(v["$tensor"])
            else:
                out[key] = decode(v, depth + 1)
        return out
    if tag in ("$tensor", "$ndarray", "$dtype", "$bytes") and not isinstance(payload, str):
        raise ManifestError(f"{tag} payload must be a string", field="tree")
    if tag == "$tensor":
        return TensorRef(payload)
    if tag == "$ndarray":
        return ArrayRef(payload)
    if tag == "$dtype":
        if payload not in ITEMSIZE:
            raise ManifestError(f"unknown $dtype {payload!r:.40}", field="tree")
        return DtypeRef(payload)
    if tag == "$bytes":
        try:
            return base64.b64decode(payload.encode("ascii"), validate=True)
        except (ValueError, UnicodeEncodeError):
            raise ManifestError("bad base64 in $bytes", field="tree") from None
    raise ManifestError(f"unknown tag {tag}", field="tree")


def _decode_view(node: dict) -> ViewRef:
    """A $view node, every field checked; its extent is checked against the storage record
    where the manifest is at hand (state.restore)."""
    if set(node) != {"$view", "dtype", "offset", "shape", "stride"}:
        raise ManifestError("malformed $view node", field="tree")
    name, dtype, offset, shape, stride = (node[k] for k in
                                          ("$view", "dtype", "offset", "shape", "stride"))

    def count(v) -> bool:
        return type(v) is int and 0 <= v < MAX_VIEW_INT

    if (not isinstance(name, str) or dtype not in ITEMSIZE or not count(offset)
            or not isinstance(shape, list) or not isinstance(stride, list)
            or len(shape) != len(stride) or len(shape) > MAX_VIEW_DIMS
            or not all(count(v) for v in shape + stride)):
        raise ManifestError(f"malformed $view node for {str(name)[:80]!r}", field="tree")
    view = ViewRef(name, dtype, offset, tuple(shape), tuple(stride))
    if view.extent() >= MAX_VIEW_INT:
        raise ManifestError(f"$view of {name[:80]!r} reaches past any storage", field="tree")
    return view


def refs(node: Any) -> list:
    """All TensorRef/ArrayRef leaves of a decoded tree, in order."""
    out: list = []
    stack = [node]
    while stack:
        v = stack.pop()
        if isinstance(v, (TensorRef, ArrayRef)):
            out.append(v)
        elif isinstance(v, ObjectState):
            stack.append(v.state)
        elif isinstance(v, dict):
            stack.extend(reversed(list(v.values())))
        elif isinstance(v, (list, tuple)):
            stack.extend(reversed(v))
    return out

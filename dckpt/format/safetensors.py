"""The tensor index of a safetensors file, read and checked without torch or the
safetensors package: where each tensor's raw bytes lie in the file.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
({name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}), then the
tensors' raw little-endian row-major bytes; offsets count from the end of the header. Those
bytes are what a raw dckpt chunk holds, so a save can share them instead of writing them
again (dckpt/engine/filebase.py). The file is treated as hostile: the header's size is
capped before it is read, and every entry is checked (known dtype, shape x dtype size =
byte length, inside the file, no overlaps) before anyone trusts an offset.
"""
from __future__ import annotations

import json
import os
import struct
from typing import NamedTuple

from ..errors import ManifestError
from .dtypes import ITEMSIZE
from .manifest import open_regular

MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit

# safetensors dtype -> dckpt (torch) dtype name
DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "C64": "complex64",
}


class Stored(NamedTuple):
    """One tensor of the file: dckpt dtype name, shape, absolute byte offset and length."""
    name: str
    dtype: str
    shape: list[int]
    offset: int
    nbytes: int


def read_index(path: str | os.PathLike) -> list[Stored]:
    """The tensors of the safetensors file at `path`, in file order. ManifestError (naming
    the file and the entry) for anything that is not a well-formed safetensors file."""
    path = str(path)
    try:
        fd, st = open_regular(path)
    except ValueError as e:
        raise ManifestError(f"{path} {e}", path) from None
    with os.fdopen(fd, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ManifestError(f"{path}: shorter than a safetensors header", path)
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > st.st_size:
            raise ManifestError(f"{path}: safetensors header of {n} bytes does not fit "
                                f"(file of {st.st_size} bytes, limit {MAX_HEADER})", path)
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: safetensors header is not JSON: {e}", path) from None
    if not isinstance(header, dict):
        raise ManifestError(f"{path}: safetensors header is not an object", path)
    start, out = 8 + n, []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        out.append(_entry(path, name, e, start, st.st_size))
    out.sort(key=lambda t: t.offset)
    for a, b in zip(out, out[1:]):
        if b.offset < a.offset + a.nbytes:
            raise ManifestError(f"{path}: tensors '{a.name}' and '{b.name}' overlap", path,
                                b.name)
    return out


def _entry(path: str, name: str, e, start: int, size: int) -> Stored:
    def bad(why: str) -> ManifestError:
        return ManifestError(f"{path}: tensor '{name}': {why}", path, name)
    if not isinstance(e, dict):
        raise bad("entry is not an object")
    dtype = DTYPES.get(e.get("dtype"))
    if dtype is None:
        raise bad(f"dtype {e.get('dtype')!r} unknown")
    shape, offs = e.get("shape"), e.get("data_offsets")
    if not isinstance(shape, list) or len(shape) > 64 or not all(_uint(d) for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offs, list) and len(offs) == 2 and all(_uint(o) for o in offs)
            and offs[0] <= offs[1]):
        raise bad(f"data_offsets {offs!r} are not [begin, end]")
    count = 1
    for d in shape:
        count *= d
    nbytes = count * ITEMSIZE[dtype]
    if offs[1] - offs[0] != nbytes:
        raise bad(f"{offs[1] - offs[0]} bytes stored for shape {shape} of {dtype}")
    if start + offs[1] > size:
        raise bad(f"bytes end at {start + offs[1]}, past the end of the file ({size})")
    return Stored(name, dtype, shape, start + offs[0], nbytes)


def _uint(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2 ** 63

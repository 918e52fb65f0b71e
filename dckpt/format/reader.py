"""A reference reader needing only numpy, zstandard and xxhash.

It exists to prove the format is open (docs/FORMAT.md) and serves as the test oracle for
the native core: simple and slow on purpose.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import xxhash
import zstandard

from .manifest import read_manifest as _read_manifest
from .manifest import CODEC_RAW, CODEC_ZSTD, CODEC_ZSTD_SHUFFLE, Manifest, open_regular


def read_manifest(ckpt: str | Path) -> Manifest:
    """The manifest, checked in Python only (the reference reader needs no native core)."""
    return _read_manifest(ckpt)


def read_view(ckpt: str | Path, m: Manifest, node: dict) -> np.ndarray:
    """A `$view` node of a state tree as raw bytes, shape (*shape, itemsize): the elements
    it sees of its storage record (docs/FORMAT.md). Views of one record share its memory."""
    from .dtypes import ITEMSIZE
    name, dtype = node["$view"], node["dtype"]
    offset, shape, stride = node["offset"], node["shape"], node["stride"]
    t = m.tensors[name]
    isz = ITEMSIZE[dtype]
    record = read_tensor_bytes(ckpt, m, name).reshape(-1)
    if len(t.shape) != 1 or len(shape) != len(stride):
        raise ValueError(f"$view of {name}: not a 1-D record, or shape and stride differ")
    if 0 not in shape:
        end = (offset + sum((n - 1) * s for n, s in zip(shape, stride)) + 1) * isz
        if min([offset, *shape, *stride]) < 0 or end > record.size:
            raise ValueError(f"$view of {name} reaches outside its {record.size} bytes")
    return np.lib.stride_tricks.as_strided(
        record[offset * isz:], (*shape, isz), (*(s * isz for s in stride), 1), writeable=False)


def unshuffle(data: bytes, width: int) -> bytes:
    n = len(data) // width
    body = np.frombuffer(data, np.uint8, n * width).reshape(width, n).T.reshape(-1)
    return body.tobytes() + data[n * width:]


def read_tensor_bytes(ckpt: str | Path, m: Manifest, name: str) -> np.ndarray:
    """The global tensor `name` as raw bytes, shape (*shape, itemsize), row-major."""
    t = m.tensors[name]
    out = np.zeros((*t.shape, t.itemsize), np.uint8)
    for shard in t.shards:
        raw = bytearray()
        for ch in shard.chunks:
            path = m.files[ch.file].path(ckpt)
            try:
                fd = open_regular(path)[0]  # no link out of the checkpoint, no FIFO
            except ValueError as e:
                raise ValueError(f"{name}: {path} {e}") from None
            with os.fdopen(fd, "rb") as fh:
                fh.seek(ch.offset)
                stored = fh.read(ch.stored)
            if xxhash.xxh3_64_intdigest(stored) != ch.stored_hash:
                raise ValueError(f"{name}: stored hash mismatch at offset {ch.offset}")
            if ch.codec == CODEC_RAW:
                data = stored
            else:
                data = zstandard.ZstdDecompressor().decompress(stored, max_output_size=ch.raw)
                if ch.codec == CODEC_ZSTD_SHUFFLE:
                    data = unshuffle(data, t.itemsize)
                elif ch.codec != CODEC_ZSTD:
                    raise ValueError(f"unknown codec {ch.codec}")
            if xxhash.xxh3_64_intdigest(data) != ch.raw_hash:
                raise ValueError(f"{name}: raw hash mismatch at offset {ch.offset}")
            raw += data
        block = np.frombuffer(bytes(raw), np.uint8).reshape(*shard.shape, t.itemsize)
        index = tuple(slice(o, o + n) for o, n in zip(shard.offsets, shard.shape))
        out[index] = block
    return out

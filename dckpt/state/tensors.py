"""torch/numpy dtypes <-> manifest names, and tensor identity for shared storage."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import StateMismatchError
from ..format.dtypes import ITEMSIZE

TORCH_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name) for name in ITEMSIZE if hasattr(torch, name)
}
TORCH_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return TORCH_NAMES[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype} is not supported by the dckpt format") from None


def torch_dtype(name: str) -> torch.dtype:
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise StateMismatchError([f"dtype {name!r} is not available in this torch build "
                                  f"(torch {torch.__version__})"]) from None


def numpy_dtype(name: str) -> np.dtype:
    return np.dtype(name)


def view_key(t: torch.Tensor) -> tuple | None:
    """Identity of a view: equal keys mean the very same memory seen the same way."""
    # A DTensor: by its local shard. (A plain tensor, asked for each of hundreds of leaves
    # per save, is known by its exact type without the failing attribute lookups.)
    if type(t) is not torch.Tensor and hasattr(t, "to_local") and hasattr(t, "placements"):
        key = view_key(t.to_local())
        return None if key is None else ("dtensor", *key)
    if t.is_meta or t.numel() == 0:
        return None
    # data_ptr() is the storage's address plus the view's offset: the same memory. (The
    # shape as torch.Size: a tuple, hashed and compared as one.)
    return (t.device, t.data_ptr(), t.shape, t.stride(), t.dtype)

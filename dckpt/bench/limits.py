"""The machine's own limits on the same bytes, measured in the same run as the systems.

plain write: Python writes each tensor's bytes to one file (then fsync), the simplest
durable save there is. plain read: reads the file back sequentially into preallocated
tensors. memcpy: one thread copies the same bytes between preallocated buffers.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.detach().reshape(-1).view(torch.uint8).numpy()


class Limits:
    def __init__(self, tensors: list[torch.Tensor]):
        self.tensors = [t for t in tensors if t.numel()]
        self.dests = [torch.empty_like(t) for t in self.tensors]
        self.nbytes = sum(t.numel() * t.element_size() for t in self.tensors)

    def write(self, path: Path) -> None:
        with open(path, "wb", buffering=0) as f:
            for t in self.tensors:
                f.write(_bytes(t))
            os.fsync(f.fileno())
        dfd = os.open(Path(path).parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def read(self, path: Path) -> None:
        with open(path, "rb", buffering=0) as f:
            for d in self.dests:
                view = _bytes(d)
                if f.readinto(view) != view.nbytes:
                    raise EOFError(f"{path} is shorter than the state")

    def memcpy(self) -> None:
        for s, d in zip(self.tensors, self.dests):
            np.copyto(_bytes(d), _bytes(s))

    def close(self) -> None:
        self.dests = []


__all__ = ["Limits"]

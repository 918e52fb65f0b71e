"""The machine's own limits on the same bytes, measured in the same run as the systems.

plain write: Python writes each tensor's bytes to one file (then fsync), the simplest
durable save there is. plain read: reads the file back sequentially into the same
(preallocated) tensors, which get their own bytes back. memcpy: one thread copies the same
bytes into a reused scratch buffer larger than any cache. sha256sum: the coreutils tool
over the plain write's file, a verify peer.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Callable

import numpy as np
import torch


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.detach().reshape(-1).view(torch.uint8).numpy()


SCRATCH_BYTES = 256 << 20


class Limits:
    """`tensors()` gives the state's current tensors: a peer's load may have replaced some
    (optimizer.load_state_dict keeps the loaded tensors), and old ones must not be kept."""

    def __init__(self, tensors: Callable[[], list[torch.Tensor]]):
        self._tensors = tensors
        largest = max((t.numel() * t.element_size() for t in tensors()), default=0)
        self.scratch = np.empty(max(SCRATCH_BYTES, largest), np.uint8)

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [t for t in self._tensors() if t.numel()]

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
            for t in self.tensors:
                view = _bytes(t)
                if f.readinto(view) != view.nbytes:
                    raise EOFError(f"{path} is shorter than the state")

    def sha256sum(self, path: Path) -> None:
        """The integrity check a user runs without a checkpoint library: sha256sum of the
        files (what Megatron's integrity manifest records), here over the state's bytes."""
        subprocess.run(["sha256sum", str(path)], check=True, stdout=subprocess.DEVNULL)

    def memcpy(self) -> None:
        pos = 0
        for t in self.tensors:
            src = _bytes(t)
            if pos + src.nbytes > self.scratch.nbytes:
                pos = 0
            np.copyto(self.scratch[pos:pos + src.nbytes], src)
            pos += src.nbytes

    def close(self) -> None:
        self.scratch = np.empty(0, np.uint8)


__all__ = ["Limits"]

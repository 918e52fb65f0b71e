"""Rank, world and the few collectives a checkpoint needs. No-ops when not distributed.

Collectives carry JSON (never pickle) as uint8 tensors, so they work over gloo and are safe.
"""
from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as tdist


def active(group=None) -> bool:
    return tdist.is_available() and tdist.is_initialized() and world_size(group) > 1


def rank(group=None) -> int:
    return tdist.get_rank(group) if tdist.is_available() and tdist.is_initialized() else 0


def world_size(group=None) -> int:
    return tdist.get_world_size(group) if tdist.is_available() and tdist.is_initialized() else 1


def _device(group) -> torch.device:
    backend = tdist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_json(obj: Any, group=None) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not active(group):
        return [obj]
    dev = _device(group)
    data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(dev)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(size) for _ in range(world_size(group))]
    tdist.all_gather(sizes, size, group=group)
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=dev)
    padded[: data.numel()] = data
    bufs = [torch.zeros_like(padded) for _ in sizes]
    tdist.all_gather(bufs, padded, group=group)
    return [json.loads(bytes(b[: int(s)].cpu().numpy())) for b, s in zip(bufs, sizes)]


def broadcast_json(obj: Any, src: int = 0, group=None) -> Any:
    """`obj` of rank `src` on every rank."""
    if not active(group):
        return obj
    return all_gather_json(obj if rank(group) == src else None, group)[src]


def barrier(group=None) -> None:
    if active(group):
        tdist.barrier(group=group)

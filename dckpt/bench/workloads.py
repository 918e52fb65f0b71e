"""The states the benchmark saves and loads: what a training job really checkpoints.

A decoder-only transformer (separate q/k/v/o, MLP, norms, embedding, head: ~16 tensors a
layer) with a stepped AdamW, so a 1 GB state holds hundreds of tensors, including AdamW's
0-d `step` tensors. Sizes are chosen by the total logical bytes of model + optimizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)


class Transformer(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)


class Adapter(nn.Module):
    """A low-rank adapter beside a frozen base: the trainable part of a fine-tune."""

    def __init__(self, d: int, rank: int):
        super().__init__()
        self.a = nn.Parameter(torch.randn(rank, d) * 0.01)
        self.b = nn.Parameter(torch.zeros(d, rank))


@dataclass
class Workload:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer

    def state(self) -> dict:
        """The live state a training loop hands to a checkpointer."""
        return {"model": self.model, "optimizer": self.optimizer}

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the state, model first, in a stable order."""
        out = list(self.model.state_dict().values())
        for per_param in self.optimizer.state_dict()["state"].values():
            out.extend(v for v in per_param.values() if isinstance(v, torch.Tensor))
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def count(self) -> int:
        return len(self.tensors())

    def perturb(self) -> None:
        """Flip every bit of every live tensor, 0-d ones (AdamW's `step`) included, so each
        element differs from the saved one and a load has to really restore all of them
        (zeroing would leave zero-initialised moments and biases already "restored")."""
        from dckpt.storage import local as io
        for t in self.tensors():
            view = io.byte_view(t)
            np.bitwise_not(view, out=view)

    def reset(self, built: "Workload") -> None:
        """Take the bytes of `built` (the same Spec built again: it is seeded) in place,
        after a load that failed: the systems timed next save and load the state as it was
        built, not what the failure left in it. A copy kept for this would double the
        memory of the largest states."""
        from dckpt.storage import local as io
        for t, src in zip(self.tensors(), built.tensors()):
            io.byte_view(t)[:] = io.byte_view(src)

    def fingerprint(self) -> list[int]:
        """XXH3 of every tensor's bytes: a load must restore exactly these."""
        from dckpt.storage import local as io
        return [io.hash64(io.byte_view(t.contiguous())) for t in self.tensors()]


def _shape_for(total_bytes: int, itemsize: int, trainable_fraction: float) -> tuple[int, int, int]:
    """(d_model, layers, vocab) whose model + AdamW state is about total_bytes."""
    # AdamW keeps two moments per trainable parameter (same dtype as the parameter).
    params = total_bytes / itemsize / (1 + 2 * trainable_fraction)
    d, vocab = (256, 2048) if params < 8e6 else (512, 8192) if params < 60e6 else (1024, 8192)
    per_layer = 12 * d * d  # 4 d*d attention + 2 * 4d*d MLP
    layers = max(1, round((params - 2 * vocab * d) / per_layer))
    return d, layers, vocab


def _adamw(params: list[nn.Parameter]) -> torch.optim.AdamW:
    """AdamW holding exactly the state one step from zero leaves (step 1, exp_avg = 0.1 g,
    exp_avg_sq = 0.001 g^2 for random gradients g), computed in float32 and stored in the
    parameters' dtype, as AdamW keeps it."""
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    gen = torch.Generator().manual_seed(1)
    for p in params:
        g = torch.randn(p.shape, generator=gen) * 1e-3
        opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": (0.1 * g).to(p.dtype),
                        "exp_avg_sq": (1e-3 * g * g).to(p.dtype)}
    return opt


def transformer(total_bytes: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> Workload:
    """Pretraining state: every parameter trained, AdamW moments in the parameters' dtype."""
    torch.manual_seed(seed)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    d, layers, vocab = _shape_for(total_bytes, itemsize, 1.0)
    model = Transformer(vocab, d, layers, 4 * d).to(dtype)
    opt = _adamw(list(model.parameters()))
    return Workload(f"transformer-{_size_tag(total_bytes)}-{_dtype_tag(dtype)}", model, opt)


def finetune(total_bytes: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Workload:
    """Frozen-base fine-tuning: a large frozen model, small adapters with AdamW state."""
    torch.manual_seed(seed)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    d, layers, vocab = _shape_for(total_bytes, itemsize, 0.0)
    base = Transformer(vocab, d, layers, 4 * d).to(dtype).requires_grad_(False)
    model = nn.Module()
    model.base = base
    model.adapters = nn.ModuleList(Adapter(d, 16).to(dtype) for _ in range(layers))
    opt = _adamw(list(model.adapters.parameters()))
    return Workload(f"finetune-{_size_tag(total_bytes)}-{_dtype_tag(dtype)}", model, opt)


def _dtype_tag(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def _size_tag(nbytes: int) -> str:
    gb = nbytes / 1e9
    return f"{gb:g}GB" if gb >= 1 else f"{round(nbytes / 1e6)}MB"


@dataclass(frozen=True)
class Spec:
    """A picklable recipe for a workload, so rank processes can build their own part."""
    kind: str  # "transformer" or "finetune"
    total_bytes: int
    dtype: str  # "float32" or "bfloat16"

    @property
    def name(self) -> str:
        return f"{self.kind}-{_size_tag(self.total_bytes)}-{_dtype_tag(getattr(torch, self.dtype))}"

    def build(self, seed: int = 0, fraction: float = 1.0) -> Workload:
        """The workload, or the `fraction` of it one rank of a group holds."""
        make = transformer if self.kind == "transformer" else finetune
        w = make(int(self.total_bytes * fraction), getattr(torch, self.dtype), seed)
        w.name = self.name
        return w


def catalogue(quick: bool, memory_bytes: int) -> list[Spec]:
    """The workloads of a run, largest last; the 4 GB ones only when memory allows.

    A run holds the live state, one checkpoint in /dev/shm (or page cache) and a peer's
    worst transient copy (accelerate's torch.load of the optimizer): about 3x the state.
    """
    if quick:
        return [Spec("transformer", 48_000_000, "float32"),
                Spec("transformer", 24_000_000, "bfloat16")]
    out = []
    for size in (250_000_000, 1_000_000_000, 4_000_000_000):
        if size > 1e9 and memory_bytes < 3.5 * size + (2 << 30):
            continue
        out += [Spec("transformer", size, "float32"), Spec("transformer", size, "bfloat16")]
        if size == 1_000_000_000:
            out.append(Spec("finetune", size, "bfloat16"))
    return out


__all__ = ["Workload", "Spec", "Transformer", "transformer", "finetune", "catalogue"]

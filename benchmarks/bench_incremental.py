"""Incremental vs full checkpoints of a LoRA-style fine-tuning state, in one run.

A frozen base model (>= 90% of the parameters) carries low-rank adapters trained with
AdamW. Each mode saves three checkpoints through a CheckpointManager, one optimizer step
apart, on a fresh root; the second (and third) save is timed and its newly written bytes
counted. Modes run interleaved, repeated, and the median is reported:

  full         CheckpointManager(incremental=False): every chunk written every time
  incremental  the default: unchanged chunks are hashed, found equal, hard-linked
  trusted      incremental + trust_versions=True: frozen tensors are not even hashed
               (from the second incremental save on, so its third save is reported)

    python benchmarks/bench_incremental.py                  # ~1 GB state, ~1-2 minutes
    python benchmarks/bench_incremental.py --base-mb 256 --repeats 2 --dir /dev/shm
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dckpt import CheckpointManager
from dckpt.bench.order import balanced
from dckpt.bench.record import recording

MODES = {"full": {"incremental": False}, "incremental": {},
         "trusted": {"trust_versions": True}}


class LoraLinear(torch.nn.Module):
    def __init__(self, n: int, rank: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n, n) * n ** -0.5, requires_grad=False)
        self.a = torch.nn.Parameter(torch.randn(n, rank) * 0.01)
        self.b = torch.nn.Parameter(torch.zeros(rank, n))


def build(base_mb: int, width: int, rank: int) -> dict:
    layers = max(1, base_mb * 2**20 // (width * width * 4))
    model = torch.nn.Sequential(*[LoraLinear(width, rank) for _ in range(layers)])
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    return {"model": model, "optim": opt}


def train_step(state: dict) -> None:
    """An optimizer step with made-up gradients: only adapters and AdamW state change."""
    for p in state["model"].parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    state["optim"].step()
    state["optim"].zero_grad(set_to_none=True)


def one_run(root: Path, mode: str, state: dict) -> list[tuple[float, int]]:
    """(seconds, newly written bytes) of saves 2 and 3 on a fresh root."""
    shutil.rmtree(root, ignore_errors=True)
    mgr = CheckpointManager(root, **MODES[mode])
    out = []
    for step in (1, 2, 3):
        train_step(state)
        t0 = time.perf_counter()
        r = mgr.save(step, state)
        seconds = time.perf_counter() - t0
        new = r.manifest.meta.get("incremental", {}).get("new_bytes", r.stored_bytes)
        if step > 1:
            out.append((seconds, new))
    shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-mb", type=int, default=1024, help="frozen base size (MiB)")
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=6)  # a balanced-order cycle of 3 modes
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--record", default=None,
                    help="also write a record for the docs generator (dckpt/bench/docs.py)")
    args = ap.parse_args()
    with recording(args.record, kind="markdown", directory=args.dir or tempfile.gettempdir()):
        run(args)


def run(args) -> None:

    state = build(args.base_mb, args.width, args.rank)
    params = list(state["model"].parameters())
    frozen = sum(p.numel() for p in params if not p.requires_grad)
    total = sum(p.numel() for p in params)
    train_step(state)  # AdamW state exists from here on
    work = Path(tempfile.mkdtemp(prefix="dckpt-bench-incr-", dir=args.dir))
    print(f"state: {total / 1e6:.1f} M parameters, {100 * frozen / total:.2f}% frozen; "
          f"{sum(p.numel() * 4 for p in params) / 2**20:.0f} MiB of parameters; dir {work}")
    print(f"\ntorch {torch.__version__}")
    results: dict[str, list] = {m: [] for m in MODES}
    try:
        for mode in MODES:  # untimed: first calls, and first writes into fresh pages
            one_run(work / "warm", mode, state)
        for rep in range(args.repeats):
            for mode in balanced(list(MODES), rep):
                results[mode].append(one_run(work / mode, mode, state))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def values(mode: str, save: int, field: int) -> list:
        return [r[save][field] for r in results[mode]]

    def spread(v: list, fmt: str = "{:.3f}") -> str:
        return f"{fmt.format(statistics.median(v))} ({fmt.format(min(v))}-{fmt.format(max(v))})"

    print(f"\n| mode | save | seconds: median (min-max) | new MiB | x smaller | x faster |")
    print("|---|---|---|---|---|---|")
    for mode in MODES:
        for save in (0, 1):
            t, b = values(mode, save, 0), values(mode, save, 1)
            full_t, full_b = values("full", save, 0), values("full", save, 1)
            print(f"| {mode} | {save + 2} | {spread(t)} | {statistics.median(b) / 2**20:.2f} | "
                  f"{statistics.median(full_b) / max(statistics.median(b), 1):.1f} | "
                  f"{statistics.median(full_t) / statistics.median(t):.1f} |")
    print(f"\n(medians of {args.repeats} interleaved runs in a balanced order; ratios against "
          "the full save of the same number. Targets: >= 5x smaller, >= 3x faster.)")

if __name__ == "__main__":
    main()

"""Processes for the async-save tests that need a process of their own: exit, signals, ranks.

    python async_job.py exit    ROOT OUT.json        save async, return from main at once
    python async_job.py sigterm ROOT OUT.json        save async, then train until SIGTERM
    python async_job.py sigkill ROOT OUT.json        SIGKILL itself while the worker writes
    python async_job.py dist    ROOT OUT.json RANK WORLD INIT_FILE

OUT.json receives the sha256 of every tensor as it was when save() returned (keyed by its
name in the checkpoint), so the parent can check the committed bytes.
"""
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

import dckpt
from dckpt.engine import checkpoint
from dckpt.storage import local as io
from dckpt.manager.async_save import AsyncOptions


def make_state(mb: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    width = 512
    layers = max(1, mb * (1 << 20) // (width * width * 4 * 3))  # params + 2 AdamW moments
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(model, opt)
    return {"model": model, "optimizer": opt}


def train_step(model, opt) -> None:
    loss = model(torch.randn(8, 512)).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def digests(state: dict) -> dict:
    return {leaf.name: hashlib.sha256(io.byte_view(leaf.value.contiguous())).hexdigest()
            for leaf in checkpoint.snapshot(state).leaves}


def mutate(state: dict) -> None:
    with torch.no_grad():
        for leaf in checkpoint.snapshot(state).leaves:
            leaf.value.add_(1)


def dump(path: str, data: dict) -> None:
    Path(path).write_text(json.dumps(data))


def run_exit(root: str, out: str) -> None:
    state = make_state(16)
    mgr = dckpt.CheckpointManager(root, async_save=True)
    expected = digests(state)
    mgr.save(1, state)
    mutate(state)
    dump(out, expected)  # no wait(), no close(): the exit path must finish the save


def run_sigterm(root: str, out: str) -> None:
    state = make_state(16)
    mgr = dckpt.CheckpointManager(root, async_save=True)
    mgr.save(1, state).result()
    expected = digests(state)
    mgr.save(2, state)
    dump(out, expected)
    print("SUBMITTED", flush=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # "training" until the signal arrives
        train_step(state["model"], state["optimizer"])
    sys.exit(5)


def run_sigkill(root: str, out: str) -> None:
    state = make_state(64)
    opts = AsyncOptions(threads=1)
    mgr = dckpt.CheckpointManager(root, async_save=opts, compression=3)
    mgr.save(1, state).result()
    dump(out, digests(state))
    train_step(state["model"], state["optimizer"])
    h = mgr.save(2, state)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        files = [f for d in Path(root).glob(".step-000000002.tmp-*") for f in d.glob("*.dckpt")]
        if files and files[0].stat().st_size > 0:
            break
        time.sleep(0.0005)
    if h.done():
        print("TOO-LATE", flush=True)
        sys.exit(3)
    os.kill(os.getpid(), signal.SIGKILL)


def run_dist(root: str, out: str, rank: int, world: int, init_file: str) -> None:
    import torch.distributed as tdist
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                             world_size=world)
    state = make_state(8, seed=rank)
    mgr = dckpt.CheckpointManager(root, async_save=AsyncOptions(when_busy="skip"))
    expected = digests(state)
    h = mgr.save(1, state)
    mutate(state)
    # Training collectives on the default group while the worker commits on its own group.
    grads = torch.ones(1 << 16)
    rounds = 0
    while True:
        tdist.all_reduce(grads)
        flag = torch.tensor([1.0 if h.done() else 0.0])
        tdist.all_reduce(flag, op=tdist.ReduceOp.MIN)
        rounds += 1
        if flag.item() == 1.0:
            break
    h.result()
    # A save while one is in flight is skipped on every rank or on none.
    h3 = mgr.save(3, state)
    h4 = mgr.save(4, state)
    mgr.close()
    dump(out, {"expected": expected, "rounds": rounds, "skipped": [h3.skipped, h4.skipped],
               "steps": mgr.steps()})
    tdist.destroy_process_group()


if __name__ == "__main__":
    mode, root, out = sys.argv[1:4]
    if mode == "dist":
        run_dist(root, out, int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    else:
        {"exit": run_exit, "sigterm": run_sigterm, "sigkill": run_sigkill}[mode](root, out)

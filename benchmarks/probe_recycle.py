"""What writing over a retired data file buys a save, against writing a new file
(dckpt/storage/spares.py).

    python benchmarks/probe_recycle.py [--dir /tmp] [--mb 14 256] [--repeats 10]

Files: the native writer (raw chunks, 2 threads, writeback, fsync) writes --mb of random
bytes into a new file (the previous one deleted first, untimed, as retention does), or over
the previous file in place (reuse), alternating, --repeats times each.
Manager: CheckpointManager.save (keep_last=2) of 300 fp32 tensors (14 MB) after every tensor
changed, with recycle on and off, alternating, --repeats saves each after 3 untimed ones.
Medians of wall time, with min-max. Run it on a disk (tmpfs has no blocks to allocate).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np


def line(label: str, times: list[float]) -> str:
    return (f"  {label:<28s} {statistics.median(times) * 1e3:8.1f} ms "
            f"({min(times) * 1e3:.1f}-{max(times) * 1e3:.1f})")


def files(d: str, mb: int, repeats: int) -> None:
    from dckpt import _native
    buf = np.random.default_rng(0).integers(0, 256, mb << 20, dtype=np.uint8)
    path = os.path.join(d, "data")
    _native.write_chunks(path, [buf], [1], threads=2)
    times = {"new file": [], "written over": []}
    for i in range(repeats * 2):
        reuse = bool(i % 2) ^ bool(i // 2 % 2)  # new/over, then over/new: balanced
        if not reuse:
            os.unlink(path)
            os.sync()
        t = time.perf_counter()
        _native.write_chunks(path, [buf], [1], threads=2, reuse=[True] if reuse else None)
        times["written over" if reuse else "new file"].append(time.perf_counter() - t)
    print(f"{mb} MB, write + fsync:")
    for k, v in times.items():
        print(line(k, v))
    new, over = (statistics.median(v) for v in times.values())
    print(f"  written over / new: {over / new:.2f}x")
    os.unlink(path)


def manager(d: str, repeats: int) -> None:
    import torch
    from dckpt import CheckpointManager
    torch.manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(11675) for i in range(300)}
    mgrs = {on: CheckpointManager(os.path.join(d, f"recycle-{on}"), keep_last=2, recycle=on)
            for on in (True, False)}
    times = {True: [], False: []}
    for i in range(3 + repeats):
        for on in ((True, False) if i % 2 else (False, True)):
            with torch.no_grad():
                for t in state.values():
                    t.add_(1.0)
            t0 = time.perf_counter()
            mgrs[on].save(i, state)
            wall = time.perf_counter() - t0
            mgrs[on].wait()  # the removal retention started, untimed
            if i >= 3:
                times[on].append(wall)
    for m in mgrs.values():
        m.close()
    print("manager save, 300 tensors (14 MB), every tensor changed:")
    print(line("recycle on", times[True]))
    print(line("recycle off", times[False]))
    print(f"  on / off: {statistics.median(times[True]) / statistics.median(times[False]):.2f}x")


def main() -> None:
    from dckpt.bench.record import header_line
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--mb", type=int, nargs="+", default=[14, 256])
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    print(header_line(), flush=True)
    with tempfile.TemporaryDirectory(prefix="probe-recycle-", dir=args.dir) as d:
        for mb in args.mb:
            files(d, mb, args.repeats)
        manager(d, args.repeats)


if __name__ == "__main__":
    main()

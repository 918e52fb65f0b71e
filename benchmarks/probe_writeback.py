"""What handing each MiB to the kernel's writeback as it is written buys a durable save:
the native writer (write_chunks, raw chunks, 2 threads) writes --mb of random bytes into a
new file, then the file is fsync'd, with writeback off and on, alternating, --repeats times
each; per save the wall time and the fsync's share of it.

    python benchmarks/probe_writeback.py [--dir .] [--mb 16 256] [--repeats 12]

Each file is removed after its save (untimed). Run it on a disk: tmpfs has no writeback.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

from dckpt import _native


def save(path: str, buf: np.ndarray, writeback: bool) -> tuple[float, float]:
    t0 = time.perf_counter()
    _native.write_chunks(path, [buf], [1], fsync=False, writeback=writeback, threads=2)
    t1 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=".")
    ap.add_argument("--mb", type=int, nargs="+", default=[16, 256])
    ap.add_argument("--repeats", type=int, default=12)
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="probe-writeback-", dir=args.dir)
    try:
        print(f"{'MB':>5s} {'writeback':>9s} {'wall ms (median, min-max)':>28s} "
              f"{'fsync ms':>9s}")
        for mb in args.mb:
            buf = np.random.default_rng(0).integers(0, 256, mb << 20, dtype=np.uint8)
            times = {False: [], True: []}
            for i in range(args.repeats * 2):
                wb = bool(i % 2) ^ bool(i // 2 % 2)  # off/on, then on/off: balanced
                path = os.path.join(d, f"f{i}")
                times[wb].append(save(path, buf, wb))
                os.unlink(path)
            med = {}
            for wb, ts in times.items():
                walls = [w for w, _ in ts]
                med[wb] = statistics.median(walls)
                print(f"{mb:5d} {'on' if wb else 'off':>9s} {med[wb] * 1e3:10.1f} "
                      f"({min(walls) * 1e3:.1f}-{max(walls) * 1e3:.1f}) "
                      f"{statistics.median(f for _, f in ts) * 1e3:16.1f}")
            print(f"{mb:5d} on / off: {med[True] / med[False]:.2f}x wall")
    finally:
        for name in os.listdir(d):
            os.unlink(os.path.join(d, name))
        os.rmdir(d)


if __name__ == "__main__":
    main()

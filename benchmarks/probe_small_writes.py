"""What a state of small tensors costs the native writer against the same bytes in one
buffer, and against a plain write loop: --count buffers of --size bytes (default 300 x
46.7 KB = 14 MB, the demo's state) written by write_chunks (raw, no fsync) into a new file
in --dir, with 1 and 2 threads; the same bytes as one buffer; and a Python loop of one
write() per buffer. The systems alternate, --repeats times each; median and min wall ms.

    python benchmarks/probe_small_writes.py [--dir .] [--count 300] [--size 46700]
                                            [--repeats 15]

Each file is removed after its write (untimed).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

from dckpt import _native


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=".")
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--size", type=int, default=46_700)
    ap.add_argument("--repeats", type=int, default=15)
    a = ap.parse_args()
    bufs = [np.random.default_rng(i).integers(0, 255, a.size, dtype=np.uint8)
            for i in range(a.count)]
    whole = np.concatenate(bufs)
    widths = [1] * a.count

    def plain(path: str) -> None:
        with open(path, "wb") as f:
            for b in bufs:
                f.write(b)

    systems = {
        f"{a.count} buffers, 1 thread": lambda p: _native.write_chunks(
            p, bufs, widths, threads=1, fsync=False),
        f"{a.count} buffers, 2 threads": lambda p: _native.write_chunks(
            p, bufs, widths, threads=2, fsync=False),
        "one buffer, 2 threads": lambda p: _native.write_chunks(
            p, [whole], [1], threads=2, fsync=False),
        "python write() per buffer": plain,
    }
    times: dict[str, list[float]] = {k: [] for k in systems}
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        path = os.path.join(d, "data")
        for r in range(a.repeats):
            for name in (list(systems) if r % 2 == 0 else list(systems)[::-1]):
                t0 = time.perf_counter()
                systems[name](path)
                times[name].append(time.perf_counter() - t0)
                os.unlink(path)
    print(f"{a.count} x {a.size} bytes = {whole.nbytes / 1e6:.1f} MB into {a.dir}, "
          f"{a.repeats} repeats each (wall ms, median and min)")
    for name, ts in times.items():
        print(f"  {name:32s} {statistics.median(ts) * 1e3:7.2f} {min(ts) * 1e3:7.2f}")


if __name__ == "__main__":
    main()

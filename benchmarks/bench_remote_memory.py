"""Peak extra memory of a remote dckpt.save and dckpt.load (object store, loopback S3).

    python benchmarks/bench_remote_memory.py [--mb 512] [--compression zstd]

The state (fp32 tensors of 64 MiB each) is made first; then a save to s3:// and a load
into the live tensors, each measured two ways: the peak of this process's RSS above its
level before the call (sampled every 5 ms from /proc/self/statm), and tracemalloc's peak
of Python and numpy allocations. The spool files of a save are in the page cache, not in
the process (DCKPT_SPOOL_DIR places them; on tmpfs they would be memory).
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def peak_during(fn) -> tuple[int, int, float]:
    """(peak RSS above the level before, tracemalloc peak, seconds) of fn()."""
    base, peak, stop = rss(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.005)
    t = threading.Thread(target=sample, daemon=True)
    tracemalloc.start()
    t.start()
    t0 = time.perf_counter()
    try:
        fn()
    finally:
        seconds = time.perf_counter() - t0
        stop.set()
        t.join()
        traced = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return max(0, max(peak[0], rss()) - base), traced, seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=512)
    ap.add_argument("--compression", default=None)
    ap.add_argument("--endpoint")
    args = ap.parse_args()
    from helpers import s3server
    proc = None
    endpoint = args.endpoint
    if endpoint is None:
        endpoint, proc = s3server.start()
    os.environ.update(s3server.client_env(endpoint))
    import torch

    import dckpt
    try:
        bucket = s3server.new_bucket(endpoint)
        n = (args.mb << 20) // (64 << 20)
        g = torch.Generator().manual_seed(0)
        state = {f"t{i}": torch.randn(16 << 20, generator=g) for i in range(n)}
        url = f"s3://{bucket}/mem"
        # A first small save and load import and connect everything outside the figures.
        dckpt.save({"x": torch.zeros(4)}, f"s3://{bucket}/warm")
        dckpt.load(f"s3://{bucket}/warm")
        size = sum(t.nbytes for t in state.values())
        s_rss, s_tr, s_sec = peak_during(lambda: dckpt.save(state, url,
                                                            compression=args.compression))
        live = {k: torch.empty_like(v).fill_(1.0) for k, v in state.items()}  # pages touched
        l_rss, l_tr, l_sec = peak_during(lambda: dckpt.load(url, into=live))
        assert all(torch.equal(live[k], state[k]) for k in state)
        mb = 1 << 20
        print(f"state {size / mb:.0f} MiB, compression {args.compression}")
        print("| call | peak extra RSS | tracemalloc peak | seconds (loaded machine) |")
        print("|---|---|---|---|")
        print(f"| dckpt.save to s3:// | {s_rss / mb:.0f} MiB | {s_tr / mb:.0f} MiB | {s_sec:.1f} |")
        print(f"| dckpt.load from s3:// | {l_rss / mb:.0f} MiB | {l_tr / mb:.0f} MiB | "
              f"{l_sec:.1f} |")
    finally:
        if proc is not None:
            proc.kill()


if __name__ == "__main__":
    main()

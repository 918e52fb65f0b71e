"""The ceiling under bench_recovery's replication figure: one gloo isend/irecv of --mb MB
between two processes on this machine (loopback TCP), in pieces of --piece MB, 3 times
(the first into fresh pages). Prints GB/s per try.

    python benchmarks/probe_gloo_p2p.py --mb 256 --piece 64
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers.ranks import run_with_ranks  # noqa: E402


def _rank(rank: int, world: int, mb: int, piece: int) -> list[float]:
    import torch
    import torch.distributed as tdist
    n, step = mb << 20, piece << 20
    buf = torch.ones(n, dtype=torch.uint8) if rank == 0 else torch.empty(n, dtype=torch.uint8)
    out = []
    for _ in range(3):
        tdist.barrier()
        t = time.perf_counter()
        op = tdist.isend if rank == 0 else tdist.irecv
        for w in [op(buf[at:at + step], 1 - rank) for at in range(0, n, step)]:
            w.wait()
        out.append(round(mb / 1024 / (time.perf_counter() - t), 2))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--piece", type=int, default=64)
    args = ap.parse_args()
    print("GB/s per try:", run_with_ranks(2, _rank, args.mb, args.piece)[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())

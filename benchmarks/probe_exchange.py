"""The latency of dckpt's JSON exchanges between ranks that arrive together.

    python -m torch.distributed.run --nproc_per_node 2 benchmarks/probe_exchange.py [--n 200]

Each rank times all_gather_json, gather_json and broadcast_json of a tiny object (and a gloo
barrier for scale), each call after a barrier, and prints the median and p90 in ms. A save
makes three such exchanges (plan, write, commit), so at small states their latency is part
of the save's fixed cost (docs/ARCHITECTURE.md, "Distributed").
"""
import argparse
import statistics
import time

import torch.distributed as tdist

from dckpt.distributed import collective as dist


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    n = ap.parse_args().n
    tdist.init_process_group("gloo")
    r = tdist.get_rank()
    calls = {"all_gather_json": lambda: dist.all_gather_json({"a": 1}, None, what="probe"),
             "gather_json": lambda: dist.gather_json({"a": 1}, 0, None, what="probe"),
             "broadcast_json": lambda: dist.broadcast_json({"a": 1}, 0, None, what="probe"),
             "gloo barrier": tdist.barrier}
    for name, call in calls.items():
        times = []
        for _ in range(n):
            tdist.barrier()
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        times.sort()
        print(f"rank {r} {name:16s} median {statistics.median(times) * 1e3:.3f} ms  "
              f"p90 {times[int(0.9 * n)] * 1e3:.3f} ms", flush=True)
    tdist.destroy_process_group()


if __name__ == "__main__":
    main()

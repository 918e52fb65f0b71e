"""Recovery time with the memory tier (docs/RECOVERY.md): 4 gloo ranks as 2 nodes.

One job state of --mb MB in all (fp32, --mb/4 per rank, every rank's own) is saved once by a
CheckpointManager with a memory tier (node "a": ranks 0-1, node "b": ranks 2-3, each node's
memory its own directory in /dev/shm) and a durable root on disk. Then, interleaved in a
balanced order, each repeated --repeats times, restore() of that step:

  memory     every rank from its own node's memory
  node-lost  node b's parts gone (moved aside): ranks 2-3 get theirs from their partners'
             replicas over gloo (loopback TCP here), verified, and keep them again
  durable    both nodes' memory gone, the durable files' pages evicted first
             (posix_fadvise DONTNEED after fsync: a cold read from the disk, without
             dropping the whole machine's page cache); mincore() then counts the bytes
             still resident (the table's "resident" column: 0 when truly cold)

and what a save costs: a synchronous memory-tier save (its own part written to tmpfs, then
replicated; what training waits for), an async save with the memory tier (blocked: the
snapshot; background: memory write, replication) and an async save without it (blocked:
the same snapshot; background: the durable write). Finally the replication bandwidth: one
transfer of every rank's part to its partner, bytes sent per rank / time.

Times are wall times from a common barrier to the slowest rank's finish (medians, with
min-max), restore() alone: zeroing the state before and the bitwise check after are outside
the timed span (they touch 3x the bytes restored). CPU seconds are those of all four ranks'
processes (every thread), also per GB restored, and per phase of the restore (the report's
phases: agreeing on the step, replica transfer, verified read, keeping a fetched replica). On a machine shared with other work they are loose: the ratios, measured in one
run and interleaved, are what to read.

    python benchmarks/bench_recovery.py                  # 1 GB job state, 3 repeats
    python benchmarks/bench_recovery.py --mb 128 --repeats 1
"""
from __future__ import annotations

import argparse
import ctypes
import mmap
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers.ranks import run_with_ranks  # noqa: E402  (the test suite's N-rank launcher)
from dckpt.bench.order import balanced  # noqa: E402

WORLD = 4
KINDS = ["memory", "node-lost", "durable"]


def _evict(root: Path) -> int:
    """Drop the pages of every file under `root` from the page cache; bytes evicted."""
    n = 0
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return n


def _resident(root: Path) -> int:
    """Bytes of the files under `root` that are in the page cache (mincore() on a mapping)."""
    import numpy as np
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    page, n = mmap.PAGESIZE, 0
    for p in root.rglob("*"):
        size = p.stat().st_size if p.is_file() else 0
        if size == 0:
            continue
        with open(p, "rb") as f:
            m = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
        try:
            view = np.frombuffer(m, dtype=np.uint8)  # the mapping's address, nothing read
            vec = ctypes.create_string_buffer((size + page - 1) // page)
            if libc.mincore(view.ctypes.data, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {p}")
            n += sum(b & 1 for b in vec.raw) * page
            del view
        finally:
            m.close()
    return n


def _rank(rank: int, world: int, root: str, shm: str, mb: int, repeats: int) -> dict:
    import torch
    import dckpt
    from dckpt.distributed import collective as dist, replicate
    from dckpt.manager.async_save import AsyncOptions

    torch.set_num_threads(1)
    node = "a" if rank < 2 else "b"
    n = mb * (1 << 20) // 4 // world
    g = torch.Generator().manual_seed(rank)
    state = {"params": torch.randn(n, generator=g), "step": torch.tensor([rank])}
    want = state["params"].clone()
    mem = shm + "/mem/{node}"

    cpu: dict[str, list[float]] = {}

    def timed(fn, key: str | None = None) -> float:
        """Wall time to the slowest rank; the CPU seconds of all ranks' processes (every
        thread: gloo's and the native pool's too) go to cpu[key]."""
        dist.barrier(what="bench start")
        t, c = time.perf_counter(), time.process_time()
        fn()
        mine = [time.perf_counter() - t, time.process_time() - c]
        got = dist.all_gather_json(mine, what="bench time")
        if key:
            cpu.setdefault(key, []).append(sum(x[1] for x in got))
        return max(x[0] for x in got)

    mgr = dckpt.CheckpointManager(root, memory=mem, node=node, durable_every=1, memory_keep=1)
    mgr.save(1, state)  # memory tier + replicas + durable
    nodes = Path(shm, "mem")
    aside = Path(shm, "aside")
    out: dict = {k: [] for k in KINDS}
    out["sources"], out["phases"], out["resident"] = {}, {k: [] for k in KINDS}, []
    got: list = []

    for kind in [k for r in range(repeats) for k in balanced(KINDS, r)]:
        if rank == 0:  # the failure each kind recovers from, made by one rank
            aside.mkdir(exist_ok=True)
            if kind == "node-lost":
                os.rename(nodes / "b" / "step-000000001", aside / "b-step")
            elif kind == "durable":
                os.rename(nodes, aside / "mem")
                _evict(Path(root))
                out["resident"].append(_resident(Path(root)))
        state["params"].zero_()  # outside the timed span, as the check below
        out[kind].append(timed(lambda: got.append(mgr.restore(state)), kind))
        rep = got.pop()
        assert rep.step == 1 and torch.equal(state["params"], want), "not restored bitwise"
        out["sources"][kind] = [rep.sources[q]["tier"] for q in range(world)]
        out["phases"][kind].append([rep.sources[q].get("phases", {}) for q in range(world)])
        if rank == 0:
            if kind == "node-lost":  # restore() put node b's parts back from the replicas
                shutil.rmtree(aside / "b-step")
            elif kind == "durable":
                os.rename(aside / "mem", nodes)
        dist.barrier(what="bench next")

    # What a save costs. Step numbers go on from 2; memory_keep=1 keeps one step in memory.
    out["sync_memory_save"] = []
    for i in range(repeats):
        out["sync_memory_save"].append(timed(lambda: mgr.save(10 + i, state, durable=False)))
    opts = AsyncOptions(max_in_flight=1)
    amem = dckpt.CheckpointManager(root + "-async-mem", memory=shm + "/amem/{node}", node=node,
                                   durable_every=1000, memory_keep=1, async_save=opts)
    adisk = dckpt.CheckpointManager(root + "-async-disk", async_save=opts)
    amem.prepare(state)
    adisk.prepare(state)
    for key in ("async_memory", "async_disk"):
        out[key] = {"blocked": [], "background": []}
    pairs = [k for r in range(repeats) for k in balanced(["async_memory", "async_disk"], r)]
    for i, key in enumerate(pairs):
        m = amem if key == "async_memory" else adisk
        dist.barrier(what="bench start")
        t = time.perf_counter()
        h = m.save(100 + i, state)
        blocked = time.perf_counter() - t
        h.wait()
        total = time.perf_counter() - t
        got = dist.all_gather_json([blocked, total - blocked], what="bench time")
        out[key]["blocked"].append(max(b for b, _ in got))
        out[key]["background"].append(max(b for _, b in got))
    amem.close()
    adisk.close()

    # Replication bandwidth: this rank's part to its partner, nothing else.
    tier = mgr._tier
    part = tier.part(10 + repeats - 1)
    sent = sum(p.stat().st_size for p in part.iterdir())
    out["replication"] = []
    for _ in range(repeats):
        def send():
            with dist.operation():
                replicate.transfer({p: part for p in tier.partners[rank]},
                                   lambda src: Path(shm, f"received-{src}"), None, tier.p2p,
                                   "bench transfer")
        out["replication"].append(timed(send, "replication"))
        for src in tier.sources:
            shutil.rmtree(Path(shm, f"received-{src}"))
        dist.barrier(what="bench next")
    out["bytes_per_rank"] = sent
    out["cpu"] = cpu
    return out


def _fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} s ({min(xs):.2f}-{max(xs):.2f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=1024, help="job state in MB (all ranks)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--disk-dir", default=None, help="the durable root's parent (a disk)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    disk = tempfile.mkdtemp(prefix="dckpt-recovery-", dir=args.disk_dir or ".")
    shm = tempfile.mkdtemp(prefix="dckpt-recovery-", dir="/dev/shm")
    try:
        t0 = time.time()
        load = os.getloadavg()
        res = run_with_ranks(WORLD, _rank, disk + "/root", shm, args.mb, args.repeats,
                             timeout=3600)[0]
    finally:
        shutil.rmtree(disk, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    mb = args.mb
    per_rank = res["bytes_per_rank"]
    print(f"# recovery bench: {mb} MB job state, {WORLD} gloo ranks as 2 nodes, "
          f"{args.repeats} repeats, load average at start {load[0]:.1f}, "
          f"{time.time() - t0:.0f} s")
    gb = mb / 1024
    print("| restore from | time | GB/s (job) | CPU s, all ranks | CPU s per GB | where each "
          "rank's bytes came from |")
    print("|---|---|---|---|---|---|")
    for k in KINDS:
        c = statistics.median(res["cpu"][k])
        print(f"| {k} | {_fmt(res[k])} | {gb / statistics.median(res[k]):.2f} | {c:.2f} | "
              f"{c / gb:.2f} | {', '.join(res['sources'][k])} |")
    print(f"\ndurable files resident in the page cache after eviction (mincore): "
          f"{res['resident']} bytes")
    print("\n| restore from | phase | wall, slowest rank | CPU s, all ranks |")
    print("|---|---|---|---|")
    for k in KINDS:
        names = sorted({p for run in res["phases"][k] for rk in run for p in rk})
        for p in names:
            wall = [max(rk.get(p, {}).get("wall", 0.0) for rk in run) for run in res["phases"][k]]
            cpu = [sum(rk.get(p, {}).get("cpu", 0.0) for rk in run) for run in res["phases"][k]]
            print(f"| {k} | {p} | {_fmt(wall)} | {statistics.median(cpu):.2f} |")
    med = {k: statistics.median(res[k]) for k in KINDS}
    print(f"\ndurable / memory = {med['durable'] / med['memory']:.1f}x, "
          f"durable / node-lost = {med['durable'] / med['node-lost']:.1f}x")
    print("\n| save | blocked (training waits) | background |")
    print("|---|---|---|")
    print(f"| sync, memory tier only (tmpfs write + replication) | "
          f"{_fmt(res['sync_memory_save'])} | - |")
    for key, name in (("async_memory", "async, memory tier"), ("async_disk", "async, disk")):
        print(f"| {name} | {_fmt(res[key]['blocked'])} | {_fmt(res[key]['background'])} |")
    rep = res["replication"]
    print(f"\nreplication: {per_rank / 1e6:.0f} MB per rank to its partner (all 4 at once) in "
          f"{_fmt(rep)}: {per_rank / 1e9 / statistics.median(rep):.2f} GB/s per rank, "
          f"{WORLD * per_rank / 1e9 / statistics.median(rep):.2f} GB/s in all; "
          f"{statistics.median(res['cpu']['replication']):.2f} CPU s in all ranks' processes "
          f"({statistics.median(res['cpu']['replication']) / (WORLD * per_rank / 1e9):.2f} "
          "CPU s per GB moved)")
    load_end = os.getloadavg()
    print(f"\nload average at the end {load_end[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps({"mb": mb, "repeats": args.repeats, "load": load,
                                         "load_end": load_end, **res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Collective save/load of one FSDP2 training state: dckpt vs torch.distributed.checkpoint.

For 1, 2 and 4 gloo ranks on this machine, a model of --mb MB of fp32 parameters is
sharded with FSDP2 (`fully_shard`) and given AdamW state (random moments), so the whole
state is about 3x --mb. Each repeat saves and loads it with both systems, alternating
which goes first:

  dckpt  dckpt.save(state, dir) / dckpt.load(dir, into=state)
  dcp    get_state_dict + dcp.save(FileSystemWriter) / dcp.load + set_state_dict

Aggregate throughput = state bytes of all ranks / wall time from a common start barrier to
the slowest rank's finish; per-rank = that rank's own bytes / its own time. Save CPU = the
CPU seconds (user + system, all threads) the ranks spent in one save, summed. Both systems
fsync their files. Loads read what the save just wrote (warm page cache for both).

    python benchmarks/bench_dist.py                      # 256 MB params, /dev/shm, 3 repeats
    python benchmarks/bench_dist.py --mb 64 --repeats 1 --worlds 1 2
    python benchmarks/bench_dist.py --dir /var/tmp       # disk instead of memory
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from distributed import run_with_ranks  # noqa: E402  (the test suite's N-rank launcher)
from dckpt.bench.order import balanced  # noqa: E402

SYSTEMS = ("dckpt", "dcp")


def build(rank: int, world: int, mb: int):
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from dckpt.distributed.partitioned import init_state
    width = 1024
    layers = max(1, mb * 2**20 // (width * width * 4))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False)
                                  for _ in range(layers)])
    mesh = init_device_mesh("cpu", (world,))  # CPU state even where a GPU is visible
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    init_state(opt)
    torch.manual_seed(rank)
    for st in opt.state.values():
        st["exp_avg"].to_local().normal_()
        st["exp_avg_sq"].to_local().uniform_()
    local = sum(t.to_local().numel() * 4 for t in model.state_dict().values())
    return {"model": model, "optim": opt}, local * 3


def cpu_seconds() -> float:
    """CPU time of this rank's process, all its threads, user + system."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def save_load(system: str, state, path: str) -> tuple[float, float, float]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    import dckpt
    from dckpt.distributed import collective as dist
    dist.barrier()
    t0, c0 = time.perf_counter(), cpu_seconds()
    if system == "dckpt":
        dckpt.save(state, path)
    else:
        msd, osd = get_state_dict(state["model"], state["optim"])
        # DCP at its best: as many writer threads as dckpt's default (all usable cores;
        # the main bench measures DCP 1.3-1.9x faster with 2 threads than with its default 1).
        writer = dcp.FileSystemWriter(path, thread_count=len(os.sched_getaffinity(0)),
                                      sync_files=True)
        dcp.save({"model": msd, "optim": osd}, storage_writer=writer)
    saved, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    dist.barrier()
    t1 = time.perf_counter()
    if system == "dckpt":
        dckpt.load(path, into=state)
    else:
        msd, osd = get_state_dict(state["model"], state["optim"])
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=path)
        set_state_dict(state["model"], state["optim"], model_state_dict=sd["model"],
                       optim_state_dict=sd["optim"])
    loaded = time.perf_counter() - t1
    return saved, loaded, cpu


def rank_main(rank: int, world: int, mb: int, root: str, repeats: int) -> dict:
    import torch.distributed as tdist
    state, nbytes = build(rank, world, mb)
    out = {s: {"save": [], "load": [], "save_cpu": []} for s in SYSTEMS}
    for rep in range(repeats):
        for system in balanced(SYSTEMS, rep):
            path = os.path.join(root, f"{system}-{rep}")
            saved, loaded, cpu = save_load(system, state, path)
            out[system]["save"].append(saved)
            out[system]["load"].append(loaded)
            out[system]["save_cpu"].append(cpu)
            tdist.barrier()
            if rank == 0:
                shutil.rmtree(path, ignore_errors=True)
    return {"bytes": nbytes, "times": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=256, help="fp32 parameter MB (state ~3x)")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default="/dev/shm")
    a = ap.parse_args()
    print(f"# bench_dist: {os.cpu_count()} cores, {platform.machine()}, "
          f"{time.strftime('%Y-%m-%d')}, --mb {a.mb}, dir {a.dir}, repeats {a.repeats}")
    rows = []
    for world in a.worlds:
        root = tempfile.mkdtemp(prefix="bench-dist-", dir=a.dir)
        try:
            res = run_with_ranks(world, rank_main, a.mb, root, a.repeats, timeout=1800)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        total = sum(r["bytes"] for r in res)
        for system in SYSTEMS:
            # per repeat: the slowest rank's time is the aggregate's wall time
            agg_save = statistics.median(max(r["times"][system]["save"][i] for r in res)
                                         for i in range(a.repeats))
            agg_load = statistics.median(max(r["times"][system]["load"][i] for r in res)
                                         for i in range(a.repeats))
            per_save = statistics.median(r["bytes"] / statistics.median(r["times"][system]["save"])
                                         for r in res)
            per_load = statistics.median(r["bytes"] / statistics.median(r["times"][system]["load"])
                                         for r in res)
            # CPU seconds of one save, all ranks together: what the save costs the machine,
            # which other jobs' load changes much less than it changes wall time.
            save_cpu = statistics.median(sum(r["times"][system]["save_cpu"][i] for r in res)
                                         for i in range(a.repeats))
            rows.append((world, system, total, per_save, total / agg_save, per_load,
                         total / agg_load, save_cpu))
    print("\n| ranks | system | state GB | save GB/s per rank | save GB/s aggregate | "
          "load GB/s per rank | load GB/s aggregate | save CPU s (all ranks) |")
    print("|---|---|---|---|---|---|---|---|")
    for w, s, total, ps, ags, pl, agl, cpu in rows:
        print(f"| {w} | {s} | {total / 1e9:.2f} | {ps / 1e9:.2f} | {ags / 1e9:.2f} | "
              f"{pl / 1e9:.2f} | {agl / 1e9:.2f} | {cpu:.3f} |")
    print("\n| ranks | dckpt / dcp save (aggregate) | dckpt / dcp load (aggregate) | "
          "dcp / dckpt save CPU |")
    print("|---|---|---|---|")
    for w in a.worlds:
        d = next(r for r in rows if r[0] == w and r[1] == "dckpt")
        c = next(r for r in rows if r[0] == w and r[1] == "dcp")
        print(f"| {w} | {d[4] / c[4]:.2f}x | {d[6] / c[6]:.2f}x | {c[7] / d[7]:.2f}x |")


if __name__ == "__main__":
    main()

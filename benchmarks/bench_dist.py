"""Collective save/load of one FSDP2 training state: dckpt vs torch.distributed.checkpoint.

For 1, 2 and 4 gloo ranks on this machine, a model of --mb MB of fp32 parameters is
sharded with FSDP2 (`fully_shard`) and given AdamW state (random moments), so the whole
state is about 3x --mb. Each repeat saves and loads it with both systems, alternating
which goes first:

  dckpt  dckpt.save(state, dir) / dckpt.load(dir, into=state)
  dcp    get_state_dict + dcp.save(FileSystemWriter) / dcp.load + set_state_dict

Aggregate throughput = state bytes of all ranks / wall time from a common start barrier to
the slowest rank's finish; per-rank = that rank's own bytes / its own time. Save CPU = the
CPU seconds (user and system apart, all threads) the ranks spent in one save, summed: the
CPU breakdown of where a save's time goes. Both systems fsync their files; DCP writes with
as many threads as there are cores. Loads read what the save just wrote (warm page cache
for both). One untimed save and load by each system comes first; the repeats run in a
balanced order and every figure is a median with its min-max.

    python benchmarks/bench_dist.py                      # 256 MB params, /dev/shm, 8 repeats
    python benchmarks/bench_dist.py --mb 64 --repeats 1 --worlds 1 2
    python benchmarks/bench_dist.py --dir /var/tmp       # disk instead of memory
    python benchmarks/bench_dist.py --record benchmarks/results/distributed.json  # for the docs
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers.ranks import run_with_ranks  # noqa: E402  (the test suite's N-rank launcher)
from dckpt.bench.order import balanced  # noqa: E402
from dckpt.bench.record import recording  # noqa: E402

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


def cpu_seconds() -> tuple[float, float]:
    """CPU time of this rank's process, all its threads: (user, system)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def save_load(system: str, state, path: str) -> tuple[float, float, tuple[float, float]]:
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
    c1 = cpu_seconds()
    saved, cpu = time.perf_counter() - t0, (c1[0] - c0[0], c1[1] - c0[1])
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
    out = {s: {"save": [], "load": [], "save_user": [], "save_sys": []} for s in SYSTEMS}
    # One untimed save and load by each system first: imports, DCP's planner set-up and
    # the allocator's growth fall outside the timed repeats, for both alike.
    for system in SYSTEMS:
        path = os.path.join(root, f"{system}-warm-up")
        save_load(system, state, path)
        tdist.barrier()
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
    for rep in range(repeats):
        for system in balanced(SYSTEMS, rep):
            path = os.path.join(root, f"{system}-{rep}")
            saved, loaded, cpu = save_load(system, state, path)
            out[system]["save"].append(saved)
            out[system]["load"].append(loaded)
            out[system]["save_user"].append(cpu[0])
            out[system]["save_sys"].append(cpu[1])
            tdist.barrier()
            if rank == 0:
                shutil.rmtree(path, ignore_errors=True)
    return {"bytes": nbytes, "times": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=256, help="fp32 parameter MB (state ~3x)")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=8)  # whole cycles of 2 systems
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--record", default=None,
                    help="also write a record for the docs generator (dckpt/bench/docs.py)")
    a = ap.parse_args()
    with recording(a.record, kind="markdown", directory=a.dir):
        run(a)


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return (f"{fmt.format(statistics.median(values))} "
            f"({fmt.format(min(values))}-{fmt.format(max(values))})")


def run(a) -> None:
    print(f"--mb {a.mb}, dir {a.dir}, {a.repeats} repeats after one untimed warm-up save and "
          f"load per system, in a balanced order; DCP with FileSystemWriter(thread_count="
          f"{len(os.sched_getaffinity(0))}, sync_files=True). GB/s: median (min-max).")
    rows = []
    for world in a.worlds:
        root = tempfile.mkdtemp(prefix="bench-dist-", dir=a.dir)
        try:
            res = run_with_ranks(world, rank_main, a.mb, root, a.repeats, timeout=1800)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        total = sum(r["bytes"] for r in res)
        for system in SYSTEMS:
            t = [r["times"][system] for r in res]
            reps = range(a.repeats)
            # per repeat: the slowest rank's time is the aggregate's wall time
            agg_save = [total / max(x["save"][i] for x in t) / 1e9 for i in reps]
            agg_load = [total / max(x["load"][i] for x in t) / 1e9 for i in reps]
            per_save = [r["bytes"] / statistics.median(x["save"]) / 1e9 for r, x in zip(res, t)]
            # CPU seconds of one save, all ranks together: what the save costs the machine,
            # which other jobs' load changes much less than it changes wall time.
            user = [sum(x["save_user"][i] for x in t) for i in reps]
            system_cpu = [sum(x["save_sys"][i] for x in t) for i in reps]
            wall = [max(x["save"][i] for x in t) for i in reps]
            rows.append(dict(world=world, system=system, total=total, agg_save=agg_save,
                             agg_load=agg_load, per_save=per_save, user=user, sys=system_cpu,
                             wall=wall))
    print("\n| ranks | system | state GB | save GB/s aggregate | save GB/s per rank (median "
          "of ranks) | load GB/s aggregate |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['world']} | {r['system']} | {r['total'] / 1e9:.2f} | "
              f"{spread(r['agg_save'])} | {statistics.median(r['per_save']):.2f} | "
              f"{spread(r['agg_load'])} |")
    print("\nWhere a save's time goes: wall time, and the CPU seconds of all ranks together "
          "(user, system), median (min-max) over the repeats.\n")
    print("| ranks | system | save wall ms | user CPU ms | system CPU ms |")
    print("|---|---|---|---|---|")
    for r in rows:
        ms = [[v * 1e3 for v in r[k]] for k in ("wall", "user", "sys")]
        print(f"| {r['world']} | {r['system']} | " + " | ".join(spread(v, "{:.0f}") for v in ms)
              + " |")
    print("\n| ranks | dckpt / dcp save (aggregate) | dckpt / dcp load (aggregate) | "
          "dcp / dckpt save CPU |")
    print("|---|---|---|---|")
    for w in a.worlds:
        d = next(r for r in rows if r["world"] == w and r["system"] == "dckpt")
        c = next(r for r in rows if r["world"] == w and r["system"] == "dcp")
        med = statistics.median
        cpu = (med([u + s for u, s in zip(c["user"], c["sys"])])
               / med([u + s for u, s in zip(d["user"], d["sys"])]))
        print(f"| {w} | {med(d['agg_save']) / med(c['agg_save']):.2f}x | "
              f"{med(d['agg_load']) / med(c['agg_load']):.2f}x | {cpu:.2f}x |")
    print("\nTarget: dckpt save >= 2x DCP's aggregate at every world size.")

if __name__ == "__main__":
    main()

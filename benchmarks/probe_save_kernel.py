"""Where a save's kernel time goes (issue 27): per save, the process's kernel and user CPU
(getrusage, all threads), /proc/vmstat deltas (page allocation, reclaim, compaction, THP)
and the memory cgroup's page-in count, for a plain write, safetensors, dckpt.save with its
writer threads sharing the chunks (current) and with the former static equal split (one
native call per file, a thread each); saves interleaved in a balanced order after a load
of the previous system's checkpoint, each target removed before its save. Then plain
pwrite loops with 256 KiB / 4 MiB / 64 MiB writes, with and without posix_fallocate first.

    python benchmarks/probe_save_kernel.py [--dir /dev/shm] [--mb 800] [--repeats 6]
    python benchmarks/probe_save_kernel.py --one  # one dckpt.save after a torch.save,
        # for wrapping in `strace -f -c` or `perf record -g -e cpu-clock`
    python benchmarks/probe_save_kernel.py --first-touch [--gap 8] [--dir .]
        # the same plain write (fsync'd on a disk), in 256 KiB and in 4 MiB pwrites, into
        # pages just freed by the unlink of the file before it, into pages freed --gap
        # seconds earlier (which the VM may have handed back to its host meanwhile: free
        # page reporting), and over an existing file in place (no new pages); the kernel's
        # reported_kib count beside it
    python benchmarks/probe_save_kernel.py --manager-changed [--dir .]
        # CheckpointManager.save (keep_last=1) after every tensor of a --mb bf16 state
        # changed: the incremental writer's path (hash first, then write), 5 saves
    python benchmarks/probe_save_kernel.py --pauses [--gap 8] [--dir .]
        # safetensors save_file + fsync and dckpt.save(overwrite=True) of the --mb state,
        # each into its one path, alternating, after a --gap s pause each

CPU times and counts hold on a loaded machine; wall times do not. vmstat counts are
system wide (other processes' allocations show up too).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dckpt  # noqa: E402
from dckpt.storage import local as io  # noqa: E402
from dckpt.bench import workloads  # noqa: E402
from dckpt.bench.limits import Limits  # noqa: E402
from dckpt.bench.order import balanced  # noqa: E402
from dckpt.bench.systems import Safetensors, TorchSave  # noqa: E402

VMSTAT = ("pgalloc_normal", "pgfault", "pgscan_kswapd", "pgscan_direct", "pgsteal_kswapd",
          "pgsteal_direct", "compact_stall", "thp_fault_alloc")


def vmstat() -> dict:
    with open("/proc/vmstat") as f:
        return {k: int(v) for k, v in (line.split() for line in f)}


def cgroup_stat() -> Path | None:
    """memory.stat of this process's memory cgroup (v2 or v1), if it can be found."""
    for line in open("/proc/self/cgroup"):
        _, ctrl, rel = line.strip().split(":", 2)
        for base in (("/sys/fs/cgroup" + rel,) if ctrl == "" else ()) + \
                (("/sys/fs/cgroup/memory" + rel,) if "memory" in ctrl.split(",") else ()):
            if Path(base, "memory.stat").is_file():
                return Path(base, "memory.stat")
    return None


def cg_pages(stat: Path | None) -> int:
    if stat is None:
        return -1
    d = dict(line.split() for line in stat.read_text().splitlines())
    return int(d.get("pgpgin", d.get("file", -1)))


def static_split(paths, values, opts, mode=io.FOREGROUND):
    """write_files as it was before issue 27: equal shares, one native call per file."""
    if len(paths) == 1:
        return io.write_file(paths[0], values, opts, mode)
    views = [io.byte_view(v).reshape(-1) for v in values]
    sizes = [io.elem_size(v) for v in values]
    plan = io._split([v.nbytes for v in views], len(paths), opts.chunk_size)
    each = dataclasses.replace(opts, threads=1)
    results, ends = [None] * len(paths), [0.0] * len(paths)

    def write(i):
        results[i] = io._write_views(paths[i], [views[v][a:z] for v, a, z in plan[i]],
                                     [sizes[v] for v, _, _ in plan[i]], each, mode, i)
        ends[i] = time.perf_counter()

    helpers = [threading.Thread(target=write, args=(i,)) for i in range(1, len(paths))]
    for t in helpers:
        t.start()
    write(0)
    for t in helpers:
        t.join()
    static_split.gap = max(ends) - min(ends)  # how long the save waited for the later file
    out = [[] for _ in values]
    for pieces, records in zip(plan, results):
        for (v, _, _), rs in zip(pieces, records):
            out[v].extend(rs)
    return out


def saves(w, root: Path, repeats: int) -> None:
    shared = io.write_files
    limits, st = Limits(w.tensors), Safetensors()

    def dckpt_static(path):
        io.write_files = static_split
        try:
            dckpt.save(w.state(), path)
        finally:
            io.write_files = shared

    systems = {"plain write": (lambda p: limits.write(p), lambda p: limits.read(p)),
               "safetensors": (lambda p: st.save(w, p), lambda p: st.load(w, p)),
               "dckpt.save (shared chunks)": (lambda p: dckpt.save(w.state(), p),
                                              lambda p: dckpt.load(p, into=w.state())),
               "dckpt.save (static split)": (dckpt_static,
                                             lambda p: dckpt.load(p, into=w.state()))}
    cg = cgroup_stat()
    gb = w.nbytes / 1e9
    rows: dict[str, list] = {n: [] for n in systems}
    print(f"{w.name}: {gb:.3f} GB, {w.count} tensors, in {root}; memory cgroup stat: {cg}")
    for rep in range(repeats):
        for name in balanced(list(systems), rep):
            save, load = systems[name]
            path = root / "probe"
            if path.is_dir():
                shutil.rmtree(path)
            path.unlink(missing_ok=True)
            static_split.gap = None
            v0, c0 = vmstat(), cg_pages(cg)
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            save(path)
            t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            v1, c1 = vmstat(), cg_pages(cg)
            rows[name].append((r1.ru_stime - r0.ru_stime, r1.ru_utime - r0.ru_utime, t1 - t0))
            delta = " ".join(f"{k}={v1.get(k, 0) - v0.get(k, 0)}" for k in VMSTAT)
            gap = f" later file +{static_split.gap:.3f} s" if static_split.gap is not None else ""
            print(f"  {name:27s} kernel {rows[name][-1][0]:.3f} s user {rows[name][-1][1]:.3f} s "
                  f"wall {t1 - t0:.3f} s | {delta} cgroup pgpgin={c1 - c0}{gap}", flush=True)
            load(path)  # other work between saves, as in the interleaved benchmark
    print("per GB, median [min-max] over the saves:")
    for name, r in rows.items():
        k = np.array([x[0] for x in r]) / gb
        u = np.array([x[1] for x in r]) / gb
        print(f"  {name:27s} kernel {np.median(k):.3f} [{k.min():.3f}-{k.max():.3f}] "
              f"user {np.median(u):.3f} s/GB")
    shutil.rmtree(root / "probe", ignore_errors=True)
    (root / "probe").unlink(missing_ok=True)


def write_sizes(root: Path, nbytes: int, repeats: int) -> None:
    src = memoryview(bytearray(os.urandom(1 << 20)) * 64)
    out: dict = {}
    for _ in range(repeats):
        for piece, falloc in [(256 << 10, False), (4 << 20, False), (64 << 20, False),
                              (256 << 10, True)]:
            p = root / "probe-sizes"
            p.unlink(missing_ok=True)
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            if falloc:
                os.posix_fallocate(fd, 0, nbytes)
            off = 0
            while off < nbytes:
                for i in range(0, len(src), piece):
                    os.pwrite(fd, src[i:i + piece], off)
                    off += piece
            os.close(fd)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            out.setdefault((piece, falloc), []).append((r1.ru_stime - r0.ru_stime) / (nbytes / 1e9))
    (root / "probe-sizes").unlink(missing_ok=True)
    print("plain pwrite loop, kernel s/GB per run:")
    for (piece, falloc), v in out.items():
        print(f"  {piece >> 10:6d} KiB writes{' after posix_fallocate' if falloc else '':22s} "
              + " ".join(f"{x:.2f}" for x in v))


def reported_kib() -> int | None:
    """KiB of free memory this VM has handed back to its host so far (virtio-balloon free
    page reporting), where the kernel exposes the count."""
    try:
        return int(Path("/sys/module/page_reporting/parameters/reported_kib").read_text())
    except (OSError, ValueError):
        return None


def first_touch(root: Path, nbytes: int, repeats: int, gap: float) -> None:
    """Kernel time of one write of nbytes by where its page-cache pages come from."""
    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    view = memoryview(src)
    sync = not str(root).startswith("/dev/shm")
    path = root / "probe-touch"

    def write(trunc: bool, piece: int) -> tuple[float, float]:
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if trunc else 0))
        for off in range(0, nbytes, piece):
            os.pwrite(fd, view[off:off + piece], off)
        if sync:
            os.fsync(fd)
        os.close(fd)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter() - t0, r1.ru_stime - r0.ru_stime

    out: dict = {}
    write(True, 4 << 20)
    for _ in range(repeats):
        for piece in (256 << 10, 4 << 20):
            size = f"{piece >> 10} KiB"
            path.unlink()
            out.setdefault(f"{size}, just freed", []).append(write(True, piece) + (0,))
            path.unlink()
            before = reported_kib()
            time.sleep(gap)
            after = reported_kib()
            out.setdefault(f"{size}, freed {gap:g} s before", []).append(
                write(True, piece) + ((after - before) >> 10 if before is not None else -1,))
            time.sleep(gap)
            out.setdefault(f"{size}, in place", []).append(write(False, piece) + (0,))
    path.unlink()
    print(f"one write of {nbytes / 1e6:.0f} MB{' + fsync' if sync else ''}, per run: "
          "wall s / kernel s [MiB the VM reported to its host during the gap]")
    for name, v in out.items():
        print(f"  {name:30s} " + "  ".join(
            f"{w:.2f}/{k:.2f}" + (f" [{r}]" if r else "") for w, k, r in v))


def pauses(w, root: Path, repeats: int, gap: float) -> None:
    """Saves the way a job that checkpoints now and then does: into the same path, after a
    pause. dckpt writes 256 KiB pieces; safetensors fills one buffer and writes it at once."""
    out: dict = {}
    for _ in range(repeats):
        for name, save in (("safetensors", lambda: Safetensors().save(w, root / "s")),
                           ("dckpt.save", lambda: dckpt.save(w.state(), root / "d",
                                                             overwrite=True))):
            time.sleep(gap)
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            save()
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            out.setdefault(name, []).append((time.perf_counter() - t0, r1.ru_stime - r0.ru_stime))
    print(f"saves after a {gap:g} s pause, per run: wall s / kernel s")
    for name, v in out.items():
        print(f"  {name:12s} " + "  ".join(f"{a:.2f}/{k:.2f}" for a, k in v))


def manager_changed(root: Path, mb: int, saves: int = 5) -> None:
    """Wall and kernel seconds of manager saves where every tensor changed since the last."""
    import torch
    g = torch.Generator().manual_seed(0)
    state = {f"t{i}": torch.randn(1 << 21, generator=g).to(torch.bfloat16)
             for i in range(max(1, (mb << 20) // (4 << 20)))}
    m = dckpt.CheckpointManager(root / "m", keep_last=1)
    m.save(0, state)
    out = []
    for step in range(1, saves + 1):
        for t in state.values():
            t.add_(1)
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        m.save(step, state)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        out.append((time.perf_counter() - t0, r1.ru_stime - r0.ru_stime))
    m.close()
    print(f"CheckpointManager.save after every tensor changed ({mb} MB bf16), per save: "
          "wall s / kernel s")
    print("  " + "  ".join(f"{a:.2f}/{k:.2f}" for a, k in out))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, default=Path("/dev/shm"))
    p.add_argument("--mb", type=int, default=800)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--one", action="store_true")
    p.add_argument("--first-touch", action="store_true")
    p.add_argument("--gap", type=float, default=8.0)
    p.add_argument("--pauses", action="store_true")
    p.add_argument("--manager-changed", action="store_true")
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix=".dckpt-probe-", dir=a.dir))
    try:
        if a.manager_changed:
            manager_changed(root, a.mb)
            return 0
        if a.first_touch:
            first_touch(root, a.mb << 20, max(2, a.repeats // 2), a.gap)
            return 0
        w = workloads.transformer(a.mb * 1_000_000)
        if a.pauses:
            pauses(w, root, max(2, a.repeats // 2), a.gap)
            return 0
        if a.one:
            TorchSave().save(w, root / "t")
            (root / "t").unlink()
            dckpt.save(w.state(), root / "d")
            return 0
        saves(w, root, a.repeats)
        write_sizes(root, (a.mb << 20) // 64 * 64, max(2, a.repeats // 2))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CheckpointManager.save after every tensor changed, against dckpt.save and safetensors,
for one workload of the save/load benchmark: each system saves --repeats times, in
alternating order, into a fresh path under --dir (the manager after an untimed save of the
bitwise-inverted state, as `dckpt bench` times it: all hashing, no chunk shared).

    python benchmarks/probe_manager_changed.py [--workload transformer-250MB-bf16]
                                               [--dir /dev/shm] [--repeats 5]
    python benchmarks/probe_manager_changed.py --bench [--workload ...] [--repeats 4]

--bench runs the save/load benchmark's own loop (dckpt.bench.runner: both regimes, the
project disk and /dev/shm, cold-cache loads where the page cache can be dropped, every
save followed by its loads) on four systems only: the manager's every-tensor-changed and
first saves, dckpt.save and safetensors; it prints each system's save seconds per repeat.
Run it with PYTHONPATH pointing at another checkout to compare two builds.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from dckpt.bench.systems import Dckpt, DckptManager, Safetensors
from dckpt.bench.variance import _parse_spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="transformer-250MB-bf16")
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bench", action="store_true")
    a = ap.parse_args()
    if a.bench:
        return bench_loop(a.workload, a.repeats)
    w = _parse_spec(a.workload).build()
    systems = {"manager, every tensor changed": DckptManager(True),
               "safetensors": Safetensors(), "dckpt.save": Dckpt()}
    times: dict[str, list[float]] = {k: [] for k in systems}
    root = Path(tempfile.mkdtemp(dir=a.dir))
    try:
        for r in range(a.repeats):
            for name in (list(systems) if r % 2 == 0 else list(systems)[::-1]):
                s, path = systems[name], root / f"s{list(systems).index(name)}"
                if hasattr(s, "before_save"):
                    s.before_save(w, path)
                t0 = time.perf_counter()
                s.save(w, path)
                times[name].append(time.perf_counter() - t0)
                if hasattr(s, "close"):
                    s.close(w)
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{a.workload} in {a.dir}, {a.repeats} saves each (wall ms, median and range)")
    for name, ts in times.items():
        print(f"  {name:32s} {statistics.median(ts) * 1e3:7.0f} ({min(ts) * 1e3:.0f}-"
              f"{max(ts) * 1e3:.0f})")


def bench_loop(workload: str, repeats: int) -> None:
    from dckpt.bench import measure, runner
    from dckpt.bench.systems import MANAGER_CHANGED, MANAGER_FIRST
    dirs = {"disk": Path(tempfile.mkdtemp(dir=".", prefix=".dckpt-bench-")),
            "shm": Path(tempfile.mkdtemp(dir="/dev/shm", prefix=".dckpt-bench-"))}
    try:
        result = runner.run(runner.Options(
            dirs=dirs, repeats=repeats, ranks=False, workloads=[workload],
            systems=["dckpt", MANAGER_FIRST, MANAGER_CHANGED, "safetensors"]))
    finally:
        for d in dirs.values():
            shutil.rmtree(d, ignore_errors=True)
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    print(f"{workload}, {repeats} repeats of the bench loop, {when} UTC, load average "
          f"{measure.load_average()}: save seconds per repeat")
    for w in result["workloads"]:
        for regime, per in w["regimes"].items():
            for name, samples in per.items():
                saves = [round(v, 3) for v in samples["seconds"].get("save", [])]
                print(f"  {regime:5s} {name:38s} {saves} {samples['errors'][:1] or ''}")


if __name__ == "__main__":
    main()

"""CheckpointManager.save after every tensor changed, against dckpt.save and safetensors,
for one workload of the save/load benchmark: each system saves --repeats times, in
alternating order, into a fresh path under --dir (the manager after an untimed save of the
bitwise-inverted state, as `dckpt bench` times it: all hashing, no chunk shared).

    python benchmarks/probe_manager_changed.py [--workload transformer-250MB-bf16]
                                               [--dir /dev/shm] [--repeats 5]

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
    a = ap.parse_args()
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


if __name__ == "__main__":
    main()

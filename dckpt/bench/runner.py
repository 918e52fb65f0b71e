"""One benchmark run: every workload, every system, both regimes, interleaved repeats.

Within a repeat the systems (and the plain write/read limits) run one after another in an
order balanced over the repeats (dckpt/bench/order.py), so a slow minute of the shared
disk or a busy neighbour hits all of them alike. Each save starts from a removed target and ends durable
(fsync'd); each load goes into the live model and optimizer after they were zeroed, and is
checked bit for bit against the state that was saved.
"""
from __future__ import annotations

import gc
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import measure
from .limits import Limits
from .measure import PeakRss, remove
from .order import balanced
from .ranks import SYSTEMS as RANK_SYSTEMS, RankPair
from .systems import System, catalogue as system_catalogue
from .workloads import Spec, Workload, catalogue as workload_catalogue

LIMIT_WRITE = "plain write"  # its samples hold the plain write (save) and read (load)
RANKS_MAX_BYTES = 1.5e9  # rank processes hold a second copy of the state: not for the largest


@dataclass
class Options:
    dirs: dict[str, Path]  # regime name ("disk", "shm") -> directory to write in
    quick: bool = False
    repeats: int = 3
    cold: bool | None = None  # None: cold-cache loads when the page cache can be dropped
    ranks: bool = True
    workloads: list[str] | None = None  # names to run (default: the catalogue's)
    systems: list[str] | None = None


@dataclass
class Samples:
    """Raw measurements of one system (or limit) in one regime of one workload."""
    seconds: dict[str, list[float]] = field(default_factory=dict)  # op -> per repeat
    peak_rss: dict[str, list[int]] = field(default_factory=dict)
    size_bytes: int | None = None
    errors: list[str] = field(default_factory=list)

    def add(self, op: str, value: float) -> None:
        self.seconds.setdefault(op, []).append(value)


def run(opts: Options, log=None) -> dict:
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    started = time.time()
    cold = measure.can_drop_caches() if opts.cold is None else opts.cold
    specs = workload_catalogue(opts.quick, measure.available_memory())
    if opts.workloads:
        specs = [s for s in specs if s.name in opts.workloads] or [
            _parse_spec(n) for n in opts.workloads]
    systems = [s for s in system_catalogue()
               if not opts.systems or s.name in opts.systems]
    rank_systems = [s for s in RANK_SYSTEMS
                    if opts.ranks and (not opts.systems or s in opts.systems)]
    for d in opts.dirs.values():
        Path(d).mkdir(parents=True, exist_ok=True)
    result = {"started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": measure.machine(opts.dirs),
              "load_average_start": measure.load_average(),
              "options": {"quick": opts.quick, "repeats": opts.repeats, "cold": cold,
                          "ranks": bool(rank_systems),
                          "dirs": {k: str(v) for k, v in opts.dirs.items()},
                          "torch_threads": torch.get_num_threads()},
              "systems": [s.name for s in systems] + rank_systems,
              "workloads": []}
    for spec in specs:
        log(f"[bench] {spec.name}: building (load average {measure.load_average()})")
        result["workloads"].append(
            _run_workload(spec, systems, rank_systems, opts, cold, log))
        gc.collect()
    result["load_average_end"] = measure.load_average()
    result["seconds"] = round(time.time() - started, 1)
    return result


def _parse_spec(name: str) -> Spec:
    """'transformer-2GB-fp32' style names outside the catalogue."""
    kind, size, dtype = name.split("-")
    scale = {"MB": 1e6, "GB": 1e9}[size[-2:]]
    return Spec(kind, int(float(size[:-2]) * scale),
                {"fp32": "float32", "bf16": "bfloat16"}[dtype])


def _run_workload(spec: Spec, systems: list[System], rank_systems: list[str], opts: Options,
                  cold: bool, log) -> dict:
    w = spec.build()
    reference = w.fingerprint()
    limits = Limits(w.tensors)
    if spec.total_bytes > RANKS_MAX_BYTES:
        rank_systems = []
    pair = RankPair(spec) if rank_systems else None
    names = [LIMIT_WRITE] + [s.name for s in systems] + rank_systems
    samples = {regime: {n: Samples() for n in names} for regime in opts.dirs}
    memcpy: list[float] = []
    by_name = {s.name: s for s in systems}
    try:
        _warm_up(names, by_name, limits, pair, w, reference, next(iter(opts.dirs.values())))
        for rep in range(opts.repeats):
            order = balanced(names, rep)
            regimes = list(opts.dirs.items())
            regimes = regimes[rep % len(regimes):] + regimes[:rep % len(regimes)]
            t0 = time.perf_counter()
            limits.memcpy()
            memcpy.append(time.perf_counter() - t0)
            for regime, root in regimes:
                durable_cold = cold and regime == "disk"
                for name in order:
                    s = samples[regime][name]
                    path = Path(root) / f"bench-{_slug(name)}"
                    remove(path)
                    try:
                        if name == LIMIT_WRITE:
                            _measure_limits(limits, path, s, durable_cold)
                        elif name in by_name:
                            _measure_system(by_name[name], w, reference, path, s, durable_cold)
                        else:
                            _measure_ranks(pair, name, path, s, durable_cold)
                    except Exception as e:  # a failing system is reported, the run goes on
                        s.errors.append(f"{type(e).__name__}: {e}")
                        log(f"[bench]   {regime} {name}: FAILED {type(e).__name__}: {e}")
                        if w.fingerprint() != reference:  # a load failed midway
                            w.reset(spec.build())
                    finally:
                        if name in by_name:
                            by_name[name].finish()
                        remove(path)
            log(f"[bench]   repeat {rep + 1}/{opts.repeats} done "
                f"(load average {measure.load_average()})")
    finally:
        if pair is not None:
            pair.close()
        for s in systems:
            s.close(w)
    out = {"name": spec.name, "bytes": w.nbytes, "tensors": w.count,
           "rank_bytes": pair.nbytes if pair else None,
           "memcpy_seconds": memcpy, "regimes": {}}
    for regime, per in samples.items():
        out["regimes"][regime] = {name: asdict(s) for name, s in per.items()}
    limits.close()
    return out


def _warm_up(names: list[str], by_name: dict, limits: Limits, pair, w: Workload,
              reference: list[int], root: Path) -> None:
    """One untimed save and load by every system, so that first imports, accelerate's
    prepare(), DCP's planner set-up and allocator growth fall outside every timed run, for
    the peers as for dckpt (whose module the bench itself has already imported)."""
    for name in names:
        path = Path(root) / f"bench-warm-{_slug(name)}"
        remove(path)
        try:
            if name == LIMIT_WRITE:
                _measure_limits(limits, path, Samples(), False)
            elif name in by_name:
                _measure_system(by_name[name], w, reference, path, Samples(), False)
            else:
                _measure_ranks(pair, name, path, Samples(), False)
        except Exception:  # the timed repeats record the failure
            pass
        finally:
            if name in by_name:
                by_name[name].finish()
            remove(path)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)


def _measure_limits(limits: Limits, path: Path, s: Samples, cold: bool) -> None:
    t0 = time.perf_counter()
    limits.write(path)
    s.add("save", time.perf_counter() - t0)
    s.size_bytes = path.stat().st_size
    t0 = time.perf_counter()
    limits.read(path)
    s.add("load", time.perf_counter() - t0)
    t0 = time.perf_counter()
    limits.sha256sum(path)
    s.add("sha256sum", time.perf_counter() - t0)
    if cold:
        measure.drop_caches()
        t0 = time.perf_counter()
        limits.read(path)
        s.add("load_cold", time.perf_counter() - t0)


def _measure_system(system: System, w: Workload, reference: list[int], path: Path,
                    s: Samples, cold: bool) -> None:
    system.before_save(w, path)
    gc.collect()
    with PeakRss() as peak:
        t0 = time.perf_counter()
        system.save(w, path)
        s.add("save", time.perf_counter() - t0)
    s.peak_rss.setdefault("save", []).append(peak.extra)
    s.size_bytes = system.size(path)
    # Warm passes first: they read the page cache as the save left it, as the plain read
    # does; after a cold pass, readahead has refilled it in smaller pieces (verify measured
    # 13-15 ms as written against 16-20 ms refilled, on the 250 MB bf16 state).
    passes = [("load", False), ("verify", False)] + (
        [("load_cold", True), ("verify_cold", True)] if cold else [])
    for op, drop in passes:
        loading = op.startswith("load")
        if not (system.loads if loading else system.can_verify):
            continue
        if drop:
            measure.drop_caches()
        if loading:
            _measure_load(system, w, reference, path, s, op)
        else:
            t0 = time.perf_counter()
            system.verify(path)
            s.add(op, time.perf_counter() - t0)


def _measure_load(system: System, w: Workload, reference: list[int], path: Path,
                  s: Samples, op: str) -> None:
    w.perturb()
    gc.collect()
    with PeakRss() as peak:
        t0 = time.perf_counter()
        system.load(w, path)
        seconds = time.perf_counter() - t0
    # A load counts only once it is proven exact: wrong bytes are an error, not a figure.
    if w.fingerprint() != reference:
        raise AssertionError(f"{system.name}: loaded state differs from the saved one")
    s.add(op, seconds)
    s.peak_rss.setdefault(op, []).append(peak.extra)


def _measure_ranks(pair: RankPair, name: str, path: Path, s: Samples, cold: bool) -> None:
    s.add("save", pair.run("save", name, path))
    s.size_bytes = measure.disk_usage(path)
    s.add("load", pair.run("load", name, path))
    if cold:
        measure.drop_caches()
        s.add("load_cold", pair.run("load", name, path))


__all__ = ["Options", "Samples", "run", "LIMIT_WRITE"]

"""How fast `dckpt verify` checks a checkpoint, against reading the same files sequentially.

    python benchmarks/bench_verify.py [--gb 2] [--repeat 12] [--dir /tmp]

Target: verify without --deep (every chunk's stored-bytes hash, through the native core)
runs at >= 90% of the sequential read bandwidth of the same data files. Both are timed in
the same run, interleaved, on a cold page cache (each file's pages dropped with
posix_fadvise(DONTNEED) before every pass; the files were fsync'd, so the pages are clean
and really go) and on a warm one. The baseline reads every data file front to back with
8 MiB readinto() calls into one reused buffer: what `cat file > /dev/null` does.
sha256sum of the same files is the integrity check a user runs without dckpt (what
Megatron's integrity manifest records): a verify peer, timed the same way.
Also shown: --deep on a zstd-compressed checkpoint of the same state (decodes every chunk).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dckpt  # noqa: E402
from dckpt.bench.order import balanced  # noqa: E402
from dckpt.tools.verify import verify  # noqa: E402
from dckpt.bench.record import recording  # noqa: E402


def make_state(gb: float) -> dict:
    """Model-like float32 and bf16 tensors, a few large and many small (as real layers)."""
    g = torch.Generator().manual_seed(0)
    total = int(gb * 1e9)
    state, i, used = {}, 0, 0
    while used < total:
        rows = 4096 if i % 4 else 64
        t = torch.randn(rows, 4096, generator=g)
        if i % 3 == 2:
            t = t.to(torch.bfloat16)
        state[f"layer{i}.weight"] = t
        used += t.numel() * t.element_size()
        i += 1
    return state


def data_files(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.iterdir() if p.suffix == ".dckpt")


def drop_cache(files: list[Path]) -> None:
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sequential_read(files: list[Path]) -> int:
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    total = 0
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def sha256sum(files: list[Path]) -> None:
    subprocess.run(["sha256sum", *map(str, files)], check=True, stdout=subprocess.DEVNULL)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_verify(ckpt: Path, deep: bool = False) -> None:
    report = verify(ckpt, deep=deep)
    if any(c.level == "error" for c in report.all_checks()):
        raise SystemExit(f"verify failed on the benchmark checkpoint: {report.to_json()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.0, help="state size in GB (default 2)")
    ap.add_argument("--repeat", type=int, default=12)  # 2 cycles of 3 systems
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir on /tmp)")
    ap.add_argument("--no-deep", action="store_true", help="skip the --deep measurement")
    ap.add_argument("--record", default=None,
                    help="also write a record for the docs generator (dckpt/bench/docs.py)")
    args = ap.parse_args()
    with recording(args.record, kind="markdown", directory=args.dir or tempfile.gettempdir()):
        run(args)


def run(args) -> None:

    base = Path(tempfile.mkdtemp(prefix="dckpt-bench-verify-", dir=args.dir))
    state = make_state(args.gb)
    raw = dckpt.save({"model": state}, base / "raw")
    zst = None if args.no_deep else dckpt.save({"model": state}, base / "zstd",
                                               compression="zstd")
    del state
    files = data_files(raw.path)
    nbytes = sum(p.stat().st_size for p in files)
    print(f"checkpoint: {nbytes / 1e9:.2f} GB in {len(files)} file(s), "
          f"{len(raw.manifest.tensors)} tensors; {os.cpu_count()} cores; {base}")

    results: dict[str, list[float]] = {}
    # sha256sum of the files: the integrity check a user runs without dckpt (what
    # Megatron's integrity manifest records), over the very same bytes.
    ops = [("sequential read", lambda: sequential_read(files)),
           ("dckpt verify", lambda: run_verify(raw.path)),
           ("sha256sum", lambda: sha256sum(files))]
    for _, fn in ops:  # untimed: first imports and set-up of every system
        fn()
    for rep in range(args.repeat):
        for cache in ("cold", "warm"):
            for name, fn in balanced(ops, rep):
                if cache == "cold":
                    drop_cache(files)
                else:
                    sequential_read(files)  # make sure every page is resident
                results.setdefault(f"{name}/{cache}", []).append(nbytes / timed(fn) / 1e9)
    print(f"\n| GB/s, median of {args.repeat} (min-max) | cold cache | warm cache |")
    print("|---|---|---|")
    for name, _ in ops:
        cells = [f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})"
                 for v in (results[f"{name}/cold"], results[f"{name}/warm"])]
        print(f"| {name} | {' | '.join(cells)} |")
    print("\n| dckpt verify / peer, per interleaved pair: median (min-max) | cold | warm |")
    print("|---|---|---|")
    for peer in ("sequential read", "sha256sum"):
        cells = []
        for cache in ("cold", "warm"):
            r = [v / p for v, p in zip(results[f"dckpt verify/{cache}"],
                                       results[f"{peer}/{cache}"])]
            cells.append(f"{statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f})")
        print(f"| {peer} | {' | '.join(cells)} |")
    print("\nTargets: verify >= 0.90x the sequential read; faster than sha256sum (ratio > 1).")

    if zst is not None:
        zfiles = data_files(zst.path)
        zbytes = sum(p.stat().st_size for p in zfiles)
        sequential_read(zfiles)
        deep = [timed(lambda: run_verify(zst.path, deep=True))
                for _ in range(max(1, args.repeat // 2))]
        t = statistics.median(deep)
        print(f"\n`--deep` on zstd ({zbytes / 1e9:.2f} GB stored, ratio {nbytes / zbytes:.2f}), "
              f"warm: {zst.bytes / t / 1e9:.2f} GB/s of raw data decoded and hashed")
    import shutil
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()

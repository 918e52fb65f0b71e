"""The fixed cost of a repeated CheckpointManager.save: a state of `--tensors` tensors of
one element each, saved unchanged again and again (incremental, fsync on), in blocks.

    python benchmarks/probe_fixed_cost.py [--tensors 300] [--blocks 8] [--per-block 20]
                                          [--dir /tmp] [--against COMMIT --rounds 4]

Per save of the best block (the least user + system CPU, what the machine's noise leaves
alone) and the median block: user and system CPU of this process (all its threads, from
getrusage) and wall time; each save waits for the removal of the step retention retired.
--against: the same probe in a `git archive` of COMMIT with this build's compiled core
(its functions are a superset of older ones), alternating OLD NEW NEW OLD ... for --rounds
pairs, so that the machine's drift weighs on both; prints each run's line.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def probe(args) -> str:
    import torch
    from dckpt.manager import CheckpointManager
    state = {f"layer{i}.weight": torch.randn(1) for i in range(args.tensors)}
    root = tempfile.mkdtemp(prefix="probe-fixed-", dir=args.dir)
    try:
        mgr = CheckpointManager(root, keep_last=2)
        step = 0
        for _ in range(5):  # first saves: imports, the first plan, the first base
            mgr.save(step, state)
            mgr.wait()
            step += 1
        blocks = []
        for _ in range(args.blocks):
            r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            for _ in range(args.per_block):
                mgr.save(step, state)
                mgr.wait()
                step += 1
            wall = time.perf_counter() - w0
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            n = args.per_block / 1e3
            blocks.append(((r1.ru_utime - r0.ru_utime) / n, (r1.ru_stime - r0.ru_stime) / n,
                           wall / n))
        mgr.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    best = min(blocks, key=lambda b: b[0] + b[1])
    mid = sorted(blocks, key=lambda b: b[0] + b[1])[len(blocks) // 2]
    import dckpt
    return (f"[{Path(dckpt.__file__).parent.parent}] "
            f"{args.tensors} tensors, ms per save: best block user {best[0]:.2f} sys "
            f"{best[1]:.2f} (CPU {best[0] + best[1]:.2f}) wall {best[2]:.2f}; median block "
            f"CPU {mid[0] + mid[1]:.2f} wall {mid[2]:.2f}")


def against(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="probe-fixed-ab-"))
    try:
        old = work / "old"
        old.mkdir()
        tar = work / "old.tar"
        tar.write_bytes(subprocess.run(["git", "-C", str(REPO), "archive", args.against],
                                       check=True, capture_output=True).stdout)
        with tarfile.open(tar) as t:
            t.extractall(old)
        for so in (REPO / "dckpt").glob("_native*.so"):
            shutil.copy(so, old / "dckpt" / so.name)
        base = [sys.executable, __file__, "--tensors", str(args.tensors), "--blocks",
                str(args.blocks), "--per-block", str(args.per_block)]
        base += ["--dir", args.dir] if args.dir else []
        for r in range(args.rounds):
            for label in (("old", "new") if r % 2 == 0 else ("new", "old")):
                env = dict(os.environ)
                if label == "old":
                    env["PYTHONPATH"] = str(old)
                out = subprocess.run(base, env=env, check=True, capture_output=True, text=True,
                                     cwd=old if label == "old" else REPO).stdout.strip()
                print(f"{label} ({args.against if label == 'old' else 'this tree'}): {out}",
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=300)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--per-block", type=int, default=20)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--against", default=None, help="a commit to compare with")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    if args.against:
        from dckpt.bench.record import header_line  # here only: runs may import an old tree
        print(header_line(), flush=True)
        against(args)
    else:
        print(probe(args))


if __name__ == "__main__":
    main()

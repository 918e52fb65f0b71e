"""`dckpt bench` on two commits, interleaved in one run: the speed of a change, by ratios.

    python benchmarks/compare_commits.py OLD NEW [--rounds 2] [--so PATH] -- BENCH ARGS

Each commit is exported (git archive) into a temporary directory, gets the compiled core
(built there, or copied from --so when the change leaves csrc/ as it was) and runs
`python -m dckpt bench BENCH ARGS` once per round, in the order OLD NEW NEW OLD ... so that
a load that drifts during the run weighs on both alike. Prints, per workload, regime,
system and operation, the median seconds of each commit over all repeats of all rounds,
the ratio NEW/OLD and each commit's spread (max/min of its samples).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def export(commit: str, dest: Path, so: Path | None) -> None:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], check=True,
                             capture_output=True).stdout
    tar = dest.with_suffix(".tar")
    tar.write_bytes(archive)
    with tarfile.open(tar) as t:
        t.extractall(dest)
    if so is not None:
        shutil.copy(so, dest / "dckpt" / so.name)
    else:
        subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=dest,
                       check=True)


def samples(result: dict) -> dict[tuple, list[float]]:
    out: dict[tuple, list[float]] = {}
    for w in result["workloads"]:
        for regime, systems in w["regimes"].items():
            for system, s in systems.items():
                for op, values in s["seconds"].items():
                    out.setdefault((w["name"], regime, system, op), []).extend(values)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--so", type=Path, default=None, help="compiled core to copy into both")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    a = p.parse_args(argv[:cut])
    bench = argv[cut + 1:] or ["--quick"]  # after "--": the `dckpt bench` arguments
    work = Path(tempfile.mkdtemp(prefix="dckpt-compare-"))
    try:
        trees = {}
        for label, commit in (("old", a.old), ("new", a.new)):
            trees[label] = work / label
            export(commit, trees[label], a.so)
        got: dict[str, dict[tuple, list[float]]] = {"old": {}, "new": {}}
        for r in range(a.rounds):
            for label in (("old", "new") if r % 2 == 0 else ("new", "old")):
                out = work / f"out-{label}-{r}"
                print(f"[compare] round {r + 1}/{a.rounds}: {label}", file=sys.stderr, flush=True)
                subprocess.run([sys.executable, "-m", "dckpt", "bench", *bench, "--out", str(out)],
                               cwd=trees[label], check=True, stdout=subprocess.DEVNULL,
                               env={**__import__("os").environ, "PYTHONPATH": str(trees[label])})
                for k, v in samples(json.loads((out / "results.json").read_text())).items():
                    got[label].setdefault(k, []).extend(v)
        print(f"{'workload':28} {'regime':6} {'system':18} {'op':10} {'old s':>8} {'new s':>8} "
              f"{'new/old':>8} {'old spread':>10} {'new spread':>10}")
        for k in sorted(set(got["old"]) & set(got["new"])):
            o, n = got["old"][k], got["new"][k]
            if not o or not n or min(o) <= 0 or min(n) <= 0:
                continue
            mo, mn = statistics.median(o), statistics.median(n)
            print(f"{k[0]:28} {k[1]:6} {k[2]:18} {k[3]:10} {mo:8.4f} {mn:8.4f} {mn / mo:8.3f} "
                  f"{max(o) / min(o):10.2f} {max(n) / min(n):10.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

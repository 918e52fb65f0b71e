"""`dckpt bench`: dckpt against torch.save, safetensors, DCP and accelerate, with the
machine's plain write/read limits, on the project's disk (fsync) and in /dev/shm."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

from . import measure, record, report
from .runner import Options, run as run_bench


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="small workloads, 2 repeats (under 2 minutes): keeps the bench working")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3; quick 2)")
    p.add_argument("--disk-dir", type=Path, default=None,
                   help="directory on the disk to measure (default: a temporary one in the "
                        "current directory)")
    p.add_argument("--shm-dir", type=Path, default=None,
                   help="RAM-backed directory (default: a temporary one in /dev/shm)")
    p.add_argument("--regimes", default="disk,shm", help="comma list of disk, shm")
    p.add_argument("--workloads", default=None,
                   help="comma list of workload names, e.g. transformer-1GB-fp32")
    p.add_argument("--systems", default=None, help="comma list of system names")
    p.add_argument("--no-ranks", action="store_true", help="skip the 2-rank variants")
    cold = p.add_mutually_exclusive_group()
    cold.add_argument("--cold", dest="cold", action="store_true", default=None,
                      help="also load with a dropped page cache (needs root)")
    cold.add_argument("--no-cold", dest="cold", action="store_false")
    p.add_argument("--out", type=Path, default=Path("bench-results"),
                   help="where results.json, chart.png and report.md go")
    p.add_argument("--record", type=Path, default=None,
                   help="write the run's record (results, command, machine, date, load) for "
                        "the docs generator (dckpt/bench/docs.py) to this JSON file")
    p.add_argument("--variance", action="store_true",
                   help="instead: the spread of saves and loads back to back, interleaved and "
                        "after a training step (dckpt/bench/variance.py: 12 repeats of "
                        "transformer-800MB-fp32, --quick 3 of 48 MB, --workloads names one); "
                        "writes variance.json and variance.md under --out")
    p.add_argument("--docs", type=Path, default=None,
                   help="rewrite the '## Save and load' section of this markdown file, with "
                        "the notes of benchmarks/notes/save-load.md (make bench-docs "
                        "regenerates the whole file)")


def run(args: argparse.Namespace) -> int:
    regimes = [r for r in args.regimes.split(",") if r]
    if not set(regimes) <= {"disk", "shm"}:
        print("--regimes takes disk and/or shm", file=sys.stderr)
        return 2
    made = []
    dirs = {}
    for regime in regimes:
        given = args.disk_dir if regime == "disk" else args.shm_dir
        if given is None:
            parent = Path.cwd() if regime == "disk" else Path("/dev/shm")
            if not parent.is_dir():
                print(f"skipping the {regime} regime: {parent} does not exist", file=sys.stderr)
                continue
            given = Path(tempfile.mkdtemp(prefix=".dckpt-bench-", dir=parent))
            made.append(given)
        dirs[regime] = given
    opts = Options(dirs=dirs, quick=args.quick,
                   repeats=args.repeats or (2 if args.quick else 3), cold=args.cold,
                   ranks=not args.no_ranks,
                   workloads=args.workloads.split(",") if args.workloads else None,
                   systems=args.systems.split(",") if args.systems else None)
    argv = sys.argv[2:] if sys.argv[1:2] == ["bench"] else []
    for flag in ("--record", "--out"):  # where the output goes is not part of the recipe
        if flag in argv[:-1]:
            i = argv.index(flag)
            argv = argv[:i] + argv[i + 2:]
    command = "python -m dckpt bench " + " ".join(shlex.quote(a) for a in argv)
    started_header = record.header(next(iter(dirs.values()), None))
    if args.variance:
        from . import variance
        try:
            with record.recording(args.record, kind="markdown",
                                  directory=next(iter(dirs.values()), None)):
                variance.main(dirs, args.out, quick=args.quick, repeats=args.repeats,
                              workload=args.workloads, command=command.strip())
        finally:
            for d in made:
                measure.remove(d)
        return 0
    try:
        result = run_bench(opts)
    finally:
        for d in made:
            measure.remove(d)
    result["command"] = command.strip()
    paths = report.write_outputs(result, args.out, command.strip())
    print(report.tables(result))
    print()
    print(report.goals_markdown(result["goals"]))
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    if args.record:
        write_record(args.record, result, started_header)
    if args.docs:
        from .docs import notes_of
        report.update_docs(args.docs, result, paths["chart"], command.strip(),
                           notes_of("save-load"))
        print(f"updated {args.docs}")
    return 0


def write_record(path: Path, result: dict, header: dict) -> None:
    """The docs generator's record of a run: the whole result, rendered by report.markdown."""
    rec = dict(header, kind="save_load", command=result["command"], result=result,
               load_average_end=result.get("load_average_end"), seconds=result.get("seconds"))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=1) + "\n")
    print(f"recorded {path}")


__all__ = ["add_arguments", "run", "write_record"]

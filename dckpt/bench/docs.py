"""docs/BENCHMARKS.md, generated: every section from a committed command's record.

    python -m dckpt.bench.docs                 # render the doc from benchmarks/results/
    python -m dckpt.bench.docs --run           # run every section's command, then render
    python -m dckpt.bench.docs --run --only verify,native --quick   # tiny sizes
    python -m dckpt.bench.docs --check         # fail if the doc is not what the records give

The doc is a function of committed files only: benchmarks/notes/intro.md, then for each
registered section (SECTIONS, in order) its record benchmarks/results/<slug>.json (written
by the section's command through dckpt/bench/record.py: output, command, commit, machine,
date, load) and its notes benchmarks/notes/<slug>.md, included verbatim, so rerunning a
command never deletes them. A section without a record yet shows
benchmarks/notes/<slug>.legacy.md, the figures written before this generator existed,
under a banner saying so. Other benchmarks plug in with `register(Section(...))` or by
adding an entry to SECTIONS.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .record import REPO

RESULTS = REPO / "benchmarks" / "results"
NOTES = REPO / "benchmarks" / "notes"
DOC = REPO / "docs" / "BENCHMARKS.md"


QUICK = "**A quick run (tiny sizes): it shows the pipeline works, not how fast anything is.**"


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


@dataclass
class Section:
    slug: str  # file names: results/<slug>.json, notes/<slug>.md, notes/<slug>.legacy.md
    title: str  # the "## " heading
    command: list[str]  # argv after `python`, run from the repository root
    quick: list[str] = field(default_factory=list)  # argv of a tiny run (pipeline checks)
    needs: str = ""  # what the machine must have, in words ("" = this machine)
    available: Callable[[], bool] = lambda: True  # False: --run keeps the existing record


SECTIONS: list[Section] = [
    Section("save-load", "Save and load",
            ["-m", "dckpt", "bench", "--workloads",
             "transformer-250MB-fp32,transformer-250MB-bf16,transformer-1GB-fp32,"
             "transformer-1GB-bf16,finetune-1GB-bf16", "--repeats", "5"],
            ["-m", "dckpt", "bench", "--quick", "--repeats", "1", "--no-ranks",
             "--regimes", "shm", "--workloads", "transformer-20MB-fp32"]),
    Section("small", "Small checkpoints: fixed costs",
            ["benchmarks/bench_small.py", "--rounds", "16"],
            ["benchmarks/bench_small.py", "--rounds", "2", "--tensors", "20", "--async-mb", "8"]),
    Section("verify", "Verify", ["benchmarks/bench_verify.py", "--gb", "2", "--repeat", "12"],
            ["benchmarks/bench_verify.py", "--gb", "0.02", "--repeat", "2", "--no-deep"]),
    Section("native", "Native core", ["benchmarks/bench_native.py"],
            ["benchmarks/bench_native.py", "--size-mb", "16", "--repeats", "2"]),
    Section("incremental", "Incremental checkpoints", ["benchmarks/bench_incremental.py"],
            ["benchmarks/bench_incremental.py", "--base-mb", "8", "--width", "256",
             "--repeats", "2"]),
    Section("distributed", "Distributed", ["benchmarks/bench_dist.py"],
            ["benchmarks/bench_dist.py", "--mb", "4", "--worlds", "1", "2", "--repeats", "1"]),
    Section("distributed-16core", "Distributed on 16 cores",
            ["benchmarks/bench_dist.py", "--mb", "512"],
            needs="16 free cores (the lent GPU host, its GPU unused)",
            available=lambda: len(os.sched_getaffinity(0)) >= 16),
    Section("async", "Async saves",
            ["benchmarks/bench_async.py", "--rounds", "2", "--steps", "3", "--max-steps", "12",
             "--compare"],
            ["benchmarks/bench_async.py", "--quick", "--steps", "1", "--max-steps", "3"]),
    Section("variance", "Save and load spread",
            ["-m", "dckpt", "bench", "--variance"],
            ["-m", "dckpt", "bench", "--variance", "--quick", "--repeats", "2", "--regimes",
             "shm"]),
    Section("object-storage", "Object storage",
            ["benchmarks/bench_remote.py", "--gb", "1", "--rounds", "2", "--lora-mb", "500"],
            ["benchmarks/bench_remote.py", "--gb", "0.02", "--rounds", "1", "--lora-mb", "10"]),
    Section("gpu", "GPU", ["benchmarks/gpu_check.py"], ["benchmarks/gpu_check.py", "--gb", "0.1"],
            needs="a CUDA GPU", available=_cuda),
]


def register(section: Section) -> None:
    """Add (or replace, by slug) a section; it renders after the ones already there."""
    SECTIONS[:] = [s for s in SECTIONS if s.slug != section.slug] + [section]


def notes_of(slug: str, notes: Path = NOTES) -> str:
    """A section's notes, verbatim ("" when it has none)."""
    path = notes / f"{slug}.md"
    return path.read_text() if path.exists() else ""


def _load_text(t) -> str:
    return ("/".join(str(x) for x in t) + " (1/5/15 min)") if isinstance(t, list) else str(t)


def machine_line(r: dict) -> str:
    m = r.get("machine", {})
    fs = "; ".join(f"{f.get('path')} on {f.get('device', '?')} ({f.get('type', '?')})"
                   for f in m.get("filesystems", {}).values())
    return (f"{m.get('cores', '?')} cores ({m.get('cpu', '?')}), "
            f"{m.get('memory_bytes', 0) / 2**30:.1f} GiB memory, Linux {m.get('kernel', '?')}, "
            f"Python {m.get('python', '?')}" + (f"; files in {fs}" if fs else ""))


def render_record(section: Section, record: dict, notes: str, doc_dir: Path,
                  charts: bool = True) -> str:
    if record.get("kind") == "save_load":
        from . import report
        chart = doc_dir / "bench_save_load.png"
        if charts:
            report.chart(record["result"], chart)
        result = dict(record["result"], commit=record.get("commit"))
        text = report.markdown(result, chart.name, record["command"], notes).rstrip()
        return text.replace("\n\n", "\n\n" + QUICK + "\n\n", 1) if record.get("quick") else text
    parts = [f"## {section.title}", "",
             f"Produced by `{record['command']}` (commit {record.get('commit', '?')}) on "
             f"{record.get('started', '?')}, {record.get('seconds', '?')} s. Machine: "
             f"{machine_line(record)}. Load average {_load_text(record.get('load_average_start'))} "
             f"at start, {_load_text(record.get('load_average_end'))} at end.", ""]
    if record.get("quick"):
        parts += [QUICK, ""]
    out = record.get("output", "").strip("\n")
    parts += [out if record.get("kind") == "markdown" else f"```text\n{out}\n```", ""]
    if notes.strip():
        parts += [notes.strip(), ""]
    return "\n".join(parts).rstrip()


def render_legacy(section: Section, legacy: str) -> str:
    cmd = "python " + " ".join(section.command)
    where = f" on a machine with {section.needs}" if section.needs else ""
    banner = (f"*Not regenerated yet: the figures in this section were taken before the "
              f"generator existed, with the committed command they name, and written here "
              f"by hand or by that command; notes that rested only on probes that were never "
              f"committed are removed. "
              f"`make bench-docs` (or `{cmd}` with `--record benchmarks/results/"
              f"{section.slug}.json`{where}, then `python -m dckpt.bench.docs`) replaces it.*")
    return "\n".join([f"## {section.title}", "", banner, "", legacy.strip()])


def render_unmeasured(section: Section, notes: str) -> str:
    """A section whose command has not run here yet: what it measures, no figures."""
    cmd = "python " + " ".join(section.command)
    return "\n".join([f"## {section.title}", "",
                      f"*Not measured yet: `make bench-docs` (or `{cmd}` with `--record "
                      f"benchmarks/results/{section.slug}.json`, then `python -m "
                      f"dckpt.bench.docs`) fills this section.*", "", notes.strip()])


def render(results: Path = RESULTS, notes: Path = NOTES, doc_dir: Path = DOC.parent,
           charts: bool = True) -> str:
    """The doc's text; charts=False leaves the chart files alone (--check writes nothing)."""
    parts = [(notes / "intro.md").read_text().strip()]
    for s in SECTIONS:
        rec_path, text = results / f"{s.slug}.json", notes_of(s.slug, notes)
        if rec_path.exists():
            parts.append(render_record(s, json.loads(rec_path.read_text()), text, doc_dir,
                                       charts))
        elif (notes / f"{s.slug}.legacy.md").exists():
            parts.append(render_legacy(s, (notes / f"{s.slug}.legacy.md").read_text()))
        elif text.strip():
            parts.append(render_unmeasured(s, text))
    return "\n\n".join(parts) + "\n"


def run_section(s: Section, results: Path, quick: bool, log=print) -> bool:
    """Run a section's command with --record; False when skipped or failed (the old record,
    if any, stays)."""
    if not s.available():
        log(f"[bench-docs] {s.slug}: skipped, needs {s.needs}")
        return False
    argv = s.quick if quick else s.command
    if not argv:
        log(f"[bench-docs] {s.slug}: no {'quick ' if quick else ''}command")
        return False
    results.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, *argv, "--record", str(results / f"{s.slug}.json")]
    log(f"[bench-docs] {s.slug}: {' '.join(cmd)}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    done = subprocess.run(cmd, cwd=REPO, env=env)
    if done.returncode != 0:
        log(f"[bench-docs] {s.slug}: FAILED (exit {done.returncode}); its old record stays")
        return False
    if quick:  # say so in the record, so a quick run can never pass for a real one
        path = results / f"{s.slug}.json"
        rec = json.loads(path.read_text())
        rec["quick"] = True
        path.write_text(json.dumps(rec, indent=1) + "\n")
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="store_true", help="run the sections' commands first")
    ap.add_argument("--quick", action="store_true", help="with --run: the tiny commands")
    ap.add_argument("--only", default=None, help="with --run: comma list of section slugs")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--notes", type=Path, default=NOTES)
    ap.add_argument("--doc", type=Path, default=DOC)
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if --doc differs from what the records and notes give")
    args = ap.parse_args(argv)
    failed = []
    if args.run:
        only = set(args.only.split(",")) if args.only else None
        unknown = (only or set()) - {s.slug for s in SECTIONS}
        if unknown:
            print(f"unknown sections {sorted(unknown)}; known: "
                  f"{[s.slug for s in SECTIONS]}", file=sys.stderr)
            return 2
        for s in SECTIONS:
            runnable = s.available() and (s.quick if args.quick else s.command)
            if (only is None or s.slug in only) and not run_section(s, args.results, args.quick):
                if runnable:  # skipped sections keep their record; failed ones are named
                    failed.append(s.slug)
    text = render(args.results, args.notes, args.doc.parent, charts=not args.check)
    if args.check:
        same = args.doc.exists() and args.doc.read_text() == text
        print(f"{args.doc}: {'up to date' if same else 'differs from the records; run python -m dckpt.bench.docs'}")
        return 0 if same else 1
    args.doc.write_text(text)
    print(f"wrote {args.doc}" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Section", "SECTIONS", "register", "render", "run_section", "main"]

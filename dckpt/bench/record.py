"""What a benchmark script hands to the docs generator (dckpt/bench/docs.py): its printed
output, the exact command, the machine, the commit, the date and the load around the run.

A script wraps its body in `recording(path)`: everything it prints still goes to the
terminal and is kept as well; when the body returns, the record is written as JSON. A
script that fails writes no record, so a broken run never replaces a good section.
"""
from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from . import measure

REPO = Path(__file__).resolve().parents[2]


class _Tee(io.TextIOBase):
    def __init__(self, out):
        self.out, self.kept = out, io.StringIO()

    def write(self, s: str) -> int:
        self.kept.write(s)
        return self.out.write(s)

    def flush(self) -> None:
        self.out.flush()


def commit() -> str:
    """The tree the figures come from: HEAD, with '+changes' when files differ from it."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+changes" if dirty else "")


def _recipe(args: list[str]) -> list[str]:
    """`dckpt bench` arguments without where its outputs go (--out)."""
    if "--out" in args[:-1]:
        i = args.index("--out")
        args = args[:i] + args[i + 2:]
    return args


def command_line(argv: list[str] | None = None) -> str:
    """The command as a reader would retype it from the repository root."""
    argv = list(sys.argv if argv is None else argv)
    if "--record" in argv[:-1]:  # where the record goes is not part of the recipe
        i = argv.index("--record")
        argv = argv[:i] + argv[i + 2:]
    script = Path(argv[0])
    if script.name == "__main__.py" and script.parent.name == "dckpt":
        return "python -m dckpt " + " ".join(shlex.quote(a) for a in _recipe(argv[1:]))
    if script.is_file():
        try:
            argv[0] = str(script.resolve().relative_to(REPO))
        except ValueError:
            pass
    return "python " + " ".join(shlex.quote(a) for a in argv)


def header(directory: str | os.PathLike | None = None, argv: list[str] | None = None) -> dict:
    """Machine, commit, command, date and load at the start of a run."""
    dirs = {"dir": Path(directory)} if directory else {}
    return {"command": command_line(argv), "commit": commit(),
            "machine": measure.machine(dirs),
            "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average_start": measure.load_average()}


def header_line() -> str:
    """One line of header(): the command, commit, date, machine and load, for probes that
    print rather than record."""
    h = header()
    m, load = h["machine"], "/".join(f"{x:.2f}" for x in h["load_average_start"])
    return (f"{h['command']} (commit {h['commit']}) on {h['started']}, {m['cores']} cores "
            f"({m['cpu']}), Python {m['python']}, load average {load} (1/5/15 min)")


@contextmanager
def recording(path: str | os.PathLike | None, kind: str = "text",
              directory: str | os.PathLike | None = None):
    """Keep what the body prints; on success write the record to `path` (None: no record).

    kind: "markdown" when the script prints markdown (tables, paragraphs), "text" when it
    prints aligned columns (the docs show those in a fenced block, as printed)."""
    if path is None:
        yield None
        return
    record = header(directory)
    record["kind"] = kind
    t0 = time.perf_counter()
    tee = _Tee(sys.stdout)
    sys.stdout = tee
    try:
        yield record  # the body may add fields ("extra") before it returns
    finally:
        sys.stdout = tee.out
    record["output"] = tee.kept.getvalue()
    record["load_average_end"] = measure.load_average()
    record["seconds"] = round(time.perf_counter() - t0, 1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


__all__ = ["recording", "header", "header_line", "commit", "command_line", "REPO"]

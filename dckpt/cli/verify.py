"""dckpt verify PATH: the checks of dckpt.verify, as a report for people or for scripts."""
from __future__ import annotations

import sys
from pathlib import Path

from . import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from .output import Progress, Style, add_output_arguments, counts, print_json

TAGS = {"pass": (" ok ", "green"), "warning": ("warn", "yellow"), "error": ("FAIL", "red")}
STATUS_STYLE = {"COMPLETE": "green", "PARTIAL": "yellow", "INCOMPLETE": "red"}
SHOWN_PER_GROUP = 20  # a thousand bad chunks are summarised, not listed (--verbose lists them)


def add_arguments(p) -> None:
    p.add_argument("path", help="a checkpoint directory, or a manager root (every step)")
    p.add_argument("--deep", action="store_true",
                   help="also decompress every chunk and check its raw hash (slower)")
    p.add_argument("--strict", action="store_true", help="warnings fail verification too")
    p.add_argument("--latest", action="store_true",
                   help="for a root: only the step a resume would use (and the root itself)")
    p.add_argument("--threads", type=int, default=0, help="reader threads (0: all cores)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="list every check (for roots: of every step) and every bad chunk")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_output_arguments(p, "print the report as JSON (schema dckpt.verify/1)")


def run(args) -> int:
    from ..errors import CheckpointNotFoundError
    from ..tools.verify import verify
    progress = Progress("verifying", enabled=not args.no_progress)
    try:
        from ..storage.objectstore import is_url
        report = verify(args.path if is_url(args.path) else Path(args.path), deep=args.deep, strict=args.strict,
                        threads=args.threads, latest_only=args.latest, progress=progress)
    except CheckpointNotFoundError as e:
        print(f"dckpt verify: {e}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        progress.close()
    if args.json:
        print_json(report.to_json())
    else:
        for line in render(report, Style(args.color), args.verbose):
            print(line)
    return EXIT_OK if report.ok else EXIT_FAILED


def render(report, style: Style, verbose: bool = False) -> list[str]:
    from ..tools.verify.report import GROUPS, summarize
    mode = "stored and raw hashes (--deep)" if report.deep else "stored hashes"
    what = (f"manager root, {len(report.checkpoints)} checkpoint(s)"
            if report.kind == "root" else "checkpoint")
    out = [style(f"dckpt verify {report.path}", "bold") + f"  ({what}; {mode}"
           + (", strict" if report.strict else "") + ")"]
    if report.checks:
        out.append(style(GROUPS["root"], "bold"))
        out += [_line(c, style, "  ") for c in report.checks]
    brief = report.kind == "root" and not verbose
    for ck in report.checkpoints:
        s = summarize(ck.checks)
        head = ck.path.rstrip("/").rpartition("/")[2] if report.kind == "root" else "result"
        status = style(ck.status, STATUS_STYLE[ck.status], "bold")
        tally = counts(s)
        if brief:
            out.append(f"{style(head, 'bold')}  {status}  {tally}")
            out += [_line(c, style, "  ") for c in _capped(
                [c for c in ck.checks if c.level != "pass"], verbose)]
            continue
        if report.kind == "root":
            out.append(style(head, "bold"))
        for group, title in GROUPS.items():
            checks = [c for c in ck.checks if c.group == group]
            if checks:
                out.append(f"  {title}")
                out += [_line(c, style, "    ") for c in _capped(checks, verbose)]
        if report.kind == "root":
            out.append(f"  {status}  {tally}")
    s = summarize(report.all_checks())
    status = style(report.status, STATUS_STYLE[report.status], "bold")
    which = f" (step {report.latest}, the one a resume uses)" if report.kind == "root" else ""
    out.append("")
    out.append(f"{status}{which}: {counts(s)}")
    if report.ok:
        verdict = style("VERIFICATION PASSED", "green", "bold")
        tail = {"COMPLETE": "ready for an exact resume",
                "PARTIAL": "loadable, but a resume will not continue exactly (see warnings)",
                "INCOMPLETE": "loadable"}[report.status]
        out.append(f"{verdict}: {tail}")
    else:
        why = "warnings count as failures (--strict)" if report.strict and not s["errors"] \
            else "do not resume from a checkpoint with errors"
        out.append(f"{style('VERIFICATION FAILED', 'red', 'bold')}: {why}")
    return out


def _capped(checks: list, verbose: bool) -> list:
    if verbose:
        return checks
    out, per_id = [], {}
    for c in checks:
        per_id[c.id] = per_id.get(c.id, 0) + 1
        if per_id[c.id] <= SHOWN_PER_GROUP:
            out.append(c)
    hidden = {k: n - SHOWN_PER_GROUP for k, n in per_id.items() if n > SHOWN_PER_GROUP}
    for id_, n in hidden.items():
        first = next(c for c in checks if c.id == id_)
        out.append(type(first)(first.group, id_, first.level,
                               f"... and {n} more like this (--verbose or --json lists them)"))
    return out


def _line(check, style: Style, indent: str) -> str:
    tag, color = TAGS[check.level]
    return f"{indent}[{style(tag, color, 'bold')}] {check.message}"

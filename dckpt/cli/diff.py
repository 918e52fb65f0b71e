"""dckpt diff A B: tensors added / removed / changed, and non-tensor state differences."""
from __future__ import annotations

import sys
from pathlib import Path

from . import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from .output import Style, add_output_arguments, print_json

SHOWN = 40


def add_arguments(p) -> None:
    p.add_argument("a", help="checkpoint directory A (or a manager root: its newest step)")
    p.add_argument("b", help="checkpoint directory B (or a manager root: its newest step)")
    p.add_argument("--atol", type=float, default=0.0,
                   help="tensors whose max abs difference is at most this count as equal")
    p.add_argument("--all", action="store_true", help=f"list every difference (default: "
                                                      f"the first {SHOWN} of each kind)")
    p.add_argument("--threads", type=int, default=0, help="reader threads (0: all cores)")
    add_output_arguments(p, "print the differences as JSON (schema dckpt.diff/1)")


def run(args) -> int:
    from ..tools.diff import diff
    from ..errors import CheckpointNotFoundError, CorruptCheckpointError, ManifestError
    from .inspect import resolve
    from ..storage.objectstore import is_url
    a, b = (resolve(x if is_url(x) else Path(x)) or x for x in (args.a, args.b))  # roots:
    # their newest step
    try:
        report = diff(a, b, atol=args.atol, threads=args.threads)
    except (CheckpointNotFoundError, ManifestError) as e:
        print(f"dckpt diff: {e}", file=sys.stderr)
        return EXIT_USAGE
    except CorruptCheckpointError as e:
        print(f"dckpt diff: cannot compare, a checkpoint is corrupt: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print_json(report.to_json())
    else:
        for line in render(report, Style(args.color), None if args.all else SHOWN):
            print(line)
    return EXIT_OK if report.same else EXIT_FAILED


def render(report, style: Style, limit: int | None) -> list[str]:
    doc = report.to_json()
    s = doc["summary"]
    out = [style(f"dckpt diff {report.a} {report.b}", "bold")]
    total = s["identical"] + s["changed"] + s["retyped"] + s["added"] + s["removed"]
    out.append(f"tensors: {total} compared: {s['identical']} identical "
               f"({s['identical_by_hash']} by hash, unread), {s['changed']} changed, "
               f"{s['retyped']} retyped, {s['added']} added, {s['removed']} removed")
    changed = [t for t in report.tensors if t.change == "changed"]
    if changed:
        rows = [[t.name, t.a, _g(t.max_abs), _g(t.max_rel), f"{t.differing}/{t.numel}"]
                for t in changed[:limit]]
        from .output import table
        out += ["  " + ln for ln in table(rows, ["changed", "dtype[shape]", "max abs",
                                                  "max rel", "elements"], style, {2, 3, 4})]
        if limit is not None and len(changed) > limit:
            out.append(f"  ... {len(changed) - limit} more changed tensor(s) (--all)")
    for kind, mark, color in (("retyped", "~", "yellow"), ("added", "+", "green"),
                              ("removed", "-", "red")):
        items = [t for t in report.tensors if t.change == kind]
        for t in items[:limit]:
            text = {"retyped": f"{t.a} -> {t.b}", "added": t.b, "removed": t.a}[kind]
            out.append(style(f"  {mark} {t.name}  {text}", color))
        if limit is not None and len(items) > limit:
            out.append(f"  ... {len(items) - limit} more {kind} (--all)")
    if report.values:
        out.append(f"state: {len(report.values)} difference(s)")
        for v in report.values[:limit]:
            if v.a is None:
                out.append(style(f"  + {v.path}: {v.b}", "green"))
            elif v.b is None:
                out.append(style(f"  - {v.path}: {v.a}", "red"))
            else:
                out.append(f"  ~ {v.path}: {v.a} -> {v.b}")
        if limit is not None and len(report.values) > limit:
            out.append(f"  ... {len(report.values) - limit} more (--all)")
    else:
        out.append("state: no differences")
    for v in report.meta[:limit]:
        out.append(style(f"  (meta) {v.path}: {v.a} -> {v.b}", "dim"))
    out.append(style("identical" if report.same else "different", "bold"))
    return out


def _g(v) -> str:
    return "-" if v is None else f"{v:.3g}"

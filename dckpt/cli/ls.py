"""dckpt ls ROOT: the checkpoints under a manager root, from manifests and directory sizes.

Reads no tensor data and does not import torch (unless --verify, which checks checksums).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from . import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from .output import Style, add_output_arguments, number, print_json, size, table, when

SCHEMA = "dckpt.ls/1"


def add_arguments(p) -> None:
    p.add_argument("root", help="a CheckpointManager root directory")
    p.add_argument("--verify", action="store_true",
                   help="also verify every checkpoint's checksums (reads all data)")
    add_retention_arguments(p)
    add_output_arguments(p, "print the listing as JSON (schema dckpt.ls/1)")


def add_retention_arguments(p) -> None:
    g = p.add_argument_group("retention (default: the policy recorded by the run's manager)")
    g.add_argument("--keep-last", type=int, metavar="N", help="keep the newest N")
    g.add_argument("--keep-best", type=int, metavar="K", help="keep the best K by --metric")
    g.add_argument("--metric", help="metric name for --keep-best")
    g.add_argument("--mode", choices=("min", "max"), help="best is min (default) or max")
    g.add_argument("--keep-every", type=int, metavar="K", help="keep steps divisible by K")


def retention_from(args, recorded: dict | None):
    """(Retention or None, where it came from). Flags change the recorded policy rule by
    rule (`--keep-best 0` drops a recorded rule); they never replace it wholesale, which
    would silently drop the rules not repeated (a recorded keep_last under --keep-every)."""
    from dataclasses import asdict
    from ..manager import Retention
    flags = {k: getattr(args, k) for k in ("keep_last", "keep_best", "metric", "mode",
                                           "keep_every") if getattr(args, k) is not None}
    base = None
    if isinstance(recorded, dict):
        try:
            base = Retention(**recorded)
        except (TypeError, ValueError):
            pass
    if not flags:
        return (base, "recorded by the run's manager") if base else (None, "none recorded")
    given = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in flags.items())
    if base is None:
        return Retention(**flags), f"command line: {given}"
    return (Retention(**{**asdict(base), **flags}),
            f"recorded by the run's manager, changed by the command line: {given}")


def check_metric(policy, metrics: dict[int, dict]) -> None:
    """Refuse a policy naming a metric no committed checkpoint records: its best-K rule would
    keep none of them, and everything else would be deleted as 'not best'."""
    if policy is None or not policy.metric:
        return
    if policy.best(metrics, 1):
        return
    known = sorted({k for m in metrics.values() for k in (m or {})})
    raise ValueError(f"no committed checkpoint records the metric {policy.metric!r} "
                     f"(metrics found: {', '.join(known) or 'none'}); refusing a best-K rule "
                     "that would keep none of them. Name a recorded metric, or drop the rule "
                     "(--keep-best 0 --metric '')")


def describe_policy(policy: dict | None) -> str:
    if not policy:
        return "keep all"
    rules = ", ".join(f"{k}={v}" for k, v in policy.items()
                      if v not in (None, 0) and k != "mode" or (k == "mode" and
                                                               policy["metric"]))
    return rules or "keep all"


def scan(root: Path) -> dict:
    """Every checkpoint-like entry under root, described from manifests only."""
    from ..errors import DckptError
    from ..format.layout import LATEST_NAME, SPARE_DIR, TMP_MARK, is_staging, parse_step_dir
    from ..errors import CheckpointNotFoundError
    from ..storage.records import read_manifest
    entries, metrics, recorded = [], {}, None
    for p in sorted(root.iterdir(), key=lambda p: p.name.lstrip(".")):
        step = parse_step_dir(p.name)
        if p.name == SPARE_DIR:  # a manager's recycled files (storage/spares.py)
            entry = {"step": None, "name": p.name, "status": "spare files"}
        elif step is None and is_staging(p.name):
            base = p.name[1:].split(TMP_MARK)[0]
            entry = {"step": parse_step_dir(base), "name": p.name, "status": (
                "being deleted" if p.name.endswith("deleting") else "incomplete")}
        elif step is not None and p.is_dir():
            entry = {"step": step, "name": p.name, "status": "committed"}
            try:
                m = read_manifest(p, ranks=[])  # a split checkpoint's index is enough
            except CheckpointNotFoundError:  # no manifest.json
                entry["status"] = "no manifest"
            except DckptError as e:
                entry["status"] = "bad manifest"
                entry["problem"] = str(e)
            else:
                entry.update(created=m.created, metrics=m.metrics,
                             epoch=m.counters.get("epoch"), bytes=_total_bytes(m))
                metrics[step] = m.metrics
                recorded = m.meta.get("retention", recorded)
        else:
            continue
        entry["disk_bytes"] = _du(p)
        entries.append(entry)
    try:
        text = (root / LATEST_NAME).read_text().strip()
    except (OSError, UnicodeDecodeError):
        text = None
    return {"entries": entries, "metrics": metrics, "recorded": recorded,
            "latest_text": text}


def _total_bytes(m) -> int | None:
    """Logical bytes: a split checkpoint's index records them (meta.totals)."""
    if m.split is None:
        return m.total_bytes
    totals = m.meta.get("totals")
    value = totals.get("bytes") if isinstance(totals, dict) else None
    return value if type(value) is int else None
def scan_url(root: str) -> dict:
    """scan() for a root in object storage, from one listing: a step prefix is committed
    when it holds a manifest object, else "incomplete" (an upload that never committed:
    absent to every reader). Adds "set_aside" (steps repair marked) and "objects"."""
    from ..errors import DckptError
    from ..format.layout import FAILED_MARK, LATEST_NAME, parse_step_dir
    from ..storage.objectstore import connect, join
    from ..storage.records import read_manifest
    root = root.rstrip("/")
    store = connect(root)
    objects = store.list(root)
    steps: dict[str, list] = {}
    for o in objects:
        head, sep, _ = o.url[len(root) + 1:].partition("/")
        if sep and parse_step_dir(head) is not None:
            steps.setdefault(head, []).append(o)
    entries, metrics, recorded, aside = [], {}, None, set()
    for name in sorted(steps, key=parse_step_dir):
        objs, step = steps[name], parse_step_dir(name)
        names = {o.url.rpartition("/")[2] for o in objs}
        entry = {"step": step, "name": name, "status": "committed",
                 "disk_bytes": sum(o.size for o in objs),
                 "modified": max((o.modified or 0) for o in objs)}
        if "manifest.json" not in names:
            entry["status"] = "incomplete"
        else:
            try:
                m = read_manifest(join(root, name))
            except DckptError as e:
                entry["status"] = "bad manifest"
                entry["problem"] = str(e)
            else:
                entry.update(created=m.created, metrics=m.metrics,
                             epoch=m.counters.get("epoch"), bytes=m.total_bytes)
                metrics[step] = m.metrics
                recorded = m.meta.get("retention", recorded)
            if FAILED_MARK in names:
                aside.add(name)
        entries.append(entry)
    text = None
    if any(o.url == join(root, LATEST_NAME) for o in objects):
        try:
            text = store.get_bytes(join(root, LATEST_NAME), 4096).decode().strip()
        except (DckptError, UnicodeDecodeError):
            text = None
    return {"entries": entries, "metrics": metrics, "recorded": recorded,
            "latest_text": text, "set_aside": aside, "objects": objects}


def _du(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def run(args) -> int:
    from ..format.layout import parse_step_dir
    from ..storage.objectstore import is_url, join
    remote = is_url(args.root)
    root = args.root.rstrip("/") if remote else Path(args.root)
    if not remote and not root.is_dir():
        print(f"dckpt ls: {root} is not a directory", file=sys.stderr)
        return EXIT_USAGE
    found = scan_url(root) if remote else scan(root)
    entries = found["entries"]
    try:
        policy, source = retention_from(args, found["recorded"])
    except ValueError as e:
        print(f"dckpt ls: {e}", file=sys.stderr)
        return EXIT_USAGE
    reasons = policy.reasons(found["metrics"]) if policy else {}
    from ..format.layout import is_set_aside
    # The step a resume uses: repair may have set newer failing ones aside.
    committed = [e["step"] for e in entries if e["status"] == "committed"
                 and not (e["name"] in found["set_aside"] if remote
                          else is_set_aside(root / e["name"]))]
    newest = max(committed, default=None)
    pointed = parse_step_dir(found["latest_text"] or "")
    for e in entries:
        e["kept_by"] = reasons.get(e["step"]) if e["status"] == "committed" and policy else None
        e["latest"] = e["status"] == "committed" and e["step"] == newest
        e["latest_pointer"] = e["status"] == "committed" and e["step"] == pointed
    failed = False
    if args.verify:
        failed = _verify_all(root, entries)
    doc = {"schema": SCHEMA, "root": str(root), "latest": newest,
           "latest_pointer": found["latest_text"],
           "retention": {"policy": _policy_json(policy), "source": source},
           "checkpoints": [_entry_json(e) for e in entries]}
    if args.json:
        print_json(doc)
    else:
        for line in render(doc, Style(args.color)):
            print(line)
    return EXIT_FAILED if failed else EXIT_OK


def _policy_json(policy) -> dict | None:
    if policy is None:
        return None
    from dataclasses import asdict
    return asdict(policy)


def _entry_json(e: dict) -> dict:
    keys = ("step", "name", "status", "created", "epoch", "metrics", "bytes", "disk_bytes",
            "kept_by", "latest", "latest_pointer", "problem")
    return {k: e.get(k) for k in keys}


def _verify_all(root: Path | str, entries: list[dict]) -> bool:
    from ..tools.verify import verify
    failed = False
    for e in entries:
        if e["status"] != "committed":
            continue
        from ..storage.objectstore import is_url, join
        rep = verify(join(root, e["name"]) if is_url(root) else root / e["name"]).checkpoints[0]
        errors = [c for c in rep.checks if c.level == "error"]
        if errors:
            e["status"] = "corrupt" if any(c.group in ("checksums", "files") for c in errors) \
                else "invalid"
            e["problem"] = errors[0].message
            failed = True
        else:
            e["status"] = "verified"
    return failed


def render(doc: dict, style: Style) -> list[str]:
    rows = []
    colors = {"committed": None, "verified": "green", "incomplete": "yellow",
              "being deleted": "dim", "spare files": "dim", "corrupt": "red", "invalid": "red",
              "no manifest": "red", "bad manifest": "red"}
    for e in doc["checkpoints"]:
        mets = ", ".join(f"{k} {number(v)}" for k, v in (e["metrics"] or {}).items())
        kept = ("-" if e["kept_by"] is None
                else ", ".join(e["kept_by"]) if e["kept_by"] else "delete at next gc")
        status = e["status"]
        color = colors.get(status)
        mark = "latest" if e["latest"] else ""
        if e["latest"] and not e["latest_pointer"]:
            mark = "latest (pointer stale)"
        step = "-" if status == "spare files" else "?" if e["step"] is None else str(e["step"])
        rows.append([step, when(e["created"]),
                     size(e["disk_bytes"]), status, mets or "-", kept, mark])
    out = [style(f"{doc['root']}", "bold") + f"  ({len(doc['checkpoints'])} entr"
           f"{'y' if len(doc['checkpoints']) == 1 else 'ies'})"]
    if not rows:
        return out + ["  no checkpoints"]
    lines = table(rows, ["step", "created", "size", "status", "metrics", "kept by",
                         "latest"], style, right={0, 2})
    out.append("  " + lines[0])
    for line, e in zip(lines[1:], doc["checkpoints"]):
        color = colors.get(e["status"])
        out.append("  " + (style(line, color) if color else line))
    for e in doc["checkpoints"]:
        if e.get("problem"):
            out.append(f"  {e['name']}: {e['problem']}")
    pol = doc["retention"]
    if pol["policy"]:
        out.append(f"  retention ({pol['source']}): {describe_policy(pol['policy'])}")
    else:
        out.append("  retention: none recorded (pass --keep-last etc. to see a policy's effect)")
    if doc["latest_pointer"] is None and doc["latest"] is not None:
        out.append("  'latest' pointer missing: resume uses the newest step; `dckpt repair` "
                   "rewrites it")
    return out

"""dckpt gc ROOT: apply retention, remove incomplete temporaries, report the bytes freed."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from . import EXIT_OK, EXIT_USAGE
from .ls import add_retention_arguments, check_metric, describe_policy, retention_from, scan
from .output import Style, add_output_arguments, print_json, size

SCHEMA = "dckpt.gc/1"


def add_arguments(p) -> None:
    p.add_argument("root", help="a CheckpointManager root directory")
    p.add_argument("--dry-run", action="store_true", help="only report what would be removed")
    p.add_argument("--older-than", type=float, default=3600.0, metavar="SECONDS",
                   help="object stores: remove a step prefix without a manifest only when its "
                        "newest object is this old (a younger one may be an upload still "
                        "running; default 3600)")
    add_retention_arguments(p)
    add_output_arguments(p, "print the result as JSON (schema dckpt.gc/1)")


def run(args) -> int:
    from ..format.layout import step_dir
    from ..manager import CheckpointManager, Retention
    from ..storage.objectstore import is_url
    if is_url(args.root):
        return run_remote(args)
    root = Path(args.root)
    if not root.is_dir():
        print(f"dckpt gc: {root} is not a directory", file=sys.stderr)
        return EXIT_USAGE
    try:
        found = scan(root)
        policy, source = retention_from(args, found["recorded"])
        if args.keep_best is not None or args.metric is not None:
            check_metric(policy, found["metrics"])
    except ValueError as e:
        print(f"dckpt gc: {e}", file=sys.stderr)
        return EXIT_USAGE
    mgr = CheckpointManager(root, retention=policy or Retention(), remove_staging=False)
    result = mgr.gc(dry_run=args.dry_run)
    kept = {s: os.readlink(root / step_dir(s)) for s in result["kept_links"]}
    return report(args, str(root), policy, source, result["removed_steps"],
                  result["removed_temporaries"], result["freed_bytes"], kept,
                  "incomplete temporary")


def run_remote(args) -> int:
    """gc of a root in object storage: retention over the committed steps (a step is
    removed manifest first, so it is absent before any of its data goes) and step prefixes
    without a manifest older than --older-than. No lock exists on an object store: run it
    when no job saves into the root, or keep --older-than above a save's duration."""
    import time

    from ..storage.objectstore import connect, join
    from .ls import scan_url
    root = args.root.rstrip("/")
    try:
        found = scan_url(root)
        policy, source = retention_from(args, found["recorded"])
        if args.keep_best is not None or args.metric is not None:
            check_metric(policy, found["metrics"])
    except ValueError as e:
        print(f"dckpt gc: {e}", file=sys.stderr)
        return EXIT_USAGE
    reasons = policy.reasons(found["metrics"]) if policy else {}
    now = time.time()
    steps, temps, freed = [], [], 0
    for e in found["entries"]:
        if e["status"] == "committed" and policy is not None and not reasons.get(e["step"]):
            steps.append(e)
        elif e["status"] == "incomplete" and now - (e["modified"] or now) >= args.older_than:
            temps.append(e)
    store = connect(root)
    for e in steps + temps:
        prefix = join(root, e["name"])
        freed += e["disk_bytes"]
        if args.dry_run:
            continue
        store.delete([join(prefix, "manifest.json")])  # absent from here on
        store.delete([o.url for o in store.list(prefix)])
    return report(args, root, policy, source, [e["step"] for e in steps],
                  [e["name"] for e in temps], freed, {}, "uncommitted upload")


def report(args, root: str, policy, source: str, steps: list, temps: list, freed: int,
           kept: dict, temp_kind: str) -> int:
    """What gc removed (or would): as JSON with --json, else one line each. kept: steps the
    policy drops but that are symbolic links, with their targets (never deleted through)."""
    doc = {"schema": SCHEMA, "root": root, "dry_run": args.dry_run,
           "retention": {"policy": None if policy is None else vars(policy).copy(),
                         "source": source},
           "removed_steps": steps, "removed_temporaries": temps,
           "kept_links": list(kept), "freed_bytes": freed}
    if args.json:
        print_json(doc)
        return EXIT_OK
    style = Style(args.color)
    verb = "would remove" if args.dry_run else "removed"
    if policy is not None:
        print(f"retention ({source}): {describe_policy(doc['retention']['policy'])}")
    for s in steps:
        print(f"{verb} step {s} (not kept by the retention policy)")
    for t in temps:
        print(f"{verb} {temp_kind} {t}")
    for s, target in kept.items():
        print(f"kept step {s}: not kept by the retention policy, but a symbolic link "
              f"({target}); not deleted through it, remove the link by hand")
    if policy is None:
        print("retention: none recorded and none given: every committed checkpoint is kept")
    print(style(f"{'would free' if args.dry_run else 'freed'} {size(freed)}", "bold")
          + ("" if steps or temps else " (nothing to do)"))
    return EXIT_OK

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
    add_retention_arguments(p)
    add_output_arguments(p, "print the result as JSON (schema dckpt.gc/1)")


def run(args) -> int:
    from ..format.layout import step_dir
    from ..manager import CheckpointManager, Retention
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
    doc = {"schema": SCHEMA, "root": str(root), "dry_run": args.dry_run,
           "retention": {"policy": None if policy is None else vars(policy).copy(),
                         "source": source},
           "removed_steps": result["removed_steps"],
           "removed_temporaries": result["removed_temporaries"],
           "kept_links": result["kept_links"],
           "freed_bytes": result["freed_bytes"]}
    if args.json:
        print_json(doc)
        return EXIT_OK
    style = Style(args.color)
    verb = "would remove" if args.dry_run else "removed"
    if policy is not None:
        print(f"retention ({source}): {describe_policy(doc['retention']['policy'])}")
    for s in doc["removed_steps"]:
        print(f"{verb} step {s} (not kept by the retention policy)")
    for t in doc["removed_temporaries"]:
        print(f"{verb} incomplete temporary {t}")
    for s in doc["kept_links"]:
        print(f"kept step {s}: not kept by the retention policy, but a symbolic link "
              f"({os.readlink(root / step_dir(s))}); not deleted through it, remove the "
              "link by hand")
    if policy is None:
        print("retention: none recorded and none given: every committed checkpoint is kept")
    freed = size(doc["freed_bytes"])
    print(style(f"{'would free' if args.dry_run else 'freed'} {freed}", "bold")
          + ("" if doc["removed_steps"] or doc["removed_temporaries"] else " (nothing to do)"))
    return EXIT_OK

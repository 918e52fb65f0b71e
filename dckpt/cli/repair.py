"""dckpt repair PATH: rebuild `latest`, clear temporaries, add missing RNG streams; with a
backup of everything touched (PATH/.dckpt-backup/<time>/) unless --no-backup."""
from __future__ import annotations

import sys

from . import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from .output import Style, add_output_arguments, print_json


def add_arguments(p) -> None:
    p.add_argument("path", help="a manager root or a checkpoint directory")
    p.add_argument("--dry-run", action="store_true", help="show what would be done, do nothing")
    p.add_argument("--no-backup", action="store_true",
                   help="do not keep copies of what is changed or removed (not recommended)")
    p.add_argument("--no-rng", action="store_true",
                   help="do not add RNG streams to checkpoints that lack them")
    p.add_argument("--seed", type=int, help="seed for added RNG streams (default: random, "
                                            "recorded in the manifest)")
    p.add_argument("--threads", type=int, default=0, help="reader threads for verification")
    add_output_arguments(p, "print the result as JSON (schema dckpt.repair/1)")


def run(args) -> int:
    from ..errors import CheckpointNotFoundError, LockError
    from ..tools.repair import repair
    try:
        report = repair(args.path, backup=not args.no_backup, dry_run=args.dry_run,
                        add_rng=not args.no_rng, seed=args.seed, threads=args.threads)
    except (CheckpointNotFoundError, LockError) as e:
        print(f"dckpt repair: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print_json(report.to_json())
    else:
        style = Style(args.color)
        head = f"dckpt repair {report.path}" + ("  (dry run: nothing changed)"
                                                if report.dry_run else "")
        print(style(head, "bold"))
        for a in report.actions:
            if a.refused:
                tag, color = "refused", "red"
            elif a.done:
                tag, color = "fixed", "green"
            else:
                tag, color = "would fix", "yellow"
            print(f"  {style(f'{tag:<9}', color, 'bold')} {a.target}: {a.detail}")
            if a.refused:
                print(f"            {a.refused}")
        if not report.actions:
            print("  nothing to repair")
        if report.backup:
            print(f"backup of everything changed: {report.backup}")
        elif any(a.done for a in report.actions):
            print("no backup kept (--no-backup)")
    return EXIT_OK if report.ok else EXIT_FAILED

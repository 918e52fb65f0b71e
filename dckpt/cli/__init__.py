"""The dckpt command line. Each subcommand lives in its own module, imported on use, with
`add_arguments(parser)` and `run(args) -> int` (exit code: 0 ok, 1 check failed, 2 usage or
unreadable input)."""
from __future__ import annotations

import argparse
import sys
from importlib import import_module

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("dckpt.demo", "train with accelerate, kill, verify, resume exactly, compare"),
}


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    parser = argparse.ArgumentParser(prog="dckpt", description="Verifiable, fast PyTorch checkpoints")
    parser.add_argument("--version", action="version", version=f"dckpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        p.add_argument_group()  # arguments are added lazily below
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        args = parser.parse_args(argv)  # prints help / usage errors (exit 2)
        parser.print_help()
        return 2
    module = import_module(COMMANDS[argv[0]][0])
    sub = argparse.ArgumentParser(prog=f"dckpt {argv[0]}", description=COMMANDS[argv[0]][1])
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    return int(module.run(args) or 0)

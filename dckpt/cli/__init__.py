"""The dckpt command line. Each subcommand lives in its own module, imported only when it
runs (so `dckpt ls` and `dckpt inspect` never import torch), with `add_arguments(parser)` and
`run(args) -> int`.

Exit codes: 0 ok, 1 the check failed (verification failed, checkpoints differ, a repair was
refused), 2 usage error or unreadable input.
"""
from __future__ import annotations

import argparse
import os
import sys
from importlib import import_module

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

# name -> (module, one-line help)
COMMANDS = {
    "verify": ("dckpt.cli.verify", "check a checkpoint or every checkpoint under a root"),
    "inspect": ("dckpt.cli.inspect", "show what a checkpoint holds, without reading tensors"),
    "ls": ("dckpt.cli.ls", "list the checkpoints under a manager root"),
    "diff": ("dckpt.cli.diff", "compare two checkpoints: tensors and training state"),
    "repair": ("dckpt.cli.repair", "fix what can be fixed safely, keeping a backup"),
    "convert": ("dckpt.cli.convert", "import torch/safetensors/accelerate/HF checkpoints; "
                                     "export weights to safetensors"),
    "gc": ("dckpt.cli.gc", "apply retention and remove incomplete temporaries"),
    "demo": ("dckpt.demo", "train with accelerate, kill, verify, resume exactly, compare"),
    "bench": ("dckpt.bench.cli", "save/load speed, size and memory against torch.save, "
                                 "safetensors, DCP, accelerate and the machine's limits"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported to add its arguments."""
    from .. import __version__
    parser = argparse.ArgumentParser(
        prog="dckpt", description="Verifiable, fast PyTorch checkpoints.",
        epilog="exit codes: 0 ok, 1 check failed, 2 usage error or unreadable input")
    parser.add_argument("--version", action="version", version=f"dckpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == command:
            import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    try:
        parser = build_parser(command)
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors: argparse has printed them
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    from ..errors import DckptError
    try:
        return int(import_module(COMMANDS[args.command][0]).run(args) or 0)
    except DckptError as e:
        print(f"dckpt {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `dckpt ls | head`: stop quietly, also at interpreter exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as e:
        print(f"dckpt {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"dckpt {args.command}: interrupted", file=sys.stderr)
        return 130

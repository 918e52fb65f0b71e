"""The dckpt command line. Each subcommand lives in its own module, imported only when it
runs (so `dckpt ls` and `dckpt inspect` never import torch), with `add_arguments(parser)` and
`run(args) -> int`.

Exit codes: 0 ok, 1 the check failed (verification failed, checkpoints differ, a repair was
refused), 2 usage error or unreadable input. They do not depend on who reads the output: a
reader that goes away early (`dckpt diff A B | head -3`) only stops the output, the command
still finishes and exits with its own code.
"""
from __future__ import annotations

import argparse
import os
import sys
from importlib import import_module

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _PipeSafe:
    """stdout that swallows a closed pipe: the rest of the output goes to /dev/null (also
    what is still buffered at interpreter exit) and the command runs on to its exit code."""

    def __init__(self, stream):
        self._stream = stream
        self._gone = False

    def _closed(self) -> None:
        self._gone = True
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())
        except (OSError, ValueError):
            pass

    def write(self, text):
        if not self._gone:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._closed()
        return len(text)

    def flush(self) -> None:
        if not self._gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._closed()

    def __getattr__(self, name):
        return getattr(self._stream, name)

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
    "export": ("dckpt.cli.export", "model weights as a Hugging Face Hub folder (sharded "
                                   "safetensors, config, tokenizer)"),
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
            if name in URL_COMMANDS:
                p.add_argument("--storage-option", action="append", default=[],
                               metavar="KEY=VALUE", dest="storage_option",
                               help="an fsspec option for s3:// (any URL) paths, e.g. "
                                    "endpoint_url=http://127.0.0.1:9000; a JSON value is "
                                    "parsed (anon=true). Credentials: the AWS_* variables")
    return parser


# Commands whose paths may be object store URLs (docs/STORAGE.md).
URL_COMMANDS = ("verify", "inspect", "ls", "diff", "gc")


def storage_options(pairs: list[str]) -> dict:
    """--storage-option KEY=VALUE pairs as fsspec options (VALUE parsed as JSON if it is)."""
    import json
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise ValueError(f"--storage-option {pair!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


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
    stdout = sys.stdout
    sys.stdout = _PipeSafe(stdout)
    try:
        return _run(args)
    finally:
        sys.stdout = stdout


def _run(args) -> int:
    from ..errors import DckptError
    if getattr(args, "storage_option", None):
        from ..storage.objectstore import configure
        try:
            configure(storage_options(args.storage_option))
        except ValueError as e:
            print(f"dckpt {args.command}: {e}", file=sys.stderr)
            return EXIT_USAGE
    try:
        code = int(import_module(COMMANDS[args.command][0]).run(args) or 0)
        sys.stdout.flush()  # a reader gone now must not turn the code into an exit error
        return code
    except DckptError as e:
        print(f"dckpt {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # output written past _PipeSafe: the result is unknown, and
        # never reported as success; 141 is what a shell shows for a process killed by SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        print(f"dckpt {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"dckpt {args.command}: interrupted", file=sys.stderr)
        return 130

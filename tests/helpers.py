"""Helpers the test modules share, written once: where this checkout is, the environment of a
subprocess that imports it, a free port on loopback, and damage to a file in place.

No torch and no dckpt here: the native tests import it in the sanitizer run
(csrc/asan_test.sh), where only the core and the format are copied. Fixtures live in
conftest.py; real checkpoints for the CLI tests in cli_fixtures.py, attack tools in
attacks.py, N real ranks in distributed.py.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # this checkout: its dckpt, whatever is installed
TESTS = REPO / "tests"


def env(*paths: str | os.PathLike, **extra: str) -> dict[str, str]:
    """os.environ for a subprocess that imports this checkout's dckpt: REPO, then `paths`
    (TESTS for the job scripts' helpers), then the caller's PYTHONPATH; `extra` on top."""
    path = [str(REPO), *map(str, paths)]
    if os.environ.get("PYTHONPATH"):
        path.append(os.environ["PYTHONPATH"])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), **extra}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a rendezvous or a server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flip_bit(path: str | os.PathLike, offset: int, bit: int) -> None:
    """Inverts bit `bit` (0-7) of the byte at `offset` of the file, in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))

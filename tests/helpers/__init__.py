"""Everything the test modules share, in one package; tests/ itself holds only the tests
(test_*.py) and the fixtures (conftest.py).

This module: where this checkout is, the environment of a subprocess that imports it, a free
port on loopback, and damage to a file in place. The submodules, each imported only by the
tests that need it:

    helpers.ranks        run_with_ranks: a function on N real torch.distributed ranks
    helpers.cli          real checkpoints (a trained model saved by a manager) for the CLI tests
    helpers.attacks      the attack suite's tools: known states, manifest surgery, trial counts
    helpers.s3server     a real S3 server on loopback (moto_server); .ci/run starts it with
                         `python -m tests.helpers.s3server --serve-for-ci`
    helpers.accelerate_spec_patch  the plugin of the accelerate specification run
    helpers/jobs/        scripts the tests start as separate processes (python or torchrun
                         JOBS / "name.py"): training jobs that save, get killed and resume

No torch and no dckpt here: the native tests import it in the sanitizer run
(csrc/asan_test.sh), where only the core and the format are copied.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # this checkout: its dckpt, whatever is installed
TESTS = REPO / "tests"
JOBS = TESTS / "helpers" / "jobs"  # the job scripts, run by path


def env(*paths: str | os.PathLike, **extra: str) -> dict[str, str]:
    """os.environ for a subprocess that imports this checkout's dckpt: REPO, then `paths`
    (TESTS, for a process that imports `helpers`), then the caller's PYTHONPATH; `extra` on top."""
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

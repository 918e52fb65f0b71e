"""Names on disk. One place, so every tool agrees on what a directory holds."""
from __future__ import annotations

import re
import uuid
from pathlib import Path

from .manifest import MANIFEST_NAME

LATEST_NAME = "latest"
LOCK_NAME = ".lock"
TMP_MARK = ".tmp-"
# A manager root's retired data files, kept for the next save to write over
# (storage/spares.py). A staging name: debris a start or `dckpt gc` clears.
SPARE_DIR = f".spare{TMP_MARK}files"
ASIDE_MARK = ".old-"
# Written by `dckpt repair` into a committed checkpoint that fails verification while an
# older one passes: resume (latest_step, verify --latest) then skips it. The file says why;
# a repair that finds the checkpoint passing again removes it.
FAILED_MARK = ".dckpt-failed"
_STEP_DIR = re.compile(r"^step-(\d{9,})$")


def rank_file(rank: int, part: int = 0) -> str:
    return f"rank-{rank:05d}.dckpt" if part == 0 else f"rank-{rank:05d}-{part}.dckpt"


def step_dir(step: int) -> str:
    return f"step-{step:09d}"


def parse_step_dir(name: str) -> int | None:
    """The step a directory name stands for; only the name step_dir(n) writes counts. A
    foreign `step-0000000000` would otherwise be taken for step 0, whose path is another."""
    m = _STEP_DIR.match(name)
    if not m:
        return None
    n = int(m.group(1))
    return n if step_dir(n) == name else None


def staging_dir(target: Path) -> Path:
    """A hidden sibling of `target`; never mistaken for a committed checkpoint."""
    return target.parent / f".{target.name}{TMP_MARK}{uuid.uuid4().hex[:12]}"


def is_staging(name: str) -> bool:
    return name.startswith(".") and TMP_MARK in name


def aside_dir(target: Path) -> Path:
    """Where an overwrite parks the committed `target` until its replacement is in place.
    Not a staging name: tools that clear debris must not delete it (commit.recover)."""
    return target.parent / f".{target.name}{ASIDE_MARK}{uuid.uuid4().hex[:12]}"


def aside_target(name: str) -> str | None:
    """The checkpoint name an aside directory belongs to, or None."""
    head, mark, _ = name.rpartition(ASIDE_MARK)
    return head[1:] if mark and name.startswith(".") and TMP_MARK not in name else None


def is_committed(path: Path) -> bool:
    return (path / MANIFEST_NAME).is_file()


def not_a_checkpoint(path: Path) -> str | None:
    """Why `path` (which has no manifest) is not one checkpoint, with what to use instead:
    a file (torch.save, safetensors) or a manager root. None if it is neither."""
    if path.is_file():
        return (f"{path} is a file, not a dckpt checkpoint (a checkpoint is a directory "
                f"holding {MANIFEST_NAME}); to import a torch.save, safetensors or accelerate "
                f"checkpoint run `dckpt convert {path} NEW_DIR` (dckpt.convert.convert)")
    try:
        names = [p.name for p in path.iterdir()]
    except OSError:
        return None
    steps = sorted(s for n in names if (s := parse_step_dir(n)) is not None
                   and is_committed(path / n))
    if steps or LATEST_NAME in names:
        newest = f" (newest: {path / step_dir(steps[-1])})" if steps else ""
        return (f"{path} is a CheckpointManager root, not one checkpoint{newest}: restore with "
                f"CheckpointManager({str(path)!r}).restore(state), load one step-* directory, "
                "or pass --latest to the command line tools")
    return None


def is_set_aside(path: Path) -> bool:
    """Committed, but marked by repair as failing verification: not resumed from."""
    return (path / FAILED_MARK).exists()

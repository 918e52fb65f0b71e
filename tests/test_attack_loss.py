"""Attacks that lost checkpoints or broke a running job's saves (issue 24): bit rot spread by
incremental saves, a lock file that follows symlinks, gc and repair racing a job, foreign and
symlinked directories in the root, a corrupt newest manifest, async failures at exit."""
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dckpt
from dckpt import CheckpointManager
from dckpt.cli import main as cli
from dckpt.format.manifest import MANIFEST_NAME

from attacks import SLOW, assert_same, flip_bit, manifest_obj

REPO = Path(__file__).resolve().parent.parent


def frozen_state(step: int) -> dict:
    """'frozen' never changes after step 1; 'moving' changes every step."""
    g = torch.Generator().manual_seed(7)
    return {"frozen": torch.randn(300_000, generator=g),
            "moving": torch.full((1000,), float(step))}


# ---- bit rot must not spread through incremental saves -------------------------------------

@pytest.mark.parametrize("trust_versions", [False, True])
def test_rot_in_a_base_chunk_is_not_linked_into_later_steps(tmp_path, caplog, trust_versions):
    mgr = CheckpointManager(tmp_path, keep_last=2, chunk_size=1 << 18,
                            trust_versions=trust_versions)
    state = frozen_state(1)  # one live state: the version cache sees 'frozen' unchanged
    mgr.save(1, state)
    m = dckpt.checkpoint.read_manifest(mgr.path(1))
    c = m.tensors["frozen"].shards[0].chunks[1]
    flip_bit(m.files[c.file].path(mgr.path(1)), c.offset + c.stored // 2, 3)
    for step in range(2, 6):
        state["moving"].fill_(float(step))
        mgr.save(step, state)  # acknowledged: memory was right every time
    assert mgr.steps() == [4, 5]
    for step in (4, 5):
        out = {"frozen": torch.empty(300_000), "moving": torch.empty(1000)}
        dckpt.load(mgr.path(step), into=out)
        assert_same(out, frozen_state(step))
    # Still incremental: the intact chunks of 'frozen' are shared, not rewritten.
    meta = dckpt.checkpoint.read_manifest(mgr.path(5)).meta["incremental"]
    assert meta["referenced_chunks"] > 0
    assert "fails its stored hash" in caplog.text

"""CheckpointManager: commit, latest pointer, retention, incomplete checkpoints, reports."""
import os

import pytest
import torch

import dckpt
from dckpt import CheckpointManager, Retention
from dckpt.errors import CheckpointNotFoundError, LockError, StateMismatchError


def state(v: float = 0.0):
    m = torch.nn.Linear(2, 2)
    torch.nn.init.constant_(m.weight, v)
    return {"model": m, "step": 0}


def test_save_restore_latest(tmp_path):
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointNotFoundError):
        mgr.restore(state())
    for s in (10, 20, 30):
        mgr.save(s, state(s), metrics={"loss": 1.0 / s}, epoch=s // 10, step_in_epoch=0)
    assert mgr.steps() == [10, 20, 30] and mgr.latest_step() == 30
    assert (tmp_path / "latest").read_text().strip() == "step-000000030"
    live = state()
    report = mgr.restore(live)
    assert report.step == 30 and report.epoch == 3 and torch.all(live["model"].weight == 30)
    assert report.rng_streams == ["python", "numpy", "torch"]
    assert "model (model)" in report.summary()
    mgr.restore(live, step=10)
    assert torch.all(live["model"].weight == 10)


def test_incomplete_checkpoints_are_ignored_and_cleaned(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, state(1))
    (tmp_path / ".step-000000002.tmp-dead").mkdir()
    (tmp_path / "step-000000003").mkdir()  # no manifest: never committed
    (tmp_path / "latest").write_text("step-000000003\n")  # damaged pointer
    assert mgr.latest_step() == 1
    live = state()
    assert mgr.restore(live).step == 1
    report = mgr.gc()
    assert report["removed_temporaries"] == [".step-000000002.tmp-dead"]
    assert (tmp_path / "latest").read_text().strip() == "step-000000001"
    CheckpointManager(tmp_path)  # a new manager also cleans staging debris
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_retention_keep_last_best_every(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2, keep_best=1, metric="loss", mode="min",
                            keep_every=40)
    losses = {10: 0.5, 20: 0.1, 30: 0.4, 40: 0.6, 50: 0.7, 60: 0.8}
    for s, loss in losses.items():
        mgr.save(s, state(s), metrics={"loss": loss})
    # 20 is best, 40 is every-40, 50/60 are the last two.
    assert mgr.steps() == [20, 40, 50, 60]
    plan = mgr.retention_plan()
    assert "best loss" in plan[20] and "every 40" in plan[40] and "newest" in plan[60]
    m = dckpt.read_manifest(mgr.path(60))
    assert m.counters["best"] == {"metric": "loss", "mode": "min", "step": 20, "value": 0.1}


def test_retention_never_deletes_newest():
    r = Retention(keep_last=1, keep_best=1, metric="acc", mode="max")
    why = r.reasons({1: {"acc": 0.9}, 2: {"acc": 0.1}, 3: {}})
    assert why[1] and why[3] and not why[2]
    with pytest.raises(ValueError):
        Retention(keep_best=2)
    with pytest.raises(ValueError):
        Retention(mode="median")


def test_missing_rng_is_an_error_unless_allowed(tmp_path):
    dckpt.save({"model": torch.nn.Linear(2, 2), "step": 0}, tmp_path / "step-000000005")
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(StateMismatchError, match="no RNG streams"):
        mgr.restore(state())
    report = mgr.restore(state(), allow_missing=["rng"])
    assert report.rng_streams == []


def test_rng_streams_come_back(tmp_path):
    import random
    import numpy as np
    mgr = CheckpointManager(tmp_path)
    dckpt.seed_everything(123)
    mgr.save(1, state())
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    dckpt.seed_everything(999)
    mgr.restore(state())
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_root_lock(tmp_path):
    from dckpt.manager.lock import RootLock
    with RootLock(tmp_path):
        with pytest.raises(LockError, match="another process"):
            RootLock(tmp_path).acquire()
    RootLock(tmp_path).acquire().release()


def test_exchanged_messages_survive_the_wire():
    """What ranks exchange (the manager's messages, rank 0's begin in the save's plan) comes
    back from its JSON as the same typed object: the wire is JSON between processes."""
    import json

    from dckpt.engine.checkpoint import Begun
    from dckpt.manager.messages import GcReport, RestoreHit, SaveDecision, StepRequest
    for msg in (SaveDecision("step-000000003", None, {"metric": "loss", "step": 3}, 3),
                SaveDecision(None, "written in full", None, None),
                StepRequest(None, [[5, "local"], [5, "remote"], [4, "local"]]),
                StepRequest(7, None),
                RestoreHit("CorruptCheckpointError: chunk 3", True, False),
                Begun("/r/.tmp-x", None), Begun("s3://b/r/x", None),
                Begun(None, ("CheckpointExistsError", "exists", "/r/x"))):
        back = type(msg).of(json.loads(json.dumps(msg.to_json())))
        assert back == msg and type(msg).of(msg) is msg
    assert RestoreHit.of(None) is None
    report = GcReport([1, 2], [".tmp-x"], [3], 4096, True)
    assert json.loads(json.dumps(report.to_json())) == {
        "removed_steps": [1, 2], "removed_temporaries": [".tmp-x"], "kept_links": [3],
        "freed_bytes": 4096, "dry_run": True}

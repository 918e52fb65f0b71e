"""dckpt repair and dckpt gc: what they fix or remove, and that nothing changes unbacked."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dckpt
from helpers.cli import build_state, copy, key_paths, make_root, run_cli, run_json, snapshot
from helpers import flip_bit
from dckpt.format import tree
from dckpt.format.reader import read_manifest
from dckpt.tools.repair import BACKUP_DIR


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return make_root(tmp_path_factory.mktemp("repair") / "run", saves=(2, 4, 6), keep_last=2)


@pytest.fixture
def root(pristine, tmp_path) -> Path:
    return copy(pristine, tmp_path / "run")


def backups(path: Path) -> list[Path]:
    base = path / BACKUP_DIR
    return sorted(base.iterdir()) if base.exists() else []


def assert_changes_backed_up(before: dict, path: Path) -> None:
    """Every file changed or removed since `before` has its old bytes in the backup."""
    after = snapshot(path)
    changed = [p for p, h in before.items() if after.get(p) != h]
    assert changed, "the repair changed nothing"
    (backup,) = backups(path)
    saved = snapshot(backup)
    for p in changed:
        assert saved.get(p) == before[p], f"{p} changed without a backup"


def test_rebuilds_damaged_latest_with_backup(root):
    (root / "latest").write_text("step-000000099\n")
    before = snapshot(root)
    code, out, _ = run_cli("repair", root)
    assert code == 0 and "fixed" in out and "backup of everything changed" in out
    assert (root / "latest").read_text() == "step-000000006\n"
    assert_changes_backed_up(before, root)
    assert run_json("verify", root)[1]["summary"]["warnings"] == 0
    assert run_cli("repair", root)[1].splitlines()[1] == "  nothing to repair"


def test_missing_latest_points_to_newest_verified(root):
    (root / "latest").unlink()
    m = read_manifest(root / "step-000000006")
    flip_bit(root / "step-000000006" / "rank-00000.dckpt",
             m.tensors["model/0.weight"].shards[0].chunks[0].offset, 6)
    code, doc = run_json("repair", root)
    assert code == 0 and doc["schema"] == "dckpt.repair/1"
    assert key_paths(doc) == {"schema", "path", "kind", "dry_run", "ok", "backup", "actions",
                              *(f"actions[].{k}" for k in ("kind", "target", "detail", "done",
                                                           "refused"))}
    aside, action = doc["actions"]  # the failing newer step is marked, so resume agrees
    assert aside["kind"] == "set-aside" and aside["done"]
    assert aside["target"] == "step-000000006/.dckpt-failed"
    assert action["kind"] == "latest" and action["done"]
    assert "step-000000004 (newest verified step)" in action["detail"]
    assert "step-000000006" in action["detail"]  # the newer, failing one is named
    assert (root / "latest").read_text() == "step-000000004\n"


def test_temporaries_move_into_backup(root):
    tmp = root / ".step-000000008.tmp-0123456789ab"
    tmp.mkdir()
    (tmp / "rank-00000.dckpt").write_bytes(b"partial")
    (root / "latest.tmp").write_text("half")
    before = snapshot(root)
    code, doc = run_json("repair", root)
    assert code == 0 and {a["target"] for a in doc["actions"]} == {tmp.name, "latest.tmp"}
    assert not tmp.exists() and not (root / "latest.tmp").exists()
    (backup,) = backups(root)
    assert (backup / tmp.name / "rank-00000.dckpt").read_bytes() == b"partial"
    assert_changes_backed_up(before, root)


def test_dry_run_and_no_backup(root):
    (root / "latest").write_text("garbage")
    (root / ".step-000000008.tmp-0123456789ab").mkdir()
    before = snapshot(root)
    code, out, _ = run_cli("repair", root, "--dry-run")
    assert code == 0 and out.count("would fix") == 2
    assert snapshot(root) == before and not backups(root)
    assert (root / ".step-000000008.tmp-0123456789ab").exists()
    code, out, _ = run_cli("repair", root, "--no-backup")
    assert code == 0 and "no backup kept" in out and not backups(root)
    assert not (root / ".step-000000008.tmp-0123456789ab").exists()


def legacy(tmp_path: Path) -> Path:
    """An imported checkpoint without RNG streams (a plain torch.save'd training dict)."""
    state = build_state()
    torch.save({"model_state_dict": state["model"].state_dict(),
                "optimizer_state_dict": state["optimizer"].state_dict(),
                "scheduler_state_dict": state["scheduler"].state_dict(),
                "epoch": 0, "global_step": 0}, tmp_path / "old.pt")
    code, _, err = run_cli("convert", tmp_path / "old.pt", tmp_path / "ckpt")
    assert code == 0, err
    return tmp_path / "ckpt"


def test_adds_rng_streams_marked_as_seeded_now(tmp_path):
    ckpt = legacy(tmp_path)
    _, doc = run_json("verify", ckpt)
    assert "rng" in doc["checkpoints"][0]["ranks"][0]["missing"]
    data_before = (ckpt / "rank-00000.dckpt").read_bytes()
    before = snapshot(ckpt)
    import random
    mine = random.getstate()
    code, doc = run_json("repair", ckpt, "--seed", "1234")
    assert code == 0 and random.getstate() == mine  # the repair left our own RNG alone
    (action,) = doc["actions"]
    assert action["kind"] == "rng" and action["done"] and "seed 1234" in action["detail"]
    assert (ckpt / "rank-00000.dckpt").read_bytes() == data_before  # data never touched
    assert_changes_backed_up(before, ckpt)
    m = read_manifest(ckpt)
    mark = m.meta["rng_seeded_now"]
    assert mark["seed"] == 1234 and mark["by"] == "dckpt repair" and "not" in mark["note"]
    assert sorted(tree.decode(m.ranks[0]["rng"])) == ["numpy", "python", "torch"]
    # the streams are those of seed 1234: a resume draws reproducibly from here on
    dckpt.seed_everything(1234)
    expected = torch.rand(3)
    mgr_state = build_state()
    dckpt.load(ckpt, into={k: mgr_state[k] for k in ("model", "optimizer", "scheduler")})
    from dckpt.state import rng
    rng.restore(tree.decode(m.ranks[0]["rng"]))
    assert torch.equal(torch.rand(3), expected)
    code, doc = run_json("verify", ckpt)
    ids = {c["id"]: c["level"] for c in doc["checkpoints"][0]["checks"]}
    assert ids["completeness.rng_seeded_now"] == "warning"
    assert "rng" not in doc["checkpoints"][0]["ranks"][0]["missing"]


def test_refuses_to_touch_an_unverifiable_checkpoint(tmp_path):
    ckpt = legacy(tmp_path)
    m = read_manifest(ckpt)
    flip_bit(ckpt / "rank-00000.dckpt", m.tensors["model/0.bias"].shards[0].chunks[0].offset, 6)
    before = snapshot(ckpt)
    code, out, _ = run_cli("repair", ckpt)
    assert code == 1 and "refused" in out and "model/0.bias" in out
    assert snapshot(ckpt) == before and not backups(ckpt)


def test_repair_bad_input(tmp_path):
    assert run_cli("repair", tmp_path / "missing")[0] == 2


def test_gc_dry_run_then_apply(root):
    tmp = root / ".step-000000008.tmp-0123456789ab"
    tmp.mkdir()
    (tmp / "x").write_bytes(b"0" * 1000)
    before = snapshot(root)
    code, doc = run_json("gc", root, "--keep-last", "1", "--dry-run")
    assert code == 0 and doc["dry_run"] and doc["removed_steps"] == [4]
    assert doc["removed_temporaries"] == [tmp.name]
    step4 = sum(p.stat().st_size for p in (root / "step-000000004").iterdir())
    assert doc["freed_bytes"] == step4 + 1000
    assert snapshot(root) == before and tmp.exists()  # a dry run touches nothing
    code, out, _ = run_cli("gc", root, "--keep-last", "1")
    assert code == 0 and "removed step 4" in out and f"freed" in out
    assert not tmp.exists() and not (root / "step-000000004").exists()
    assert (root / "step-000000006").exists()


def test_gc_uses_the_recorded_policy(root):
    code, doc = run_json("gc", root)
    assert doc["retention"]["source"] == "recorded by the run's manager"
    assert doc["retention"]["policy"]["keep_last"] == 2
    assert doc["removed_steps"] == [] and doc["freed_bytes"] == 0


def test_gc_refuses_while_a_writer_holds_the_lock(root):
    from dckpt.manager.lock import RootLock
    with RootLock(root):
        code, _, err = run_cli("gc", root)
    assert code == 2 and "another process" in err

"""The memory tier across a change of world size (dckpt/manager/memory_reshard.py): a job of
4 gloo ranks as 2 nodes ("a": ranks 0-1, "b": ranks 2-3) saves with durable_every=2, so its
newest step (3) is in the memory tier only; it restarts at 2 ranks. Node "b" is lost
(its directory removed): node "a" holds its own parts of ranks 0-1 and the replicas of
ranks 2-3."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers.ranks import run_with_ranks  # noqa: E402
from test_memory_tier import _save, make  # noqa: E402

import dckpt  # noqa: E402
from dckpt.format.layout import step_dir  # noqa: E402

OLD = [f"rank-{q:05d}-of-00004" for q in range(4)]
SLOW = os.environ.get("DCKPT_SLOW") == "1"


def _restore(rank, world, root, mem, nodes, save_steps=(), keep=2):
    """Restore at `world` ranks (rank r on nodes[r]), check the state bitwise against what
    the old rank r had at the restored step, then save `save_steps`."""
    mgr = dckpt.CheckpointManager(root, memory=mem + "/{node}", node=nodes[rank],
                                  durable_every=2, memory_keep=keep)
    newest = mgr.newest_step()
    state = make(rank, 0)
    rep = mgr.restore(state)
    want = make(rank, rep.step)
    out = {"step": rep.step, "newest": newest, "notes": rep.notes,
           "same": all(torch.equal(state[k], want[k]) for k in want),
           "sources": [rep.sources[q] for q in range(world)]}
    for s in save_steps:
        mgr.save(s, make(rank, s))
    mgr.close()
    return out


def _lose_node_b(mem: str) -> None:
    shutil.rmtree(Path(mem, "b"))


def test_newest_memory_step_is_restored_at_another_world_size(tmp_path):
    root, mem = str(tmp_path / "root"), str(tmp_path / "shm")
    run_with_ranks(4, _save, root, mem, [1, 2, 3], 2)  # memory: 2, 3; durable: 2
    _lose_node_b(mem)
    res = run_with_ranks(2, _restore, root, mem, ["a", "a"])
    assert [r["step"] for r in res] == [3, 3] and [r["newest"] for r in res] == [3, 3]
    assert all(r["same"] for r in res)  # rank r has old rank r's per-rank tensors, bitwise
    for src in res[0]["sources"]:
        assert src["tier"] == "memory" and src["resharded_from"] == 4
        assert src["from"] == ("memory of node a, parts of the 4-rank save: own [0, 1], "
                               "replicas [2, 3]")
    assert any("saved by 4 rank(s): restored on 2" in n for n in res[0]["notes"])


def test_a_part_missing_everywhere_falls_back_to_the_durable_step(tmp_path):
    root, mem = str(tmp_path / "root"), str(tmp_path / "shm")
    run_with_ranks(4, _save, root, mem, [1, 2, 3], 2)
    _lose_node_b(mem)
    shutil.rmtree(Path(mem, "a", "replicas", step_dir(3), OLD[2]))  # rank 2's step 3: gone
    res = run_with_ranks(2, _restore, root, mem, ["a", "a"])
    # Step 2 is complete in memory too (both nodes' copies of it on "a"): memory serves it.
    assert [r["step"] for r in res] == [2, 2] and all(r["same"] for r in res)
    assert [s["tier"] for s in res[0]["sources"]] == ["memory", "memory"]
    shutil.rmtree(Path(mem, "a", "replicas", step_dir(2), OLD[3]))  # and rank 3's step 2
    res = run_with_ranks(2, _restore, root, mem, ["a", "a"])
    assert [r["step"] for r in res] == [2, 2] and all(r["same"] for r in res)
    assert [s["tier"] for s in res[0]["sources"]] == ["durable", "durable"]


def test_a_damaged_part_falls_back_to_the_durable_tier(tmp_path):
    root, mem = str(tmp_path / "root"), str(tmp_path / "shm")
    run_with_ranks(4, _save, root, mem, [1, 2], 2)  # step 2: memory and durable
    _lose_node_b(mem)
    # Old rank 0's part: every byte of it is read (its per-rank tensors by new rank 0, its
    # replicated weights, kept once, by both). A flip in bytes no new rank needs (old rank
    # 3's per-rank tensors) would go unread, and unnoticed, like any unread chunk.
    data = Path(mem, "a", step_dir(2), OLD[0], "rank-00000.dckpt")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    res = run_with_ranks(2, _restore, root, mem, ["a", "a"])
    assert [r["step"] for r in res] == [2, 2] and all(r["same"] for r in res)
    assert [s["tier"] for s in res[0]["sources"]] == ["durable", "durable"]
    assert any("4-rank save's memory tier could not be restored" in n and "Corrupt" in n
               for n in res[0]["notes"]), res[0]["notes"]


def test_a_node_without_the_parts_fetches_them(tmp_path):
    root, mem = str(tmp_path / "root"), str(tmp_path / "shm")
    run_with_ranks(4, _save, root, mem, [1, 2, 3], 2)
    _lose_node_b(mem)
    res = run_with_ranks(2, _restore, root, mem, ["a", "c"])  # "c": a new, empty node
    assert [r["step"] for r in res] == [3, 3] and all(r["same"] for r in res)
    assert res[0]["sources"][1]["from"] == (
        "memory of node c, parts of the 4-rank save: own [], fetched 0 from rank 0 (node a), "
        "1 from rank 0 (node a), 2 from rank 0 (node a), 3 from rank 0 (node a)")
    assert sorted(os.listdir(Path(mem, "c", "replicas", step_dir(3)))) == OLD


def test_parts_of_another_world_size_are_retired(tmp_path):
    root, mem = str(tmp_path / "root"), str(tmp_path / "shm")
    run_with_ranks(4, _save, root, mem, [1, 2, 3], 2)
    _lose_node_b(mem)
    a = Path(mem, "a")
    debris = a / "replicas" / step_dir(3) / ".rank-00002-of-00004.tmp-0123456789ab"
    debris.mkdir()  # a fetch of rank 2's part interrupted by a crash
    run_with_ranks(2, _restore, root, mem, ["a", "c"], [4])
    assert not debris.exists()
    # One step of the 2-rank job: with memory_keep=2, step 3 (4 ranks) is still kept.
    assert sorted(os.listdir(a / step_dir(3))) == OLD[:2]
    assert sorted(os.listdir(Path(mem, "c", "replicas", step_dir(3)))) == OLD
    assert not (a / step_dir(2)).exists() and not (a / "replicas" / step_dir(2)).exists()
    res = run_with_ranks(2, _restore, root, mem, ["a", "c"], [5])  # restores step 4
    assert [r["step"] for r in res] == [4, 4] and all(r["same"] for r in res)
    for node in ("a", "c"):  # two steps of the 2-rank job: the 4-rank parts are gone
        left = sorted(str(p.relative_to(Path(mem, node))) for p in Path(mem, node).rglob("*")
                      if p.name.startswith("rank-") and p.parent.name.startswith("step-"))
        assert not any("of-00004" in p for p in left), left
        assert {p.split("/")[-2] for p in left} == {step_dir(4), step_dir(5)}


# ---- sharded states: FSDP2 shards and ZeRO partitions, bitwise --------------------------------
def _train_save(rank, world, root, mem, ref, kind, nodes="aabb"):
    from test_distributed import ddp_state, fsdp_state, train
    state = (ddp_state(rank, world, zero=True) if kind == "zero"
             else fsdp_state(rank, world))
    # fsdp-async: the parts are written from the async saver's staged copy of the shards
    mgr = dckpt.CheckpointManager(root, memory=mem + "/{node}", node=nodes[rank],
                                  durable_every=2, async_save=kind == "fsdp-async")
    losses = []
    for s in (1, 2, 3):
        train(state, 1, losses)
        mgr.save(s, state)
        mgr.wait()
    dckpt.save(state, ref)  # the reference: step 3 as a 4-rank checkpoint
    mgr.close()


def _restore_sharded(rank, world, root, mem, out, kind, nodes="aa"):
    from test_distributed import ddp_state, fsdp_state, train
    state = (ddp_state(rank, world, init_seed=1, zero=True) if kind == "zero"
             else fsdp_state(rank, world, init_seed=1))
    mgr = dckpt.CheckpointManager(root, memory=mem + "/{node}", node=nodes[rank],
                                  durable_every=2)
    rep = mgr.restore(state)
    dckpt.save(state, out)  # what the 2 ranks hold, as a 2-rank checkpoint
    train(state, 1, [])  # the restored optimizer state works
    return {"step": rep.step, "sources": [rep.sources[q] for q in range(world)]}


@pytest.mark.parametrize("kind", ["fsdp", "zero", pytest.param(
    "fsdp-async", marks=pytest.mark.skipif(not SLOW, reason="a variant (DCKPT_SLOW=1)"))])
def test_sharded_state_reshards_4_to_2_from_memory_bitwise(tmp_path, kind):
    from test_distributed import assert_same_global_tensors
    root, mem = str(tmp_path / "root"), str(tmp_path / "shm")
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    run_with_ranks(4, _train_save, root, mem, ref, kind, timeout=120)
    _lose_node_b(mem)
    res = run_with_ranks(2, _restore_sharded, root, mem, out, kind, timeout=120)
    assert [r["step"] for r in res] == [3, 3]  # the durable tier has only step 2
    assert [s["tier"] for s in res[0]["sources"]] == ["memory", "memory"]
    assert_same_global_tensors(ref, out)  # every model and optimizer tensor, bitwise


# ---- joining parts into one manifest: the checks, without processes ---------------------------
def _part(tmp: Path, q: int, world: int, state: dict, shards: dict, counters=None,
          layout=None) -> tuple:
    path = tmp / step_dir(3) / f"rank-{q:05d}-of-{world:05d}"
    dckpt.save(state, path, counters=counters or {"step": 3}, layout=layout,
               meta={"memory_tier": {"rank": q, "world": world, "shards": shards}})
    return q, path, dckpt.read_manifest(path)


def _joined(tmp: Path, parts: list) -> dict:
    from dckpt.manager.memory_reshard import assemble
    base = tmp / step_dir(3)
    return dckpt.load(base, manifest=assemble(parts, base, len(parts)))


@pytest.mark.parametrize("layout", ["single", "split"])  # parts saved under DCKPT_LAYOUT
def test_parts_join_into_one_manifest(tmp_path, layout):
    w = torch.arange(16.0).reshape(4, 4)
    parts = [_part(tmp_path, q, 2, {"w": w[2 * q:2 * q + 2].clone(), "same": torch.ones(3),
                                    "own": torch.full((2,), float(q))},
                   {"w": [[4, 4], [2 * q, 0]]}, layout=layout) for q in range(2)]
    assert (parts[0][2].split is not None) == (layout == "split")
    full = _joined(tmp_path, parts)
    assert torch.equal(full["w"], w)  # the shards, placed by their global offsets
    assert torch.equal(full["same"], torch.ones(3)) and torch.equal(full["own"], torch.zeros(2))
    from dckpt.manager.memory_reshard import assemble
    m = assemble(parts, tmp_path / step_dir(3), 2)
    assert len(m.tensors["same"].shards) == 1  # alike in both parts: kept once
    assert m.ranks[1]["aliases"] == {"own": "own@r1"}  # differing: rank 1's own copy


@pytest.mark.parametrize("case,why", [
    ("overlap", "overlap"), ("outside", "does not fit"), ("gap", "do not tile"),
    ("other_rank", "not rank 1's part of a 2-rank save"), ("counters", "other counters")])
def test_parts_that_do_not_fit_are_refused(tmp_path, case, why):
    from dckpt.errors import IncompleteCheckpointError, ManifestError
    w = torch.arange(16.0).reshape(4, 4)
    at = {"overlap": 1, "outside": 3}.get(case, 2)  # where part 1 says its rows 2-3 are
    block = w[2:3] if case == "gap" else w[2:4]
    parts = [_part(tmp_path, 0, 2, {"w": w[:2].clone()}, {"w": [[4, 4], [0, 0]]}),
             _part(tmp_path, 1, 3 if case == "other_rank" else 2, {"w": block.clone()},
                   {"w": [[4, 4], [at, 0]]}, {"step": 4} if case == "counters" else None)]
    want = IncompleteCheckpointError if case == "counters" else ManifestError
    with pytest.raises(want, match=why):
        _joined(tmp_path, parts)


def test_a_part_without_shard_places_is_refused(tmp_path):
    from dckpt.errors import ManifestError
    from dckpt.manager.memory_reshard import assemble
    q, path, m = _part(tmp_path, 0, 1, {"w": torch.ones(2)}, {})
    del m.meta["memory_tier"]["shards"]  # as a part written before shard places were kept
    with pytest.raises(ManifestError, match="cannot be resharded"):
        assemble([(q, path, m)], tmp_path / step_dir(3), 1)


def test_fsdp_reshards_2_to_4_from_memory_bitwise(tmp_path):
    """The other way: each new shard is part of an old one (a partial read of it)."""
    from test_distributed import assert_same_global_tensors
    root, mem = str(tmp_path / "root"), str(tmp_path / "shm")
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    run_with_ranks(2, _train_save, root, mem, ref, "fsdp", "ab", timeout=120)
    res = run_with_ranks(4, _restore_sharded, root, mem, out, "fsdp", "aabb", timeout=120)
    assert [r["step"] for r in res] == [3] * 4
    assert [s["tier"] for s in res[0]["sources"]] == ["memory"] * 4
    assert res[0]["sources"][2]["from"] == ("memory of node b, parts of the 2-rank save: "
                                            "own [1], replicas [0]")
    assert_same_global_tensors(ref, out)


def _restore_then_save_again(rank, world, root, mem):
    """Restore step 3 (resharded), then save a step 3 of this world size (a rerun)."""
    mgr = dckpt.CheckpointManager(root, memory=mem + "/{node}", node="a", durable_every=2)
    mgr.restore(make(rank, 0))
    mgr.save(3, make(rank, 30))
    mgr.close()


def _restore_state(rank, world, root, mem):
    mgr = dckpt.CheckpointManager(root, memory=mem + "/{node}", node="a", durable_every=2)
    state = make(rank, 0)
    rep = mgr.restore(state)
    return {"step": rep.step, "sources": [rep.sources[q] for q in range(world)],
            "rerun": all(torch.equal(state[k], v) for k, v in make(rank, 30).items())}


def test_a_step_saved_again_at_this_world_size_comes_before_the_old_parts(tmp_path):
    root, mem = str(tmp_path / "root"), str(tmp_path / "shm")
    run_with_ranks(4, _save, root, mem, [1, 2, 3], 2)
    _lose_node_b(mem)
    run_with_ranks(2, _restore_then_save_again, root, mem)
    assert sorted(os.listdir(Path(mem, "a", step_dir(3)))) == sorted(
        OLD[:2] + [f"rank-{q:05d}-of-00002" for q in range(2)])  # both saves of step 3
    res = run_with_ranks(2, _restore_state, root, mem)
    assert [r["step"] for r in res] == [3, 3] and all(r["rerun"] for r in res)
    assert all("resharded_from" not in s for s in res[0]["sources"])


def _restore_holder_dies(rank, world, root, mem):
    os.environ["DCKPT_PEER_TIMEOUT"] = "3"
    from dckpt.distributed import replicate
    mgr = dckpt.CheckpointManager(root, memory=mem + "/{node}", node="ca"[rank],
                                  durable_every=2)
    if rank == 1:  # node a's rank dies as it starts sending the parts to node c (rank 0
        # is spared: it serves the process group's store)
        replicate._mapped = lambda *a, **k: os._exit(9)
    try:
        mgr.restore(make(rank, 0))
    except dckpt.errors.DistributedError as e:
        return e.rank
    return None


def test_a_holder_dying_while_sending_parts_fails_every_rank_without_a_hang(tmp_path):
    root, mem = str(tmp_path / "root"), str(tmp_path / "shm")
    run_with_ranks(4, _save, root, mem, [1, 2, 3], 2)
    _lose_node_b(mem)
    got = run_with_ranks(2, _restore_holder_dies, root, mem, may_die=(1,), timeout=40)
    assert got[0] == 1  # rank 0 learns, within seconds, that rank 1 failed


def _rerun_from(rank, world, root, mem, step, again):
    """Restore `step` explicitly, then save step `again` anew (content of step 10 * again)."""
    mgr = dckpt.CheckpointManager(root, memory=mem + "/{node}", node="a", durable_every=2)
    mgr.restore(make(rank, 0), step)
    mgr.save(again, make(rank, 10 * again))
    mgr.close()


def _restore_newest(rank, world, root, mem):
    mgr = dckpt.CheckpointManager(root, memory=mem + "/{node}", node="a", durable_every=2)
    state = make(rank, 0)
    rep = mgr.restore(state)
    old = rank if rank < 2 else 0  # a rank the 2-rank save did not have gets rank 0's state
    return {"step": rep.step, "resharded_from": rep.sources[rank].get("resharded_from"),
            "rerun": all(torch.equal(state[k], v) for k, v in make(old, 30).items())}


def test_of_two_saves_of_one_step_at_other_world_sizes_the_later_is_restored(tmp_path):
    """A 4-rank job saves step 3; a 2-rank job resumes from step 2 and saves its own step 3;
    a 3-rank restart finds both complete on node a and must take the 2-rank one (the
    larger world's is the older save)."""
    root, mem = str(tmp_path / "root"), str(tmp_path / "shm")
    run_with_ranks(4, _save, root, mem, [1, 2, 3], 2)  # node a: own parts 0-1, replicas 2-3
    run_with_ranks(2, _rerun_from, root, mem, 2, 3)
    held = sorted(os.listdir(Path(mem, "a", step_dir(3))))
    assert OLD[0] in held and "rank-00000-of-00002" in held  # both saves of step 3
    res = run_with_ranks(3, _restore_newest, root, mem)
    assert [r["step"] for r in res] == [3, 3, 3]
    assert [r["resharded_from"] for r in res] == [2, 2, 2]
    assert all(r["rerun"] for r in res)


def _save_on_a(rank, world, root, mem, steps):
    mgr = dckpt.CheckpointManager(root, memory=mem + "/{node}", node="a", durable_every=2)
    for s in steps:
        mgr.save(s, make(rank, s))
    mgr.close()


def test_a_later_save_of_the_step_at_another_world_size_comes_before_this_ones(tmp_path):
    """2 ranks save steps 1-3; 4 ranks resume from step 2 and save their own step 3; a
    2-rank restart must take the 4-rank step 3 (the later save), not its own world's."""
    root, mem = str(tmp_path / "root"), str(tmp_path / "shm")
    run_with_ranks(2, _save_on_a, root, mem, [1, 2, 3])
    run_with_ranks(4, _rerun_from, root, mem, 2, 3)
    res = run_with_ranks(2, _restore_newest, root, mem)
    assert [r["step"] for r in res] == [3, 3]
    assert [r["resharded_from"] for r in res] == [4, 4]
    assert all(r["rerun"] for r in res)

"""The memory tier (dckpt/manager/memory_tier.py): 4 gloo ranks as 2 nodes ("a": ranks 0-1,
"b": ranks 2-3), each node's memory under its own directory through `{node}`. A restart is
a new set of processes; losing a node is removing its memory directory."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers.ranks import run_with_ranks  # noqa: E402

import dckpt  # noqa: E402
from dckpt.format.layout import step_dir  # noqa: E402
from dckpt.manager.memory_tier import part_name  # noqa: E402


def node_of(rank: int) -> str:
    return "a" if rank < 2 else "b"


def make(rank: int, step: int) -> dict:
    """A rank's state at `step`: a replicated weight, rank-own moments, a small record."""
    shared = torch.Generator().manual_seed(step)
    own = torch.Generator().manual_seed(1000 * step + rank)
    return {"weights": torch.randn(64, 32, generator=shared),
            "moments": torch.randn(3000, generator=own),
            "record": torch.tensor([rank, step])}


def manager(rank: int, root: str, mem: str, durable_every: int, **kw):
    return dckpt.CheckpointManager(root, memory=mem + "/{node}", node=node_of(rank),
                                   durable_every=durable_every, **kw)


def _save(rank, world, root, mem, steps, durable_every, async_save=False):
    mgr = manager(rank, root, mem, durable_every, async_save=async_save)
    for s in steps:
        mgr.save(s, make(rank, s))
    mgr.close()
    return mgr._tier.partners[rank]


def _restore(rank, world, root, mem, durable_every, step=None):
    mgr = manager(rank, root, mem, durable_every)
    assert mgr.newest_step() is not None  # what a training script asks before restore()
    state = make(rank, 0)
    rep = mgr.restore(state, step)
    want = make(rank, rep.step)
    same = all(torch.equal(state[k], want[k]) for k in want)
    return {"step": rep.step, "same": same, "notes": rep.notes,
            "sources": {str(q): v for q, v in rep.sources.items()}}


def tiers(res: dict) -> list[str]:
    return [res["sources"][str(q)]["tier"] for q in range(4)]


def committed(root: str) -> list[str]:
    return sorted(n for n in os.listdir(root) if n.startswith("step-"))


def test_lost_node_comes_back_from_partner_replicas_then_durable(tmp_path):
    root, mem = str(tmp_path / "root"), str(tmp_path / "shm")
    partners = run_with_ranks(4, _save, root, mem, [1, 2, 3], 2)
    assert partners == [[2], [3], [0], [1]]  # the same local rank on the other node
    # Every save in memory on both nodes, each part also as a replica on the other node;
    # only the 2nd save (step 2) on disk.
    assert committed(root) == ["step-000000002"]
    for r in range(4):
        node, other = node_of(r), node_of((r + 2) % 4)
        assert (Path(mem, node, "step-000000003", part_name(r, 4), "manifest.json")).is_file()
        assert (Path(mem, other, "replicas", "step-000000003", part_name(r, 4),
                     "manifest.json")).is_file()
    # Retention keeps the newest two steps in memory.
    assert sorted(os.listdir(Path(mem, "a"))) == ["replicas", "step-000000002", "step-000000003"]

    shutil.rmtree(Path(mem, "b"))  # node b replaced: its memory is gone
    res = run_with_ranks(4, _restore, root, mem, 2)
    assert {r["step"] for r in res} == {3} and all(r["same"] for r in res)
    assert all(r["sources"] == res[0]["sources"] for r in res)  # every rank's report agrees
    assert tiers(res[0]) == ["memory", "memory", "replica", "replica"]
    assert "rank 0" in res[0]["sources"]["2"]["from"] and res[0]["sources"]["2"]["bytes"] > 0
    # Where each rank's time went: every rank agreed, took part in the transfer (as sender
    # or receiver) and read verified; only the receivers kept a fetched copy.
    for q in range(4):
        ph = res[0]["sources"][str(q)]["phases"]
        assert {"agree", "transfer", "read"} <= set(ph) and ("keep" in ph) == (q >= 2), ph
        assert ph["read"]["wall"] > 0 and all(v["cpu"] >= 0 for v in ph.values())
    # The replica fetched is kept as node b's own part again.
    assert Path(mem, "b", "step-000000003", part_name(2, 4), "manifest.json").is_file()

    shutil.rmtree(Path(mem, "a"))
    shutil.rmtree(Path(mem, "b"))  # both nodes lost: the newest durable step
    res = run_with_ranks(4, _restore, root, mem, 2)
    assert {r["step"] for r in res} == {2} and all(r["same"] for r in res)
    assert tiers(res[0]) == ["durable"] * 4
    assert all(set(res[0]["sources"][str(q)]["phases"]) == {"agree", "read"} for q in range(4))


def test_flipped_bit_in_a_replica_is_detected_and_the_next_source_used(tmp_path):
    root, mem = str(tmp_path / "root"), str(tmp_path / "shm")
    run_with_ranks(4, _save, root, mem, [1, 2, 3], 3)  # step 3 also durable
    shutil.rmtree(Path(mem, "b"))
    data = Path(mem, "a", "replicas", "step-000000003", part_name(2, 4), "rank-00000.dckpt")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))
    res = run_with_ranks(4, _restore, root, mem, 3)
    assert {r["step"] for r in res} == {3} and all(r["same"] for r in res)
    assert tiers(res[0]) == ["memory", "memory", "durable", "replica"]
    flagged = [n for n in res[2]["notes"] if n.startswith("rank 2:")]
    assert flagged and "CorruptCheckpointError" in flagged[0], res[2]["notes"]
    # The corrupt copy was not kept as node b's part.
    assert not Path(mem, "b", "step-000000003", part_name(2, 4)).exists()
    # A state that does not match is no damaged copy: every rank raises, no fallback.
    assert run_with_ranks(4, _restore_mismatched, root, mem) == ["StateMismatchError"] * 4


def _restore_mismatched(rank, world, root, mem):
    state = make(rank, 0)
    state["moments"] = torch.zeros(17)
    try:
        manager(rank, root, mem, 3).restore(state)
    except dckpt.errors.DckptError as e:
        return type(e).__name__


def test_flipped_bits_everywhere_fall_back_to_an_older_step(tmp_path):
    root, mem = str(tmp_path / "root"), str(tmp_path / "shm")
    run_with_ranks(4, _save, root, mem, [1, 2], 10)  # nothing durable
    for node in ("a", "b"):
        for d in Path(mem, node).rglob("step-000000002/*/rank-00000.dckpt"):
            raw = bytearray(d.read_bytes())
            raw[-7] ^= 1
            d.write_bytes(bytes(raw))
    res = run_with_ranks(4, _restore, root, mem, 10)
    assert {r["step"] for r in res} == {1} and all(r["same"] for r in res)
    assert any("fell back to step 1" in n for n in res[0]["notes"])


def _save_and_die(rank, world, root, mem, victim):
    os.environ["DCKPT_PEER_TIMEOUT"] = "3"
    from dckpt.distributed import replicate
    mgr = manager(rank, root, mem, 10)
    mgr.save(1, make(rank, 1))
    mgr.save(2, make(rank, 2))
    if rank == victim:  # dies once the file lists are exchanged, before sending bytes
        mapped = replicate._mapped
        replicate._mapped = lambda path, size, maps, write: (
            mapped(path, size, maps, write) if write else os._exit(9))
    try:
        mgr.save(3, make(rank, 3))
    except dckpt.errors.DistributedError as e:
        return [type(e).__name__, e.rank]
    return None


def test_process_killed_mid_replication_leaves_previous_step_usable(tmp_path):
    root, mem = str(tmp_path / "root"), str(tmp_path / "shm")
    out = run_with_ranks(4, _save_and_die, root, mem, 3, may_die=(3,))
    assert out[3] is None
    assert all(o == ["DistributedError", 3] for o in out[:3]), out
    shutil.rmtree(Path(mem, "b"))  # and rank 3's node is lost with it
    res = run_with_ranks(4, _restore, root, mem, 10)
    assert {r["step"] for r in res} == {2} and all(r["same"] for r in res)
    assert tiers(res[0]) == ["memory", "memory", "replica", "replica"]


def test_async_saves_go_through_the_memory_tier(tmp_path):
    root, mem = str(tmp_path / "root"), str(tmp_path / "shm")
    run_with_ranks(4, _save, root, mem, [1, 2, 3, 4], 2, True)
    shutil.rmtree(Path(mem, "a"))
    res = run_with_ranks(4, _restore, root, mem, 2)
    assert {r["step"] for r in res} == {4} and all(r["same"] for r in res)
    assert tiers(res[0]) == ["replica", "replica", "memory", "memory"]
    assert committed(root) == ["step-000000002", "step-000000004"]


def test_one_node_is_not_replicated_and_says_so(tmp_path):
    mgr = dckpt.CheckpointManager(tmp_path / "root", memory=str(tmp_path / "shm/{node}"),
                                  node="solo", durable_every=2)
    for s in (1, 2, 3):
        mgr.save(s, make(0, s))
    state = make(0, 0)
    rep = mgr.restore(state)
    assert rep.step == 3 and torch.equal(state["moments"], make(0, 3)["moments"])
    assert rep.sources[0]["tier"] == "memory"
    assert any("not replicated" in n for n in rep.notes)
    shutil.rmtree(tmp_path / "shm")
    state = make(0, 0)
    rep = dckpt.CheckpointManager(tmp_path / "root", memory=str(tmp_path / "shm/{node}"),
                                  node="solo").restore(state)
    assert rep.step == 2 and rep.sources[0]["tier"] == "durable"
    assert torch.equal(state["moments"], make(0, 2)["moments"])


def _train_save(rank, world, root, mem, kind):
    from test_distributed import ddp_state, digests, fsdp_state, train
    state = fsdp_state(rank, world) if kind == "fsdp" else ddp_state(rank, world, zero=True)
    mgr = manager(rank, root, mem, 10)
    losses = train(state, 2, [])
    mgr.save(1, state)
    train(state, 2, losses)
    mgr.save(2, state)
    return digests(state)


def _restore_sharded(rank, world, root, mem, kind):
    from test_distributed import ddp_state, digests, fsdp_state
    state = (fsdp_state(rank, world, init_seed=1) if kind == "fsdp"
             else ddp_state(rank, world, init_seed=1, zero=True))
    rep = manager(rank, root, mem, 10).restore(state)
    return {"step": rep.step, "digests": digests(state),
            "sources": {str(q): v for q, v in rep.sources.items()}}


@pytest.mark.parametrize("kind", ["fsdp", "zero"])
def test_sharded_states_replicate_each_ranks_shard(tmp_path, kind):
    root, mem = str(tmp_path / "root"), str(tmp_path / "shm")
    saved = run_with_ranks(4, _train_save, root, mem, kind, timeout=120)
    assert saved[0] != saved[2]  # the ranks' shards (partitions) differ
    shutil.rmtree(Path(mem, "b"))
    res = run_with_ranks(4, _restore_sharded, root, mem, kind, timeout=120)
    assert [r["step"] for r in res] == [2] * 4
    assert [r["digests"] for r in res] == saved  # bitwise, every rank's own shard
    assert tiers(res[0]) == ["memory", "memory", "replica", "replica"]


def test_other_world_size_restores_from_the_durable_tier_without_all_parts(tmp_path):
    root, mem = str(tmp_path / "root"), str(tmp_path / "shm")
    run_with_ranks(4, _save, root, mem, [1, 2, 3], 2)  # memory: 2, 3; durable: 2
    # Node b and the replicas of its ranks are gone: no step of the 4-rank job is whole in
    # memory (with them, memory reshards: tests/test_memory_reshard.py).
    shutil.rmtree(Path(mem, "b"))
    shutil.rmtree(Path(mem, "a", "replicas"))
    res = run_with_ranks(2, _restore_resized, root, mem)
    assert [r["step"] for r in res] == [2, 2] and all(r["same"] for r in res)
    assert all(r["tiers"] == ["durable", "durable"] for r in res)


def _restore_resized(rank, world, root, mem):
    mgr = manager(rank, root, mem, 2)
    state = make(rank, 0)
    rep = mgr.restore(state)  # ranks 0-1 of 4 saved: their per-rank tensors are there
    want = make(rank, rep.step)
    return {"step": rep.step, "same": all(torch.equal(state[k], want[k]) for k in want),
            "tiers": [rep.sources[q]["tier"] for q in range(world)]}


def test_partners_are_on_other_nodes_at_the_same_position(monkeypatch):
    from dckpt.distributed.replicate import holders_of, node_id, partners
    nodes = ["x", "x", "y", "y", "z", "z"]
    assert partners(nodes, 1) == [[2], [3], [4], [5], [0], [1]]
    assert partners(nodes, 2) == [[2, 4], [3, 5], [4, 0], [5, 1], [0, 2], [1, 3]]
    assert partners(nodes, 5) == partners(nodes, 2)  # at most every other node once
    assert holders_of(partners(nodes, 1), 0) == [4]  # rank 0 keeps rank 4's copies
    assert partners(["x", "y", "y", "y"], 1) == [[1], [0], [0], [0]]  # uneven nodes
    assert partners(["x"] * 3, 1) == [[], [], []]  # one node: nobody to copy to
    monkeypatch.setenv("GROUP_RANK", "3")
    assert node_id() == "node3" and node_id("b") == "b"
    monkeypatch.delenv("GROUP_RANK")
    monkeypatch.delenv("NODE_RANK", raising=False)
    import socket
    assert node_id() == socket.gethostname()


def _fail_once(rank, world, root, mem):
    from dckpt.manager import memory_tier
    mgr = manager(rank, root, mem, 10)
    mgr.save(1, make(rank, 1))
    real = memory_tier.checkpoint.write
    if rank == 2:  # its part of step 2 cannot be written
        def broken(*a, **k):
            raise dckpt.errors.StorageError("no space left on device (injected)", "part")
        memory_tier.checkpoint.write = broken
    try:
        mgr.save(2, make(rank, 2))
        got = None
    except dckpt.errors.DckptError as e:
        got = [type(e).__name__, getattr(e, "rank", None)]
    memory_tier.checkpoint.write = real
    mgr.save(3, make(rank, 3))  # the same manager saves again
    return got


def test_one_ranks_failed_part_is_every_ranks_error_and_the_next_save_works(tmp_path):
    root, mem = str(tmp_path / "root"), str(tmp_path / "shm")
    got = run_with_ranks(4, _fail_once, root, mem)
    assert got[2][0] == "StorageError"
    assert [g for i, g in enumerate(got) if i != 2] == [["DistributedError", 2]] * 3
    shutil.rmtree(Path(mem, "a"))
    res = run_with_ranks(4, _restore, root, mem, 10)
    assert {r["step"] for r in res} == {3} and all(r["same"] for r in res)
    assert tiers(res[0]) == ["replica", "replica", "memory", "memory"]


def _restore_holder_dies(rank, world, root, mem):
    os.environ["DCKPT_PEER_TIMEOUT"] = "3"
    from dckpt.distributed import replicate
    mgr = manager(rank, root, mem, 10)
    if rank == 1:  # the holder of rank 3's replica dies as it starts sending it
        replicate._mapped = lambda *a, **k: os._exit(9)
    try:
        mgr.restore(make(rank, 0))
    except dckpt.errors.DistributedError as e:
        return e.rank
    return None


def test_a_holder_dying_while_sending_a_replica_fails_every_rank_without_a_hang(tmp_path):
    root, mem = str(tmp_path / "root"), str(tmp_path / "shm")
    run_with_ranks(4, _save, root, mem, [1], 10)
    shutil.rmtree(Path(mem, "b"))
    got = run_with_ranks(4, _restore_holder_dies, root, mem, may_die=(1,), timeout=40)
    assert got == [1, None, 1, 1]


# ---- the last source: the remote durable tier ------------------------------------------------
def _aws() -> dict:
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


def _save_remote(rank, world, root, mem, url, env):
    os.environ.update(env)  # the forkserver may predate the test's AWS_* variables
    mgr = manager(rank, root, mem, 1, remote=url)  # every save durable, then uploaded
    for s in (1, 2):
        mgr.save(s, make(rank, s))
    assert mgr.wait(60)
    mgr.close()


def _restore_remote(rank, world, root, mem, url, env):
    os.environ.update(env)
    mgr = manager(rank, root, mem, 1, remote=url)
    newest = mgr.newest_step()
    state = make(rank, 0)
    rep = mgr.restore(state)
    want = make(rank, rep.step)
    mgr.close()
    return {"step": rep.step, "newest": newest,
            "same": all(torch.equal(state[k], want[k]) for k in want),
            "sources": {str(q): v for q, v in rep.sources.items()}}


def test_chain_ends_at_the_remote_durable_tier(tmp_path, s3_endpoint, s3_bucket):
    root, mem, url = str(tmp_path / "root"), str(tmp_path / "shm"), f"s3://{s3_bucket}/mt"
    run_with_ranks(4, _save_remote, root, mem, url, _aws(), timeout=120)
    # Ranks 2-3 lose both memory copies (their node, and the replicas node a keeps for
    # them); the local durable root is gone too: the remote serves them.
    shutil.rmtree(Path(mem, "b"))
    shutil.rmtree(Path(mem, "a", "replicas"))
    shutil.rmtree(root)
    res = run_with_ranks(4, _restore_remote, root, mem, url, _aws(), timeout=120)
    assert [r["step"] for r in res] == [2] * 4 and [r["newest"] for r in res] == [2] * 4
    assert all(r["same"] for r in res)  # bitwise
    assert tiers(res[0]) == ["memory", "memory", "remote", "remote"]
    assert res[0]["sources"]["2"]["from"] == f"remote {url}/{step_dir(2)}"
    # Nothing in memory at all: every rank from the remote.
    shutil.rmtree(mem)
    shutil.rmtree(root)
    res = run_with_ranks(4, _restore_remote, root, mem, url, _aws(), timeout=120)
    assert [r["step"] for r in res] == [2] * 4 and all(r["same"] for r in res)
    assert tiers(res[0]) == ["remote"] * 4

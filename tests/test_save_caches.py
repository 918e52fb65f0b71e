"""What a CheckpointManager keeps between saves (the manifest it committed last, reused as
the next save's base; the plan of the last layout; one listing of the root per save) never
changes what is saved: a changed layout is saved and loaded bitwise, and a manifest changed
on disk after the manager wrote it is read again, not trusted from memory."""
import os
import subprocess
import sys
import time

import torch

import dckpt
from dckpt import CheckpointManager

CHUNK = 64 << 10


def state0() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(300, 100, generator=g), "b": torch.randn(4096, generator=g),
            "c": torch.arange(1000, dtype=torch.int64), "n": 3}


def same(loaded: dict, state: dict) -> None:
    assert set(loaded) == set(state)
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape, k
            assert loaded[k].contiguous().view(torch.uint8).reshape(-1).tolist() == \
                v.contiguous().view(torch.uint8).reshape(-1).tolist(), k
        else:
            assert loaded[k] == v, k


def test_changed_layout_after_cached_saves_is_saved_bitwise(tmp_path):
    mgr = CheckpointManager(tmp_path, chunk_size=CHUNK)
    state = state0()
    for step in range(3):  # the manifest and plan caches are warm after these
        r = mgr.save(step, state)
    assert r.manifest.meta["incremental"]["new_bytes"] == 0  # the unchanged state shared all
    assert mgr._written.get(mgr.path(2)) is r.manifest  # the cache is what the next save uses
    variants = [
        {**state, "a": torch.randn(100, 300)},  # same bytes count, another shape
        {**state, "b": state["b"].to(torch.float64)},  # another dtype
        {**state, "b": state["b"].view(torch.int32)},  # same bytes, another dtype
        {**state, "d": torch.ones(17, dtype=torch.bfloat16)},  # a new tensor
        {k: v for k, v in state.items() if k != "c"},  # one gone
        {**state, "a": state["a"][:, :50].contiguous()},  # fewer bytes
        {**state, "n": 4.0},  # a value of another type in the tree
    ]
    step = 3
    for v in variants:
        mgr.save(step, v)
        same(dckpt.load(mgr.path(step)), v)
        r = mgr.save(step + 1, v)  # and the same layout again, now from the cache
        assert r.manifest.meta["incremental"]["new_bytes"] == 0
        same(dckpt.load(mgr.path(step + 1)), v)
        step += 2
    # A restore of the newest step into a live state gives back the last variant.
    live = {k: (torch.zeros_like(x) if isinstance(x, torch.Tensor) else x)
            for k, x in variants[-1].items()}
    mgr.restore(live)
    same(live, variants[-1])


REWRITE = """
import sys, torch, dckpt
g = torch.Generator().manual_seed(1)
dckpt.save({"a": torch.randn(300, 100, generator=g), "b": torch.randn(4096, generator=g),
            "c": torch.arange(1000, dtype=torch.int64) * 7, "n": 3}, sys.argv[1],
           overwrite=True, chunk_size=%d)
""" % CHUNK


def test_manifest_rewritten_by_another_process_is_not_trusted_from_cache(tmp_path):
    mgr = CheckpointManager(tmp_path, chunk_size=CHUNK)
    state = state0()
    mgr.save(0, state)
    # Every tensor changed: step 1 holds its own data file, of the size the rewrite's has.
    state = {k: (v + 1 if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    mgr.save(1, state)
    assert mgr._written.get(mgr.path(1)) is not None
    # Another process replaces step 1 with other bytes (and its own manifest).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", REWRITE, str(mgr.path(1))], check=True, env=env)
    assert mgr._written.get(mgr.path(1)) is None
    r = mgr.save(2, state)
    inc = r.manifest.meta["incremental"]
    # Compared against the manifest on disk, whose tensors hold other bytes: nothing is
    # shared, and no linked chunk had to be caught by the rot check (which is what a stale
    # manifest, promising the old bytes, would have needed).
    assert "damaged_base_chunks" not in inc and "fallback" not in inc
    assert inc["referenced_chunks"] == 0
    same(dckpt.load(mgr.path(2)), state)


def test_manifest_edited_in_place_is_read_again(tmp_path):
    mgr = CheckpointManager(tmp_path, chunk_size=CHUNK)
    state = state0()
    mgr.save(0, state)
    manifest = mgr.path(0) / "manifest.json"
    data = manifest.read_bytes()
    time.sleep(0.05)  # past the file system's timestamp granularity
    with open(manifest, "r+b") as f:  # same inode, same size, same bytes: only times move
        f.write(data)
    assert mgr._written.get(mgr.path(0)) is None
    # A manifest damaged in place is read, found unreadable, and the save is full.
    with open(manifest, "r+b") as f:
        f.seek(len(data) // 2)
        f.write(b"#")
    r = mgr.save(1, state)
    assert any("written in full" in n for n in r.notes)
    same(dckpt.load(mgr.path(1)), state)


def test_repeated_save_lists_the_root_once(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep_last=2, chunk_size=CHUNK)
    state = state0()
    for step in range(3):
        mgr.save(step, state)
    scans = []
    scan = mgr._scan
    monkeypatch.setattr(mgr, "_scan", lambda: scans.append(1) or scan())
    mgr.save(3, state)
    assert len(scans) == 1
    assert mgr.steps() == [2, 3]  # retention still saw the new step and the old ones
    assert mgr.latest_step() == 3
    assert (tmp_path / "latest").read_text() == "step-000000003\n"


def test_int_lists_in_the_tree_keep_their_types():
    """The one-step encoding of int lists (RNG states) takes exact ints only: bools, int
    subclasses and floats among them still go through the general path, and round-trip."""
    import enum
    import json
    from dckpt.format import tree

    class Flag(enum.IntEnum):
        A = 1

    value = {"ints": list(range(700)), "t": tuple(range(5)), "mixed": [1, True, 2.0, None],
             "bools": [True, False], "empty": [], "sub": [Flag.A, 2]}
    plain = {k: value[k] for k in sorted(value) if k != "sub"}  # sorted: stored as a dict
    enc = tree.encode(plain)
    assert enc["ints"] == list(range(700)) and enc["t"] == {"$tuple": [0, 1, 2, 3, 4]}
    assert [type(x) for x in enc["mixed"]] == [int, bool, float, type(None)]
    assert [type(x) for x in enc["bools"]] == [bool, bool] and enc["empty"] == []
    back = tree.decode(json.loads(json.dumps(enc)))
    assert back == plain
    assert [type(x) for x in back["mixed"]] == [int, bool, float, type(None)]
    assert type(back["t"]) is tuple
    # An int subclass is not an int to the fast path: encoded as the general path does.
    assert [type(x) for x in tree.encode(value["sub"])] == [int, int]


def test_the_save_listing_is_the_saving_threads_own(tmp_path):
    """An async save's worker lists the root once per save; the training thread asking
    steps() or latest_step() meanwhile gets the disk's answer, not that memo."""
    import threading
    mgr = CheckpointManager(tmp_path, chunk_size=CHUNK)
    mgr.save(0, state0())
    mgr._memo.listing = {"steps": [0, 7], "latest": 7}  # as a save in this thread holds it
    assert mgr.steps() == [0, 7] and mgr.latest_step() == 7
    seen = []
    t = threading.Thread(target=lambda: seen.append((mgr.steps(), mgr.latest_step())))
    t.start()
    t.join()
    assert seen == [([0], 0)]
    mgr._memo.listing = None
    assert mgr.steps() == [0]

"""The commit without rename on a real S3 server (docs/STORAGE.md): uploads killed at
random instants never leave a prefix a reader takes for a checkpoint nor harm an older
one; two gloo ranks upload their own files and rank 0 writes the manifest only after both
succeeded."""
from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

import dckpt
from helpers.ranks import run_with_ranks
from dckpt.errors import CheckpointNotFoundError, CorruptCheckpointError, DistributedError

ROOT = Path(__file__).resolve().parent.parent
SLOW = os.environ.get("DCKPT_SLOW") == "1"

def big_state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(2 << 20, generator=g), "b": torch.randn(2 << 20, generator=g),
            "c": {"small": torch.arange(10), "n": seed}}


def same(a: dict, b: dict) -> bool:
    return (torch.equal(a["a"], b["a"]) and torch.equal(a["b"], b["b"])
            and torch.equal(a["c"]["small"], b["c"]["small"]) and a["c"]["n"] == b["c"]["n"])


def _start(url: str, seed: int) -> int:
    """A forked child (torch and the client already imported) saving big_state(seed) to
    `url`; returns its pid once it is about to save."""
    state = big_state(seed)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: save, then leave without running the parent's cleanup
        code = 1
        try:
            os.close(r)
            os.write(w, b"R")
            dckpt.save(state, url, threads=2, overwrite=True)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    assert os.read(r, 1) == b"R"
    os.close(r)
    return pid


def test_uploads_killed_at_random_points_never_commit_or_harm_older(s3_bucket, monkeypatch):
    """SIGKILL a process saving a 16 MB state (a multipart upload of 4 parts) at random
    instants: the new prefix is absent to readers or a complete checkpoint, never a
    partial one; an older committed checkpoint beside it still loads bitwise."""
    old = f"s3://{s3_bucket}/run/step-000000001"
    new = f"s3://{s3_bucket}/run/step-000000002"
    monkeypatch.setenv("DCKPT_REMOTE_PART_BYTES", str(5 << 20))
    dckpt.save(big_state(1), old)
    # One uninterrupted save measures how long a save takes here.
    t0 = time.perf_counter()
    pid = _start(new, 2)
    assert os.waitpid(pid, 0)[1] == 0
    took = time.perf_counter() - t0
    assert same(dckpt.load(new), big_state(2))
    rng = random.Random(19)
    outcomes = []
    for trial in range(16 if SLOW else 6):
        seed = 10 + trial
        pid = _start(new, seed)
        # Spread over the whole save, its overwrite's deletes and its last request.
        time.sleep(rng.uniform(0.0, took * 1.1))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        try:
            m = dckpt.read_manifest(new)
        except CheckpointNotFoundError:
            outcomes.append("absent")
            with pytest.raises(CheckpointNotFoundError):
                dckpt.load(new)
        else:
            # Committed: then every byte of it is there and right.
            assert m.counters == {} and len(m.files) >= 1
            assert same(dckpt.load(new), big_state(seed)), "a committed checkpoint is wrong"
            outcomes.append("committed")
        assert same(dckpt.load(old), big_state(1)), f"trial {trial}: the older one broke"
        from dckpt.tools.verify import verify
        assert verify(f"s3://{s3_bucket}/run/step-000000001").ok
    print("outcomes:", outcomes, f"(save {took:.2f} s)")
    assert "absent" in outcomes, outcomes  # at least one kill landed mid-upload
    # Whatever a kill left, a new save there succeeds and is complete.
    dckpt.save(big_state(99), new, overwrite=True)
    assert same(dckpt.load(new), big_state(99))


def _rank_save(rank: int, world: int, url: str, env: dict, fail_rank: int) -> dict:
    os.environ.update(env)
    import numpy as np
    if rank == fail_rank:  # this rank's spool cannot be created: its write phase fails
        os.environ["DCKPT_SPOOL_DIR"] = "/proc/dckpt-no-such-dir"
    g = torch.Generator().manual_seed(100 + rank)
    mine = {"w": torch.randn(64, 1000, generator=g), "i": np.arange(10) + rank}
    state = {"shared": torch.arange(1000.0), "rank": mine}
    try:
        dckpt.save(state, url, chunk_size=64 << 10)
    except DistributedError as e:
        return {"error": type(e).__name__, "rank_named": e.rank}
    except Exception as e:  # the failing rank raises its own error
        return {"error": type(e).__name__}
    live = {"shared": torch.zeros(1000), "rank": {"w": torch.zeros(64, 1000),
                                                  "i": np.zeros(10, dtype=np.int64)}}
    dckpt.load(url, into=live)
    return {"equal": bool(torch.equal(live["rank"]["w"], mine["w"])
                          and torch.equal(live["shared"], state["shared"])
                          and (live["rank"]["i"] == mine["i"]).all()),
            "files": sorted(f.name for f in dckpt.read_manifest(url).files)}


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


def test_two_ranks_upload_their_own_files_and_load_bitwise(s3_bucket):
    url = f"s3://{s3_bucket}/two"
    res = run_with_ranks(2, _rank_save, url, _env(), -1, timeout=120)
    assert all(r.get("equal") for r in res), res
    assert res[0]["files"] == ["rank-00000.dckpt", "rank-00001.dckpt"]
    # Two ranks save the split layout: an index plus one record object per rank, each
    # verified against the index's hash, remotely as locally.
    from dckpt.storage import objectstore
    from dckpt.tools.verify import verify
    store = objectstore.connect(url)
    names = sorted(o.url.rpartition("/")[2] for o in store.list(url))
    assert names == ["manifest.json", "rank-00000.dckpt", "rank-00001.dckpt",
                     "records-00000.json", "records-00001.json"], names
    assert verify(url).ok
    record = objectstore.join(url, "records-00001.json")
    data = bytearray(store.get_bytes(record, 1 << 20))
    data[len(data) // 2] ^= 1
    store.put_bytes(record, bytes(data))
    failed = [c for c in verify(url).all_checks() if c.level == "error"]
    assert [c.id for c in failed] == ["structure.records"], failed
    assert "records-00001.json" in failed[0].message
    with pytest.raises(CorruptCheckpointError, match="records-00001.json"):
        dckpt.load(url)


def test_a_failing_rank_leaves_no_manifest_and_no_objects(s3_bucket):
    from dckpt.storage import objectstore
    url = f"s3://{s3_bucket}/two"
    res = run_with_ranks(2, _rank_save, url, _env(), 1, timeout=120)
    assert res[0]["error"] == "DistributedError" and res[0]["rank_named"] == 1, res
    assert "error" in res[1]
    with pytest.raises(CheckpointNotFoundError):
        dckpt.read_manifest(url)
    assert objectstore.connect(url).list(url) == []  # rank 0 aborted: its upload removed

"""The remote tier: CheckpointManager(local_root, remote="s3://...") uploads every committed
step in the background to a real S3 server on loopback (moto, tests/helpers/s3server.py).

The state is LoRA-shaped: a frozen base that incremental saves share by hard link, and a
small trainable part. What is asserted: bitwise restores from the remote alone, the bytes
that crossed the client's link (the incremental step's are its changed part only), remote
retention, an upload whose server died (typed error, local tier intact, save not held),
and a bit flipped in a remote object (detected, fallback).
"""
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import torch

from helpers import s3server
from helpers.ranks import run_with_ranks
from helpers import free_port
from dckpt import CheckpointManager
from dckpt.errors import UploadError
from dckpt.format.layout import step_dir

BASE_NUMEL = 2 << 20  # 8 MiB of fp32: the frozen base, in two tensors
LORA_NUMEL = 16 << 10  # 64 KiB: what training changes


def lora_state(seed: int = 0, rank: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"base.0": torch.randn(BASE_NUMEL // 2, generator=g),
                      "base.1": torch.randn(BASE_NUMEL // 2, generator=g),
                      "lora": torch.randn(LORA_NUMEL, generator=g) + rank}}


def train(state: dict) -> None:
    state["model"]["lora"].add_(0.5)


def blank(state: dict) -> dict:
    return {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()}}


def same_bits(a: dict, b: dict) -> bool:
    return all(torch.equal(a["model"][k].view(torch.int32), b["model"][k].view(torch.int32))
               for k in a["model"])


def s3(endpoint: str):
    return boto3.client("s3", **s3server._boto_args(endpoint))


def keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    pages = s3(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                   Prefix=prefix)
    return sorted(o["Key"] for p in pages for o in p.get("Contents", []))


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setenv("DCKPT_REMOTE_RETRIES", "2")
    monkeypatch.setenv("DCKPT_REMOTE_BACKOFF", "0.05")


def test_upload_order_and_tiers_then_restore_from_remote_alone(tmp_path, s3_endpoint,
                                                               s3_bucket):
    root, url = tmp_path / "run", f"s3://{s3_bucket}/exp1"
    state = lora_state()
    with CheckpointManager(root, remote=url) as mgr:
        mgr.save(1, state)
        train(state)
        mgr.save(2, state)
        mgr.wait()
        assert mgr.tiers() == {1: {"local", "remote"}, 2: {"local", "remote"}}
        assert mgr.steps() == [1, 2]  # the local steps, as always
        report = mgr.upload_report(2)
    # The manifest went up last; every file of the local step is there, byte for byte.
    assert report.objects[-1] == f"{url}/{step_dir(2)}/manifest.json"
    local = sorted(p.name for p in (root / step_dir(2)).iterdir())
    assert keys(s3_endpoint, s3_bucket, f"exp1/{step_dir(2)}/") == \
        [f"exp1/{step_dir(2)}/{n}" for n in local]
    for n in local:
        body = s3(s3_endpoint).get_object(Bucket=s3_bucket,
                                          Key=f"exp1/{step_dir(2)}/{n}")["Body"].read()
        assert body == (root / step_dir(2) / n).read_bytes(), n

    shutil.rmtree(root)  # the machine is gone: only the remote is left
    mgr = CheckpointManager(root, remote=url)
    assert mgr.tiers() == {1: {"remote"}, 2: {"remote"}} and mgr.steps() == []
    # latest_step() keeps to the local root; newest_step() is what restore() takes.
    assert mgr.latest_step() is None and mgr.newest_step() == 2
    fresh = blank(state)
    rep = mgr.restore(fresh)
    assert rep.step == 2 and str(rep.path) == f"{url}/{step_dir(2)}"
    assert same_bits(fresh, state)
    mgr.close()


def test_incremental_step_uploads_only_its_changed_bytes(tmp_path, s3_endpoint, s3_bucket):
    url = f"s3://{s3_bucket}/lora"
    state = lora_state()
    with CheckpointManager(tmp_path / "run", remote=url) as mgr:
        mgr.save(1, state)
        train(state)
        mgr.save(2, state)  # incremental: the base is a hard link to step 1's data
        train(state)
        mgr.save(3, state, full=True)  # the same state written in full, for comparison
        mgr.wait()
        first, second, full = (mgr.upload_report(s) for s in (1, 2, 3))
    base_bytes = BASE_NUMEL * 4
    mgr.save(4, state)  # after close(): the worker starts again
    mgr.wait()
    assert mgr.tiers()[4] == {"local", "remote"} and mgr.upload_report(4).sent < base_bytes
    mgr.close()
    assert first.sent > base_bytes and full.sent > base_bytes
    # Step 2's shared file crossed no link: copied server-side from step 1's object.
    assert second.copied >= base_bytes
    assert second.sent * 5 <= full.sent, (second.sent, full.sent)
    assert second.sent < LORA_NUMEL * 4 + (256 << 10)  # the changed part and a manifest
    # The copied object holds the same bytes (restore of step 2 alone is bitwise).
    mgr = CheckpointManager(tmp_path / "other", remote=url)
    fresh = blank(state)
    mgr.restore(fresh, step=3)
    assert same_bits(fresh, state)
    mgr.close()


def test_async_saves_upload_after_their_commit_and_a_reopened_manager_shares(
        tmp_path, s3_endpoint, s3_bucket):
    root, url = tmp_path / "run", f"s3://{s3_bucket}/async"
    state = lora_state()
    with CheckpointManager(root, remote=url, async_save=True) as mgr:
        mgr.save(1, state)
        train(state)
        mgr.save(2, state)
        mgr.wait()  # the async commits, then their uploads
        assert mgr.tiers() == {1: {"local", "remote"}, 2: {"local", "remote"}}
        assert mgr.upload_report(2).copied >= BASE_NUMEL * 4
    # A resumed run (a new process, the same root): its first incremental step copies the
    # shared base server-side too, matched through step 2's identical remote manifest.
    mgr = CheckpointManager(root, remote=url)
    fresh = blank(state)
    mgr.restore(fresh)
    train(fresh)
    mgr._remote._uploaded.clear()  # what a new process starts with
    mgr.save(3, fresh)
    mgr.wait()
    report = mgr.upload_report(3)
    assert report.copied >= BASE_NUMEL * 4 and report.sent < BASE_NUMEL
    mgr.close()


def test_overwritten_step_is_replaced_and_debris_removed(tmp_path, s3_endpoint, s3_bucket):
    url = f"s3://{s3_bucket}/ow"
    # What a failed upload of step 0 left: data without a manifest.
    s3(s3_endpoint).put_object(Bucket=s3_bucket, Key=f"ow/{step_dir(0)}/rank-00000.dckpt",
                               Body=b"x" * 100)
    state = lora_state()
    with CheckpointManager(tmp_path / "run", remote=url) as mgr:
        mgr.save(1, state)
        mgr.wait()
        assert keys(s3_endpoint, s3_bucket, f"ow/{step_dir(0)}/") == []
        train(state)
        # Shares the base with the step it replaces: copied from that step's object before
        # the new upload replaces it.
        mgr.save(1, state, overwrite=True)
        mgr.wait()
        assert mgr.upload_report(1).copied >= BASE_NUMEL * 4
        local = sorted(p.name for p in (tmp_path / "run" / step_dir(1)).iterdir())
    assert keys(s3_endpoint, s3_bucket, "ow/") == [f"ow/{step_dir(1)}/{n}" for n in local]
    mgr = CheckpointManager(tmp_path / "elsewhere", remote=url)
    fresh = blank(state)
    assert mgr.restore(fresh).step == 1 and same_bits(fresh, state)
    mgr.close()


def test_uploads_pending_at_exit_are_finished(tmp_path, s3_endpoint, s3_bucket):
    url = f"s3://{s3_bucket}/exit"
    code = (f"import torch, dckpt\n"
            f"m = dckpt.CheckpointManager({str(tmp_path / 'run')!r}, remote={url!r})\n"
            f"m.save(7, {{'w': torch.arange(1000.0)}})\n")  # no wait(), no close()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    assert keys(s3_endpoint, s3_bucket, f"exit/{step_dir(7)}/manifest.json")


def test_remote_retention_keeps_what_remaining_steps_need(tmp_path, s3_endpoint, s3_bucket):
    url = f"s3://{s3_bucket}/ret"
    state = lora_state()
    states = {}
    with CheckpointManager(tmp_path / "run", remote=url, keep_last=3,
                           keep_last_remote=2) as mgr:
        for step in (1, 2, 3, 4):
            train(state)
            mgr.save(step, state)
            states[step] = {"model": {k: v.clone() for k, v in state["model"].items()}}
            mgr.wait()
        assert mgr.tiers() == {2: {"local"}, 3: {"local", "remote"}, 4: {"local", "remote"}}
    # Nothing of the deleted steps is left behind (manifest and data both went).
    assert {k.split("/")[1] for k in keys(s3_endpoint, s3_bucket, "ret/")} == \
        {step_dir(3), step_dir(4)}
    # Steps 3 and 4 shared the base with steps 1 and 2, which are gone: each still
    # restores bitwise from the remote alone.
    for step in (3, 4):
        mgr = CheckpointManager(tmp_path / f"fresh{step}", remote=url)
        fresh = blank(state)
        assert mgr.restore(fresh, step=step).step == step
        assert same_bits(fresh, states[step])
        mgr.close()


def test_server_killed_during_upload(tmp_path, caplog, monkeypatch):
    endpoint, proc = s3server.start()  # a server of this test's own, to kill
    for k, v in s3server.client_env(endpoint).items():
        monkeypatch.setenv(k, v)
    # A failing request is retried once, half a second later: the window in which step
    # 2's upload is known to be still pending.
    monkeypatch.setenv("DCKPT_REMOTE_RETRIES", "2")
    monkeypatch.setenv("DCKPT_REMOTE_BACKOFF", "0.5")
    try:
        bucket = s3server.new_bucket(endpoint)
        options = {"endpoint_url": endpoint,
                   "config_kwargs": {"connect_timeout": 1, "read_timeout": 2,
                                     "retries": {"max_attempts": 1}}}
        root = tmp_path / "run"
        mgr = CheckpointManager(root, remote=f"s3://{bucket}/x", storage_options=options,
                                keep_last=1)
        state = lora_state()
        mgr.save(1, state)
        mgr.wait()
        train(state)
        with caplog.at_level(logging.ERROR, logger="dckpt"):
            mgr.save(2, state, full=True)  # 8 MiB to send
            # save() returned with the step committed locally and its upload not done.
            assert mgr.wait(timeout=0) is False and mgr.steps() == [2]
            while mgr.upload_report(2) is None:  # the upload is under way...
                time.sleep(0.001)
            proc.kill()  # ...when the server dies
            proc.wait()
            train(state)
            mgr.save(3, state)  # not held by the failing upload
            # keep_last=1, but step 2's upload is still retrying: kept locally till it ends.
            assert mgr.steps() == [2, 3]
            with pytest.raises(UploadError) as err:
                mgr.wait()
        assert err.value.step == 2
        assert err.value.object is None or step_dir(2) in err.value.object
        assert "step 2" in str(err.value) and "step 3" in str(err.value)  # both failed
        # A log line at once for each, naming the step.
        logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("step 2" in m for m in logged) and any("step 3" in m for m in logged)
        # The local tier is complete: step 3 restores bitwise from it.
        fresh = blank(state)
        assert mgr.restore(fresh).step == 3 and same_bits(fresh, state)
        # Reported once; with no upload pending, local retention applies again.
        mgr.save(4, state)
        assert mgr.steps() == [4] and mgr.wait(timeout=0) is False
        with pytest.raises(UploadError) as err:
            mgr.close()
        assert err.value.step == 4
    finally:
        if proc.poll() is None:
            proc.kill()


def flip_remote_bit(endpoint: str, bucket: str, key: str, offset: int) -> None:
    client = s3(endpoint)
    body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[offset] ^= 0x10
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body))


def test_bit_flip_in_remote_object_is_detected_and_restore_falls_back(tmp_path, s3_endpoint,
                                                                      s3_bucket):
    url = f"s3://{s3_bucket}/flip"
    state = lora_state()
    with CheckpointManager(tmp_path / "run", remote=url) as mgr:
        mgr.save(1, state)
        before = {"model": {k: v.clone() for k, v in state["model"].items()}}
        train(state)
        mgr.save(2, state)
        mgr.wait()
        own = next(n for n in (tmp_path / "run" / step_dir(2)).iterdir()
                   if n.name.startswith("rank-"))  # step 2's own data: the changed part
    flip_remote_bit(s3_endpoint, s3_bucket, f"flip/{step_dir(2)}/{own.name}", 100)

    # The local copy is there and intact: it is preferred, the flip never read.
    mgr = CheckpointManager(tmp_path / "run", remote=url)
    fresh = blank(state)
    rep = mgr.restore(fresh)
    assert rep.step == 2 and Path(rep.path) == tmp_path / "run" / step_dir(2)
    assert same_bits(fresh, state)
    mgr.close()

    # Only the remote is left: the flip is detected and the older intact step restored.
    mgr = CheckpointManager(tmp_path / "elsewhere", remote=url)
    fresh = blank(state)
    rep = mgr.restore(fresh)
    assert rep.step == 1 and same_bits(fresh, before)
    assert "step 2 (remote) could not be restored" in rep.notes[0]
    assert "Corrupt" in rep.notes[0] or "hash" in rep.notes[0]
    mgr.close()


def test_corrupt_local_copy_falls_back_to_the_remote_copy_of_the_same_step(
        tmp_path, s3_endpoint, s3_bucket):
    url = f"s3://{s3_bucket}/lc"
    state = lora_state()
    with CheckpointManager(tmp_path / "run", remote=url) as mgr:
        mgr.save(1, state)
        train(state)
        mgr.save(2, state)
        mgr.wait()
    own = next(p for p in (tmp_path / "run" / step_dir(2)).iterdir()
               if p.name.startswith("rank-"))
    data = bytearray(own.read_bytes())
    data[100] ^= 0x10
    own.write_bytes(bytes(data))
    mgr = CheckpointManager(tmp_path / "run", remote=url)
    fresh = blank(state)
    rep = mgr.restore(fresh)
    assert rep.step == 2 and str(rep.path) == f"{url}/{step_dir(2)}"
    assert same_bits(fresh, state)
    assert "step 2 (local) could not be restored" in rep.notes[0]
    mgr.close()


# ---- two gloo ranks -------------------------------------------------------------------

def rank_upload(rank, world, root, url, env, dead):
    os.environ.update(env)  # the forkserver may predate the test's AWS_* variables
    state = lora_state(rank=rank)  # base replicated (written once), lora per rank
    mgr = CheckpointManager(root, remote=url)
    mgr.save(1, state)
    train(state)
    mgr.save(2, state)
    mgr.wait()
    reports = [mgr.upload_report(s) for s in (1, 2)]
    tiers = {str(k): sorted(v) for k, v in mgr.tiers().items()}
    mgr.close()
    # The local root is lost (kept aside for the test to compare): restore from the remote.
    import torch.distributed as tdist
    tdist.barrier()
    if rank == 0:
        os.rename(root, root + "-gone")
    tdist.barrier()
    fresh = blank(state)
    mgr = CheckpointManager(root, remote=url)
    newest = mgr.newest_step()
    rep = mgr.restore(fresh)
    mgr.close()
    restored = {"step": rep.step, "path": str(rep.path), "same": same_bits(fresh, state),
                "newest": newest}
    # Rank 1 cannot reach the store: rank 0 must not commit (no manifest), and both ranks'
    # wait() raise, naming the step.
    options = {"endpoint_url": dead, "config_kwargs": {"retries": {"max_attempts": 1}}} \
        if rank == 1 else None
    mgr = CheckpointManager(root + "-2", remote=url + "-2", storage_options=options,
                            async_save=True)  # the upload follows the async commit
    mgr.save(5, state)
    try:
        mgr.wait()
        failed = None
    except UploadError as e:
        failed = {"step": e.step, "message": str(e)}
    failed["committed_locally"] = mgr.steps() == [5]
    mgr.close()
    return {"sent": [r.sent for r in reports], "copied": [r.copied for r in reports],
            "objects": [[o.rsplit("/", 1)[1] for o in r.objects] for r in reports],
            "tiers": tiers, "failed": failed, "restored": restored}


def test_two_ranks_upload_their_own_files_restore_from_remote_and_fail_together(tmp_path, s3_endpoint,
                                                                  s3_bucket):
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    env.update(DCKPT_REMOTE_RETRIES="2", DCKPT_REMOTE_BACKOFF="0.05")
    root, url = str(tmp_path / "run"), f"s3://{s3_bucket}/two"
    dead = f"http://127.0.0.1:{free_port()}"
    res = run_with_ranks(2, rank_upload, root, url, env, dead, timeout=120)
    manifest = "manifest.json"
    # Rank 0 alone uploads the manifest, last; each rank its own data files.
    assert [o[-1] for o in res[0]["objects"]] == [manifest, manifest]
    assert all(manifest not in o for o in res[1]["objects"])
    for step in (1, 2):
        names = [n for r in res for n in r["objects"][step - 1] if n != manifest]
        assert len(names) == len(set(names))  # no file uploaded twice
        local = sorted(p.name for p in (tmp_path / "run-gone" / step_dir(step)).iterdir())
        assert sorted(names + [manifest]) == local
        assert keys(s3_endpoint, s3_bucket, f"two/{step_dir(step)}/") == \
            [f"two/{step_dir(step)}/{n}" for n in local]
    # Each rank wrote one base tensor at step 1 and linked it at step 2: copied, not sent.
    assert all(r["copied"][1] >= BASE_NUMEL * 2 and r["sent"][1] * 5 < r["sent"][0]
               for r in res), res
    assert res[0]["tiers"] == res[1]["tiers"] == {"1": ["local", "remote"],
                                                  "2": ["local", "remote"]}

    # The failed upload: typed on both ranks, nothing committed remotely.
    assert all(r["failed"]["step"] == 5 and r["failed"]["committed_locally"] for r in res)
    assert "rank 1" in res[0]["failed"]["message"]
    assert step_dir(5) in res[0]["failed"]["message"]
    assert not [k for k in keys(s3_endpoint, s3_bucket, "two-2/") if "manifest" in k]

    back = [r["restored"] for r in res]
    assert [b["step"] for b in back] == [2, 2] and all(b["same"] for b in back)
    assert [b["newest"] for b in back] == [2, 2]
    assert all(b["path"] == f"{url}/{step_dir(2)}" for b in back)


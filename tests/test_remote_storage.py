"""Checkpoints in object storage against a real S3 server on loopback
(tests/helpers/s3server.py): the client layer (storage/objectstore.py), the backend
(storage/remote.py) and dckpt.save / dckpt.load / dckpt.read_manifest with s3:// URLs."""
from __future__ import annotations

import json
import logging
import os
import threading
import time

import boto3
import numpy as np
import pytest
import torch

import dckpt
from helpers import attacks, s3server
from dckpt.errors import (CheckpointExistsError, CheckpointNotFoundError,
                          CorruptCheckpointError, IncompleteCheckpointError, ManifestError,
                          RemoteStorageError, StorageError)
from dckpt.storage import objectstore, remote

# No retries inside the client: dckpt's own retry loop is what these tests watch.
QUICK = {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2,
                           "read_timeout": 5}}


def s3(endpoint: str):
    return boto3.client("s3", **s3server._boto_args(endpoint))


def state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(300, 257, generator=g),
                      "b": torch.randn(257, generator=g).to(torch.bfloat16),
                      "step": torch.tensor(7)},
            "arr": np.arange(1000, dtype=np.int32) * (seed + 1),
            "meta": {"lr": 0.1, "name": "x", "seq": [1, 2, (3, 4)]}}


def zeros_like(st: dict) -> dict:
    return {"model": {k: torch.zeros_like(v) for k, v in st["model"].items()},
            "arr": np.zeros_like(st["arr"]), "meta": {}}


def assert_bitwise(a: dict, b: dict) -> None:
    for k, v in a["model"].items():
        assert v.dtype == b["model"][k].dtype
        assert torch.equal(v.view(torch.uint8) if v.dim() else v, b["model"][k].view(
            torch.uint8) if v.dim() else b["model"][k]), k
    assert np.array_equal(a["arr"], b["arr"]) and a["arr"].dtype == b["arr"].dtype


# ---- the client layer ------------------------------------------------------------------

def test_objectstore_put_get_list_copy_delete(s3_bucket, tmp_path):
    st = objectstore.connect(f"s3://{s3_bucket}/p")
    base = f"s3://{s3_bucket}/p"
    data = np.random.default_rng(0).integers(0, 256, (21 << 20) + 5, dtype=np.uint8)
    f = tmp_path / "big"
    data.tofile(f)
    info = st.put_file(f, f"{base}/big", part_size=5 << 20, concurrency=2)
    # Multipart (5 parts) and its ETag rebuilt from the local bytes: the check ran.
    assert info.size == data.nbytes and info.etag.endswith("-5")
    assert objectstore._md5_etag_of_file(f, data.nbytes, 5) == info.etag
    buf = np.zeros(1000, np.uint8)
    st.get_into(f"{base}/big", (5 << 20) - 500, buf)  # across a part boundary
    assert np.array_equal(buf, data[(5 << 20) - 500:(5 << 20) + 500])
    assert st.put_bytes(f"{base}/small", b"hello").etag is not None
    assert st.get_bytes(f"{base}/small", 10) == b"hello"
    with pytest.raises(RemoteStorageError, match="limit"):
        st.get_bytes(f"{base}/small", 4)
    st.copy(f"{base}/small", f"{base}/sub/copy")
    assert [o.url for o in st.list(base)] == [f"{base}/big", f"{base}/small",
                                              f"{base}/sub/copy"]
    assert st.list(f"s3://{s3_bucket}/p/su") == []  # a prefix is a directory, not a string
    with pytest.raises(IncompleteCheckpointError, match="truncated"):
        st.get_into(f"{base}/small", 2, bytearray(10))
    with pytest.raises(IncompleteCheckpointError, match="missing"):
        st.get_into(f"{base}/nothing", 0, bytearray(10))
    st.delete([f"{base}/small", f"{base}/never-was"])
    assert not st.exists(f"{base}/small") and st.info(f"{base}/big").size == data.nbytes


def test_urls_and_locations():
    from dckpt import storage
    assert objectstore.is_url("s3://b/x") and objectstore.is_url("gs://b")
    assert not objectstore.is_url("file:///tmp/x") and not objectstore.is_url("/tmp/x")
    assert objectstore.local_path("file:///tmp/x") == "/tmp/x"
    assert storage.location("s3://b/x/") == "s3://b/x"
    assert str(storage.location("file:///tmp/x")) == "/tmp/x"
    assert storage.join("s3://b/x", "manifest.json") == "s3://b/x/manifest.json"
    assert objectstore.split("s3://b/x/y") == ("s3://b/x", "y")


def test_local_or_remote_is_decided_by_the_location_alone():
    """storage/__init__.py decides, and objectstore's names are the same code: a Path is
    local whatever it spells, a str by its scheme (file:// and local:// are local)."""
    from pathlib import Path, PurePosixPath

    from dckpt import storage
    assert objectstore.is_url is storage.is_remote and objectstore.local_path is storage.local_path
    p = Path("s3://not/a/url")  # a Path is never a URL, even one that reads like it
    assert not storage.is_remote(p) and storage.location(p) is p
    assert storage.join(p, "m.json") == p / "m.json"
    assert storage.location(PurePosixPath("/tmp/x")) == Path("/tmp/x")
    assert storage.location("/tmp/x") == Path("/tmp/x")
    assert storage.location("FILE:///tmp/x") == Path("/tmp/x")
    assert storage.location("local:///tmp/x") == Path("/tmp/x")
    assert storage.location("file://") == Path("/")
    assert storage.local_path("gs://b/x") is None and storage.location("GS://b/x//") == "GS://b/x"
    assert storage.is_remote("s3+https://b/x") and not storage.is_remote("s3:/b/x")
    assert not storage.is_remote("rel/s3://x") and storage.location("rel/s3://x") == Path(
        "rel/s3://x")
    assert storage.join("s3://b/x/", "m.json") == "s3://b/x/m.json"


def test_server_gone_is_retried_then_a_typed_error_without_secrets(tmp_path, monkeypatch,
                                                                   caplog):
    """An upload whose server goes away midway is retried with backoff, then fails with a
    RemoteStorageError naming the object; neither it nor the log lines carry the secret."""
    endpoint, proc = s3server.start()
    secret = "S3cr3t-Value-that-must-not-leak"
    bucket = s3server.new_bucket(endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)  # moto accepts any key
    monkeypatch.setenv("DCKPT_REMOTE_RETRIES", "3")
    monkeypatch.setenv("DCKPT_REMOTE_BACKOFF", "0.05")
    st = objectstore.connect(f"s3://{bucket}/x", {**QUICK, "key": "testing", "secret": secret})
    f = tmp_path / "f"
    np.random.default_rng(1).integers(0, 256, 96 << 20, dtype=np.uint8).tofile(f)
    killer = threading.Timer(0.3, proc.kill)
    caplog.set_level(logging.WARNING, logger="dckpt.storage")
    try:
        killer.start()
        t0 = time.monotonic()
        with pytest.raises(RemoteStorageError) as e:
            st.put_file(f, f"s3://{bucket}/x/data", part_size=5 << 20, concurrency=1)
    finally:
        killer.cancel()
        proc.kill()
        proc.wait()
    assert time.monotonic() - t0 < 60
    assert e.value.retried == 3 and e.value.operation == "PUT"
    assert f"s3://{bucket}/x/data" in str(e.value)
    retries = [r for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 2  # two waits between three tries
    text = str(e.value) + repr(e.value) + "".join(r.getMessage() for r in caplog.records)
    assert secret not in text
    assert objectstore.redact(f"x {secret} s3://u:{secret}@b", {"secret": secret}) == \
        "x *** s3://***@b"


def test_connection_refused_is_retried_then_typed(monkeypatch):
    endpoint, proc = s3server.start()
    proc.kill()
    proc.wait()
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("DCKPT_REMOTE_RETRIES", "2")
    monkeypatch.setenv("DCKPT_REMOTE_BACKOFF", "0.01")
    st = objectstore.connect("s3://nobucket/x", {**QUICK, "key": "k1", "secret": "s1"})
    with pytest.raises(RemoteStorageError, match="after 2 tries") as e:
        st.put_bytes("s3://nobucket/x/m", b"{}")
    assert e.value.path == "s3://nobucket/x/m"
    # Through dckpt.save and dckpt.load: the same typed error, nothing left behind.
    opts = {**QUICK, "key": "k1", "secret": "s1"}
    with pytest.raises(RemoteStorageError, match="s3://nobucket/ck"):
        dckpt.save(state(), "s3://nobucket/ck", storage_options=opts)
    with pytest.raises(RemoteStorageError):
        dckpt.load("s3://nobucket/ck", storage_options=opts)


def test_a_missing_bucket_is_not_retried(s3_endpoint, monkeypatch):
    monkeypatch.setenv("DCKPT_REMOTE_BACKOFF", "5")  # a retry would show in the time
    st = objectstore.connect("s3://no-such-bucket-dckpt/x")
    t0 = time.monotonic()
    with pytest.raises((RemoteStorageError, FileNotFoundError)):
        st.put_bytes("s3://no-such-bucket-dckpt/x/m", b"{}")
    assert time.monotonic() - t0 < 4


# ---- save / load ---------------------------------------------------------------------

@pytest.mark.parametrize("compression", [None, "zstd"])
def test_save_load_bitwise(s3_bucket, compression):
    url = f"s3://{s3_bucket}/run/ck"
    st = state()
    res = dckpt.save(st, url, compression=compression, chunk_size=64 << 10, threads=2)
    assert res.path == url
    m = dckpt.read_manifest(url)
    assert m.files[0].name == "rank-00000.dckpt" and m.total_bytes == res.bytes
    out = dckpt.load(url)
    assert_bitwise(out, st)
    assert out["meta"] == st["meta"]
    live = zeros_like(st)
    dckpt.load(url, into=live)
    assert_bitwise(live, st)
    # Nothing but the checkpoint's own objects; no spool file left on the node.
    keys = sorted(o["Key"] for o in s3(os.environ["AWS_ENDPOINT_URL"]).list_objects_v2(
        Bucket=s3_bucket)["Contents"])
    assert keys == ["run/ck/manifest.json", "run/ck/rank-00000.dckpt"]


def test_storage_options_and_file_urls(s3_endpoint, s3_bucket, tmp_path):
    st = state(1)
    opts = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    dckpt.save(st, f"s3://{s3_bucket}/o", storage_options=opts)
    assert_bitwise(dckpt.load(f"s3://{s3_bucket}/o", storage_options=opts), st)
    assert dckpt.read_manifest(f"s3://{s3_bucket}/o", storage_options=opts).world_size == 1
    dckpt.save(st, f"file://{tmp_path}/local")
    assert (tmp_path / "local" / "manifest.json").is_file()
    assert_bitwise(dckpt.load(f"file://{tmp_path}/local"), st)


def test_exists_overwrite_and_absent(s3_bucket):
    url = f"s3://{s3_bucket}/ck"
    with pytest.raises(CheckpointNotFoundError):
        dckpt.read_manifest(url)
    dckpt.save(state(0), url)
    with pytest.raises(CheckpointExistsError):
        dckpt.save(state(1), url)
    assert_bitwise(dckpt.load(url), state(0))
    dckpt.save(state(2), url, overwrite=True)
    assert_bitwise(dckpt.load(url), state(2))


def test_debris_without_manifest_is_absent_and_replaced(s3_endpoint, s3_bucket):
    """A prefix holding data objects but no manifest (an upload that died) is not a
    checkpoint to any reader, and a new save there replaces the debris."""
    c = s3(s3_endpoint)
    c.put_object(Bucket=s3_bucket, Key="ck/rank-00000.dckpt", Body=b"x" * 100)
    c.put_object(Bucket=s3_bucket, Key="ck/rank-00007.dckpt", Body=b"junk")
    with pytest.raises(CheckpointNotFoundError):
        dckpt.load(f"s3://{s3_bucket}/ck")
    dckpt.save(state(3), f"s3://{s3_bucket}/ck")
    keys = sorted(o["Key"] for o in c.list_objects_v2(Bucket=s3_bucket)["Contents"])
    assert keys == ["ck/manifest.json", "ck/rank-00000.dckpt"]
    assert_bitwise(dckpt.load(f"s3://{s3_bucket}/ck"), state(3))


def _flip(c, bucket: str, key: str, offset: int) -> None:
    body = bytearray(c.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[offset] ^= 0x10
    c.put_object(Bucket=bucket, Key=key, Body=bytes(body))


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_flipped_bit_is_found_naming_tensor_and_chunk(s3_endpoint, s3_bucket, compression):
    url = f"s3://{s3_bucket}/ck"
    st = state()
    dckpt.save(st, url, compression=compression, chunk_size=64 << 10)
    m = dckpt.read_manifest(url)
    ch = m.tensors["model/w"].shards[0].chunks[2]
    _flip(s3(s3_endpoint), s3_bucket, "ck/rank-00000.dckpt", ch.offset + ch.stored // 2)
    with pytest.raises(CorruptCheckpointError) as e:
        dckpt.load(url, into=zeros_like(st))
    assert e.value.tensor == "model/w" and e.value.chunk == 2
    assert "model/w" in str(e.value) and "chunk 2" in str(e.value)
    assert url + "/rank-00000.dckpt" in str(e.value)
    from dckpt.tools.verify import verify
    rep = verify(url, deep=compression is not None)  # deep: decoded natively from a spool
    assert not rep.ok
    bad = [c for r in rep.checkpoints for c in r.checks if c.level == "error"]
    assert len(bad) == 1 and bad[0].location.tensor == "model/w" and bad[0].location.chunk == 2


def test_truncated_object_is_incomplete(s3_endpoint, s3_bucket):
    url = f"s3://{s3_bucket}/ck"
    dckpt.save(state(), url)
    c = s3(s3_endpoint)
    body = c.get_object(Bucket=s3_bucket, Key="ck/rank-00000.dckpt")["Body"].read()
    c.put_object(Bucket=s3_bucket, Key="ck/rank-00000.dckpt", Body=body[:1000])
    with pytest.raises(IncompleteCheckpointError, match="truncated"):
        dckpt.load(url)


def test_hostile_manifest_objects_are_refused_before_allocating(s3_endpoint, s3_bucket,
                                                              monkeypatch):
    c = s3(s3_endpoint)
    url = f"s3://{s3_bucket}/ck"
    dckpt.save(state(), url)
    # Garbage: a typed error, not a crash.
    c.put_object(Bucket=s3_bucket, Key="ck/manifest.json", Body=b"\x00\xff" * 1000)
    with pytest.raises(ManifestError):
        dckpt.load(url)
    # Huge: refused by its size (a HEAD), never downloaded. A low limit stands in for
    # the real 512 MiB one, which would take the loopback server too long to hold.
    monkeypatch.setattr(remote, "MAX_MANIFEST_BYTES", 1 << 20)
    c.put_object(Bucket=s3_bucket, Key="ck/manifest.json", Body=b" " * (4 << 20))
    import tracemalloc
    tracemalloc.start()
    with pytest.raises(ManifestError, match="size"):
        dckpt.read_manifest(url)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20  # the request's own overhead, not the 4 MiB object
    monkeypatch.undo()
    # A valid (sealed) manifest that declares a tensor far larger than its object holds:
    # refused by the object's size (a HEAD) before the tensor is allocated.
    dckpt.save({"w": torch.zeros(10)}, f"s3://{s3_bucket}/small")
    m = json.loads(c.get_object(Bucket=s3_bucket, Key="small/manifest.json")["Body"].read())
    m["files"][0]["size"] = 1 << 36
    m["tensors"]["w"]["shape"] = m["tensors"]["w"]["shards"][0]["shape"] = [1 << 34]
    ch = m["tensors"]["w"]["shards"][0]["chunks"][0]
    ch[2] = ch[3] = 1 << 30
    m["tensors"]["w"]["shards"][0]["chunks"] = [[0, i << 30, 1 << 30, 1 << 30, 0, ch[5],
                                                 ch[6]] for i in range(64)]
    c.put_object(Bucket=s3_bucket, Key="small/manifest.json", Body=attacks.seal(m))
    tracemalloc.start()
    with pytest.raises(IncompleteCheckpointError, match="truncated"):
        dckpt.load(f"s3://{s3_bucket}/small")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 << 20


def test_upload_checkpoint_commits_a_local_one_manifest_last(s3_bucket, tmp_path):
    """A committed local checkpoint copied by the save's protocol: loads bitwise, the
    manifest bytes are the local ones; a local one with a missing file is refused before
    the manifest goes up, and what was uploaded is removed."""
    st = state(4)
    dckpt.save(st, tmp_path / "ck", chunk_size=64 << 10)
    (tmp_path / "ck" / "records-r0.json").write_text("{}")  # any other file travels too
    backend = remote.for_url(f"s3://{s3_bucket}")
    url = f"s3://{s3_bucket}/up/ck"
    names = backend.upload_checkpoint(tmp_path / "ck", url)
    assert names == ["rank-00000.dckpt", "records-r0.json"]
    assert_bitwise(dckpt.load(url), st)
    assert backend.store.get_bytes(f"{url}/manifest.json", 1 << 20) == \
        (tmp_path / "ck" / "manifest.json").read_bytes()
    with pytest.raises(CheckpointExistsError):
        backend.upload_checkpoint(tmp_path / "ck", url)
    (tmp_path / "ck" / "rank-00000.dckpt").unlink()
    with pytest.raises(IncompleteCheckpointError):
        backend.upload_checkpoint(tmp_path / "ck", f"s3://{s3_bucket}/up/broken")
    assert backend.store.list(f"s3://{s3_bucket}/up/broken") == []


def test_local_use_imports_no_object_store_client(tmp_path):
    """Local saves and loads, by Path, str and file:// URL, never import the object store
    client module (so none of its code runs), let alone fsspec or a cloud SDK."""
    import subprocess
    import sys
    code = ("import sys, pathlib, torch, dckpt; p = sys.argv[1]; "
            "dckpt.save({'a': torch.zeros(3)}, p); dckpt.load(p); "
            "dckpt.save({'a': torch.ones(3)}, pathlib.Path(p), overwrite=True); "
            "dckpt.load(pathlib.Path(p)); dckpt.read_manifest('file://' + p); "
            "dckpt.load('file://' + p); "
            "print(sorted(m for m in ('fsspec', 's3fs', 'obstore', 'botocore', "
            "'dckpt.storage.objectstore', 'dckpt.storage.remote') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ck")], check=True,
                         capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout
    assert out.strip() == "[]"


def test_a_save_never_deletes_what_is_not_a_checkpoint(s3_bucket):
    """A save onto a prefix holding deeper objects (a root of steps) or onto a bucket is
    refused, with or without overwrite, and deletes nothing."""
    dckpt.save(state(1), f"s3://{s3_bucket}/root/step-000000001")
    for overwrite in (False, True):
        with pytest.raises(CheckpointExistsError, match="other objects"):
            dckpt.save(state(2), f"s3://{s3_bucket}/root", overwrite=overwrite)
    with pytest.raises(StorageError, match="bucket"):
        dckpt.save(state(2), f"s3://{s3_bucket}/", overwrite=True)
    assert_bitwise(dckpt.load(f"s3://{s3_bucket}/root/step-000000001"), state(1))

"""The command line on checkpoints in object storage: dckpt ls | inspect | verify | diff |
gc with s3:// URLs on the loopback server, and --storage-option."""
from __future__ import annotations

import json

import boto3
import pytest
import torch

import dckpt
from helpers import s3server
from dckpt.cli import main
from dckpt.storage import objectstore


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(64, 1024, generator=g), "b": torch.zeros(3) + seed}}


@pytest.fixture
def root(s3_endpoint, s3_bucket):
    """A root with two committed steps and the debris of an upload that never committed."""
    url = f"s3://{s3_bucket}/run"
    for step in (1, 2):
        dckpt.save(_state(step), f"{url}/step-{step:09d}", chunk_size=64 << 10,
                   counters={"step": step}, metrics={"loss": 1.0 / step})
    c = boto3.client("s3", **s3server._boto_args(s3_endpoint))
    c.put_object(Bucket=s3_bucket, Key="run/step-000000003/rank-00000.dckpt", Body=b"x" * 64)
    return url


def _json(capsys, *argv) -> tuple[int, dict]:
    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_ls_inspect_verify_diff(root, capsys, s3_endpoint):
    code, doc = _json(capsys, "ls", root)
    assert code == 0
    assert [(e["step"], e["status"]) for e in doc["checkpoints"]] == [
        (1, "committed"), (2, "committed"), (3, "incomplete")]
    assert doc["latest"] == 2 and doc["checkpoints"][1]["metrics"] == {"loss": 0.5}
    code, doc = _json(capsys, "inspect", root)  # a root: its newest committed step
    assert code == 0 and doc["path"].endswith("/run/step-000000002")
    code, doc = _json(capsys, "verify", root)
    assert code == 0 and doc["ok"] and doc["latest"] == 2
    assert any("without a manifest" in c["message"] for c in doc["checks"])
    code, doc = _json(capsys, "diff", f"{root}/step-000000001", f"{root}/step-000000002")
    assert code == 1 and doc["tensors"]
    # A flipped bit: verify names the tensor and chunk, and fails.
    c = boto3.client("s3", **s3server._boto_args(s3_endpoint))
    bucket, key = root[5:].split("/", 1)
    m = dckpt.read_manifest(f"{root}/step-000000002")
    ch = m.tensors["model/w"].shards[0].chunks[1]
    obj = f"{key}/step-000000002/{m.files[ch.file].name}"
    body = bytearray(c.get_object(Bucket=bucket, Key=obj)["Body"].read())
    body[ch.offset + 5] ^= 1
    c.put_object(Bucket=bucket, Key=obj, Body=bytes(body))
    code, doc = _json(capsys, "verify", f"{root}/step-000000002")
    assert code == 1
    bad = [c for ck in doc["checkpoints"] for c in ck["checks"] if c["level"] == "error"]
    assert len(bad) == 1 and bad[0]["location"]["tensor"] == "model/w"
    assert bad[0]["location"]["chunk"] == 1
    code, doc = _json(capsys, "ls", root, "--verify")
    assert code == 1
    assert [e["status"] for e in doc["checkpoints"]] == ["verified", "corrupt", "incomplete"]


def test_gc_applies_retention_and_removes_old_debris(root, capsys):
    code, doc = _json(capsys, "gc", root, "--keep-last", "1", "--dry-run")
    assert code == 0 and doc["removed_steps"] == [1] and doc["removed_temporaries"] == []
    code, doc = _json(capsys, "gc", root, "--keep-last", "1", "--older-than", "0")
    assert doc["removed_steps"] == [1] and doc["removed_temporaries"] == ["step-000000003"]
    left = sorted(o.url[len(root) + 1:] for o in objectstore.connect(root).list(root))
    assert left == ["step-000000002/manifest.json", "step-000000002/rank-00000.dckpt"]
    assert torch.equal(dckpt.load(f"{root}/step-000000002")["model"]["w"], _state(2)["model"]["w"])


def test_storage_option_names_the_endpoint(root, capsys, monkeypatch, s3_endpoint):
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    objectstore._STORES.clear()
    try:
        code, doc = _json(capsys, "inspect", f"{root}/step-000000001",
                          "--storage-option", f"endpoint_url={s3_endpoint}")
        assert code == 0 and doc["counters"]["step"] == 1
        assert main(["ls", root, "--storage-option", "oops"]) == 2
    finally:
        objectstore.configure(None)
        objectstore._STORES.clear()

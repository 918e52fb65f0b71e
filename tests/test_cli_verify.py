"""dckpt verify on good and damaged checkpoints: exit codes, what is named, the JSON schema."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import dckpt
from helpers.cli import build_state, copy, key_paths, make_root, run_cli, run_json, sharded_root
from helpers import flip_bit
from dckpt.format.reader import read_manifest
from dckpt.tools.verify import verify


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_root(tmp_path_factory.mktemp("verify") / "run", saves=(5, 10))


@pytest.fixture
def ckpt(root, tmp_path) -> Path:
    return copy(root / "step-000000010", tmp_path / "step-000000010")


# The JSON report's key set. A change here is a schema change: bump SCHEMA and say so.
GOLDEN_KEYS = {
    "schema", "path", "kind", "deep", "strict", "ok", "status", "latest", "summary",
    "summary.passed", "summary.warnings", "summary.errors", "checks", "checkpoints",
    "checkpoints[].path", "checkpoints[].step", "checkpoints[].status", "checkpoints[].ok",
    "checkpoints[].summary", "checkpoints[].summary.passed", "checkpoints[].summary.warnings",
    "checkpoints[].summary.errors", "checkpoints[].checks", "checkpoints[].ranks",
    "checkpoints[].stats",
    *(f"checkpoints[].checks[].{k}" for k in ("group", "id", "level", "message", "location")),
    *(f"checkpoints[].checks[].location.{k}" for k in
      ("file", "rank", "tensor", "shard", "chunk", "offset")),
    *(f"checkpoints[].ranks[].{k}" for k in ("rank", "components", "rng_streams", "missing")),
    *(f"checkpoints[].stats.{k}" for k in
      ("tensors", "files", "chunks", "chunks_checked", "bytes_checked", "seconds")),
}


def _component_keys(doc: dict) -> set[str]:
    return {p for p in key_paths(doc) if not p.startswith("checkpoints[].ranks[].components.")}


def test_good_checkpoint_is_complete(ckpt):
    code, out, _ = run_cli("verify", ckpt)
    assert code == 0, out
    assert "COMPLETE" in out and "VERIFICATION PASSED" in out
    for group in ("structure", "data files", "checksums", "metadata consistency",
                  "training-state consistency", "completeness"):
        assert group in out
    assert "mid-epoch checkpoint" in out  # 10 steps of 8 batches per epoch
    assert "\033[" not in out  # plain when not a terminal
    code, doc = run_json("verify", ckpt)
    assert code == 0 and doc["ok"] and doc["status"] == "COMPLETE"
    assert doc["summary"]["errors"] == doc["summary"]["warnings"] == 0
    ids = {c["id"] for c in doc["checkpoints"][0]["checks"]}
    assert {"structure.manifest", "files.present", "checksums.chunk", "metadata.position",
            "training.optimizer_steps", "training.scheduler_steps", "training.lr",
            "completeness.parts"} <= ids
    assert doc["checkpoints"][0]["ranks"][0]["missing"] == []


def test_json_schema_is_stable(ckpt, root):
    for path in (ckpt, root):
        _, doc = run_json("verify", path)
        assert doc["schema"] == "dckpt.verify/1"
        assert _component_keys(doc) == GOLDEN_KEYS | ({"checks[].group", "checks[].id",
                                                        "checks[].level", "checks[].message",
                                                        "checks[].location",
                                                        *(f"checks[].location.{k}" for k in (
                                                            "file", "rank", "tensor", "shard",
                                                            "chunk", "offset"))}
                                                       if path == root else set())


def test_root_verifies_every_step(root):
    code, doc = run_json("verify", root)
    assert code == 0 and doc["kind"] == "root" and doc["latest"] == 10
    assert [c["step"] for c in doc["checkpoints"]] == [5, 10]
    assert {c["id"] for c in doc["checks"]} == {"root.steps", "root.latest"}
    code, doc = run_json("verify", root, "--latest")
    assert code == 0 and [c["step"] for c in doc["checkpoints"]] == [10]


def test_corrupted_chunk_names_file_tensor_chunk_and_offset(ckpt):
    m = read_manifest(ckpt)
    name = "model/0.weight"
    chunk = m.tensors[name].shards[0].chunks[0]
    flip_bit(ckpt / "rank-00000.dckpt", chunk.offset + 7, 6)
    code, out, _ = run_cli("verify", ckpt)
    assert code == 1 and "VERIFICATION FAILED" in out
    assert f"tensor '{name}' chunk 0 in rank-00000.dckpt at offset {chunk.offset}" in out
    _, doc = run_json("verify", ckpt)
    bad = [c for c in doc["checkpoints"][0]["checks"] if c["level"] == "error"]
    assert len(bad) == 1 and bad[0]["id"] == "checksums.chunk"
    assert bad[0]["location"] == {"file": "rank-00000.dckpt", "rank": 0, "tensor": name,
                                  "shard": 0, "chunk": 0, "offset": chunk.offset}
    assert doc["status"] == "INCOMPLETE"


def test_deep_decodes_compressed_chunks(tmp_path):
    state = {"model": {"w": torch.randn(64, 1024)}}
    res = dckpt.save(state, tmp_path / "z", compression="zstd", chunk_size=64 << 10)
    code, doc = run_json("verify", res.path, "--deep")
    assert doc["deep"] and not [c for c in doc["checkpoints"][0]["checks"]
                                if c["level"] == "error"]
    chunk = res.manifest.tensors["model/w"].shards[0].chunks[2]
    flip_bit(res.path / "rank-00000.dckpt", chunk.offset + chunk.stored // 2, 6)
    code, doc = run_json("verify", res.path, "--deep")
    loc = [c["location"] for c in doc["checkpoints"][0]["checks"] if c["level"] == "error"]
    assert code == 1 and loc == [{"file": "rank-00000.dckpt", "rank": 0, "tensor": "model/w",
                                  "shard": 0, "chunk": 2, "offset": chunk.offset}]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    return sharded_root(tmp_path_factory.mktemp("sharded") / "run") / "step-000000001"


def test_sharded_checkpoint_verifies(sharded):
    code, doc = run_json("verify", sharded)
    ck = doc["checkpoints"][0]
    assert code == 0 and ck["stats"]["files"] == 2 and len(ck["ranks"]) == 2
    assert [r["missing"] for r in ck["ranks"]] == [["scheduler", "data"]] * 2


def test_corrupt_shard_names_its_rank_and_shard(sharded, tmp_path):
    path = copy(sharded, tmp_path / "ck")
    m = read_manifest(path)
    shard = m.tensors["model/0.weight"].shards[1]
    f = m.files[shard.chunks[0].file]
    flip_bit(path / f.name, shard.chunks[0].offset, 6)
    code, doc = run_json("verify", path)
    (bad,) = [c for c in doc["checkpoints"][0]["checks"] if c["level"] == "error"]
    assert code == 1 and bad["location"] == {"file": f.name, "rank": 1, "tensor": "model/0.weight",
                                             "shard": 1, "chunk": 0,
                                             "offset": shard.chunks[0].offset}


def test_missing_rank_file(sharded, tmp_path):
    path = copy(sharded, tmp_path / "ck")
    (path / "rank-00001.dckpt").unlink()
    code, out, _ = run_cli("verify", path)
    assert code == 1
    assert "rank-00001.dckpt (rank 1) is missing" in out and "'model/0.weight'" in out
    _, doc = run_json("verify", path)
    errors = [c for c in doc["checkpoints"][0]["checks"] if c["level"] == "error"]
    assert [e["id"] for e in errors] == ["files.present"]
    assert errors[0]["location"]["rank"] == 1
    # rank 0's chunks are still checked; rank 1's are not reported chunk by chunk
    stats = doc["checkpoints"][0]["stats"]
    assert 0 < stats["chunks_checked"] < stats["chunks"]


def test_empty_data_file(ckpt):
    (ckpt / "rank-00000.dckpt").write_bytes(b"")
    code, out, _ = run_cli("verify", ckpt)
    assert code == 1 and "rank-00000.dckpt (rank 0) is empty" in out


def test_truncated_file_names_lost_chunks(ckpt):
    data = ckpt / "rank-00000.dckpt"
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size - 100)
    _, doc = run_json("verify", ckpt)
    checks = doc["checkpoints"][0]["checks"]
    assert any(c["id"] == "files.size" and "truncated" in c["message"] for c in checks)
    lost = [c for c in checks if c["id"] == "checksums.chunk" and c["level"] == "error"]
    assert lost and all("past the end" in c["message"] for c in lost)


def test_truncated_manifest(ckpt):
    mpath = ckpt / "manifest.json"
    mpath.write_bytes(mpath.read_bytes()[:200])
    code, out, _ = run_cli("verify", ckpt)
    assert code == 1 and "truncated?" in out and "manifest.json" in out
    _, doc = run_json("verify", ckpt)
    assert doc["checkpoints"][0]["checks"][0]["id"] == "structure.manifest"


def test_missing_manifest(ckpt):
    (ckpt / "manifest.json").unlink()
    code, out, _ = run_cli("verify", ckpt)
    assert code == 1 and "not a committed checkpoint" in out


def test_optimizer_step_mismatch(tmp_path):
    state = build_state()
    from helpers.cli import train
    train(state, 7, [])
    mgr = dckpt.CheckpointManager(tmp_path / "run", fsync=False)
    # The run claims step 3 although the optimizer has stepped 7 times.
    mgr.save(3, state, epoch=0, step_in_epoch=3)
    path = mgr.path(3)
    code, out, _ = run_cli("verify", path)
    assert code == 0 and "optimizer 'optimizer' has taken 7 step(s), the global step is 3" in out
    code, doc = run_json("verify", path, "--strict")
    assert code == 1 and not doc["ok"] and doc["strict"]
    warn = [c for c in doc["checkpoints"][0]["checks"] if c["level"] == "warning"]
    assert {c["id"] for c in warn} >= {"training.optimizer_steps", "metadata.data_position"}


def test_gradient_accumulation_is_consistent(tmp_path):
    state = build_state()
    from helpers.cli import train
    train(state, 5, [])
    mgr = dckpt.CheckpointManager(tmp_path / "run", fsync=False)
    mgr.save(20, state, counters={"grad_accum": 4})
    _, doc = run_json("verify", mgr.path(20))
    opt = [c for c in doc["checkpoints"][0]["checks"] if c["id"] == "training.optimizer_steps"]
    assert opt[0]["level"] == "pass" and "accumulation over 4" in opt[0]["message"]


def test_missing_scheduler_and_rng_is_partial(tmp_path):
    state = build_state()
    del state["scheduler"]
    res = dckpt.save(state, tmp_path / "ckpt", counters={"step": 0, "epoch": 0,
                                                         "step_in_epoch": 0})
    code, doc = run_json("verify", res.path)
    assert code == 0 and doc["status"] == "PARTIAL"
    ids = {c["id"] for c in doc["checkpoints"][0]["checks"] if c["level"] == "warning"}
    assert {"completeness.scheduler", "completeness.rng"} <= ids
    assert doc["checkpoints"][0]["ranks"][0]["missing"] == ["scheduler", "rng"]
    code, out, _ = run_cli("verify", res.path, "--strict")
    assert code == 1 and "PARTIAL" in out and "--strict" in out


def test_stale_latest_and_temporaries_are_warnings(root, tmp_path):
    r = copy(root, tmp_path / "run")
    (r / "latest").write_text("step-000000005\n")
    (r / ".step-000000015.tmp-0123456789ab").mkdir()
    code, doc = run_json("verify", r)
    assert code == 0
    levels = {c["id"]: c["level"] for c in doc["checks"]}
    assert levels["root.latest"] == "warning" and levels["root.temporaries"] == "warning"


@pytest.mark.parametrize("make", ["missing", "file", "empty_dir"])
def test_unreadable_input_exits_2(tmp_path, make):
    target = tmp_path / "x"
    if make == "file":
        target.write_text("hello")
    elif make == "empty_dir":
        target.mkdir()
    code, _, err = run_cli("verify", target)
    assert code == 2 and err


def test_usage_errors_exit_2():
    assert run_cli("verify")[0] == 2
    assert run_cli("no-such-command")[0] == 2
    assert run_cli("verify", ".", "--bogus")[0] == 2
    assert run_cli("--help")[0] == 0


def test_library_report_matches_cli(ckpt):
    report = verify(ckpt)
    _, doc = run_json("verify", ckpt)
    assert json.loads(json.dumps(report.to_json()))["summary"] == doc["summary"]


def test_color_and_progress(ckpt, capsys):
    from dckpt.cli.output import Progress
    code, out, _ = run_cli("verify", ckpt, "--color", "always")
    assert code == 0 and "\033[32" in out
    import io
    stream = io.StringIO()
    bar = Progress("verifying", force=True, delay=0, stream=stream)
    bar(50, 100)
    bar(100, 100)
    bar.close()
    assert "50%" in stream.getvalue() and "100%" in stream.getvalue()



def test_damaged_step_count_is_reported_when_checksums_are_skipped(tmp_path):
    """The step counts are read and checked by hash even without the checksum pass."""
    from helpers.cli import train
    state = build_state()
    train(state, 2, [])
    res = dckpt.save(state, tmp_path / "ckpt", counters={"step": 2})
    good = verify(res.path, checksums=False).checkpoints[0]
    steps = [c for c in good.checks if c.id == "training.optimizer_steps"]
    assert steps and all(c.level == "pass" for c in steps)
    m = read_manifest(res.path)
    name = next(n for n in m.tensors if n.endswith("/step"))
    ch = m.tensors[name].shards[0].chunks[0]
    flip_bit(res.path / m.files[ch.file].name, ch.offset, 6)
    bad = verify(res.path, checksums=False).checkpoints[0]
    errors = [c for c in bad.checks if c.id == "training.optimizer_steps" and c.level == "error"]
    assert len(errors) == 1 and "cannot read step count" in errors[0].message
    assert "fail their hash" in errors[0].message


def test_step_count_reader_closes_its_descriptors(sharded):
    """The step-count reader keeps a descriptor per data file for the whole check (one
    open for hundreds of scalars) and closes them all when the check ends."""
    before = len(os.listdir("/proc/self/fd"))
    report = verify(sharded, checksums=False).checkpoints[0]
    assert len(os.listdir("/proc/self/fd")) == before
    steps = [c for c in report.checks if c.id == "training.optimizer_steps"]
    assert steps and all(c.level == "pass" for c in steps)

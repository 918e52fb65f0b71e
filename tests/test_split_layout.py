"""The split layout (format version 3): an index plus one record file per rank.

Round trips at 1, 2 and 4 real gloo ranks, bitwise; which record files a rank reads on a
same-world-size resume and when resharding 4 -> 2 and 2 -> 4; a damaged record file named
by verify and by load; an old single-manifest checkpoint still loading; a repeated save of
the same layout reusing the agreed plan and sending fewer bytes."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import dckpt
from dckpt.errors import CorruptCheckpointError
from dckpt.format import reader
from dckpt.format.manifest import MANIFEST_NAME
from dckpt.tools.verify import verify, verify_checkpoint
from helpers.ranks import run_with_ranks

SHAPES = {"w1": (16, 3), "w2": (32,), "w3": (16, 2, 2), "w4": (8, 5)}  # rows divide 1, 2, 4


def global_value(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return torch.randn(SHAPES[name], generator=g)


def state_for(rank: int, world: int, fill: bool, extra: int = 0) -> dict:
    """FSDP2-like: every weight a DTensor sharded over all ranks by rows, plus a replicated
    tensor, a per-rank tensor and one only rank 0 holds."""
    names = list(SHAPES) + [f"x{i}" for i in range(extra)]
    for i in range(extra):
        SHAPES[f"x{i}"] = (8,)

    def value(n):
        return global_value(n) if fill else torch.zeros(SHAPES[n])
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor
        mesh = init_device_mesh("cpu", (world,))
        model = {n: distribute_tensor(value(n), mesh, [Shard(0)]) for n in names}
    else:
        model = {n: value(n) for n in names}
    state = {"model": model, "rep": torch.arange(6.0) if fill else torch.zeros(6),
             "mine": torch.full((3,), float(rank)) if fill else torch.zeros(3),
             "step": 5 if fill else 0}
    if rank == 0:
        state["only0"] = torch.arange(4.0) * 7 if fill else torch.zeros(4)
    return state


def check_state(state: dict, rank: int, saved_world: int) -> list[str]:
    """What differs from what the save wrote, bitwise; [] when all is right."""
    from dckpt.distributed.sharding import is_dtensor, local_block
    bad = []
    for n, t in state["model"].items():
        if is_dtensor(t):
            local, _, offsets = local_block(t)
            want = global_value(n)[offsets[0]:offsets[0] + local.shape[0]]
        else:
            local, want = t, global_value(n)
        if local.numpy().tobytes() != want.numpy().tobytes():
            bad.append(n)
    src = rank if rank < saved_world else 0
    if not torch.equal(state["mine"], torch.full((3,), float(src))):
        bad.append("mine")
    if not torch.equal(state["rep"], torch.arange(6.0)) or state["step"] != 5:
        bad.append("rep/step")
    if "only0" in state and not torch.equal(state["only0"], torch.arange(4.0) * 7):
        bad.append("only0")
    return bad


def counting_record_reads():
    """Instrument the record file reader of this process: the names it opens, in order."""
    import dckpt.format.manifest as mf
    seen: list[str] = []
    real = mf._read_record

    def counted(path, ref):
        seen.append(Path(path).name)
        return real(path, ref)
    mf._read_record = counted
    return seen


def rank_save(rank, world, path, layout="split"):
    res = dckpt.save(state_for(rank, world, True), path, layout=layout)
    return {"reused": res.plan_reused, "sent": res.sent_bytes, "received": res.received_bytes,
            "metadata": res.metadata_bytes}


def rank_load(rank, world, path, saved_world):
    seen = counting_record_reads()
    live = state_for(rank, world, False)
    dckpt.load(path, into=live)
    return {"bad": check_state(live, rank, saved_world), "records": sorted(set(seen))}


@pytest.mark.parametrize("world", [2, 4])
def test_round_trip_bitwise_reads_only_own_record(tmp_path, world):
    path = str(tmp_path / "c")
    run_with_ranks(world, rank_save, path)
    names = sorted(p.name for p in Path(path).iterdir())
    assert [n for n in names if n.startswith("records-")] == [
        f"records-{r:05d}.json" for r in range(world)]
    index = json.loads((Path(path) / MANIFEST_NAME).read_text())
    assert index["version"] == 3 and "ranks" not in index
    assert len(index["records"]["sizes"]) == world
    assert set(index["tensors"]) == {"rep"}  # the replicated tensor: in the index
    assert index["owned"] == {"only0": 0}
    got = run_with_ranks(world, rank_load, path, world)
    for r, g in enumerate(got):
        assert g["bad"] == [], (r, g)
        assert g["records"] == [f"records-{r:05d}.json"], (r, g)  # its own, nothing else
    # The reference reader (numpy, zstandard, xxhash) reads the whole split checkpoint.
    m = reader.read_manifest(path)
    for n in SHAPES:
        if not n.startswith("x"):
            assert reader.read_tensor_bytes(path, m, f"model/{n}").tobytes() == \
                global_value(n).numpy().tobytes()
    assert reader.read_tensor_bytes(path, m, "rep").tobytes() == torch.arange(6.0).numpy().tobytes()
    assert verify(path).ok


def test_round_trip_one_process(tmp_path):
    path = tmp_path / "c"
    rank_save(0, 1, path)
    assert (path / "records-00000.json").is_file()
    seen = counting_record_reads()
    live = state_for(0, 1, False)
    dckpt.load(path, into=live)
    assert check_state(live, 0, 1) == [] and seen == ["records-00000.json"]


@pytest.mark.parametrize("saved, loaded, reads", [
    (4, 2, [["records-00000.json", "records-00001.json"],
            ["records-00001.json", "records-00002.json", "records-00003.json"]]),
    (2, 4, [["records-00000.json"], ["records-00000.json", "records-00001.json"],
            ["records-00000.json", "records-00001.json"],
            ["records-00000.json", "records-00001.json"]]),
])
def test_reshard_reads_overlapping_records(tmp_path, saved, loaded, reads):
    path = str(tmp_path / "c")
    run_with_ranks(saved, rank_save, path)
    got = run_with_ranks(loaded, rank_load, path, saved)
    for r, g in enumerate(got):
        assert g["bad"] == [], (r, g)
    # New rank 0 of 2 needs rows [0, 1/2): old ranks 0 and 1 only. New rank 1 reads its
    # per-rank state from old rank 1 and rows [1/2, 1) from old ranks 2 and 3.
    assert [g["records"] for g in got] == reads


def test_damaged_record_file_is_named(tmp_path):
    path = tmp_path / "c"
    run_with_ranks(2, rank_save, str(path))
    rec = path / "records-00001.json"
    data = bytearray(rec.read_bytes())
    data[len(data) // 2] ^= 0x01
    rec.write_bytes(bytes(data))
    report = verify_checkpoint(path)
    assert not report.ok(strict=False)
    bad = [c for c in report.checks if c.level == "error"]
    assert bad and bad[0].id == "structure.records"
    assert bad[0].location.file == "records-00001.json"
    assert "records-00001.json" in bad[0].message and "hash mismatch" in bad[0].message
    with pytest.raises(CorruptCheckpointError, match="records-00001.json"):
        dckpt.load(path)
    # Rank 0 alone, at the same world size, never reads the damaged file.
    assert dckpt.read_manifest(path, rank=0).ranks[0] is not None


FIXTURE = Path(__file__).parent / "data" / "v1-two-ranks"


def test_old_single_manifest_still_loads(tmp_path):
    """A checkpoint written by the single-manifest writer (version 1) of two ranks, kept in
    tests/data (written by 2 gloo ranks with
    state_for() by dckpt at commit ade47b7, before the split layout), and one that
    layout="single" writes today: both load at 2 ranks, bitwise."""
    assert json.loads((FIXTURE / MANIFEST_NAME).read_text())["version"] == 1
    assert not list(FIXTURE.glob("records-*"))
    got = run_with_ranks(2, rank_load, str(FIXTURE), 2)
    assert [g["bad"] for g in got] == [[], []] and [g["records"] for g in got] == [[], []]
    path = str(tmp_path / "c")
    run_with_ranks(2, rank_save, path, "single")
    assert not list(Path(path).glob("records-*"))
    got = run_with_ranks(2, rank_load, path, 2)
    assert [g["bad"] for g in got] == [[], []]


def rank_repeat(rank, world, root, extra):
    out = []
    for i in range(3):
        res = dckpt.save(state_for(rank, world, True, extra), f"{root}/s{i}")
        out.append({"reused": res.plan_reused, "sent": res.sent_bytes,
                    "received": res.received_bytes})
    for i, more in enumerate((1, 0, 1)):  # a new layout, then the two in turn
        res = dckpt.save(state_for(rank, world, True, extra + more), f"{root}/changed{i}")
        out.append({"reused": res.plan_reused, "sent": res.sent_bytes,
                    "received": res.received_bytes})
    return out


def test_plan_reuse_sends_fewer_bytes(tmp_path):
    few = run_with_ranks(4, rank_repeat, str(tmp_path / "few"), 0)
    many = run_with_ranks(4, rank_repeat, str(tmp_path / "many"), 40)
    for runs in (few, many):
        for r, (first, second, third, changed, back, again) in enumerate(runs):
            assert not first["reused"] and second["reused"] and third["reused"]
            assert not changed["reused"]  # a new tensor: the offers travel again
            # Either layout's plan is kept: saving them in turn reuses both.
            assert back["reused"] and again["reused"]
            assert second["sent"] < first["sent"] and second["received"] < first["received"]
            assert changed["sent"] > second["sent"]
    # What a rank sends does not grow with its DTensors: 44 cost what 4 do, within the
    # digits of sizes and hashes in the record summary; with the plan reused, and on the
    # first save too (every rank holds the same Shard-placed DTensors: the compact plan).
    for r in range(1, 4):
        assert abs(many[r][2]["sent"] - few[r][2]["sent"]) < 32, (many[r], few[r])
        assert abs(many[r][0]["sent"] - few[r][0]["sent"]) < 32, (many[r], few[r])


def rank_incremental(rank, world, root):
    state = state_for(rank, world, True)
    dckpt.save(state, f"{root}/full")
    seen = counting_record_reads()
    res = dckpt.save(state, f"{root}/incr", base=f"{root}/full")
    live = state_for(rank, world, False)
    dckpt.load(f"{root}/incr", into=live)
    return {"records": seen, "reused": res.plan_reused, "bad": check_state(live, rank, world)}


def test_incremental_save_reads_only_its_base_record(tmp_path):
    got = run_with_ranks(2, rank_incremental, str(tmp_path))
    for r, g in enumerate(got):
        assert g["bad"] == [] and g["reused"], (r, g)
        # its own record of the base (to link unchanged chunks), then of the new checkpoint
        assert g["records"] == [f"records-{r:05d}.json"] * 2, (r, g)
    meta = dckpt.read_manifest(tmp_path / "incr").meta["incremental"]
    assert meta["new_bytes"] == 0 and meta["referenced_chunks"] > 0


def _rewrite_index(path: Path, obj: dict) -> None:
    import xxhash
    obj = dict(obj)
    obj.pop("self_hash", None)
    body = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    obj["self_hash"] = f"{xxhash.xxh3_64_intdigest(body):016x}"
    (path / MANIFEST_NAME).write_bytes(json.dumps(obj, sort_keys=True,
                                                  separators=(",", ":")).encode())


ODD = [-1, 0, 2**63, True, None, "x", [], {}, [0, 0, 0, 0], ["0" * 16], 1.5]


def test_hostile_index_and_records_give_typed_errors(tmp_path):
    """Every field of the index's records, and of a record file (its hash made to match),
    replaced by odd values: reading gives a typed error or a valid manifest, nothing else."""
    from dckpt.errors import DckptError
    import xxhash
    src = tmp_path / "src"
    dckpt.save(state_for(0, 1, True), src, layout="split")
    index = json.loads((src / MANIFEST_NAME).read_text())
    record = json.loads((src / "records-00000.json").read_text())
    cases = []
    for key in ("sizes", "hashes", "spans"):
        for i in range(len(index["records"][key])):
            for v in ODD:
                cases.append(("index", key, i, v))
        for v in ODD:
            cases.append(("index", key, None, v))
    for key in ("format", "rank", "files", "tensors", "rank_state", "meshes"):
        for v in ODD:
            cases.append(("record", key, None, v))
    name = "model/w1"
    for key in ("dtype", "shape", "shards", "placement", "kind"):
        for v in ODD:
            cases.append(("tensor", key, None, v))
    typed = 0
    path = tmp_path / "c"
    shutil.copytree(src, path)
    for where, key, i, v in cases:
        idx = json.loads(json.dumps(index))
        (path / "records-00000.json").write_bytes((src / "records-00000.json").read_bytes())
        if where == "index":
            if i is None:
                idx["records"][key] = v
            else:
                idx["records"][key][i] = v
        else:
            rec = json.loads(json.dumps(record))
            if where == "record":
                rec[key] = v
            else:
                rec["tensors"][name][key] = v
            data = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()
            (path / "records-00000.json").write_bytes(data)
            idx["records"]["sizes"][0] = len(data)
            idx["records"]["hashes"][0] = f"{xxhash.xxh3_64_intdigest(data):016x}"
        _rewrite_index(path, idx)
        try:
            dckpt.read_manifest(path)
        except DckptError:
            typed += 1
    assert typed > len(cases) * 0.8, (typed, len(cases))

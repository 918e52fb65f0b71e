"""Manifest schema and safe-tree codec: pure data, no torch, no native core."""
import json
import math

import pytest

from dckpt.errors import CorruptCheckpointError, FormatVersionError, ManifestError, UnsupportedStateError
from dckpt.format import tree
from dckpt.format.manifest import Chunk, FileEntry, Manifest, Shard, TensorEntry, parse


def sample_manifest() -> Manifest:
    ch = [Chunk(0, 0, 16, 16, 0, 0x1234, 0x1234), Chunk(0, 16, 10, 16, 1, 7, 8)]
    t = TensorEntry("float32", [2, 4], [Shard([0, 0], [2, 4], 0, ch)])
    return Manifest(files=[FileEntry("rank-00000.dckpt", 26, 0)], tensors={"model/w": t},
                    ranks=[{"tree": {"model": {"w": {"$tensor": "model/w"}}}}],
                    counters={"step": 3}, metrics={"loss": 0.5})


def test_roundtrip():
    m = sample_manifest()
    back = parse(m.to_bytes())
    assert back.tensors["model/w"].shards[0].chunks == m.tensors["model/w"].shards[0].chunks
    assert back.counters == {"step": 3} and back.metrics == {"loss": 0.5}
    assert back.to_bytes() == m.to_bytes()


def edit(m: Manifest, fn) -> bytes:
    """Apply fn to the manifest dict and re-seal it (so only the schema checks can object)."""
    obj = m.to_dict()
    fn(obj)
    body = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    import xxhash
    obj["self_hash"] = f"{xxhash.xxh3_64_intdigest(body):016x}"
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def test_self_hash_detects_edits():
    data = bytearray(sample_manifest().to_bytes())
    i = data.index(b'"step":3')
    data[i + 7] = ord("4")
    with pytest.raises(CorruptCheckpointError, match="manifest hash mismatch"):
        parse(bytes(data))


def test_future_version():
    data = edit(sample_manifest(), lambda o: o.update(version=99))
    with pytest.raises(FormatVersionError, match="version 99 is newer"):
        parse(data)


@pytest.mark.parametrize("mutate, message", [
    (lambda o: o["files"][0].update(name="../etc/passwd"), "unsafe file name"),
    (lambda o: o["files"][0].update(name="/abs"), "unsafe file name"),
    (lambda o: o["files"][0].update(name="a/b"), "unsafe file name"),
    (lambda o: o["files"][0].update(dir=".."), "unsafe directory"),
    (lambda o: o["tensors"]["model/w"]["shards"][0]["chunks"][0].__setitem__(1, 2**64), "integer"),
    (lambda o: o["tensors"]["model/w"]["shards"][0]["chunks"][0].__setitem__(1, 100), "past the end"),
    (lambda o: o["tensors"]["model/w"]["shards"][0]["chunks"][0].__setitem__(1, -1), "integer"),
    (lambda o: o["tensors"]["model/w"].update(dtype="object"), "unknown dtype"),
    (lambda o: o["tensors"]["model/w"].update(shape=[2, 5]), "tile the global shape"),
    (lambda o: o["tensors"]["model/w"]["shards"][0].update(shape=[3, 4]), "exceeds|needs"),
    (lambda o: o["tensors"]["model/w"]["shards"][0]["chunks"][0].__setitem__(4, 9), "integer"),
    (lambda o: o["tensors"]["model/w"]["shards"][0]["chunks"][0].__setitem__(2, 15), "raw chunk"),
    (lambda o: o["tensors"]["model/w"]["shards"][0]["chunks"][0].__setitem__(5, "zz"), "hex"),
    (lambda o: o["tensors"]["model/w"].update(shape=[2**40, 2**40]), "too large|exceeds"),
    (lambda o: o.update(world_size=2), "rank entries"),
    (lambda o: o.update(files="x"), "expected list"),
    (lambda o: o["tensors"]["model/w"]["shards"][0].update(rank=5), "integer"),
])
def test_hostile_fields(mutate, message):
    with pytest.raises(ManifestError, match=message):
        parse(edit(sample_manifest(), mutate))


def test_garbage_and_duplicates():
    with pytest.raises(ManifestError, match="not valid JSON"):
        parse(b"{not json")
    with pytest.raises(ManifestError, match="duplicate key"):
        parse(b'{"format":"dckpt","format":"dckpt"}')
    with pytest.raises(ManifestError, match="non-standard JSON constant"):
        parse(b'{"format":NaN}')
    with pytest.raises(ManifestError):
        parse(b"[]")


def test_tree_roundtrip():
    value = {"a": [1, 2.5, None, True, "s"], "t": (1, (2, 3)), 5: b"\x00\xff",
             "$weird": {"nan": math.nan, "inf": math.inf, "ninf": -math.inf},
             "refs": [tree.TensorRef("x"), tree.ArrayRef("y")],
             "obj": tree.ObjectState("torch.optim.AdamW", {"lr": 1e-3})}
    enc = tree.encode(value)
    json.dumps(enc, allow_nan=False)  # strict JSON
    back = tree.decode(json.loads(json.dumps(enc)))
    assert back["a"] == value["a"] and back["t"] == (1, (2, 3)) and back[5] == b"\x00\xff"
    assert math.isnan(back["$weird"]["nan"]) and back["$weird"]["ninf"] == -math.inf
    assert back["refs"] == value["refs"] and back["obj"] == value["obj"]
    assert type(back["t"]) is tuple


def test_tree_refuses_objects_with_path():
    class Thing:
        pass
    with pytest.raises(UnsupportedStateError, match="'model/cfg/1'") as e:
        tree.encode({"model": {"cfg": [1, Thing()]}}, "")
    assert e.value.key_path == "model/cfg/1"


def test_tree_decode_hostile():
    deep = "x"
    for _ in range(500):
        deep = [deep]
    with pytest.raises(ManifestError, match="deeper"):
        tree.decode(deep)
    for bad in ({"$tensor": 5}, {"$float": "1.0"}, {"$bytes": "!!"}, {"$nope": 1},
                {"$tuple": 1, "$dict": []}, {"$dict": [[1]]}, {"$dict": [[[1], 2]]}):
        with pytest.raises(ManifestError):
            tree.decode(bad)


def test_format_imports_without_torch():
    import subprocess
    import sys
    code = ("import sys; sys.modules['torch'] = None; sys.modules['dckpt._native'] = None; "
            "import dckpt.format, dckpt.format.reader; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr

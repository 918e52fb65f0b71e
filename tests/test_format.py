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


def test_self_hash_member_planted_or_moved_is_caught():
    """The self hash is checked on the raw bytes with its member cut out: a copy of that
    member planted in a nested dict, or the member moved there, must not pass."""
    data = sample_manifest().to_bytes()
    start = data.index(b',"self_hash":')
    member = data[start:data.index(b'"', start + 14) + 1]
    nested = data.index(b'"step":3') + len(b'"step":3')
    planted = data[:nested] + member + data[nested:]
    moved = planted.replace(member + b',"tensors"', b',"tensors"')
    assert planted != data and moved.count(member) == 1
    with pytest.raises(CorruptCheckpointError, match="manifest hash mismatch"):
        parse(planted)
    with pytest.raises(ManifestError, match="self_hash: expected 16 lowercase hex"):
        parse(moved)
    assert parse(data).counters == {"step": 3}


def forge(data: bytes) -> bytes:
    """`data` with its self hash recomputed over the raw bytes, as a forger would."""
    import re
    import xxhash
    m = re.search(rb',"self_hash":"[0-9a-f]{16}"', data)
    body = (data[:m.start()] + data[m.end():]).rstrip(b"\n")
    return data[:m.start()] + b',"self_hash":"%016x"' % xxhash.xxh3_64_intdigest(body) + data[m.end():]


def test_forged_manifest_still_meets_every_rule():
    """Bytes that pass the self hash on their raw form skip the canonical comparison; a
    forger can make any bytes pass, so numbers out of range are still refused there, and
    duplicate keys read as JSON reads them (the last one), then face every schema check."""
    data = sample_manifest().to_bytes()
    assert forge(data) == data
    with pytest.raises(ManifestError, match="out of range"):
        parse(forge(data.replace(b'"loss":0.5', b'"loss":1e999')))
    with pytest.raises(ManifestError, match="non-standard JSON constant"):
        parse(forge(data.replace(b'"loss":0.5', b'"loss":NaN')))
    m = parse(forge(data.replace(b'"step":3', b'"step":3,"step":4')))
    assert m.counters == {"step": 4}
    with pytest.raises(ManifestError, match="rank entries"):
        parse(forge(data.replace(b'"world_size":1', b'"world_size":1,"world_size":2')))


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
             "sd": {"b": tree.TensorRef("w"), "a": tree.TensorRef("v"), 0: tree.TensorRef("u")},
             "obj": tree.ObjectState("torch.optim.AdamW", {"lr": 1e-3})}
    enc = tree.encode(value)
    json.dumps(enc, allow_nan=False)  # strict JSON
    back = tree.decode(json.loads(json.dumps(enc)))
    assert back["a"] == value["a"] and back["t"] == (1, (2, 3)) and back[5] == b"\x00\xff"
    assert math.isnan(back["$weird"]["nan"]) and back["$weird"]["ninf"] == -math.inf
    assert back["refs"] == value["refs"] and back["obj"] == value["obj"]
    assert back["sd"] == value["sd"] and list(back["sd"]) == ["b", "a", 0]
    assert type(back["t"]) is tuple


def test_tree_keeps_dict_order_through_sorted_json():
    """The manifest is canonical JSON with sorted keys; dicts still come back in their order."""
    value = {"z": 1, "layer.10.w": 2, "layer.2.w": {"b": 1, "a": 2}, "a": {"x": 1, "y": 2}}
    sealed = json.dumps(tree.encode(value), sort_keys=True)
    back = tree.decode(json.loads(sealed))
    assert list(back) == list(value) and list(back["layer.2.w"]) == ["b", "a"]
    assert back == value and tree.encode(value["a"]) == {"x": 1, "y": 2}  # sorted: plain


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
                {"$tuple": 1, "$dict": []}, {"$dict": [[1]]}, {"$dict": [[[1], 2]]},
                {"$dict": "x"}, {"$dict": [["k", {"$tensor": 5}]]},
                {"$dict": [["k", {"$tensor": "x", "more": 1}]]}):
        with pytest.raises(ManifestError):
            tree.decode(bad)


def test_format_imports_without_torch():
    import subprocess
    import sys
    code = ("import sys; sys.modules['torch'] = None; sys.modules['dckpt._native'] = None; "
            "import dckpt.format, dckpt.format.reader; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


_ODD_VALUES = [-1, 0, 1, 2, 15, 16, 17, 26, 2**48, 2**63, 2**64, True, False, None, 0.0, 1.0,
               "x", "0000000000001234", "0000000000001234 ", [], [0], {}, [2, 4], [0, 0],
               "float8_e4m3fn", "numpy", "<f4", {"kind": "local"}]


def _paths(node, prefix=()):
    """The key path of every value inside a JSON value."""
    for k, v in (node.items() if isinstance(node, dict) else enumerate(node)):
        yield prefix + (k,)
        if isinstance(v, (dict, list)):
            yield from _paths(v, prefix + (k,))


def test_chunk_fast_check_agrees_with_the_field_checks():
    """_chunk_ok accepts exactly the chunks whose every field passes its own check."""
    from dckpt.format.manifest import MAX_CHUNK_BYTES, MAX_INT, _chunk_ok
    files = [FileEntry("rank-00000.dckpt", 26, 0)]
    good = [0, 0, 16, 16, 0, "0000000000001234", "0000000000001234"]
    limits = [(0, 0), (0, MAX_INT), (0, MAX_CHUNK_BYTES + (1 << 20)), (0, MAX_CHUNK_BYTES),
              (0, 2)]
    for i in range(7):
        for value in _ODD_VALUES:
            ch = list(good)
            ch[i] = value
            ints_ok = all(type(v) is int and lo <= v <= hi for v, (lo, hi) in zip(ch, limits))
            hashes_ok = all(isinstance(h, str) and len(h) == 16 and
                            all(x in "0123456789abcdef" for x in h) for h in ch[5:])
            fits = ints_ok and ch[1] + ch[2] <= 26 and (ch[2] == ch[3] if ch[4] == 0
                                                         else ch[3] <= ch[2] << 15)
            assert _chunk_ok(ch, files) == (ints_ok and hashes_ok and fits), (i, value)


def test_block_fast_check_agrees_with_the_full_check():
    """The one-pass check of one rank's block of a tensor (_block_tensor, the split
    layout's record files) never accepts what _check_tensor(tiles=False) rejects, nor reads
    it differently; every value of a valid sharded block is varied as above."""
    import copy

    from dckpt.format.manifest import _Check, _block_tensor, _check_tensor
    files = [FileEntry("rank-00001.dckpt", 64, 1)]
    meshes = [{"shape": [2], "dim_names": None, "ranks": [0, 1]}]
    base = {"kind": "torch", "dtype": "float32", "shape": [4, 2],
            "placement": {"kind": "sharded", "mesh": 0, "placements": ["Shard(dim=0)"]},
            "shards": [{"offsets": [2, 0], "shape": [2, 2], "rank": 1,
                        "chunks": [[0, 0, 16, 16, 0, "0000000000001234", "0000000000005678"]]}]}
    accepted = rejected = 0
    for path in _paths(base):
        for value in _ODD_VALUES + [KeyError]:
            entry = copy.deepcopy(base)
            parent = entry
            for k in path[:-1]:
                parent = parent[k]
            if value is KeyError:
                if not isinstance(parent, dict):
                    continue
                del parent[path[-1]]
            else:
                parent[path[-1]] = value
            fast = _block_tensor("model/w", entry, files, 2, meshes)
            try:
                slow = _check_tensor(_Check(None), "model/w", entry, files, 2, meshes,
                                     tiles=False)
            except ManifestError:
                slow = None
            assert fast is None or fast == slow, (path, value)
            accepted += fast is not None
            rejected += slow is None
    assert accepted > 5 and rejected > 300  # both outcomes were exercised

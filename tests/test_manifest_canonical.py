"""The manifest's "tensors" member written directly (format/canonical.py) is byte for byte
what json.dumps writes of the records' to_json(), for every shape of record, including
after the cached record heads were filled by an earlier manifest with other fields."""
import json

import numpy as np
import torch

import dckpt
from dckpt.format import canonical
from dckpt.format.manifest import Chunk, Manifest, Shard, TensorEntry, parse


def slow(entries: dict) -> bytes:
    return json.dumps({k: v.to_json() for k, v in entries.items()}, sort_keys=True,
                      separators=(",", ":"), allow_nan=False, ensure_ascii=True).encode("ascii")


def chunk(i: int, h: int = 0x0123456789ABCDEF) -> Chunk:
    return Chunk(0, i * 100, 100, 100, 0, h, (1 << 64) - 1 - i)


def entries(shape=(4, 25), dtype="float32", placement=None) -> dict:
    sh = [Shard([0, 0], list(shape), 0, [chunk(0), chunk(1, 0)])]
    return {
        "b": TensorEntry(dtype, list(shape), sh, "torch", placement),
        "a/ü\"q\\": TensorEntry("<f4", [100], [Shard([0], [100], 1, [chunk(2)])], "numpy"),
        "empty": TensorEntry("int64", [0], [Shard([0], [0], 0, [])]),
        "sharded": TensorEntry("bfloat16", [8, 4], [
            Shard([0, 0], [4, 4], 0, [chunk(3)]), Shard([4, 0], [4, 4], 1, [chunk(4)])],
            "torch", {"kind": "sharded", "mesh": 0, "placements": ["Shard(dim=0)"]}),
        "~3": TensorEntry("float64", [], [Shard([], [], 0, [chunk(5)])]),
        "100%d %s": TensorEntry("uint8", [3], [Shard([0], [3], 0, [chunk(6)])]),
    }


def test_direct_tensors_equal_json_dumps_for_every_record_shape():
    for variant in (entries(), entries((100,), "float16"), entries((5, 20)),
                    entries(placement={"kind": "replicated"}),
                    entries(placement={"kind": "owned"}), entries(),
                    # Equal as dict keys, written apart: 1, 1.0 and true.
                    entries(placement={"kind": "x", "n": 1}),
                    entries(placement={"kind": "x", "n": 1.0}),
                    entries(placement={"kind": "x", "n": True}), {}):
        # The same names again with other fields: a stale cached head would show here.
        assert canonical.tensors(variant) == slow(variant)


def test_values_of_other_types_fall_back_to_json():
    odd = {
        # A bool and a numpy int where ints belong: json writes true / refuses; the direct
        # writer never writes them as ints.
        "x": TensorEntry("float32", [True, 3], [Shard([0, 0], [1, 3], 0, [chunk(0)])]),
        "y": TensorEntry("float32", [3], [Shard([0], [3], 0, [Chunk(0, 0, 12, 12, 0, 5, -1)])]),
    }
    assert canonical.tensors(odd) == slow(odd)
    # The head cached for "x" with shape [True, 3] is not used for [1, 3].
    again = {"x": TensorEntry("float32", [1, 3], [Shard([0, 0], [1, 3], 0, [chunk(0)])])}
    assert canonical.tensors(again) == slow(again)


def test_saved_manifest_bytes_are_the_json_form(tmp_path):
    state = {"w": torch.randn(3, 5), "v": np.arange(7, dtype=np.int16),
             "t": torch.ones(2, dtype=torch.bfloat16), "s": {"x": torch.zeros(0)}}
    for i, st in enumerate((state, {**state, "w": torch.randn(5, 3)})):
        r = dckpt.save(st, tmp_path / f"c{i}", chunk_size=4096)
        data = (tmp_path / f"c{i}" / "manifest.json").read_bytes()
        m = parse(data)
        body = m.to_dict()
        body_bytes = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False,
                                ensure_ascii=True).encode("ascii")
        # The written form is the canonical JSON of the whole manifest with its self hash.
        assert data == Manifest.to_bytes(m)
        assert m.to_bytes()[:-1].replace(b',"self_hash":"' + data.split(b'"self_hash":"')[1][:16]
                                         + b'"', b"") == body_bytes
        assert r.manifest.tensors.keys() == m.tensors.keys()


def test_record_file_bytes_are_the_json_form():
    """A split layout's record file (format/split.py record_bytes) writes its tensors the
    same way: the bytes json.dumps gives of the whole document."""
    from dckpt.format import split
    tensors = entries(placement={"kind": "sharded", "mesh": 0, "placements": ["Shard(dim=0)"]})
    files = [{"name": "rank00001.dckpt", "size": 300, "rank": 1}]
    entry = {"tree": {"w": {"$tensor": "b"}}, "aliases": {}, "rng": {"torch": "x"}}
    meshes = [{"shape": [2], "dim_names": None, "ranks": [0, 1]}]
    got = split.record_bytes(1, files, tensors, entry, meshes)
    doc = {"format": split.RECORDS_FORMAT, "version": split.SPLIT_VERSION, "rank": 1,
           "files": files, "tensors": {k: v.to_json() for k, v in tensors.items()},
           "rank_state": entry, "meshes": [split.compact_mesh(m) for m in meshes]}
    assert got == json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False,
                             ensure_ascii=True).encode("ascii") + b"\n"

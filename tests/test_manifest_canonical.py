"""The manifest's "tensors" member written directly (format/canonical.py) is byte for byte
what json.dumps writes of the records' to_json(), for every shape of record, including
after the cached record heads were filled by an earlier manifest with other fields."""
import json
import random

import numpy as np
import pytest
import torch

import dckpt
from dckpt import _native
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


def native(entries: dict) -> bytes | None:
    """The core's writer alone (canonical.tensors falls back to Python on None)."""
    return _native.records_json(entries, {n: canonical._placement(t.placement)
                                          for n, t in entries.items() if t.placement is not None})


def test_saves_write_records_with_the_core():
    import dckpt.storage.commit  # noqa: F401  (what every local save imports)
    assert canonical._records is _native.records_json
    assert canonical._value is _native.value_json


@pytest.mark.parametrize("writer", [canonical.written, native, canonical.tensors])
def test_direct_tensors_equal_json_dumps_for_every_record_shape(writer):
    for variant in (entries(), entries((100,), "float16"), entries((5, 20)),
                    entries(placement={"kind": "replicated"}),
                    entries(placement={"kind": "owned"}), entries(),
                    # Equal as dict keys, written apart: 1, 1.0 and true.
                    entries(placement={"kind": "x", "n": 1}),
                    entries(placement={"kind": "x", "n": 1.0}),
                    entries(placement={"kind": "x", "n": True}), {}):
        # The same names again with other fields: a stale cached head would show here.
        assert writer(variant) == slow(variant)


def test_values_of_other_types_fall_back_to_json():
    odd = {
        # A bool and a numpy int where ints belong: json writes true / refuses; the direct
        # writer never writes them as ints.
        "x": TensorEntry("float32", [True, 3], [Shard([0, 0], [1, 3], 0, [chunk(0)])]),
        "y": TensorEntry("float32", [3], [Shard([0], [3], 0, [Chunk(0, 0, 12, 12, 0, 5, -1)])]),
    }
    assert canonical.tensors(odd) == slow(odd)
    for name in odd:  # the core refuses each; the Python writer then takes the dict
        assert native({name: odd[name]}) is None
    # The head cached for "x" with shape [True, 3] is not used for [1, 3].
    again = {"x": TensorEntry("float32", [1, 3], [Shard([0, 0], [1, 3], 0, [chunk(0)])])}
    assert canonical.tensors(again) == slow(again)


def test_random_records_are_written_as_json_dumps_writes_them():
    """Names with every kind of character JSON escapes (quotes, backslashes, control
    characters, DEL, non-ASCII, a lone surrogate, beyond U+FFFF), numbers at and past the
    64-bit edges, tuples for lists: the core writes json's bytes or declines, never other
    bytes, and canonical.tensors always gives json's."""
    rng = random.Random(7)
    alphabet = ['a', 'Z', '0', '/', '.', ' ', '"', '\\', '\n', '\r', '\t', '\b', '\f', '\x00',
                '\x1f', '\x7f', '\x80', 'é', '\u2028', '\ud800', '\U0001f600', '%', '~']
    ints = [0, 1, 7, 4096, (1 << 63) - 1, -1, -(1 << 63), 1 << 63, 1 << 70]
    declined = 0
    for _ in range(300):
        def num():
            return rng.choice(ints) if rng.random() < 0.1 else rng.randrange(1 << 20)

        def seq(n):
            xs = [num() for _ in range(n)]
            return tuple(xs) if rng.random() < 0.2 else xs

        def hsh():
            return rng.choice([0, (1 << 64) - 1, 1 << 64, -1]) if rng.random() < 0.05 \
                else rng.getrandbits(64)

        recs = {}
        for _ in range(rng.randrange(0, 6)):
            name = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 9)))
            shards = [Shard(seq(d := rng.randrange(0, 3)), seq(d), num(),
                            [Chunk(*seq(5), hsh(), hsh()) for _ in range(rng.randrange(0, 3))])
                      for _ in range(rng.randrange(0, 3))]
            placement = rng.choice([None, {"kind": "replicated"},
                                    {"kind": "sharded", "mesh": 1, "placements": ["S(0)"]}])
            recs[name] = TensorEntry(rng.choice(["float32", "<f4", "ü"]), seq(2), shards,
                                     rng.choice(["torch", "numpy"]), placement)
        expected = slow(recs)
        got = native(recs)
        declined += got is None
        assert got is None or got == expected
        assert canonical.tensors(recs) == expected
    assert 0 < declined < 200  # both paths were taken


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


def test_random_values_are_written_as_json_dumps_writes_them():
    """The core's writer of any other JSON value (state trees, RNG states, metadata):
    json's bytes for every nesting of dicts, lists, tuples, strs of every escape class, ints
    at and past 64 bits, floats of every magnitude, bools and None; it declines what json
    must write or refuse itself (non-str keys, NaN, an int subclass, other types), and
    canonical() then gives json's bytes or its error."""
    rng = random.Random(11)
    alphabet = ['a', '"', '\\', '\n', '\x00', '\x1f', '\x7f', 'é', '\u2028', '\ud800',
                '\U0001f600', '$', '~', ' ']
    floats = [0.0, -0.0, 1.0, 0.1, 1e-7, 1e16, 1.5e300, 5e-324, -2.5, 123456789.125]

    def text():
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 6)))

    def value(depth=0):
        kind = rng.randrange(9 if depth < 4 else 6)
        if kind == 0:
            return rng.choice([None, True, False])
        if kind == 1:
            return rng.choice([0, -1, 7, (1 << 63) - 1, -(1 << 63), 1 << 63, -(1 << 80)])
        if kind == 2:
            return rng.choice(floats) * rng.choice([1, -1])
        if kind in (3, 4, 5):
            return text()
        if kind == 6:
            return [value(depth + 1) for _ in range(rng.randrange(4))]
        if kind == 7:
            return tuple(value(depth + 1) for _ in range(rng.randrange(4)))
        return {text(): value(depth + 1) for _ in range(rng.randrange(5))}

    declined = 0
    for _ in range(500):
        v = value()
        got = _native.value_json(v)
        declined += got is None
        assert got is None or got == slow_value(v), v
        assert canonical.canonical(v) == slow_value(v)
    assert 0 < declined < 250  # big ints go to json; the rest is the core's
    for odd in ({1: "x"}, {"a": float("nan")}, [float("inf")], {"a": {1, 2}}, b"x",
                [True, np.int64(3)], {"k": type("S", (str,), {})("s")}):
        assert _native.value_json(odd) is None
        try:
            expected = slow_value(odd)
        except (TypeError, ValueError) as e:
            with pytest.raises(type(e)):
                canonical.canonical(odd)
        else:
            assert canonical.canonical(odd) == expected
    deep = []
    for _ in range(300):  # deeper than the core goes: json writes it
        deep = [deep]
    assert canonical.canonical(deep) == slow_value(deep)


def slow_value(v) -> bytes:
    return json.dumps(v, sort_keys=True, separators=(",", ":"), allow_nan=False,
                      ensure_ascii=True).encode("ascii")

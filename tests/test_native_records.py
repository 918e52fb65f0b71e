"""The native check of manifest tensor records gives the Python oracle's answer, always.

dckpt.storage.records hands the native core's whole_tensors to dckpt.format.manifest, which
checks the usual tensor record (a torch tensor stored whole by one rank) with it and every
other record field by field (_check_tensor). whole_tensor below is the same one-pass check
written in Python: it runs only here, as the oracle. Both see thousands of valid and
mutated records: each must accept exactly what the other accepts and build equal entries,
and neither may accept what the field-by-field check rejects or read it differently.
Imports only dckpt.format and the core, so csrc/asan_test.sh runs it against the sanitizer
build too.
"""
import copy
import json
import math
import random

import pytest

from dckpt import _native as native
from dckpt.errors import ManifestError
from dckpt.format import manifest as mf
from dckpt.format.dtypes import ITEMSIZE, numpy_itemsize
from dckpt.storage import records as records_mod

FILES = [mf.FileEntry("rank-00000-0.dckpt", 1 << 40, 0), mf.FileEntry("rank-00000-1.dckpt", 4096, 0)]
SIZES = [f.size for f in FILES]
TYPES = (mf.Chunk, mf.Shard, mf.TensorEntry)
H = "0123456789abcdef"


def whole_tensor(name: str, t, files: list, world: int):
    """The oracle: a tensor stored whole by one rank, checked in one pass in Python, as an
    entry equal to what the full parse builds; None for anything else, valid or not (numpy
    arrays included, which the core leaves to the field-by-field check)."""
    if type(t) is not dict or not 0 < len(name) <= 4096 or t.get("placement") is not None:
        return None
    kind, dtype, shape, shards = t.get("kind"), t.get("dtype"), t.get("shape"), t.get("shards")
    if type(dtype) is not str or type(shards) is not list or len(shards) != 1:
        return None
    itemsize = (ITEMSIZE.get(dtype) if kind == "torch" else
                numpy_itemsize(dtype) if kind == "numpy" else None)
    s = shards[0]
    if itemsize is None or not mf._shape_ok(shape) or type(s) is not dict:
        return None
    offsets, sshape, rank, chunks = s.get("offsets"), s.get("shape"), s.get("rank"), s.get("chunks")
    # Equal lists of equal length; the types too, as 1.0 == 1 == True.
    if (type(sshape) is not list or sshape != shape or type(offsets) is not list
            or len(offsets) != len(shape) or type(rank) is not int or not 0 <= rank < world
            or type(chunks) is not list):
        return None
    for d, o in zip(sshape, offsets):
        if type(d) is not int or type(o) is not int or o != 0:
            return None
    raw = 0
    for ch in chunks:
        if not mf._chunk_ok(ch, files):
            return None
        raw += ch[3]
    if raw != math.prod(shape) * itemsize:
        return None
    return mf.TensorEntry(dtype, shape, [mf.Shard(offsets, sshape, rank, [
        mf._chunk(ch) for ch in chunks])], kind)


def full_check(name: str, t, files: list, world: int):
    """What the parse makes of a record the fast check leaves to it: an entry, or None
    where it raises ManifestError."""
    try:
        return mf._check_tensor(mf._Check(None), name, t, files, world, [])
    except ManifestError:
        return None


def records() -> dict:
    return {
        "w": {"kind": "torch", "dtype": "float32", "shape": [4, 64], "placement": None,
              "shards": [{"offsets": [0, 0], "shape": [4, 64], "rank": 0,
                          "chunks": [[0, 0, 512, 512, 0, H, H], [0, 512, 300, 512, 2, H, "f" * 16]]}]},
        "step": {"kind": "torch", "dtype": "int64", "shape": [], "shards": [
            {"offsets": [], "shape": [], "rank": 1, "chunks": [[1, 8, 8, 8, 0, H, H]]}]},
        "empty": {"kind": "torch", "dtype": "bfloat16", "shape": [0, 3], "shards": [
            {"offsets": [0, 0], "shape": [0, 3], "rank": 0, "chunks": []}]},
        "huge0": {"kind": "torch", "dtype": "uint8", "shape": [1 << 48, 1 << 48, 0], "shards": [
            {"offsets": [0, 0, 0], "shape": [1 << 48, 1 << 48, 0], "rank": 0, "chunks": []}]},
        "wide": {"kind": "torch", "dtype": "uint8", "shape": [(1 << 48) + 1, 0], "shards": [
            {"offsets": [0, 0], "shape": [(1 << 48) + 1, 0], "rank": 0, "chunks": []}]},
        "z": {"kind": "torch", "dtype": "float32", "shape": [1 << 28], "shards": [  # 1 GiB
            {"offsets": [0], "shape": [1 << 28], "rank": 0,
             "chunks": [[0, 1 << 20, 32768, 1 << 30, 1, H, H]]}]},
        "arr": {"kind": "numpy", "dtype": "<f4", "shape": [2], "shards": [
            {"offsets": [0], "shape": [2], "rank": 0, "chunks": [[1, 0, 8, 8, 0, H, H]]}]},
    }


def both(tensors: dict, world: int = 2) -> tuple[list, list]:
    """The native answers, and the oracle's less numpy arrays (which the core leaves to the
    field-by-field check). Every record either accepts is one the full check accepts too,
    as the same entry."""
    fast = native.whole_tensors(tensors, SIZES, world, mf.ITEMSIZE, TYPES)
    slow = [whole_tensor(n, t, FILES, world) for n, t in tensors.items()]
    for (n, t), e, o in zip(tensors.items(), fast, slow):
        if e is not None or o is not None:
            assert full_check(n, t, FILES, world) == (e or o), n
    return fast, [None if e is not None and e.kind == "numpy" else e for e in slow]


def test_valid_records_build_the_same_entries():
    fast, slow = both(records())
    assert fast == slow
    assert [e is None for e in fast] == [False] * 4 + [True, False, True]  # wide: invalid; arr: numpy
    assert whole_tensor("arr", records()["arr"], FILES, 2) is not None
    w = fast[0]
    assert type(w) is mf.TensorEntry and type(w.shards[0]) is mf.Shard
    assert type(w.shards[0].chunks[1]) is mf.Chunk and w.shards[0].chunks[1].stored_hash == (1 << 64) - 1
    assert w.placement is None and w.kind == "torch" and w.itemsize == 4


ODD = [None, True, False, 0, 1, -1, 2, 7, 8, 16, 300, 511, 512, 4088, 4089, 4096, (1 << 20) - 511,
       (1 << 20) - 512, 1 << 20, 32767, 1 << 28, 1 << 30, (1 << 30) + 1, (1 << 30) + (1 << 20),
       (1 << 30) + (1 << 20) + 1,
       (1 << 48), (1 << 48) + 1, (1 << 63) - 1, 1 << 63, 1 << 64, -(1 << 63), 1.0, 0.0, 512.0,
       "", "x", "torch", "numpy", "float32", "int64", H, H.upper(), "0123456789abcde",
       "0123456789abcdef0", "0123456789abcdeg", "0123456789abcde\u0660", [], [0], [0, 0],
       [4, 64], {}, {"kind": "sharded"}]


def mutate(obj, rng: random.Random):
    """One random edit somewhere in `obj`: a value replaced, a key dropped or added, a list
    grown or shortened."""
    path, node = [], obj
    while isinstance(node, (dict, list)) and node and rng.random() < 0.85:
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        path.append((node, key))
        node = node[key]
    parent, key = path[-1] if path else (None, None)
    action = rng.random()
    if parent is None:
        return
    if action < 0.7:
        parent[key] = copy.deepcopy(rng.choice(ODD))
    elif action < 0.8 and isinstance(parent, dict):
        del parent[key]
    elif action < 0.9 and isinstance(parent, dict):
        parent[rng.choice(["placement", "kind", "extra"])] = copy.deepcopy(rng.choice(ODD))
    elif isinstance(parent, list):
        if rng.random() < 0.5:
            parent.append(copy.deepcopy(rng.choice(ODD)))
        elif parent:
            parent.pop()


def leaves(node, path=()):
    """Every (path, value) below `node`, containers included."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield path + (k,), v
        yield from leaves(v, path + (k,))


def test_every_single_edit_gets_the_same_answer():
    """Each value of each record replaced by each odd value, one at a time."""
    rejected = 0
    for name, rec in records().items():
        for path, _ in list(leaves(rec)):
            for value in ODD:
                tensors = records()
                node = tensors[name]
                for k in path[:-1]:
                    node = node[k]
                node[path[-1]] = copy.deepcopy(value)
                fast, slow = both(tensors)
                assert fast == slow, (name, path, value)
                rejected += fast[list(tensors).index(name)] is None
    assert rejected > 1000


@pytest.mark.parametrize("seed", range(4))
def test_mutated_records_get_the_same_answer(seed):
    rng = random.Random(seed)
    accepted = rejected = 0
    for _ in range(1500):
        tensors = records()
        for _ in range(rng.randint(1, 3)):
            name = rng.choice(list(tensors))
            mutate(tensors, rng) if rng.random() < 0.1 else mutate(tensors[name], rng)
        tensors = json.loads(json.dumps(tensors))  # what a parsed manifest holds
        fast, slow = both(tensors, world=rng.choice([1, 2]))
        assert fast == slow, json.dumps(tensors)[:2000]
        assert [type(e) for e in fast] == [type(e) for e in slow]
        accepted += sum(e is not None for e in fast)
        rejected += sum(e is None for e in fast)
    assert accepted > 1000 and rejected > 1000  # both answers were exercised


def test_no_fast_check_accepts_what_the_full_check_rejects():
    """Every value of a valid record replaced by each odd value in turn, or removed: the
    core and the oracle give one answer, and accept only what the field-by-field check
    accepts, read the same way."""
    files = [mf.FileEntry("rank-00000.dckpt", 26, 0)]
    base = mf.TensorEntry("float32", [2, 4], [mf.Shard([0, 0], [2, 4], 0, [
        mf.Chunk(0, 0, 16, 16, 0, 0x1234, 0x1234), mf.Chunk(0, 16, 10, 16, 1, 7, 8)])]).to_json()
    base = json.loads(json.dumps(base))
    accepted = rejected = 0
    for path, _ in list(leaves(base)):
        for value in ODD + [KeyError]:
            entry = copy.deepcopy(base)
            parent = entry
            for k in path[:-1]:
                parent = parent[k]
            if value is KeyError:
                if not isinstance(parent, dict):
                    continue
                del parent[path[-1]]
            else:
                parent[path[-1]] = copy.deepcopy(value)
            fast = native.whole_tensors({"model/w": entry}, [26], 1, mf.ITEMSIZE, TYPES)[0]
            oracle = whole_tensor("model/w", entry, files, 1)
            slow = full_check("model/w", entry, files, 1)
            assert fast == oracle, (path, value)
            assert fast is None or fast == slow, (path, value)
            accepted += fast is not None
            rejected += slow is None
    assert accepted > 5 and rejected > 300  # both outcomes were exercised


def test_non_json_values_get_the_same_answer():
    """Values JSON cannot produce (bool dims, subclasses of int and str) are refused too."""
    class Int(int):
        pass

    class Str(str):
        pass

    for edit in (lambda t: t["w"]["shape"].__setitem__(0, True),
                 lambda t: t["w"]["shards"][0]["chunks"][0].__setitem__(2, Int(512)),
                 lambda t: t["w"]["shards"][0]["chunks"][0].__setitem__(5, Str(H)),
                 lambda t: t["w"].__setitem__("dtype", Str("float32")),
                 lambda t: t["w"]["shards"][0].__setitem__("rank", Int(0)),
                 lambda t: t["w"]["shards"][0]["chunks"].__setitem__(0, tuple(t["w"]["shards"][0]["chunks"][0]))):
        tensors = records()
        edit(tensors)
        fast, slow = both(tensors)
        assert fast == slow and fast[0] is None


def test_bad_arguments_are_type_errors():
    with pytest.raises(TypeError):
        native.whole_tensors([], SIZES, 1, mf.ITEMSIZE, TYPES)
    with pytest.raises(TypeError):
        native.whole_tensors({}, SIZES, 1, mf.ITEMSIZE, (tuple, tuple, dict))
    with pytest.raises(TypeError):
        native.whole_tensors({}, SIZES, 0, mf.ITEMSIZE, TYPES)
    with pytest.raises(ValueError):
        native.whole_tensors({}, [-1], 1, mf.ITEMSIZE, TYPES)


def test_parse_gives_the_same_manifest_with_and_without_the_core():
    m = mf.Manifest(world_size=2, files=FILES, ranks=[{"tree": {}}, {"tree": {}}],
                    tensors={n: full_check(n, t, FILES, 2) for n, t in records().items()
                             if n not in ("huge0", "wide")})
    data = m.to_bytes()
    with_core = mf.parse(data, records=native.whole_tensors)
    assert records_mod.parse(data) == with_core  # the parse every reader above format uses
    assert mf.parse(data) == with_core and with_core.tensors == m.tensors


def test_no_reference_is_leaked_or_lost():
    """Built entries hold the parsed lists themselves; once dropped, every count is back."""
    import gc
    import sys
    import tracemalloc
    tensors = json.loads(json.dumps(records()))
    tensors["bad"] = copy.deepcopy(tensors["w"])
    tensors["bad"]["shards"][0]["chunks"][1][5] = "bad"  # rejected after building a chunk
    watched = [tensors["w"]["shape"], tensors["w"]["dtype"], tensors["bad"]["shape"],
               tensors["w"]["shards"][0]["chunks"][0][1], tensors["bad"]["shards"][0]["chunks"][0][1]]
    counts = [sys.getrefcount(x) for x in watched]
    out = native.whole_tensors(tensors, SIZES, 2, mf.ITEMSIZE, TYPES)
    assert out[0].shape is tensors["w"]["shape"] and out[-1] is None
    del out
    assert [sys.getrefcount(x) for x in watched] == counts
    gc.collect()
    tracemalloc.start()
    try:
        for _ in range(3):
            native.whole_tensors(tensors, SIZES, 2, mf.ITEMSIZE, TYPES)
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(300):
            native.whole_tensors(tensors, SIZES, 2, mf.ITEMSIZE, TYPES)
        assert tracemalloc.get_traced_memory()[0] - base < 10_000
    finally:
        tracemalloc.stop()

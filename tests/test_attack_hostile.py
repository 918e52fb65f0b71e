"""Hostile manifests: crafted by someone who wants a loader to read, write or allocate what
it should not. Each is re-sealed (valid self hash) so only validation can stop it."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dckpt
from dckpt.errors import (DckptError, IncompleteCheckpointError, ManifestError,
                          StateMismatchError)
from dckpt.format.manifest import MANIFEST_NAME, _canonical, parse

from helpers.attacks import (SLOW, json_paths, manifest_obj, model_state, rewrite_manifest, seal,
                             tree_child, tree_set)

W = "extra/w"  # float32 [64, 33], several 4 KiB chunks


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile") / "root"
    mgr = dckpt.CheckpointManager(root, compression="zstd", chunk_size=4096)
    mgr.save(3, model_state(3), {"loss": 1.0})
    return mgr.path(3)


@pytest.fixture
def ckpt(saved, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(saved.parent, root)
    return root / saved.name


def attempts(ckpt):
    return [lambda: dckpt.load(ckpt),
            lambda: dckpt.CheckpointManager(ckpt.parent).restore(model_state(0))]


def chunk(obj, name=W, shard=0, index=0):
    return obj["tensors"][name]["shards"][shard]["chunks"][index]


def set_chunk(i, value, index=0):
    return lambda o: chunk(o, index=index).__setitem__(i, value)


def set_file(**kw):
    return lambda o: o["files"][0].update(kw)


def dup_shard(o):
    """Two [32, 33] shards at rows 0 and 16: their sizes add up to the [64, 33] tensor and
    their chunk lengths fit, but rows 16..31 are covered twice and 48..63 never."""
    shards = o["tensors"][W]["shards"]
    c0, c1, c2 = shards[0]["chunks"]
    tail = lambda c: [c[0], c[1], 128, 128, 0, c[5], c[5]]  # noqa: E731 - 4096 + 128 bytes
    shards[:] = [{"offsets": [0, 0], "shape": [32, 33], "rank": 0, "chunks": [c0, tail(c2)]},
                 {"offsets": [16, 0], "shape": [32, 33], "rank": 0, "chunks": [c1, tail(c2)]}]


def shared_bytes(o):
    a, b = chunk(o, index=0), chunk(o, index=1)
    b[1] = a[1]  # second chunk reads the first chunk's bytes


def alias_to_nothing(o):
    o["ranks"][0]["aliases"] = {"extra/w": "no/such/tensor"}


def ref_to_nothing(o):
    tree_set(tree_child(o["ranks"][0]["tree"], "extra"), "w", {"$tensor": "no/such/tensor"})


HOSTILE = {
    "dotdot name": (set_file(name=".."), ManifestError, "unsafe file name"),
    "parent name": (set_file(name="../rank-00000.dckpt"), ManifestError, "unsafe file name"),
    "absolute name": (set_file(name="/etc/passwd"), ManifestError, "unsafe file name"),
    "separator name": (set_file(name="a/rank-00000.dckpt"), ManifestError, "unsafe file name"),
    "backslash name": (set_file(name="a\\b"), ManifestError, "unsafe file name"),
    "nul name": (set_file(name="rank\x00.dckpt"), ManifestError, "unsafe file name"),
    "hidden name": (set_file(name=".lock"), ManifestError, "unsafe file name"),
    "empty name": (set_file(name=""), ManifestError, "unsafe file name"),
    "long name": (set_file(name="a" * 300), ManifestError, "unsafe file name"),
    "dotdot dir": (set_file(dir=".."), ManifestError, "unsafe directory"),
    "absolute dir": (set_file(dir="/tmp"), ManifestError, "unsafe directory"),
    "nested dir": (set_file(dir="../../etc"), ManifestError, "unsafe directory"),
    "offset past declared end": (set_chunk(1, 10**9), ManifestError, "past the end"),
    "offset past real end": (
        lambda o: (set_file(size=10**9)(o), set_chunk(1, 10**8)(o)),
        IncompleteCheckpointError, "truncated"),
    "offset 2^63-1": (set_chunk(1, 2**63 - 1), ManifestError, "past the end"),
    "offset 2^64": (set_chunk(1, 2**64), ManifestError, "integer"),
    "negative offset": (set_chunk(1, -1), ManifestError, "integer"),
    "stored 2^64-1": (set_chunk(2, 2**64 - 1), ManifestError, "integer"),
    "raw 2^63": (set_chunk(3, 2**63), ManifestError, "integer"),
    "file size 2^64": (set_file(size=2**64), ManifestError, "integer"),
    "shape disagrees with lengths": (
        lambda o: o["tensors"][W].update(shape=[65, 33]), ManifestError, "tile"),
    "dtype disagrees with lengths": (
        lambda o: o["tensors"][W].update(dtype="float64"), ManifestError, "needs"),
    "shard shape disagrees": (
        lambda o: o["tensors"][W]["shards"][0].update(shape=[33, 64]), ManifestError, None),
    "overlapping shards": (dup_shard, ManifestError, r"shards at \[0, 0\] and \[16, 0\] overlap"),
    "chunks sharing bytes": (shared_bytes, ManifestError, "share stored bytes"),
    "zstd claiming 2^30 from a few bytes": (
        lambda o: o["tensors"][W]["shards"][0]["chunks"][0].__setitem__(3, 2**30),
        ManifestError, "cannot hold"),
    "alias to a missing tensor": (alias_to_nothing, ManifestError, "names no tensor"),
    "reference to a missing tensor": (ref_to_nothing, StateMismatchError, "not in the checkpoint"),
    "hash not hex": (set_chunk(5, "xyz"), ManifestError, "hex"),
    "codec 7": (set_chunk(4, 7), ManifestError, "integer"),
    "world size 0": (lambda o: o.update(world_size=0), ManifestError, "world_size"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_manifest(ckpt, case):
    mutate, error, message = HOSTILE[case]
    obj = manifest_obj(ckpt)
    mutate(obj)
    rewrite_manifest(ckpt, obj)
    for attempt in attempts(ckpt):
        with pytest.raises(error, match=message):
            attempt()
    assert sorted(p.name for p in ckpt.iterdir()) == [MANIFEST_NAME, "rank-00000.dckpt"]


@pytest.mark.parametrize("depth, message", [(500, "nested deeper"), (100_000, "not valid JSON")])
def test_deeply_nested_tree(ckpt, depth, message):
    """Too deep for the tree decoder, or for the JSON parser itself; sealed by splicing the
    nesting into the canonical text, which json.dumps could not write."""
    obj = manifest_obj(ckpt)
    tree_set(tree_child(obj["ranks"][0]["tree"], "extra"), "deep", "DEEP")
    deep = b"[" * depth + b"]" * depth
    body = {k: v for k, v in obj.items() if k != "self_hash"}
    digest = xxhash.xxh3_64_intdigest(_canonical(body).replace(b'"DEEP"', deep))
    body["self_hash"] = f"{digest:016x}"
    (ckpt / MANIFEST_NAME).write_bytes(_canonical(body).replace(b'"DEEP"', deep))
    for attempt in attempts(ckpt):
        with pytest.raises(ManifestError, match=message):
            attempt()


def test_overlapping_shards_with_valid_hashes(ckpt):
    """The overlap with every hash right: without the tiling check this loads 'successfully'
    with rows 48..63 left as whatever torch.empty returned."""
    obj = manifest_obj(ckpt)
    dup_shard(obj)
    data = (ckpt / "rank-00000.dckpt").read_bytes()
    for shard in obj["tensors"][W]["shards"]:
        tail = shard["chunks"][1]
        tail[5] = tail[6] = f"{xxhash.xxh3_64_intdigest(data[tail[1]:tail[1] + 128]):016x}"
    rewrite_manifest(ckpt, obj)
    for attempt in attempts(ckpt):
        with pytest.raises(ManifestError, match=r"shards at \[0, 0\] and \[16, 0\] overlap"):
            attempt()


def test_duplicate_tensor_names(ckpt):
    """JSON objects with a repeated key are refused, not resolved last-wins."""
    data = (ckpt / MANIFEST_NAME).read_bytes()
    entry = json.dumps({W: manifest_obj(ckpt)["tensors"][W]}, separators=(",", ":"))[1:-1]
    data = data.replace(b'"tensors":{', b'"tensors":{' + entry.encode() + b",", 1)
    (ckpt / MANIFEST_NAME).write_bytes(data)
    for attempt in attempts(ckpt):
        with pytest.raises(ManifestError, match="duplicate key"):
            attempt()


# ---- enormous declared sizes: must fail before allocating -------------------------------------

HUGE_JOB = r"""
import resource, sys
import dckpt, torch
from dckpt.errors import DckptError
# Address space: what is mapped now plus 256 MiB. A 1 GiB tensor cannot be allocated.
vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), resource.RLIM_INFINITY))
attempts = {"control": lambda c: torch.empty(1 << 28),
            "load": lambda c: dckpt.load(c),
            "restore": lambda c: dckpt.CheckpointManager(c.rsplit("/", 1)[0]).restore(
                {"extra": {}}, allow_missing=True)}
for arg in sys.argv[1:]:
    how, ckpt = arg.split("=", 1)
    try:
        attempts[how](ckpt)
        print(arg, "LOADED")
    except DckptError as e:
        print(arg, "TYPED", type(e).__name__, str(e)[:300].replace("\n", " "))
    except BaseException as e:
        print(arg, "UNTYPED", type(e).__name__, str(e)[:300].replace("\n", " "))
"""

GIB_FLOATS = 1 << 28  # float32 elements in 1 GiB


def huge_tensor(obj, chunks):
    obj["tensors"]["huge"] = {"kind": "torch", "dtype": "float32", "shape": [GIB_FLOATS],
                              "shards": [{"offsets": [0], "shape": [GIB_FLOATS], "rank": 0,
                                          "chunks": chunks}]}
    tree_set(tree_child(obj["ranks"][0]["tree"], "extra"), "huge", {"$tensor": "huge"})


def repeated_region(obj):
    """1 GiB claimed by one small zstd frame read 32 times, 32 MiB each (a ratio zstd can
    reach, so only the shared bytes give it away)."""
    c = chunk(obj)
    assert c[4] != 0 and c[2] >= 1024
    huge_tensor(obj, [[c[0], c[1], c[2], 1 << 25, c[4], c[5], c[6]]] * 32)


def promised_bytes(obj):
    """1 GiB of distinct raw chunks in a file the manifest says is 1 GiB long; it is 10 KB."""
    size = obj["files"][0]["size"]
    obj["files"][0]["size"] = size + (1 << 30)
    step = 1 << 20
    huge_tensor(obj, [[0, size + i * step, step, step, 0, "0" * 16, "0" * 16]
                      for i in range((1 << 30) // step)])


def compressed_claim(obj):
    """1 GiB from one small zstd frame."""
    c = chunk(obj)
    huge_tensor(obj, [[0, c[1], c[2], 1 << 30, 1, c[5], c[6]]])


def test_enormous_declared_size_fails_before_allocating(saved, tmp_path):
    """A 1 GiB tensor declared three ways over a 10 KB file, loaded and restored in a
    process that cannot map 1 GiB more: each must end in a typed error, not in the
    allocator (the control allocation shows the limit bites)."""
    crafts = {"repeated_region": (repeated_region, "share stored bytes"),
              "promised_bytes": (promised_bytes, "truncated"),
              "compressed_claim": (compressed_claim, "cannot hold")}
    args = ["control=-"]
    for name, (craft, _) in crafts.items():
        shutil.copytree(saved.parent, tmp_path / name)
        ckpt = tmp_path / name / saved.name
        obj = manifest_obj(ckpt)
        craft(obj)
        rewrite_manifest(ckpt, obj)
        args += [f"load={ckpt}", f"restore={ckpt}"]
    out = subprocess.run([sys.executable, "-c", HUGE_JOB, *args], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert len(lines) == len(args), out.stdout + out.stderr[-3000:]
    assert lines["control=-"].startswith("UNTYPED"), lines
    for name, (_, message) in crafts.items():
        for how in ("load", "restore"):
            result = lines[f"{how}={tmp_path / name / saved.name}"]
            assert result.startswith("TYPED") and message in result, (name, how, result)


# ---- property-based fuzzing of the parser and the loaders -------------------------------------

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8),
                      st.sampled_from([0, 1, -1, 2**63 - 1, 2**63, 2**64, "..", "/", "float32",
                                       "rank-00000.dckpt", "0" * 16, {"$tensor": W}]))
json_value = st.recursive(json_leaf, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=6), kids, max_size=4)),
    max_leaves=12)

EXAMPLES = 2000 if SLOW else 150


@pytest.fixture(scope="module")
def fuzz_base(saved):
    obj = manifest_obj(saved)
    return obj, [p for p in json_paths(obj, sample_lists=False) if p != ("self_hash",)]


def _fuzz_load(ckpt, data):
    (ckpt / MANIFEST_NAME).write_bytes(data)
    try:
        m = parse(data)
    except DckptError:
        return
    for c in (ch for t in m.tensors.values() for s in t.shards for ch in s.chunks):
        assert c.offset + c.stored <= m.files[c.file].size
    for attempt in attempts(ckpt):
        try:
            attempt()
        except DckptError:
            pass


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not SLOW,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_mutated_fields(fuzz_base, saved, tmp_path_factory, data):
    """Replace, delete or add fields anywhere (re-sealed): parse and both loaders either
    succeed or raise a typed error."""
    obj, paths = fuzz_base
    ckpt = _scratch(saved, tmp_path_factory)
    path = data.draw(st.sampled_from(paths))
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    mutated = json.loads(json.dumps(obj))
    node = mutated
    for k in path[:-1]:
        node = node[k]
    if action == "replace":
        node[path[-1]] = data.draw(json_value)
    elif action == "delete":
        node.pop(path[-1])
    elif isinstance(node[path[-1]], dict):
        node[path[-1]][data.draw(st.text(max_size=6))] = data.draw(json_value)
    elif isinstance(node[path[-1]], list):
        node[path[-1]].append(data.draw(json_value))
    _fuzz_load(ckpt, seal(mutated))


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not SLOW,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_mutated_bytes(saved, tmp_path_factory, data):
    """Random byte edits, insertions and deletions, not re-sealed: always a typed error."""
    ckpt = _scratch(saved, tmp_path_factory)
    raw = bytearray((saved / MANIFEST_NAME).read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["set", "insert", "delete"]))
        if op == "set":
            raw[i] = data.draw(st.integers(0, 255))
        elif op == "insert":
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=4))
        else:
            del raw[i:i + data.draw(st.integers(1, 8))]
    if bytes(raw) == (saved / MANIFEST_NAME).read_bytes():
        return
    (ckpt / MANIFEST_NAME).write_bytes(bytes(raw))
    for attempt in attempts(ckpt):
        with pytest.raises(DckptError):
            attempt()


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not SLOW,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_mutated_chunk_records(fuzz_base, saved, tmp_path_factory, data):
    """Chunk records with fields swapped for boundary and random integers (re-sealed): what
    parse lets through reaches the native reader, which must answer with a typed error or
    exactly the saved bytes."""
    obj, _ = fuzz_base
    ckpt = _scratch(saved, tmp_path_factory)
    mutated = json.loads(json.dumps(obj))
    records = [c for t in mutated["tensors"].values() for s in t["shards"] for c in s["chunks"]]
    size = mutated["files"][0]["size"]
    ints = st.one_of(st.sampled_from([0, 1, -1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1,
                                      size, size - 1, size + 1, 4096, 4095]),
                     st.integers(-2**64, 2**65))
    for _ in range(data.draw(st.integers(1, 3))):
        rec = data.draw(st.sampled_from(records))
        field = data.draw(st.integers(0, 6))
        rec[field] = data.draw(ints) if field < 5 else data.draw(
            st.one_of(st.just(rec[5 if field == 6 else 6]), st.from_regex(r"[0-9a-f]{16}", fullmatch=True)))
    _fuzz_load(ckpt, seal(mutated))


_scratch_dirs: dict = {}


def _scratch(saved, factory) -> Path:
    """One private copy per test function, reused across examples (the data files are never
    modified, only the manifest)."""
    key = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    if key not in _scratch_dirs:
        root = factory.mktemp("fuzz") / "root"
        shutil.copytree(saved.parent, root)
        _scratch_dirs[key] = root / saved.name
    return _scratch_dirs[key]


def test_fuzzed_manifest_left_no_files(saved):
    """Loading never writes: the scratch checkpoints hold only what was copied."""
    for ckpt in _scratch_dirs.values():
        names = sorted(p.name for p in ckpt.parent.rglob("*"))
        assert set(names) <= {".lock", "latest", ckpt.name, MANIFEST_NAME, "rank-00000.dckpt"}

"""Who writes what (dckpt.distributed.sharding.assign) from the ranks' offers, and the manifest's record
of it. Pure planning: no process group needed; test_distributed.py runs the real thing."""
import pytest

from dckpt.errors import ManifestError
from dckpt.format.manifest import Chunk, FileEntry, Manifest, Shard, TensorEntry, parse
from dckpt.distributed.sharding import LOCAL, OWNED, REPLICATED, SHARDED, Offer, assign

MESH = {"shape": [2], "dim_names": None, "ranks": [0, 1]}


def plain(name, nbytes, digest, shape=None):
    shape = shape or [nbytes // 4]
    return Offer.from_json({"name": name, "dtype": "float32", "kind": "torch", "shape": shape,
                            "global": shape, "offsets": [0] * len(shape), "nbytes": nbytes,
                            "placement": None, "digest": digest})


def shard(name, rows, offset, total, cols=4, mesh=MESH, placements=("Shard(dim=0)",)):
    return Offer.from_json({"name": name, "dtype": "float32", "kind": "torch",
                            "shape": [rows, cols], "global": [total, cols],
                            "offsets": [offset, 0], "nbytes": rows * cols * 4,
                            "placement": {"mesh": mesh, "placements": list(placements)},
                            "digest": None})


def plans(offers):
    return [assign(offers, r) for r in range(len(offers))]


def test_each_class_of_tensor():
    offers = [
        [shard("w", 3, 0, 5), plain("rep", 400, "aa"), plain("buf", 8, "01"), ],
        [shard("w", 2, 3, 5), plain("rep", 400, "aa"), plain("buf", 8, "02"),
         plain("only1", 16, "cc")],
    ]
    p0, p1 = plans(offers)
    writes = {r: dict(p.writes) for r, p in enumerate((p0, p1))}
    assert "w" in writes[0] and "w" in writes[1]  # every rank its own shard
    assert ("rep" in writes[0]) != ("rep" in writes[1])  # replicated: once in total
    assert writes[0]["buf@r0"] == 2 and writes[1]["buf@r1"] == 2  # differing: per rank
    assert p0.aliases == {"buf": "buf@r0"} and p1.aliases == {"buf": "buf@r1"}
    assert "only1" in writes[1] and "only1" not in writes[0]  # owned, under its own name
    every = {**p0.placements, **p1.placements}
    assert every["w"] == {"kind": SHARDED, "mesh": MESH, "placements": ["Shard(dim=0)"]}
    assert every["rep"]["kind"] == REPLICATED and every["only1"]["kind"] == OWNED
    assert every["buf@r0"]["kind"] == LOCAL
    assert p0.bytes_per_rank == p1.bytes_per_rank  # the same plan on every rank


def test_replicated_writes_are_balanced_by_bytes():
    sizes = [4000, 3000, 2000, 1000, 800, 400, 200, 100]
    offers = [[plain(f"t{i}", n, f"{i:02x}") for i, n in enumerate(sizes)] for _ in range(4)]
    ps = plans(offers)
    load = ps[0].bytes_per_rank
    assert sum(load) == sum(sizes) and max(load) - min(load) <= max(sizes)
    written = [n for p in ps for n, _ in p.writes]
    assert sorted(written) == sorted(f"t{i}" for i in range(len(sizes)))  # each once


def test_replicate_mesh_dimension_is_written_once():
    """HSDP: a (replicate, shard) mesh of 4 ranks holds each shard on two ranks."""
    mesh = {"shape": [2, 2], "dim_names": ["rep", "shard"], "ranks": [0, 1, 2, 3]}
    pl = ("Replicate()", "Shard(dim=0)")
    offers = [[shard("w", 4, 4 * (r % 2), 8, mesh=mesh, placements=pl)] for r in range(4)]
    ps = plans(offers)
    writers = {r: [n for n, _ in p.writes] for r, p in enumerate(ps)}
    assert sum(len(w) for w in writers.values()) == 2  # two blocks, each written once
    assert len([r for r, w in writers.items() if w]) == 2  # by two different ranks


@pytest.mark.parametrize("offers, message", [
    ([[shard("w", 3, 0, 5)], [shard("w", 3, 1, 5)]], "overlapping or missing"),
    ([[shard("w", 2, 0, 5)], [shard("w", 2, 3, 5)]], "overlapping or missing"),
    ([[shard("w", 3, 0, 5)], [plain("w", 80, "00", [5, 4])]], "DTensor on some ranks"),
    ([[shard("w", 3, 0, 5)], [shard("w", 2, 3, 6)]], "global shapes"),
])
def test_inconsistent_ranks_are_refused(offers, message):
    with pytest.raises(ValueError, match=message):
        assign(offers, 0)


def manifest_with(placement, meshes) -> bytes:
    ch = [Chunk(0, 0, 16, 16, 0, 1, 1)]
    t = TensorEntry("float32", [4], [Shard([0], [4], 0, ch)], placement=placement)
    return Manifest(world_size=2, files=[FileEntry("rank-00000.dckpt", 16, 0)],
                    tensors={"w": t}, ranks=[{"tree": {}}, {"tree": {}}],
                    meshes=meshes).to_bytes()


def test_manifest_keeps_placements_and_meshes():
    m = parse(manifest_with({"kind": "sharded", "mesh": 0, "placements": ["Shard(dim=0)"]},
                            [MESH]))
    assert m.tensors["w"].placement["placements"] == ["Shard(dim=0)"] and m.meshes == [MESH]
    assert parse(manifest_with(None, [])).tensors["w"].placement is None


@pytest.mark.parametrize("placement, meshes, message", [
    ({"kind": "scattered"}, [], "expected one of"),
    ({"kind": "sharded", "mesh": 1, "placements": ["S"]}, [MESH], "mesh"),
    ({"kind": "sharded", "mesh": 0, "placements": ["S", "R"]}, [MESH], "one placement name"),
    ({"kind": "sharded", "mesh": 0, "placements": [7]}, [MESH], "one placement name"),
    (None, [{"shape": [2, 2], "ranks": [0, 1]}], "ranks for mesh shape"),
    (None, [{"shape": [2], "ranks": [0, -1]}], "integer"),
    (None, [{"shape": [2], "ranks": [0, 1], "dim_names": ["a", "b"]}], "one name per"),
    ("sharded", [], "expected dict"),
])
def test_hostile_placements_are_refused(placement, meshes, message):
    with pytest.raises(ManifestError, match=message):
        parse(manifest_with(placement, meshes))


def test_offers_travel_with_compact_meshes_and_come_back_equal():
    import json
    big = {"shape": [4096], "dim_names": None, "ranks": list(range(4096))}
    o = shard("w", 1, 7, 4096, mesh=big)
    wire = json.dumps(o.to_json())
    assert len(wire) < 400  # the 4,096 ranks travel as {"first": 0, "count": 4096}
    assert Offer.from_json(json.loads(wire)) == o


def test_layout_hash_sees_the_layout_not_the_values():
    from dataclasses import replace
    from dckpt.distributed.sharding import layout_hash, plan_id
    offers = [shard("w", 3, 0, 5), plain("rep", 400, "aa")]
    h = layout_hash(offers)
    assert layout_hash([offers[0], replace(offers[1], digest="bb")]) == h  # values change
    for changed in ([shard("w", 3, 0, 6), offers[1]], [shard("v", 3, 0, 5), offers[1]],
                    [offers[1], offers[0]], [offers[0], plain("rep", 400, "aa", [10, 10])],
                    [shard("w", 3, 0, 5, placements=("Replicate()",)), offers[1]]):
        assert layout_hash(changed) != h, changed
    assert plan_id([h, h]) != plan_id([h, layout_hash(offers[:1])])


def test_assign_lists_replicas_and_owners_for_every_rank():
    offers = [[plain("rep", 400, "aa"), plain("mine", 8, "01")],
              [plain("rep", 400, "aa"), plain("only1", 16, "cc"), plain("mine", 8, "02")]]
    p0, p1 = plans(offers)
    assert p0.replicated == p1.replicated == ("rep",)
    assert p0.owned == p1.owned == {"only1": 1}


def test_compact_plan_decides_what_the_full_plan_does():
    """Every rank holding the same Shard-placed DTensors: the plan from their hash, the
    bytes and the plain offers (what travels) equals assign's from every offer."""
    from dckpt.distributed.sharding import assign_compact, compact_applies, compact_offers
    world = 4
    mesh = {"shape": [world], "dim_names": None, "ranks": list(range(world))}
    offers = []
    for r in range(world):
        mine = [shard(f"w{k}", rows, r * rows, rows * world, mesh=mesh)
                for k, rows in enumerate((3, 1, 2))]
        mine += [plain("rep", 400, "aa"), plain("big", 4000, "bb"),
                 plain("mine", 8, f"0{r}")] + ([plain("only2", 16, "cc")] if r == 2 else [])
        offers.append(mine)
    msgs = [compact_offers(o) for o in offers]
    assert compact_applies(msgs)
    for r in range(world):
        full, fast = assign(offers, r), assign_compact(msgs, offers[r], r)
        assert sorted(fast.writes) == sorted(full.writes), r
        assert (fast.aliases, fast.placements, fast.bytes_per_rank, fast.replicated,
                fast.owned) == (full.aliases, full.placements, full.bytes_per_rank,
                                full.replicated, full.owned), r
    # A replicated mesh dimension, or ranks holding different DTensors: every offer travels.
    hsdp = [[shard("w", 2, 0, 2, placements=("Replicate()",))] for _ in range(2)]
    assert not compact_applies([compact_offers(o) for o in hsdp])
    assert not compact_applies([compact_offers(offers[0]), compact_offers(offers[1][1:])])

"""What a save keeps between calls to cut its fixed cost (the offers and layout hash of a
layout seen before: sharding.offer_layout; the manifest record templates:
format/canonical.py) never outlives the layout it was made for: after a change of shape,
dtype, key or number of tensors the save writes the new layout, restored bitwise, and its
manifest describes the state as it is."""
import numpy as np
import torch

import dckpt
from dckpt import CheckpointManager
from dckpt.distributed import sharding
from dckpt.engine.checkpoint import snapshot


def base_state() -> dict:
    g = torch.Generator().manual_seed(3)
    return {"w": torch.randn(40, 30, generator=g), "b": torch.randn(30, generator=g),
            "i": torch.arange(50, dtype=torch.int32), "a": np.arange(12, dtype=np.float32),
            "step": 7}


def variants(s: dict) -> list[dict]:
    return [
        {**s, "w": torch.randn(30, 40)},  # same numel, another shape
        {**s, "b": s["b"].to(torch.float16)},  # another dtype
        {**s, "i": s["i"].view(torch.float32)},  # same bytes, another dtype
        {**s, "a": s["a"].astype(np.float64)},  # a numpy dtype
        {**s, "a": s["a"].reshape(3, 4)},  # a numpy shape
        {("x" if k == "b" else k): v for k, v in s.items()},  # a key renamed
        {**s, "c": torch.ones(3, dtype=torch.bfloat16)},  # one more tensor
        {k: v for k, v in s.items() if k != "w"},  # one fewer
        {**s, "b": torch.randn(31)},  # another size
        s,  # and back
    ]


def bitwise(loaded: dict, state: dict) -> None:
    assert set(loaded) == set(state)
    for k, v in state.items():
        got = loaded[k]
        if isinstance(v, torch.Tensor):
            assert got.dtype == v.dtype and got.shape == v.shape, k
            assert torch.equal(got.view(torch.uint8), v.view(torch.uint8)), k
        elif isinstance(v, np.ndarray):
            assert got.dtype == v.dtype and got.shape == v.shape, k
            assert got.tobytes() == v.tobytes(), k
        else:
            assert got == v, k


def described(m, state: dict) -> None:
    """The manifest's records are the state's tensors, with their dtypes and shapes."""
    want = {k: v for k, v in state.items() if isinstance(v, (torch.Tensor, np.ndarray))}
    assert set(m.tensors) == set(want)
    for k, v in want.items():
        t = m.tensors[k]
        assert t.shape == list(v.shape), k
        assert t.kind == ("numpy" if isinstance(v, np.ndarray) else "torch"), k
        assert t.dtype == (v.dtype.str if isinstance(v, np.ndarray) else str(v.dtype)[6:]), k
        assert t.nbytes == v.nbytes, k


def test_offers_of_a_known_layout_equal_fresh_ones():
    s = base_state()
    for world in (1, 2):
        for v in [s, *variants(s), s]:
            flat = snapshot(v).flat
            offers, own = sharding.offer_layout(flat, world)
            fresh = sharding.offer(flat, world)
            assert offers == fresh
            assert own == sharding.layout_hash(fresh)
    # The digests (world > 1: small tensors carry one) follow the values, not the cache.
    flat = snapshot(s).flat
    before = {o.name: o.digest for o in sharding.offer_layout(flat, 2)[0]}
    changed = {**s, "b": s["b"] + 1}
    after = {o.name: o.digest for o in sharding.offer_layout(snapshot(changed).flat, 2)[0]}
    assert before["b"] != after["b"] and before["w"] == after["w"]


def test_dckpt_save_after_a_layout_change_is_bitwise(tmp_path):
    s = base_state()
    dckpt.save(s, tmp_path / "warm")  # the caches now hold this layout
    for n, v in enumerate(variants(s)):
        r = dckpt.save(v, tmp_path / f"v{n}")
        bitwise(dckpt.load(tmp_path / f"v{n}"), v)
        described(dckpt.read_manifest(tmp_path / f"v{n}"), v)
        assert r.manifest.to_bytes() == (tmp_path / f"v{n}" / "manifest.json").read_bytes()


def test_manager_saves_after_layout_changes_are_bitwise(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3, chunk_size=4096)
    s = base_state()
    step = 0
    for _ in range(2):
        mgr.save(step, s)
        step += 1
    for v in variants(s):
        for _ in range(2):  # a new layout, then the same layout from the caches
            r = mgr.save(step, v)
            bitwise(dckpt.load(mgr.path(step)), v)
            described(dckpt.read_manifest(mgr.path(step)), v)
            assert r.bytes == sum(x.nbytes for x in v.values()
                                  if isinstance(x, (torch.Tensor, np.ndarray)))
            step += 1
        assert r.manifest.meta["incremental"]["new_bytes"] == 0  # unchanged: all shared


def test_small_tensor_digest_fast_path_hashes_the_same_bytes():
    """sharding._digest hashes a plain contiguous CPU tensor through its numpy view; the
    digest must be the general path's (its bytes) for every shape and dtype."""
    g = torch.Generator().manual_seed(5)
    values = [torch.tensor(3.5), torch.tensor(7, dtype=torch.int64), torch.randn(5, generator=g),
              torch.randn(3, 4, generator=g).double(), torch.tensor([True, False, True]),
              torch.randn(6, generator=g).half(), torch.randn(4, generator=g).bfloat16(),
              torch.randn(4, 3, generator=g).t(), torch.empty(0),
              torch.randn(3, generator=g, requires_grad=True),
              torch.randn(2, dtype=torch.complex64, generator=g)]
    for v in values:
        leaf = sharding.Leaf("x", v, list(v.shape), [0] * v.dim())
        host = v.detach().contiguous()
        want = f"{sharding.io.hash64(sharding.io.byte_view(host)):016x}"
        assert sharding._digest(leaf) == want, (v.dtype, tuple(v.shape))


def test_lists_of_plain_values_are_copied_into_the_tree():
    """flatten takes a list of plain values in one step: the tree holds a copy (a later
    change to the live list does not reach a snapshot), and subclasses still come out as
    the plain containers they did."""
    import collections
    import enum
    order = list(range(1000))
    Pair = collections.namedtuple("Pair", "a b")
    Color = enum.IntEnum("Color", "RED GREEN")
    state = {"order": order, "mixed": [1, 2.5, "x", None, True], "pair": Pair(1, 2),
             "enums": [Color.RED, 3]}
    tree = snapshot(state).flat.tree
    order.append(1000)
    assert tree["order"] == list(range(1000)) and type(tree["order"]) is list
    assert tree["mixed"] == [1, 2.5, "x", None, True]
    assert type(tree["pair"]) is tuple and tree["pair"] == (1, 2)
    assert tree["enums"] == [Color.RED, 3]

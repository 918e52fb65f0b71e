"""Tensors that are views of one storage (a flat buffer's parameters, `t` and `t[2:5]`) are
stored once and come back as views of one storage, as torch.save/torch.load keep them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import dckpt
from dckpt.format import reader as refreader
from dckpt.format.manifest import MANIFEST_NAME
from helpers.ranks import run_with_ranks

N = 1 << 18  # elements of the flat buffer: 1 MiB of float32


def flat_model(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A model whose parameters are views of one flat buffer, as ZeRO-3/Megatron's
    distributed optimizer lay them out (with padding between them)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(256, 480), nn.Linear(480, 256))
    flat = torch.zeros(N)
    pos = 0
    for p in model.parameters():
        n = p.numel()
        flat[pos:pos + n] = p.detach().reshape(-1)
        p.data = flat[pos:pos + n].view_as(p)
        pos += n + 64  # alignment padding
    assert pos <= N
    return model, flat


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _data_bytes(ckpt: Path) -> int:
    return sum(p.stat().st_size for p in ckpt.iterdir() if p.suffix == ".dckpt")


def test_views_come_back_sharing_one_storage(tmp_path):
    model, flat = flat_model()
    t = torch.randn(10, 6)
    state = {"model": model, "flat": flat, "t": t, "t25": t[2:5], "col": t[:, 1],
             "every2": t.reshape(-1)[::2], "bytes": t.view(torch.uint8)[0]}
    dckpt.save(state, tmp_path / "ck", fsync=False)
    out = dckpt.load(tmp_path / "ck")
    sd = out["model"]
    for k, p in model.state_dict().items():
        assert torch.equal(sd[k], p) and sd[k].stride() == p.stride()
        assert _storage(sd[k]) == _storage(out["flat"])
        assert sd[k].storage_offset() == p.storage_offset()  # same place in the buffer
    assert torch.equal(out["flat"], flat)
    for k in ("t25", "col", "every2", "bytes"):
        assert torch.equal(out[k], state[k]) and out[k].stride() == state[k].stride()
        assert _storage(out[k]) == _storage(out["t"])
    assert out["t25"].data_ptr() == out["t"][2:5].data_ptr()
    out["t"][3, 0] = 1234.0  # a write through one is seen through the others
    assert out["t25"][1, 0] == 1234.0 and out["every2"][9] == 1234.0
    # torch.save keeps the same aliasing: the reference behaviour
    del state["bytes"]  # torch.save refuses views of one storage with different dtypes
    torch.save(state, tmp_path / "ref.pt")
    ref = torch.load(tmp_path / "ref.pt", weights_only=False)
    assert _storage(ref["t25"]) == _storage(ref["t"])


def test_each_storage_is_written_once(tmp_path):
    model, flat = flat_model()
    shared = {"model": model, "flat": flat}
    dckpt.save(shared, tmp_path / "shared", fsync=False)
    separate = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                "flat": flat.clone()}
    dckpt.save(separate, tmp_path / "separate", fsync=False)
    # The params fill most of the buffer: stored apart they take it almost twice.
    assert _data_bytes(tmp_path / "shared") == flat.nbytes
    assert _data_bytes(tmp_path / "separate") > 1.8 * flat.nbytes
    m = dckpt.read_manifest(tmp_path / "shared")
    assert list(m.tensors) == ["model/0.weight~storage"] and m.version == 2
    assert dckpt.read_manifest(tmp_path / "separate").version == 1  # unchanged without views


def test_in_place_load_keeps_the_live_aliasing(tmp_path):
    model, flat = flat_model(seed=1)
    dckpt.save({"model": model, "flat": flat}, tmp_path / "ck", fsync=False)
    live, live_flat = flat_model(seed=2)
    before = {k: (_storage(p), p.storage_offset()) for k, p in live.state_dict().items()}
    rep = dckpt.load(tmp_path / "ck", into={"model": live, "flat": live_flat})
    assert rep.tensors == 1 and rep.bytes == flat.nbytes
    assert torch.equal(live_flat, flat)
    for k, p in live.state_dict().items():
        assert (_storage(p), p.storage_offset()) == before[k] and _storage(p) == _storage(live_flat)
        assert torch.equal(p, model.state_dict()[k])
    # a live model whose parameters are NOT views takes the values all the same
    plain = nn.Sequential(nn.Linear(256, 480), nn.Linear(480, 256))
    dckpt.load(tmp_path / "ck", into={"model": plain}, keys=["model"])
    for k, p in plain.state_dict().items():
        assert torch.equal(p, model.state_dict()[k])
    with pytest.raises(dckpt.StateMismatchError, match="a view"):
        dckpt.load(tmp_path / "ck", into={"model": nn.Sequential(nn.Linear(256, 4),
                                                                 nn.Linear(4, 256))},
                   keys=["model"])


def test_optimizer_over_flat_params_resumes_bitwise(tmp_path):
    """An AdamW over the views: train, save, restore into a fresh flat model, train on."""
    def run(model, opt, steps):
        g = torch.Generator().manual_seed(5)
        for _ in range(steps):
            x = torch.randn(8, 256, generator=g)
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()

    model, flat = flat_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run(model, opt, 2)
    mgr = dckpt.CheckpointManager(tmp_path / "run", fsync=False)
    mgr.save(2, {"model": model, "flat": flat, "optimizer": opt})
    run(model, opt, 2)
    live, live_flat = flat_model(seed=9)
    live_opt = torch.optim.AdamW(live.parameters(), lr=1e-3)
    mgr.restore({"model": live, "flat": live_flat, "optimizer": live_opt}, restore_rng=False)
    run(live, live_opt, 2)
    assert torch.equal(live_flat, flat)


def test_incremental_saves_see_writes_through_the_views(tmp_path):
    model, flat = flat_model()
    mgr = dckpt.CheckpointManager(tmp_path / "run", fsync=False, trust_versions=True,
                                  chunk_size=1 << 16)
    state = {"model": model, "flat": flat}
    mgr.save(1, state)
    mgr.save(2, state)  # unchanged: every chunk shared with step 1
    inc = dckpt.read_manifest(mgr.path(2)).meta["incremental"]
    assert inc["new_bytes"] == 0 and inc["referenced_bytes"] == flat.nbytes
    with torch.no_grad():
        model[0].bias.add_(1.0)  # through a view: the storage record's own counter is still
    mgr.save(3, state)
    out = dckpt.load(mgr.path(3))
    assert torch.equal(out["model"]["0.bias"], model[0].bias.detach())
    assert torch.equal(out["flat"], flat)
    assert 0 < dckpt.read_manifest(mgr.path(3)).meta["incremental"]["new_bytes"] < flat.nbytes


def test_reference_reader_reads_views(tmp_path):
    t = torch.randn(12, 5, dtype=torch.float64)
    state = {"block": t[3:7, 1:4], "ints": t.view(torch.int32)[:, ::3], "t": t}
    dckpt.save(state, tmp_path / "ck", fsync=False, compression="zstd")
    m = refreader.read_manifest(tmp_path / "ck")
    tree = m.ranks[0]["tree"]
    for k, v in state.items():
        node = tree[k]
        assert "$view" in node
        raw = refreader.read_view(tmp_path / "ck", m, node)
        want = v.contiguous().view(torch.uint8).numpy().reshape(*v.shape, v.element_size())
        assert np.array_equal(raw, want)


def _rewrite_view(ckpt: Path, key: str, **fields) -> None:
    m = dckpt.read_manifest(ckpt)
    m.ranks[0]["tree"][key].update(fields)
    (ckpt / MANIFEST_NAME).write_bytes(m.to_bytes())


@pytest.mark.parametrize("fields", [
    {"offset": 10 ** 6},  # past the record
    {"shape": [3, 4], "stride": [1000, 1]},  # reaches past the end through a stride
    {"offset": -1},
    {"shape": [3], "stride": [1, 1]},  # one stride per dimension
    {"dtype": "object"},
    {"$view": "no-such-record"},
    {"$view": "t"},  # names a view's tree path, which is no record
])
def test_hostile_views_are_refused_before_any_read(tmp_path, fields):
    t = torch.arange(10.0)
    ck = tmp_path / "ck"
    dckpt.save({"s": t[2:5], "t": t}, ck, fsync=False)  # sorted keys: a plain JSON object
    _rewrite_view(ck, "s", **fields)
    with pytest.raises((dckpt.ManifestError, dckpt.StateMismatchError)) as e:
        dckpt.load(ck)
    assert "s" in str(e.value) or "view" in str(e.value)
    live = {"t": torch.zeros(10), "s": torch.zeros(3)}
    with pytest.raises((dckpt.ManifestError, dckpt.StateMismatchError)):
        dckpt.load(ck, into=live)
    assert not live["t"].any() and not live["s"].any()  # nothing was read into it
    from dckpt.tools.verify import verify
    report = verify(ck)
    assert not report.ok
    assert any(c.id == "structure.tree" and c.level == "error" for c in report.all_checks())


def test_checkpoints_of_the_previous_release_still_load(tmp_path):
    """tests/data/v1-two-views was written by the release before views existed (commit
    7c16fca): `t = arange(10)` and `t[2:5]` saved as two tensors."""
    old = Path(__file__).parent / "data" / "v1-two-views"
    shutil.copytree(old, tmp_path / "old")
    m = json.loads((tmp_path / "old" / MANIFEST_NAME).read_text())
    assert m["version"] == 1 and set(m["tensors"]) == {"t", "s"}
    out = dckpt.load(tmp_path / "old")
    assert torch.equal(out["t"], torch.arange(10.0)) and torch.equal(out["s"], out["t"][2:5])
    live = {"t": torch.zeros(10)}
    live["s"] = live["t"][2:5]
    dckpt.load(tmp_path / "old", into=live)
    assert torch.equal(live["s"], torch.arange(2.0, 5.0))


def _rank_views(rank: int, world: int, path: str) -> list:
    """Each rank has its own flat buffer (different values) with views into it, and a
    sharded-by-ownership tensor from the distributed layer alongside."""
    t = torch.arange(12.0) + 100 * rank
    state = {"t": t, "head": t[:4], "tail": t[8:].view(2, 2)}
    dckpt.save(state, path)
    out = dckpt.load(path)
    same = _storage(out["head"]) == _storage(out["t"]) == _storage(out["tail"])
    live = {"t": torch.zeros(12)}
    live["head"], live["tail"] = live["t"][:4], live["t"][8:].view(2, 2)
    dckpt.load(path, into=live)
    return [same, out["t"].tolist(), out["tail"].tolist(), live["t"].tolist(),
            _storage(live["head"]) == _storage(live["t"])]


def test_views_on_distributed_ranks(tmp_path):
    results = run_with_ranks(2, _rank_views, str(tmp_path / "ck"))
    for rank, (same, t, tail, live_t, live_same) in enumerate(results):
        want = (torch.arange(12.0) + 100 * rank).tolist()
        assert same and live_same and t == want and live_t == want
        assert tail == [want[8:10], want[10:12]]
    m = dckpt.read_manifest(tmp_path / "ck")
    assert len(m.tensors) == 2  # one storage record per rank, nothing else


def test_inspect_shows_each_view_with_its_own_shape(tmp_path):
    from helpers.cli import run_cli
    model, flat = flat_model()
    dckpt.save({"model": model, "flat": flat}, tmp_path / "ck", fsync=False)
    code, out, _ = run_cli("inspect", tmp_path / "ck", "--tree")
    assert code == 0 and "format v2" in out
    assert "0.bias: <float32[480] view of model/0.weight~storage at element 122944>" in out
    code, _, _ = run_cli("verify", tmp_path / "ck", "--deep")
    assert code == 0


def test_async_save_of_views(tmp_path):
    """The background writer stages the storage record like any other leaf: a write after
    save() returned is not in the checkpoint."""
    model, flat = flat_model()
    want = flat.clone()
    with dckpt.CheckpointManager(tmp_path / "run", fsync=False, async_save=True) as mgr:
        handle = mgr.save(1, {"model": model, "flat": flat})
        with torch.no_grad():
            model[1].bias.fill_(-5.0)  # after the snapshot
        assert handle.result(timeout=120) is not None
    out = dckpt.load(tmp_path / "run" / "step-000000001")
    assert torch.equal(out["flat"], want)
    assert _storage(out["model"]["1.bias"]) == _storage(out["flat"])

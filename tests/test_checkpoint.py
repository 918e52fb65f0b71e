"""dckpt.save / dckpt.load: every dtype and shape, sharing, partial loads, no pickle."""
import json
import pickle

import numpy as np
import pytest
import torch

import dckpt
from dckpt.errors import (CheckpointExistsError, FormatVersionError, StateMismatchError,
                          UnsupportedStateError)
from dckpt.format.reader import read_manifest, read_tensor_bytes
from dckpt.state.tensors import TORCH_DTYPES

DTYPES = sorted(TORCH_DTYPES)


def make(dtype: torch.dtype, shape) -> torch.Tensor:
    raw = torch.randint(0, 256, (int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size(),),
                        dtype=torch.uint8)
    if dtype == torch.bool:
        return (raw % 2).bool().reshape(shape)
    return raw.view(dtype).reshape(shape)


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and raw(a) == raw(b)


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_every_dtype_and_shape(tmp_path, compression):
    state = {}
    for name in DTYPES:
        dt = TORCH_DTYPES[name]
        for shape in [(), (0,), (3, 0, 2), (7,), (5, 33)]:
            state[f"{name}{list(shape)}"] = make(dt, shape)
    state["noncontig"] = torch.arange(24.0).reshape(4, 6).t()
    state["slice"] = torch.arange(100, dtype=torch.int16)[10:50:3]
    state["big"] = torch.randn(3_000_000)  # several chunks
    dckpt.save(state, tmp_path / "c", compression=compression, chunk_size=1 << 20)
    back = dckpt.load(tmp_path / "c")
    assert back.keys() == state.keys()
    for k, v in state.items():
        assert same(back[k], v), k
    # The open-format oracle: numpy + zstandard + xxhash read the same bytes.
    m = read_manifest(tmp_path / "c")
    for k in ("float32[5, 33]", "bfloat16[7]", "big"):
        assert read_tensor_bytes(tmp_path / "c", m, k).tobytes() == \
            state[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_values_and_numpy(tmp_path):
    state = {"n": 3, "f": float("nan"), "inf": float("-inf"), "s": "x", "b": b"\x00\x01",
             "t": (1, [2, (3,)]), "none": None, "ints": {1: "a", (2, 3): "b"},
             "arr": np.arange(12, dtype=np.float64).reshape(3, 4),
             "arr_bool": np.array([True, False]), "np_scalar": np.float32(2.5),
             "dtype": torch.bfloat16, "size": torch.Size([2, 3])}
    dckpt.save(state, tmp_path / "c")
    back = dckpt.load(tmp_path / "c")
    assert back["n"] == 3 and np.isnan(back["f"]) and back["inf"] == float("-inf")
    assert back["t"] == (1, [2, (3,)]) and back["ints"] == {1: "a", (2, 3): "b"}
    assert isinstance(back["arr"], np.ndarray) and np.array_equal(back["arr"], state["arr"])
    assert back["arr_bool"].dtype == np.bool_ and back["np_scalar"] == 2.5
    assert back["dtype"] is torch.bfloat16 and back["size"] == (2, 3) and back["b"] == b"\x00\x01"


def test_shared_storage_survives(tmp_path):
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied weights
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    dckpt.save({"model": model.state_dict()}, tmp_path / "c")
    back = dckpt.load(tmp_path / "c")["model"]
    assert back["emb.weight"] is back["head.weight"]
    m = read_manifest(tmp_path / "c")
    assert len(m.tensors) == 1  # written once


def test_load_into_live_objects_in_place(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
    state = {"model": model, "optimizer": opt, "epoch": 7, "history": [1.0, 2.0]}
    dckpt.save(state, tmp_path / "c")

    fresh = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=5.0)
    ptr = fresh[0].weight.data_ptr()
    live = {"model": fresh, "optimizer": fresh_opt, "epoch": 0, "history": []}
    report = dckpt.load(tmp_path / "c", into=live)
    assert fresh[0].weight.data_ptr() == ptr  # read into existing memory
    assert live["epoch"] == 7 and live["history"] == [1.0, 2.0]
    assert report.components == {"model": "model", "optimizer": "optimizer", "epoch": "value",
                                 "history": "value"}
    # 4 parameters, and per parameter AdamW's step, exp_avg and exp_avg_sq
    saved = list(model.state_dict().values()) + [
        v for per in opt.state_dict()["state"].values() for v in per.values()]
    assert report.tensors == len(saved) == 16
    assert report.bytes == sum(t.numel() * t.element_size() for t in saved)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["exp_avg_sq"], fresh_opt.state[b]["exp_avg_sq"])
    assert fresh_opt.param_groups[0]["lr"] == 1e-3


def test_partial_load(tmp_path):
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dckpt.save({"model": model, "optimizer": opt, "step": 3}, tmp_path / "c")
    only = dckpt.load(tmp_path / "c", keys=["model"])
    assert list(only) == ["model"] and torch.equal(only["model"]["weight"], model.weight)
    fresh = torch.nn.Linear(4, 4)
    dckpt.load(tmp_path / "c", into={"model": fresh}, keys=["model"])
    assert torch.equal(fresh.weight, model.weight)
    with pytest.raises(KeyError, match="nope"):
        dckpt.load(tmp_path / "c", keys=["nope"])


def test_mismatches_reported_together_before_reading(tmp_path):
    dckpt.save({"model": torch.nn.Linear(4, 4), "head": torch.nn.Linear(4, 4), "step": 1},
               tmp_path / "c")
    model = torch.nn.Linear(4, 4)
    torch.nn.init.constant_(model.weight, 7.0)
    live = {"model": model, "head": torch.nn.Linear(4, 5).double(), "step": 0,
            "scaler": torch.nn.Linear(1, 1)}
    with pytest.raises(StateMismatchError) as e:
        dckpt.load(tmp_path / "c", into=live)
    text = str(e.value)
    assert "head/weight" in text and "head/bias" in text and "'scaler'" in text
    assert len(e.value.problems) == 3
    assert torch.all(model.weight == 7.0) and live["step"] == 0  # nothing was read
    report = dckpt.load(tmp_path / "c", into={"model": model, "extra": 1},
                        allow_missing=["extra"])
    assert report.missing_allowed == ["extra"] and not torch.all(model.weight == 7.0)


def test_same_size_other_dtype_is_a_mismatch_and_views_are_filled(tmp_path):
    """A live tensor of another dtype is refused even when its bytes would fit exactly;
    a non-contiguous live tensor is filled through its values, not its memory."""
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    dckpt.save({"model": {"w": w, "v": w.clone()}}, tmp_path / "c")
    live = {"model": {"w": torch.zeros(3, 4, dtype=torch.int32), "v": torch.zeros(3, 4)}}
    with pytest.raises(StateMismatchError, match=r"model/w: live int32\[3, 4\] vs checkpoint "
                                                 r"float32\[3, 4\]"):
        dckpt.load(tmp_path / "c", into=live)
    assert not live["model"]["v"].any()  # nothing read
    base = torch.zeros(4, 3)
    live = {"model": {"w": base.t(), "v": torch.zeros(3, 4)}}
    dckpt.load(tmp_path / "c", into=live)
    assert live["model"]["w"]._base is base and torch.equal(base.t(), w)


def test_a_mismatch_changes_nothing_live(tmp_path):
    """The walk that finds problems also plans the restore: none of it happens (no read, no
    change to a live container) when anything mismatched, however late the problem."""
    dckpt.save({"stats": {"mean": torch.ones(3), "seen": [torch.ones(2), 5]},
                "w": torch.ones(3)}, tmp_path / "c")
    seen = [torch.full((2,), 7.0), 0]
    stats = {"mean": torch.full((3,), 7.0), "seen": seen}
    live = {"stats": stats, "w": torch.zeros(4)}
    with pytest.raises(StateMismatchError, match=r"w: live float32\[4\]") as e:
        dckpt.load(tmp_path / "c", into=live)
    assert len(e.value.problems) == 1
    assert live["stats"] is stats and stats["seen"] is seen and seen[1] == 0
    assert torch.all(stats["mean"] == 7.0) and torch.all(seen[0] == 7.0)
    live["w"] = torch.zeros(3)
    dckpt.load(tmp_path / "c", into=live)
    assert seen[1] == 5 and torch.all(stats["mean"] == 1.0) and torch.all(seen[0] == 1.0)
    assert torch.all(live["w"] == 1.0)


def test_modules_that_change_how_they_load_still_load(tmp_path):
    """A module whose tensors were all read in place need not be handed them again, unless
    some part of it saves or loads its own way: an override, a hook or extra state."""
    class Cached(torch.nn.Linear):
        def _load_from_state_dict(self, *args, **kwargs):
            super()._load_from_state_dict(*args, **kwargs)
            self.loaded = True

    class Versioned(torch.nn.Module):  # extra state equal to the live one: still handed over
        def __init__(self):
            super().__init__()
            self.w, self.restored = torch.nn.Parameter(torch.ones(2)), False

        def get_extra_state(self):
            return 1

        def set_extra_state(self, state):
            self.restored = state == 1

    class Copied(torch.nn.Linear):  # its state dict holds copies, not its own tensors
        def _save_to_state_dict(self, destination, prefix, keep_vars):
            for name, p in self.named_parameters(recurse=False):
                destination[prefix + name] = p.detach().clone()

    torch.manual_seed(0)
    dckpt.save({"a": torch.nn.Sequential(Cached(2, 2)), "n": Versioned(),
                "b": torch.nn.Linear(2, 2), "c": torch.nn.Linear(2, 2),
                "k": torch.nn.Sequential(Copied(2, 2)), "h": torch.nn.Linear(2, 2)}, tmp_path / "c")
    saved = dckpt.load(tmp_path / "c")
    a, n, k = torch.nn.Sequential(Cached(2, 2)), Versioned(), torch.nn.Sequential(Copied(2, 2))
    b, c, h = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    seen = []
    c.register_load_state_dict_post_hook(lambda module, keys: seen.append(module))

    def hand_out_copies(module, state, prefix, local_metadata):
        for key in state:
            state[key] = state[key].clone()
    h.register_state_dict_post_hook(hand_out_copies)
    dckpt.load(tmp_path / "c", into={"a": a, "n": n, "b": b, "c": c, "k": k, "h": h})
    assert a[0].loaded and n.restored and seen == [c]
    assert torch.equal(b.weight, saved["b"]["weight"]) and torch.equal(c.bias, saved["c"]["bias"])
    assert torch.equal(a[0].weight, saved["a"]["0.weight"])
    assert torch.equal(k[0].weight, saved["k"]["0.weight"])
    assert torch.equal(h.weight, saved["h"]["weight"])


def test_module_key_mismatch(tmp_path):
    dckpt.save({"model": torch.nn.Linear(4, 4)}, tmp_path / "c")
    with pytest.raises(StateMismatchError, match="missing from the checkpoint"):
        dckpt.load(tmp_path / "c", into={"model": torch.nn.Sequential(torch.nn.Linear(4, 4))})


def test_unsupported_value_names_its_path(tmp_path):
    with pytest.raises(UnsupportedStateError, match="'cfg/fn'"):
        dckpt.save({"cfg": {"fn": lambda x: x}}, tmp_path / "c")
    assert not list(tmp_path.iterdir())  # nothing left behind


def test_no_pickle_on_load(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 3)
    dckpt.save({"model": model, "meta": {"a": (1, 2)}}, tmp_path / "c", compression="zstd")

    def refuse(*a, **k):
        raise AssertionError("pickle used on the load path")
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    back = dckpt.load(tmp_path / "c")
    assert torch.equal(back["model"]["weight"], model.weight)
    fresh = torch.nn.Linear(3, 3)
    dckpt.load(tmp_path / "c", into={"model": fresh, "meta": None})
    assert torch.equal(fresh.weight, model.weight)


def test_future_version_is_a_clear_error(tmp_path):
    dckpt.save({"x": torch.zeros(2)}, tmp_path / "c")
    mpath = tmp_path / "c" / "manifest.json"
    obj = json.loads(mpath.read_text())
    obj.pop("self_hash")
    obj["version"] = 4  # this dckpt reads 1, 2 (views) and 3 (split layout)
    import xxhash
    body = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    obj["self_hash"] = f"{xxhash.xxh3_64_intdigest(body):016x}"
    mpath.write_text(json.dumps(obj, sort_keys=True, separators=(",", ":")))
    with pytest.raises(FormatVersionError, match="version 4 is newer"):
        dckpt.load(tmp_path / "c")


def test_overwrite_and_exists(tmp_path):
    dckpt.save({"x": torch.zeros(2)}, tmp_path / "c")
    with pytest.raises(CheckpointExistsError):
        dckpt.save({"x": torch.ones(2)}, tmp_path / "c")
    dckpt.save({"x": torch.ones(2)}, tmp_path / "c", overwrite=True)
    assert torch.equal(dckpt.load(tmp_path / "c")["x"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_stateful_dataloader_position(tmp_path):
    from torchdata.stateful_dataloader import StatefulDataLoader
    data = list(range(40))
    torch.manual_seed(0)
    loader = StatefulDataLoader(data, batch_size=4, shuffle=True)
    it = iter(loader)
    for _ in range(3):
        next(it)
    dckpt.save({"data": loader}, tmp_path / "c")
    expected = [b.tolist() for b in it]
    resumed = StatefulDataLoader(data, batch_size=4, shuffle=True)
    dckpt.load(tmp_path / "c", into={"data": resumed})
    assert [b.tolist() for b in resumed] == expected


def test_plain_dataloader_gets_a_hint(tmp_path):
    loader = torch.utils.data.DataLoader(list(range(4)))
    with pytest.raises(UnsupportedStateError, match="ResumableLoader"):
        dckpt.save({"data": loader}, tmp_path / "c")


def test_load_into_plain_state_dict(tmp_path):
    model = torch.nn.Linear(3, 3)
    dckpt.save({"model": model}, tmp_path / "c")
    target = torch.nn.Linear(3, 3).state_dict()
    w = target["weight"]
    dckpt.load(tmp_path / "c", into={"model": target})
    assert target["weight"] is w and torch.equal(w, model.weight)

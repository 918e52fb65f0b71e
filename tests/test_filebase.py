"""FileBase (dckpt/engine/filebase.py): a save shares the tensors a safetensors file beside it
already holds (hard link, no second copy), only where the bytes are equal; the checkpoint
loads bitwise and verifies like any other; a damaged or hostile safetensors file is never
trusted."""
import json
import os
import struct

import pytest
import torch

pytest.importorskip("safetensors")
from safetensors.torch import save_file  # noqa: E402

import dckpt  # noqa: E402
from dckpt.engine import checkpoint  # noqa: E402
from dckpt.engine.filebase import FileBase  # noqa: E402
from dckpt.errors import ManifestError  # noqa: E402
from dckpt.format import safetensors  # noqa: E402

CHUNK = 4096  # small, so that tensors span several chunks


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(),
                               torch.nn.Linear(48, 8)).to(torch.bfloat16)


def save(folder, m, weights=None):
    """One optimizer step, then weights(m) writes the file beside (as Trainer's save_model
    does), then the dckpt save of model + optimizer with that file as the base."""
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.ones(2, 64, dtype=torch.bfloat16)).sum().backward()
    opt.step()
    (weights or write_weights)(folder, m)
    base = FileBase(folder, "*.safetensors", CHUNK, name_of=lambda n: f"model/{n}")
    checkpoint.save({"model": m, "optimizer": opt}, folder / "dckpt", chunk_size=CHUNK,
                    base=base)
    return opt


def write_weights(folder, m):
    save_file(m.state_dict(), folder / "model.safetensors")


def test_weights_file_is_shared_not_written_twice(tmp_path):
    m = model()
    opt = save(tmp_path, m)
    ck = tmp_path / "dckpt"
    mf = dckpt.read_manifest(ck)
    links = [f for f in mf.files if f.name.endswith("model.safetensors")]
    assert len(links) == 1
    assert os.stat(ck / links[0].name).st_ino == os.stat(tmp_path / "model.safetensors").st_ino
    weights = sum(v.nbytes for v in m.state_dict().values())
    inc = mf.meta["incremental"]
    assert inc["referenced_bytes"] == weights
    # What was written is the optimizer state alone (momentum buffers, as large as weights).
    assert inc["new_bytes"] == weights
    # Every model chunk points into the linked file, after its header.
    for name, t in mf.tensors.items():
        if name.startswith("model/"):
            assert all(mf.files[c.file] is links[0] or mf.files[c.file] == links[0]
                       for s in t.shards for c in s.chunks), name
    got = dckpt.load(ck)
    for k, v in m.state_dict().items():
        assert torch.equal(got["model"][k], v) and got["model"][k].dtype == v.dtype, k
    assert torch.equal(got["optimizer"]["state"][0]["momentum_buffer"],
                       opt.state_dict()["state"][0]["momentum_buffer"])


def test_only_equal_bytes_are_shared(tmp_path):
    m = model()

    def stale_bias(folder, m):
        write_weights(folder, m)
        with torch.no_grad():
            m[2].bias.add_(1)  # the file now holds an older bias: it must not be shared
    save(tmp_path, m, stale_bias)
    mf = dckpt.read_manifest(tmp_path / "dckpt")
    own = [i for i, f in enumerate(mf.files) if f.name.startswith("rank-")]
    assert all(c.file in own for c in mf.tensors["model/2.bias"].shards[0].chunks)
    assert all(c.file not in own for c in mf.tensors["model/0.weight"].shards[0].chunks)
    got = dckpt.load(tmp_path / "dckpt")
    assert torch.equal(got["model"]["2.bias"], m[2].bias.detach())


def test_damaged_weights_file_is_refused_on_load(tmp_path):
    m = model()
    save(tmp_path, m)
    raw = bytearray((tmp_path / "model.safetensors").read_bytes())
    raw[-3] ^= 0x40  # a byte of the last tensor, in the one inode both names share
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.write(raw)
    with pytest.raises(dckpt.CorruptCheckpointError, match="model/"):
        dckpt.load(tmp_path / "dckpt")


def header_file(path, header: dict, body: bytes = b"\0" * 64, length: int | None = None):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if length is None else length) + h + body)


@pytest.mark.parametrize("header,length", [
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "v": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, None),  # overlap
    ({"w": {"dtype": "F32", "shape": [8], "data_offsets": [0, 16]}}, None),  # size mismatch
    ({"w": {"dtype": "F32", "shape": [32], "data_offsets": [0, 128]}}, None),  # past the end
    ({"w": {"dtype": "X9", "shape": [4], "data_offsets": [0, 16]}}, None),  # unknown dtype
    ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, None),  # bad shape
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 1 << 40),  # huge header
    ([1, 2], None),  # not an object
])
def test_hostile_headers_are_refused(tmp_path, header, length):
    p = tmp_path / "bad.safetensors"
    header_file(p, header, length=length)
    with pytest.raises(ManifestError):
        safetensors.read_index(p)


def test_save_beside_a_hostile_file_writes_everything(tmp_path, caplog):
    m = model()
    with caplog.at_level("WARNING", logger="dckpt"):
        save(tmp_path, m, lambda folder, _: header_file(
            folder / "model.safetensors",
            {"0.weight": {"dtype": "BF16", "shape": [48, 64], "data_offsets": [0, 10]}}))
    assert "not shared" in caplog.text
    mf = dckpt.read_manifest(tmp_path / "dckpt")
    assert [f.name for f in mf.files] == ["rank-00000.dckpt"]
    got = dckpt.load(tmp_path / "dckpt")
    assert all(torch.equal(got["model"][k], v) for k, v in m.state_dict().items())


def test_index_matches_the_safetensors_package(tmp_path):
    from safetensors import safe_open
    m = model()
    save_file(m.state_dict(), tmp_path / "w.safetensors")
    raw = (tmp_path / "w.safetensors").read_bytes()
    idx = safetensors.read_index(tmp_path / "w.safetensors")
    with safe_open(tmp_path / "w.safetensors", "pt") as f:
        assert sorted(f.keys()) == sorted(t.name for t in idx)
        for t in idx:
            want = f.get_tensor(t.name)
            assert t.shape == list(want.shape) and t.dtype == str(want.dtype)[6:]
            assert raw[t.offset:t.offset + t.nbytes] == want.contiguous().view(
                torch.uint8).numpy().tobytes()

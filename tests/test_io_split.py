"""A rank's data split across one file per writer thread: the cut plan, and saves that
round-trip bitwise through dckpt.load and the reference reader."""
import random

import numpy as np
import pytest
import torch

import dckpt
from dckpt.storage import local as io
from dckpt.format.reader import read_manifest, read_tensor_bytes

CHUNK = 4096


@pytest.mark.parametrize("seed", range(30))
def test_split_covers_every_byte_once_in_order_on_the_chunk_grid(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([0, 1, 7, CHUNK, 3 * CHUNK + 5, 40 * CHUNK, rng.randrange(200_000)])
               for _ in range(rng.randrange(1, 12))]
    parts = rng.randrange(2, 5)
    plan = io._split(lengths, parts, CHUNK)
    assert len(plan) == parts
    seen = {v: [] for v in range(len(lengths))}
    for pieces in plan:
        for v, a, z in pieces:
            assert 0 <= a < z <= lengths[v]
            assert a % CHUNK == 0  # a piece starts where the one-file writer starts a chunk
            seen[v].append((a, z))
    for v, ranges in seen.items():
        pos = 0
        for a, z in ranges:  # files in order give the value's bytes in order
            assert a == pos
            pos = z
        assert pos == lengths[v]
    total = sum(lengths)
    for pieces in plan:  # each cut moves by less than a chunk, so each share by less than 2
        share = sum(z - a for _, a, z in pieces)
        assert abs(share - total / parts) < 2 * CHUNK + 1


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    big = [torch.randn(3_000_000 + i, generator=g) for i in range(4)]  # ~48 MB in all
    return {"w": big, "bf16": torch.randn(1000, 999, generator=g).to(torch.bfloat16),
            "empty": torch.empty(0), "scalar": torch.tensor(3.5), "n": np.arange(10_001),
            "tied": big[0]}


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_split_save_round_trips_and_reads_with_the_reference_reader(tmp_path, compression):
    state = _state()
    res = dckpt.save(state, tmp_path / "c", compression=compression, threads=2,
                     chunk_size=1 << 20)
    names = sorted(f.name for f in res.manifest.files)
    assert names == ["rank-00000-1.dckpt", "rank-00000.dckpt"]
    # Two writer threads take chunks from one queue, each into its own file: which file
    # holds a chunk depends on the threads' progress (on a busy machine one may write all).
    assert {c.file for t in res.manifest.tensors.values() for s in t.shards
            for c in s.chunks} <= {0, 1}
    out = dckpt.load(tmp_path / "c")
    for a, b in zip(state["w"], out["w"]):
        assert torch.equal(a, b)
    assert torch.equal(out["bf16"], state["bf16"]) and out["scalar"].item() == 3.5
    assert out["tied"] is out["w"][0] and np.array_equal(out["n"], state["n"])
    m = read_manifest(tmp_path / "c")
    for name, t in m.tensors.items():
        if t.kind == "torch" and name.startswith("w/"):
            i = int(name.split("/")[1])
            ref = read_tensor_bytes(tmp_path / "c", m, name).reshape(-1)
            assert ref.tobytes() == state["w"][i].numpy().tobytes()
    live = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in _state().items()}
    live["w"] = [torch.zeros_like(t) for t in state["w"]]
    dckpt.load(tmp_path / "c", into=live)
    assert all(torch.equal(a, b) for a, b in zip(live["w"], state["w"]))


def test_one_writer_thread_or_a_small_state_writes_one_file(tmp_path):
    res = dckpt.save(_state(), tmp_path / "a", threads=1)
    assert [f.name for f in res.manifest.files] == ["rank-00000.dckpt"]
    res = dckpt.save({"x": torch.ones(1000)}, tmp_path / "b", threads=2)
    assert [f.name for f in res.manifest.files] == ["rank-00000.dckpt"]

"""Distributed CUDA paths: device tensors written by their owners, each rank's own CUDA
RNG stream, FSDP2 shards on the GPU read straight back. Skipped without a GPU; run on a
GPU machine (scripts/gpu_check.sh)."""
import json

import pytest
import torch

import dckpt
from helpers.ranks import run_with_ranks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def rank_cuda_state(rank, world, root):
    """Two gloo ranks sharing one GPU: dckpt's collectives need no device communication."""
    dev = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    torch.cuda.manual_seed(100 + rank)
    torch.rand(3, device=dev)
    g = torch.Generator().manual_seed(1)
    # Identical on both, so written once; past sharding.EAGER_DIGEST_BYTES, so it is hashed
    # (through a host copy) only in the exchange that settles replicas.
    shared = torch.randn(256, 128, generator=g).to(dev)
    mine = (torch.randn(32, 64) + rank).to(dev).t()  # per rank, non-contiguous
    mgr = dckpt.CheckpointManager(root)
    mgr.save(1, {"shared": shared, "mine": mine})
    expected = torch.rand(4, device=dev).cpu()
    live = {"shared": torch.zeros_like(shared), "mine": torch.zeros(32, 64, device=dev).t()}
    torch.cuda.manual_seed(7)
    report = mgr.restore(live)
    got = torch.rand(4, device=dev).cpu()
    return {"rng_back": torch.equal(expected, got), "streams": report.rng_streams,
            "expected": expected.tolist(), "equal": torch.equal(live["shared"], shared)
            and torch.equal(live["mine"], mine), "on_device": live["mine"].is_cuda}


def test_cuda_tensors_and_own_device_rng(tmp_path):
    res = run_with_ranks(2, rank_cuda_state, str(tmp_path))
    assert all(r["rng_back"] and "cuda" in r["streams"] and r["equal"] and r["on_device"]
               for r in res)
    assert res[0]["expected"] != res[1]["expected"]  # each rank its own CUDA stream
    m = dckpt.read_manifest(tmp_path / "step-000000001")
    shared = m.tensors["shared"]
    assert len(shared.shards) == 1 and shared.placement["kind"] == "replicated"
    assert {n for n in m.tensors if n.startswith("mine")} == {"mine@r0", "mine@r1"}
    assert all("cuda_device" in json.dumps(m.ranks[r]["rng"]) for r in range(2))


def rank_fsdp_cuda(rank, world, path):
    from torch.distributed.fsdp import fully_shard
    torch.cuda.set_device(rank)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Linear(24, 5)).cuda()
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(8, 16, device="cuda")).square().mean().backward()
    opt.step()
    dckpt.save({"model": model, "optimizer": opt}, path)
    torch.manual_seed(1)
    fresh = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Linear(24, 5)).cuda()
    for layer in fresh:
        fully_shard(layer)
    fully_shard(fresh)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    dckpt.load(path, into={"model": fresh, "optimizer": fresh_opt})
    same = all(torch.equal(a.to_local(), b.to_local())
               for a, b in zip(model.parameters(), fresh.parameters()))
    same_opt = all(torch.equal(opt.state[a]["exp_avg"].to_local(),
                               fresh_opt.state[b]["exp_avg"].to_local())
                   for a, b in zip(model.parameters(), fresh.parameters()))
    return {"same": same and same_opt, "device": str(next(fresh.parameters()).device)}


def test_fsdp2_on_cuda_round_trip(tmp_path):
    res = run_with_ranks(1, rank_fsdp_cuda, str(tmp_path / "c"), backend="nccl")
    assert res[0]["same"] and res[0]["device"].startswith("cuda")

"""CUDA paths: saving device tensors, reading into device tensors, per-device RNG streams.

Skipped without a GPU; run on a GPU machine with scripts/gpu_check.sh.
"""
import pytest
import torch

import dckpt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def trained(device: str):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(),
                                torch.nn.Linear(64, 8)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(16, 64, device=device)).square().mean().backward()
        opt.step()
    return model, opt


def test_cuda_state_round_trip_in_place(tmp_path):
    model, opt = trained("cuda")
    extra = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16).t()  # non-contiguous
    dckpt.save({"model": model, "optimizer": opt, "extra": extra}, tmp_path / "c",
               compression="zstd")
    fresh, fresh_opt = trained("cuda")
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    ptr = fresh[0].weight.data_ptr()
    live_extra = torch.zeros(64, 64, device="cuda", dtype=torch.bfloat16).t()
    dckpt.load(tmp_path / "c", into={"model": fresh, "optimizer": fresh_opt, "extra": live_extra})
    torch.cuda.synchronize()
    assert fresh[0].weight.data_ptr() == ptr and fresh[0].weight.is_cuda
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["exp_avg"], fresh_opt.state[b]["exp_avg"])
    assert torch.equal(live_extra, extra)
    plain = dckpt.load(tmp_path / "c")
    assert plain["extra"].device.type == "cpu" and torch.equal(plain["extra"], extra.cpu())


def test_cuda_rng_per_device(tmp_path):
    torch.cuda.manual_seed_all(5)
    torch.rand(3, device="cuda")
    mgr = dckpt.CheckpointManager(tmp_path)
    mgr.save(1, {"x": torch.zeros(1)})
    expected = [torch.rand(4, device=f"cuda:{d}").cpu() for d in range(torch.cuda.device_count())]
    torch.cuda.manual_seed_all(99)
    report = mgr.restore({"x": torch.zeros(1)})
    assert "cuda" in report.rng_streams
    got = [torch.rand(4, device=f"cuda:{d}").cpu() for d in range(torch.cuda.device_count())]
    assert all(torch.equal(a, b) for a, b in zip(expected, got))

"""The accelerate integration on a GPU: CUDA tensors and RNG streams, and accelerate's FSDP2
plugin (sharded DTensor state), each resumed bit for bit in a fresh process."""
import pytest
import torch

from test_accelerate import ENV, job

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_ENV = dict(ENV, CUBLAS_WORKSPACE_CONFIG=":4096:8")  # deterministic cuBLAS


def test_cuda_resume_is_bitwise(tmp_path):
    ref = job(tmp_path, "ref.json", "--gpu", "--save-at", 4, 9, env=GPU_ENV)
    resumed = job(tmp_path, "b.json", "--gpu", "--resume", env=GPU_ENV)
    assert resumed["seen"] == ref["seen"]
    assert resumed["losses"] == ref["losses"]
    assert resumed["params"] == ref["params"]


def test_fsdp2_plugin_resume_is_bitwise(tmp_path):
    ckpt = tmp_path / "ckpt"
    args = ["--gpu", "--fsdp", "--explicit", ckpt]
    ref = job(tmp_path, "ref.json", *args, "--save-at", 9, torchrun=True, env=GPU_ENV)
    assert ref["distributed_type"] == "DistributedType.FSDP"
    resumed = job(tmp_path, "b.json", *args, "--resume", ckpt, torchrun=True, env=GPU_ENV)
    assert resumed["losses"] == ref["losses"]
    assert resumed["params"] == ref["params"]

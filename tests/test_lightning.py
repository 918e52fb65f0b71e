"""DckptCheckpointIO (dckpt.integrations.lightning) on real Lightning: a LightningModule with
dropout, AdamW + StepLR, ModelCheckpoint(save_last=True) unchanged; a run killed after an
epoch's checkpoint and resumed with fit(ckpt_path="last") ends bitwise identical to one never
stopped: 1 process, the async variant, and (DCKPT_SLOW=1) 2 processes (Lightning's ddp on
CPU, gloo)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning")

import dckpt  # noqa: E402
from helpers import JOBS, env  # noqa: E402

ENV = env(OMP_NUM_THREADS="1")
SLOW = os.environ.get("DCKPT_SLOW") == "1"


def job(d, result, *args):
    r = subprocess.run([sys.executable, str(JOBS / "lightning_job.py"), str(d), str(result),
                        *map(str, args)], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(Path(result).read_text()) if Path(result).exists() else None


def killed_and_resumed(tmp_path, *args):
    d = tmp_path / "run"
    job(d, tmp_path / "stopped.json", "--stop-after-epoch", 1, *args)
    names = sorted(p.name for p in (d / "ckpt").iterdir())
    assert names == ["epoch=0-step=8.ckpt", "epoch=1-step=16.ckpt", "last.ckpt"] or \
        names == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt", "last.ckpt"], names
    return d, job(d, tmp_path / "resumed.json", "--resume", *args)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lref")
    return job(tmp / "run", tmp / "ref.json")


def test_resume_from_last_is_bitwise(tmp_path, reference):
    d, got = killed_and_resumed(tmp_path)
    assert got == reference, "resumed weights differ from the uninterrupted run"
    last = d / "ckpt" / "last.ckpt"
    m = dckpt.read_manifest(last)  # a dckpt checkpoint directory, no pickle
    assert last.is_dir() and m.ranks[0]["rng"]
    plain = dckpt.load(last)
    assert {"state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks",
            "epoch", "global_step"} <= set(plain)


def test_async_variant_resumes_bitwise(tmp_path, reference):
    _, got = killed_and_resumed(tmp_path, "--async")
    assert got == reference


@pytest.mark.skipif(not SLOW, reason="DCKPT_SLOW=1: 3 two-process Lightning runs (about 75 s)")
def test_two_processes_ddp_resume_is_bitwise(tmp_path):
    ref = job(tmp_path / "ref", tmp_path / "ref.json", "--devices", 2)
    _, got = killed_and_resumed(tmp_path, "--devices", 2)
    assert got == ref


def test_load_verifies(tmp_path):
    import torch
    from dckpt.integrations.lightning import DckptCheckpointIO
    io = DckptCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.arange(1000.0)}, "epoch": 1},
                       tmp_path / "last.ckpt")
    assert torch.equal(io.load_checkpoint(tmp_path / "last.ckpt")["state_dict"]["w"],
                       torch.arange(1000.0))
    data = next((tmp_path / "last.ckpt").glob("*.dckpt"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))
    with pytest.raises(dckpt.CorruptCheckpointError):
        io.load_checkpoint(tmp_path / "last.ckpt")
    io.remove_checkpoint(tmp_path / "last.ckpt")
    assert not (tmp_path / "last.ckpt").exists()


@pytest.mark.skipif(not SLOW, reason="DCKPT_SLOW=1: Lightning's own resume, for docs")
def test_lightnings_own_resume_on_the_same_job(tmp_path):
    ref = job(tmp_path / "ref", tmp_path / "ref.json", "--plain")
    _, got = killed_and_resumed(tmp_path, "--plain")
    print(f"Lightning's own resume: exact={got == ref}")

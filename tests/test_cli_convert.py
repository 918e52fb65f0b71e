"""dckpt convert: torch.save files, safetensors, HF Trainer and accelerate folders into dckpt
(restorable into live objects, bitwise), and model weights back out to safetensors."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import dckpt
from helpers.cli import build_state, run_cli, run_json, train
from dckpt.format.reader import read_manifest


@pytest.fixture(scope="module")
def trained():
    state = build_state()
    train(state, 5, [])
    return state


def fresh():
    s = build_state(seed=123)
    return {k: s[k] for k in ("model", "optimizer", "scheduler")}


def assert_same(live: dict, ref: dict) -> None:
    for a, b in zip(live["model"].state_dict().values(), ref["model"].state_dict().values()):
        assert torch.equal(a, b)
    sa, sb = live["optimizer"].state_dict(), ref["optimizer"].state_dict()
    for pid in sb["state"]:
        for k, v in sb["state"][pid].items():
            assert torch.equal(sa["state"][pid][k], v)
    assert live["scheduler"].state_dict() == ref["scheduler"].state_dict()


def test_torch_training_dict(trained, tmp_path):
    torch.save({"model_state_dict": trained["model"].state_dict(),
                "optimizer_state_dict": trained["optimizer"].state_dict(),
                "scheduler_state_dict": trained["scheduler"].state_dict(),
                "epoch": 0, "global_step": 5, "best_loss": 0.25, "epoch_losses": [1.0, 0.5],
                "rng_states": {"python_rng_state": random.getstate(),
                               "numpy_rng_state": np.random.get_state(),
                               "torch_rng_state": torch.get_rng_state()}}, tmp_path / "c.pt")
    code, out, err = run_cli("convert", tmp_path / "c.pt", tmp_path / "ck")
    assert code == 0, err
    assert "components: model, optimizer, scheduler" in out and "rng streams: 1 process" in out
    m = read_manifest(tmp_path / "ck")
    assert m.counters == {"step": 5, "epoch": 0, "loss_history": [1.0, 0.5]}
    assert m.metrics == {"best_loss": 0.25} and m.meta["imported"]["from"] == "torch"
    live = fresh()
    dckpt.load(tmp_path / "ck", into=live)
    assert_same(live, trained)
    _, doc = run_json("verify", tmp_path / "ck")
    assert doc["status"] == "PARTIAL"  # no data position in the source
    assert doc["checkpoints"][0]["ranks"][0]["missing"] == ["data"]


def test_safetensors_roundtrip_and_export(trained, tmp_path):
    weights = {k: v.clone() for k, v in trained["model"].state_dict().items()}
    save_file(weights, tmp_path / "w.safetensors", metadata={"origin": "test"})
    assert run_cli("convert", tmp_path / "w.safetensors", tmp_path / "ck")[0] == 0
    m = read_manifest(tmp_path / "ck")
    assert m.meta["imported"]["safetensors_metadata"] == {"origin": "test"}
    code, out, err = run_cli("convert", tmp_path / "ck", tmp_path / "out.safetensors")
    assert code == 0, err
    back = load_file(tmp_path / "out.safetensors")
    assert back.keys() == weights.keys()
    assert all(torch.equal(back[k], weights[k]) for k in weights)


def test_export_model_of_a_training_checkpoint_with_tied_weights(tmp_path):
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied
    model = nn.ModuleDict({"emb": emb, "head": head})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mgr = dckpt.CheckpointManager(tmp_path / "run", fsync=False)
    mgr.save(1, {"model": model, "optimizer": opt})
    code, doc = run_json("convert", mgr.path(1), tmp_path / "m.safetensors")
    assert code == 0 and doc["component"] == "model"
    back = load_file(tmp_path / "m.safetensors")
    assert set(back) == {"emb.weight", "head.weight"}
    assert torch.equal(back["emb.weight"], emb.weight) and torch.equal(back["head.weight"],
                                                                       emb.weight)
    assert run_cli("convert", mgr.path(1), tmp_path / "m.safetensors")[0] == 2  # exists


def hf_trainer_folder(trained, folder: Path, processes: int = 2) -> list:
    folder.mkdir()
    save_file(trained["model"].state_dict(), folder / "model.safetensors")
    torch.save(trained["optimizer"].state_dict(), folder / "optimizer.pt")
    torch.save(trained["scheduler"].state_dict(), folder / "scheduler.pt")
    pythons = []
    for i in range(processes):
        random.seed(100 + i)
        pythons.append(random.getstate())
        torch.save({"python": random.getstate(), "numpy": np.random.get_state(),
                    "cpu": torch.get_rng_state()}, folder / f"rng_state_{i}.pth")
    (folder / "trainer_state.json").write_text(json.dumps({
        "global_step": 5, "epoch": 1.25, "max_steps": 8, "num_train_epochs": 2,
        "log_history": [{"loss": 0.9, "step": 2}, {"loss": 0.7, "step": 4},
                        {"eval_loss": 0.8, "step": 4}]}))
    (folder / "training_args.bin").write_bytes(b"pickled TrainingArguments")
    return pythons


def test_hf_trainer_folder_with_per_process_rng(trained, tmp_path):
    pythons = hf_trainer_folder(trained, tmp_path / "checkpoint-5")
    code, doc = run_json("convert", tmp_path / "checkpoint-5", tmp_path / "ck")
    assert code == 0 and doc["source"] == "hf-trainer" and doc["rng_processes"] == 2
    assert any("training_args.bin" in n for n in doc["notes"])
    m = read_manifest(tmp_path / "ck")
    assert m.world_size == 2
    assert m.counters == {"step": 5, "steps_per_epoch": 4, "epoch": 1, "step_in_epoch": 1,
                          "loss_history": [0.9, 0.7]}
    assert m.metrics == {"eval_loss": 0.8}
    from dckpt.state import rng
    from dckpt.format import tree
    for r in range(2):  # each process keeps its own stream
        rng.restore(tree.decode(m.ranks[r]["rng"]), ("python",))
        assert random.getstate() == pythons[r]
    live = fresh()
    dckpt.load(tmp_path / "ck", into=live)
    assert_same(live, trained)
    _, v = run_json("verify", tmp_path / "ck")
    assert [r["missing"] for r in v["checkpoints"][0]["ranks"]] == [["data"], ["data"]]


def test_accelerate_save_state_folder(trained, tmp_path):
    from accelerate import Accelerator
    acc = Accelerator(cpu=True)
    model, opt, sched = acc.prepare(trained["model"], trained["optimizer"], trained["scheduler"])
    acc.save_state(str(tmp_path / "acc"))
    code, doc = run_json("convert", tmp_path / "acc", tmp_path / "ck")
    assert code == 0 and doc["source"] == "accelerate"
    assert set(doc["components"]) == {"model", "optimizer", "scheduler"}
    assert doc["rng_processes"] == 1
    live = fresh()
    dckpt.load(tmp_path / "ck", into=live)
    assert_same(live, trained)


class Opaque:  # needs unpickling: refused
    def __init__(self):
        self.x = 1


def test_pickled_objects_are_refused_and_named(tmp_path):
    torch.save({"model": {"w": torch.ones(2)}, "thing": Opaque()}, tmp_path / "bad.pt")
    code, _, err = run_cli("convert", tmp_path / "bad.pt", tmp_path / "ck")
    assert code == 2 and "Opaque" in err and "no pickle" in err
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint"])
def test_unreadable_sources(tmp_path, content):
    (tmp_path / "x.pt").write_bytes(content)
    code, _, err = run_cli("convert", tmp_path / "x.pt", tmp_path / "ck")
    assert code == 2 and "x.pt" in err
    assert run_cli("convert", tmp_path / "nothing", tmp_path / "ck2")[0] == 2

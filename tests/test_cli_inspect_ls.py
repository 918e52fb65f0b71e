"""dckpt inspect and dckpt ls: manifest-only views, also without torch installed."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.cli import copy, key_paths, make_root, run_cli, run_json
from dckpt.format.reader import read_manifest
from helpers import env, flip_bit


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_root(tmp_path_factory.mktemp("ls") / "run", saves=(4, 8, 12), keep_last=2,
                     keep_best=1, metric="loss")


def test_inspect_shows_components_tensors_counters(root):
    code, out, _ = run_cli("inspect", root / "step-000000012", "--tensors", "3")
    assert code == 0
    for text in ("format v1", "world size 1", "counters  step 12, epoch 1, step_in_epoch 4",
                 "model", "optimizer  AdamW", "scheduler  LambdaLR; last_epoch 12",
                 "data         data       ResumableLoader; epoch 1, 4 batch(es) consumed",
                 "rng          streams    numpy, python, torch", "model/0.weight",
                 "more (--all lists every tensor)"):
        assert text in out, text
    code, out, _ = run_cli("inspect", root / "step-000000012", "--tree")
    assert "<float32[32, 8] model/0.weight>" in out and "last_epoch: 12" in out


def test_inspect_json(root):
    code, doc = run_json("inspect", root)  # a root: its newest step
    assert code == 0 and doc["schema"] == "dckpt.inspect/1"
    assert doc["path"].endswith("step-000000012")
    m = read_manifest(root / "step-000000012")
    assert doc["totals"]["tensors"] == len(m.tensors) and doc["totals"]["bytes"] == m.total_bytes
    kinds = {c["key"]: c["kind"] for c in doc["ranks"][0]["components"]}
    assert kinds == {"model": "model", "optimizer": "optimizer", "scheduler": "scheduler",
                     "scaler": "scaler", "data": "data"}
    w = next(t for t in doc["tensors"] if t["name"] == "model/0.weight")
    assert w["shape"] == [32, 8] and w["bytes"] == 32 * 8 * 4 and w["ratio"] == 1.0
    assert w["shards"] == [{"rank": 0, "offsets": [0, 0], "shape": [32, 8], "chunks": 1}]
    assert {"schema", "path", "format_version", "created", "world_size", "versions", "meta",
            "counters", "metrics", "ranks", "files", "tensors", "totals"} == set(doc)
    assert {"tensors[].name", "tensors[].dtype", "tensors[].shape", "tensors[].shards",
            "tensors[].placement",
            "tensors[].bytes", "tensors[].stored_bytes", "tensors[].ratio",
            "tensors[].codecs"} <= key_paths(doc)


def test_inspect_bad_input(root, tmp_path):
    assert run_cli("inspect", tmp_path / "nope")[0] == 2
    ck = copy(root / "step-000000008", tmp_path / "c")
    (ck / "manifest.json").write_bytes((ck / "manifest.json").read_bytes()[:100])
    code, _, err = run_cli("inspect", ck)
    assert code == 1 and "manifest" in err


def test_ls_lists_steps_retention_and_latest(root):
    code, out, _ = run_cli("ls", root)
    assert code == 0
    lines = out.splitlines()
    row = {ln.split()[0]: ln for ln in lines[2:] if ln.strip() and ln.split()[0].isdigit()}
    assert set(row) == {"8", "12"}  # retention (keep_last=2) already deleted step 4
    assert "latest" in row["12"] and "newest, last 2" in row["12"]
    assert "recorded by the run's manager" in out
    code, doc = run_json("ls", root, "--keep-last", "1")
    assert doc["schema"] == "dckpt.ls/1" and doc["latest"] == 12
    assert key_paths(doc) - {p for p in key_paths(doc) if ".metrics." in p} == {
        "schema", "root", "latest", "latest_pointer", "retention", "retention.policy",
        "retention.source", "checkpoints",
        *(f"retention.policy.{k}" for k in ("keep_last", "keep_best", "metric", "mode",
                                            "keep_every")),
        *(f"checkpoints[].{k}" for k in ("step", "name", "status", "created", "epoch",
                                         "metrics", "bytes", "disk_bytes", "kept_by", "latest",
                                         "latest_pointer", "problem"))}
    kept = {c["step"]: c["kept_by"] for c in doc["checkpoints"]}
    best = min(doc["checkpoints"], key=lambda c: c["metrics"]["loss"])["step"]
    assert kept[12][:2] == ["newest", "last 1"]
    assert kept[8] == (["best loss"] if best == 8 else [])


def test_ls_shows_incomplete_and_corrupt(root, tmp_path):
    r = copy(root, tmp_path / "run")
    (r / ".step-000000016.tmp-0123456789ab").mkdir()
    m = read_manifest(r / "step-000000008")
    flip_bit(r / "step-000000008" / "rank-00000.dckpt", m.tensors["model/0.bias"]
             .shards[0].chunks[0].offset, 6)
    code, doc = run_json("ls", r)
    assert code == 0
    status = {c["name"]: c["status"] for c in doc["checkpoints"]}
    assert status[".step-000000016.tmp-0123456789ab"] == "incomplete"
    code, doc = run_json("ls", r, "--verify")
    status = {c["step"]: c["status"] for c in doc["checkpoints"] if c["name"].startswith("step")}
    assert code == 1 and status == {8: "corrupt", 12: "verified"}


def test_ls_not_a_directory(tmp_path):
    assert run_cli("ls", tmp_path / "missing")[0] == 2


def test_inspect_and_ls_run_without_torch(root):
    """In a fresh process where `import torch` fails, through `python -m dckpt`."""
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.modules['dckpt._native'] = None; "
            "sys.argv = ['dckpt'] + sys.argv[1:]; runpy.run_module('dckpt', run_name='__main__')")
    for argv in (["inspect", str(root)], ["ls", str(root)]):
        out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True,
                             text=True, env=env(), timeout=120)
        assert out.returncode == 0, out.stderr
        assert "step" in out.stdout
    out = subprocess.run([sys.executable, "-c", code, "verify", str(root)],
                         capture_output=True, text=True, env=env(), timeout=120)
    assert out.returncode != 0  # verify needs the native core for checksums


def test_components_are_recognised_from_the_tree_alone():
    from dckpt.format.anatomy import classify
    from dckpt.format.tree import ObjectState, TensorRef
    t = TensorRef
    cases = {
        "model": ObjectState("user.Net", {"w": t("m/w"), "b": t("m/b"), "_extra_state": b"x"}),
        "weights": {"w": t("w/w")},  # a converted plain state dict
        "optimizer": {"state": {0: {"step": t("o/0/step")}}, "param_groups": [{"lr": 0.1}]},
        "sched": ObjectState("torch.optim.lr_scheduler.OneCycleLR", {"last_epoch": 3}),
        "plateau": {"last_epoch": 2, "min_lrs": [0.0], "best": 1.0},
        "scaler": {"scale": 2.0, "growth_factor": 2.0, "backoff_factor": 0.5},
        "loader": ObjectState("dckpt.data.ResumableLoader", {"epoch": 1, "batches": 2}),
        "stateful": {"_num_yielded": 5, "_sampler_iter_yielded": 5},
        "thing": ObjectState("user.Thing", {"n": 1}),
        "lr": 0.1,
    }
    kinds = {k: classify(k, v).kind for k, v in cases.items()}
    assert kinds == {"model": "model", "weights": "model", "optimizer": "optimizer",
                     "sched": "scheduler", "plateau": "scheduler", "scaler": "scaler",
                     "loader": "data", "stateful": "data", "thing": "object", "lr": "value"}

"""dckpt diff: tensors added / removed / changed with their differences, and state changes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dckpt
from helpers.cli import copy, key_paths, make_root, run_cli, run_json
from helpers import flip_bit


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_root(tmp_path_factory.mktemp("diff") / "run", saves=(3, 6))


def test_identical_copy_is_proven_by_hashes(root, tmp_path):
    a = root / "step-000000006"
    b = copy(a, tmp_path / "b")
    code, out, _ = run_cli("diff", a, b)
    assert code == 0 and out.rstrip().endswith("identical")
    code, doc = run_json("diff", a, b)
    n = doc["summary"]["identical"]
    assert doc["same"] and n == doc["summary"]["identical_by_hash"] > 0


def test_two_steps_differ_with_exact_max_abs(root):
    a, b = root / "step-000000003", root / "step-000000006"
    code, doc = run_json("diff", a, b)
    assert code == 1 and not doc["same"]
    assert key_paths(doc) == {
        "schema", "a", "b", "same", "atol", "summary", "tensors", "values", "meta",
        *(f"summary.{k}" for k in ("identical", "identical_by_hash", "added", "removed",
                                   "changed", "retyped", "values")),
        *(f"tensors[].{k}" for k in ("name", "change", "a", "b", "max_abs", "max_rel",
                                     "differing", "numel")),
        *(f"{x}[].{k}" for x in ("values", "meta") for k in ("path", "a", "b"))}
    changed = {t["name"]: t for t in doc["tensors"]}
    wa = dckpt.load(a, keys=["model"])["model"]["0.weight"]
    wb = dckpt.load(b, keys=["model"])["model"]["0.weight"]
    t = changed["model/0.weight"]
    assert t["change"] == "changed" and t["a"] == "float32[32, 8]"
    assert t["max_abs"] == pytest.approx(float((wa.double() - wb.double()).abs().max()))
    assert t["max_rel"] == pytest.approx(t["max_abs"] / float(max(wa.abs().max(),
                                                                  wb.abs().max())))
    assert t["differing"] == int((wa != wb).sum()) and t["numel"] == 256
    values = {v["path"]: (v["a"], v["b"]) for v in doc["values"]}
    assert values["counters/step"] == ("3", "6")
    assert values["scheduler/last_epoch"] == ("3", "6")
    code, out, _ = run_cli("diff", a, b)
    assert "~ counters/step: 3 -> 6" in out and "model/0.weight" in out


def test_added_removed_retyped_and_nan(tmp_path):
    a = dckpt.save({"model": {"keep": torch.tensor([1.0, float("nan")]), "old": torch.ones(2),
                              "shape": torch.zeros(2)}}, tmp_path / "a").path
    b = dckpt.save({"model": {"keep": torch.tensor([1.0, float("nan")]), "new": torch.ones(3),
                              "shape": torch.zeros(3)}}, tmp_path / "b").path
    code, doc = run_json("diff", a, b)
    by = {t["name"]: t["change"] for t in doc["tensors"]}
    assert code == 1 and by == {"model/old": "removed", "model/new": "added",
                                "model/shape": "retyped"}
    assert doc["summary"]["identical"] == 1  # NaN == NaN for a diff


def test_atol_and_rewritten_equal_tensor(tmp_path):
    x = torch.randn(10000)
    a = dckpt.save({"w": x}, tmp_path / "a").path
    b = dckpt.save({"w": x + 1e-6}, tmp_path / "b", chunk_size=4096).path
    c = dckpt.save({"w": x.clone()}, tmp_path / "c", chunk_size=4096).path
    assert run_cli("diff", a, b)[0] == 1
    assert run_cli("diff", a, b, "--atol", "1e-5")[0] == 0
    code, doc = run_json("diff", a, c)  # other chunking: read and compared, equal
    assert code == 0 and doc["summary"]["identical_by_hash"] == 0


def test_corrupt_or_missing_input_exits_2(root, tmp_path):
    b = copy(root / "step-000000006", tmp_path / "b")
    m = dckpt.read_manifest(b)
    flip_bit(b / "rank-00000.dckpt", m.tensors["model/0.weight"].shards[0].chunks[0].offset, 6)
    # same hashes in the manifest, so only a changed manifest forces a read: use step 3
    code, _, err = run_cli("diff", root / "step-000000003", b)
    assert code == 2 and "corrupt" in err and "model/0.weight" in err
    assert run_cli("diff", root / "step-000000003", tmp_path / "nope")[0] == 2

"""The save/load spread benchmark (dckpt/bench/variance.py) runs end to end on a tiny state,
through `dckpt bench --variance`, and reports what it measured."""
import json

import pytest
import torch

from dckpt.bench import variance
from dckpt.bench.workloads import Spec
from dckpt.cli import main

TINY = "transformer-4MB-fp32"


@pytest.fixture
def shm_dir(tmp_path):
    """A directory in /dev/shm where there is one (the fsyncs of a disk directory would
    make this test slow on a busy machine), else under tmp_path."""
    import shutil
    import tempfile
    from pathlib import Path
    d = Path(tempfile.mkdtemp(dir="/dev/shm")) if Path("/dev/shm").is_dir() else tmp_path / "shm"
    d.mkdir(exist_ok=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_cli_runs_every_system_in_every_situation_and_writes_the_section(tmp_path, shm_dir,
                                                                        capsys):
    out = tmp_path / "out"
    rc = main(["bench", "--variance", "--workloads", TINY, "--repeats", "1", "--regimes", "shm",
               "--shm-dir", str(shm_dir), "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "variance.json").read_text())
    assert result["workload"] == TINY and result["repeats"] == 1
    assert set(result["regimes"]) == {"shm"}
    for per in result["regimes"].values():
        assert list(per) == variance.SITUATIONS
        for situation, samples in per.items():
            assert list(samples) == variance.SYSTEMS
            for s in samples.values():
                assert len(s["save"]) == 1
                # Loads only in the interleaved situation, each proven bit-exact there.
                assert len(s["load"]) == (1 if situation == "interleaved" else 0)
                for x in s["save"] + s["load"]:
                    assert x["wall"] > 0 and x["user"] >= 0 and x["sys"] >= 0
    assert not list(shm_dir.iterdir())  # every checkpoint removed
    md = (out / "variance.md").read_text()
    assert md == variance.markdown(result) and md.startswith("## Save and load spread\n")
    assert "### shm, after training" in md and "### shm, interleaved" in md
    assert "| CheckpointManager.save | load |" in md and "### Goals" in md
    assert "Produced by `python -m dckpt bench" in md  # the command that produced it
    # stdout is the docs section's body: the tables and goals, without the heading and the
    # command line the docs generator writes from its record
    assert capsys.readouterr().out.strip() == variance.markdown(result, standalone=False).strip()


def test_goals_are_ratios_of_the_medians():
    def op(*walls, sys=0.1):
        return [{"wall": w, "user": 0.01, "sys": sys} for w in walls]
    samples = {variance.PLAIN: {"save": op(1.0, 1.0, 1.0, sys=0.2), "load": []},
               variance.TORCH: {"save": op(2.0, 2.0, 2.0), "load": []},
               variance.SAFETENSORS: {"save": op(1.0, 1.0, 1.2), "load": []},
               variance.DCKPT: {"save": op(0.5, 0.5, 0.5), "load": []},
               variance.MANAGER: {"save": op(2.0, 2.0, 4.0, sys=0.4), "load": []}}
    result = {"bytes": 10**9, "regimes": {"shm": {"interleaved": samples}}}
    rows = {r["system"]: r for r in variance.goals(result)}
    d, m = rows[variance.DCKPT], rows[variance.MANAGER]
    assert d["speed"] == pytest.approx(2.0) and d["plain"] == pytest.approx(2.0)
    assert d["kernel"] == pytest.approx(0.5) and all(d["ok"].values())
    assert m["speed"] == pytest.approx(0.5) and m["kernel"] == pytest.approx(2.0)
    assert not m["ok"]["speed"] and not m["ok"]["plain"] and not m["ok"]["kernel"]
    # p90/p50 (linear percentiles): the manager's 3.6 / 2.0 against torch.save's 1.0.
    assert m["spread"] == pytest.approx(0.8) and not m["ok"]["spread"]


def test_the_kernel_goal_reads_ours_against_the_plain_writes_own_range():
    def op(*sys_s):
        return [{"wall": 1.0, "user": 0.0, "sys": x} for x in sys_s]
    samples = {variance.PLAIN: {"save": op(0.30, 0.30, 0.31, 0.35), "load": op(0.1, 0.1)},
               variance.TORCH: {"save": op(0.3, 0.3), "load": op(0.1, 0.1)},
               variance.SAFETENSORS: {"save": op(0.3, 0.3), "load": op(0.1, 0.1)},
               # median 0.32: 1.05x the plain write's median, inside its range (p90 0.338)
               variance.DCKPT: {"save": op(0.32, 0.32, 0.32), "load": op(0.5, 0.5)},
               # median 0.34: above the plain write's p90, inflated
               variance.MANAGER: {"save": op(0.34, 0.34, 0.34), "load": op(0.1, 0.1)}}
    rows = {(r["system"], r["op"]): r for r in variance.goals(
        {"bytes": 10**9, "regimes": {"disk": {"after training": samples}}})}
    d, m = rows[(variance.DCKPT, "save")], rows[(variance.MANAGER, "save")]
    assert d["kernel"] == pytest.approx(0.32 / 0.305) and d["ok"]["kernel"]
    assert m["kernel"] == pytest.approx(0.34 / 0.305) and not m["ok"]["kernel"]
    # Loads: the ratio is reported (5x here), not a goal.
    load = rows[("dckpt.load", "load")]
    assert load["kernel"] == pytest.approx(5.0) and "kernel" not in load["ok"]


def test_a_training_step_changes_the_state():
    w = Spec("transformer", 4_000_000, "float32").build()
    before = [t.clone() for t in w.model.parameters()]
    variance.train_step(w)
    assert any(not torch.equal(a, b) for a, b in zip(before, w.model.parameters()))

"""The edges of a save (issue 17): nothing reported saved and then gone, no temporary left
by an interrupted save, no crash at commit for values a training loop has at hand, typed
errors before anything is written."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import dckpt
from dckpt import CheckpointManager
from dckpt.errors import StepOrderError
from distributed import run_with_ranks

REPO = Path(__file__).resolve().parents[1]


def state(v: float = 0.0):
    m = torch.nn.Linear(2, 2)
    torch.nn.init.constant_(m.weight, v)
    return {"model": m}


def listing(root: Path) -> list[str]:
    return sorted(os.listdir(root))


def run_child(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


# ---- a step lower than the newest is refused, before anything is written -----------------
def test_lower_step_is_refused_before_anything_is_written(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    for s in (30, 40, 50):
        mgr.save(s, state(s))
    before = listing(tmp_path)
    with pytest.raises(StepOrderError) as e:
        mgr.save(5, state(5))
    assert "step 5" in str(e.value) and "step 50" in str(e.value)
    assert "another root" in str(e.value)  # tells the user how to proceed
    assert (e.value.step, e.value.newest) == (5, 50)
    assert listing(tmp_path) == before  # no directory, no temporary
    assert (tmp_path / "latest").read_text().strip() == "step-000000050"
    assert mgr.steps() == [30, 40, 50]
    mgr.save(60, state(60))  # a higher step goes on as usual
    assert mgr.steps() == [40, 50, 60]
    assert (tmp_path / "latest").read_text().strip() == "step-000000060"


def test_two_runs_sharing_a_root(tmp_path):
    """Another process's run saved a newer step: this run's next, lower step is refused with
    both steps named; the other run's checkpoints and `latest` stay as they were."""
    a = CheckpointManager(tmp_path, keep_last=2)
    a.save(10, state(10))
    other = run_child("""
        import sys, torch, dckpt
        m = torch.nn.Linear(2, 2)
        dckpt.CheckpointManager(sys.argv[1], keep_last=2).save(100, {"model": m})
        try:
            dckpt.CheckpointManager(sys.argv[1], keep_last=2).save(7, {"model": m})
        except dckpt.errors.StepOrderError as e:
            print("REFUSED", e)
        """, str(tmp_path))
    assert other.returncode == 0, other.stderr
    assert "REFUSED" in other.stdout and "step 7" in other.stdout and "step 100" in other.stdout
    with pytest.raises(StepOrderError, match="step 11 .* step 100"):
        a.save(11, state(11))
    assert a.steps() == [10, 100]
    assert (tmp_path / "latest").read_text().strip() == "step-000000100"
    report = a.restore(state())
    assert report.step == 100


def test_retention_spares_the_step_latest_names(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=1)
    mgr.save(1, state(1))
    mgr.save(2, state(2))
    assert mgr.steps() == [2]
    mgr.save(3, state(3))
    # `latest` moved back by hand (or not moved, disk full): retention must not delete it.
    (tmp_path / "latest").write_text("step-000000002\n")
    assert mgr._doomed() == []
    assert mgr._doomed(saved=3) == []
    mgr.gc()  # gc repairs the pointer first, then retention may delete step 2
    assert mgr.steps() == [3]
    assert (tmp_path / "latest").read_text().strip() == "step-000000003"


def rank_lower_step(rank, world, root):
    mgr = CheckpointManager(root, keep_last=2)
    mgr.save(20, state(20))
    try:
        mgr.save(5, state(5))
        refused = None
    except StepOrderError as e:
        refused = [e.step, e.newest]
    mgr.save(30, state(30))  # no rank was left behind in a collective
    return {"refused": refused, "steps": mgr.steps()}


def test_lower_step_is_refused_on_every_rank(tmp_path):
    res = run_with_ranks(2, rank_lower_step, str(tmp_path))
    assert [r["refused"] for r in res] == [[5, 20], [5, 20]]
    assert res[0]["steps"] == [20, 30]
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


# ---- an interrupted save leaves nothing behind ---------------------------------------------
INTERRUPTED_SAVE = """
    import sys, torch, dckpt
    root, mode = sys.argv[1], sys.argv[2]
    big = {"w": torch.full((75_000_000,), 1.5)}  # 300 MB
    if mode == "manager":
        mgr = dckpt.CheckpointManager(root)
        mgr.save(1, {"w": torch.arange(4.0)})
        print("ready", flush=True)
        mgr.save(2, big)
    else:
        dckpt.save({"w": torch.arange(4.0)}, root + "/step-000000001")
        print("ready", flush=True)
        dckpt.save(big, root + "/step-000000002")
    print("done", flush=True)
"""


@pytest.mark.parametrize("mode", ["manager", "bare"])
def test_ctrl_c_mid_save_removes_the_temporary(tmp_path, mode):
    import signal
    import time
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(INTERRUPTED_SAVE),
                              str(tmp_path), mode], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        written = []
        while not written and time.monotonic() < deadline and child.poll() is None:
            written = [f for d in tmp_path.glob(".step-000000002.tmp-*")
                       for f in d.glob("rank-*") if f.stat().st_size > 0]
            time.sleep(0.001)
        assert written, "the save ended before any data reached the staging directory"
        child.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal sends
        out, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert "done" not in out and "KeyboardInterrupt" in err, err[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step")) == [
        "step-000000001"]
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    back = dckpt.load(tmp_path / "step-000000001")  # the previous checkpoint, intact
    assert torch.equal(back["w"], torch.arange(4.0))


class Exploding:
    """A state object whose state_dict() raises something that is not an Exception."""

    def state_dict(self):
        raise SystemExit("stop")

    def load_state_dict(self, sd):
        pass


def test_base_exception_while_saving_removes_the_temporary(tmp_path):
    with pytest.raises(SystemExit):
        dckpt.save({"x": torch.zeros(3), "obj": Exploding()}, tmp_path / "ck")
    assert os.listdir(tmp_path) == []
    mgr = CheckpointManager(tmp_path / "root")
    with pytest.raises(SystemExit):
        mgr.save(1, {"x": torch.zeros(3), "obj": Exploding()})
    assert [p for p in os.listdir(tmp_path / "root") if ".tmp-" in p] == []

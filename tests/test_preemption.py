"""save_on=: a signal at a random moment of a 2-rank torchrun job becomes one committed
checkpoint at a step both ranks agreed on, and the resumed run is bitwise identical to one
that was never stopped (tests/helpers/jobs/preempt_job.py)."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dckpt
from dckpt.manager import Preemption
from helpers import JOBS, env

ENV = env(OMP_NUM_THREADS="1", DCKPT_PEER_TIMEOUT="30")
STEPS = 60


def torchrun(root, out, **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "--max-restarts", "0", str(JOBS / "preempt_job.py"), str(root), str(out),
           "--steps", str(STEPS)]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, **popen)


def finish(proc, timeout=240):
    try:
        text, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, text


def finals(out):
    return [json.loads((Path(out) / f"final-{r}.json").read_text()) for r in range(2)]


def progress(root, rank):
    try:
        step, pid = (Path(root) / f"progress-{rank}").read_text().split()
        return int(step), int(pid)
    except (OSError, ValueError):
        return -1, 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    rc, text = finish(torchrun(tmp / "root", tmp / "out"))
    assert rc == 0, text
    return finals(tmp / "out")


def preempt_and_resume(tmp_path, send):
    """Start the job, call send(proc, root) at a random moment mid-run, check the
    preemption checkpoint, resume, return the final state and the step saved."""
    root, out = tmp_path / "root", tmp_path / "out"
    proc = torchrun(root, out)
    deadline = time.monotonic() + 120
    while min(progress(root, 0)[0], progress(root, 1)[0]) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, finish(proc)[1]
        time.sleep(0.02)
    time.sleep(random.uniform(0, 1.0))  # steps take >= 0.05 s: a random step mid-run
    seen = max(progress(root, 0)[0], progress(root, 1)[0])
    send(proc, root)
    rc, text = finish(proc)
    assert rc != 0, text  # stopped, not finished
    assert not (out / "final-0.json").exists(), text
    steps = dckpt.CheckpointManager(root).steps()
    assert len(steps) == 1, (steps, text)
    saved = steps[0]
    # The step in progress (or the next ones, up to the margin), never an older one.
    assert seen <= saved <= seen + 3, (seen, saved, text)
    assert text.count(f"preemption checkpoint of step {saved} committed") == 2, text
    m = dckpt.read_manifest(root / f"step-{saved:09d}")
    assert m.world_size == 2 and m.counters["step"] == saved
    rc, text = finish(torchrun(root, out))
    assert rc == 0, text
    return finals(out), saved, text


def test_sigterm_to_torchrun_saves_and_resumes_exactly(tmp_path, reference):
    """SIGTERM to torchrun, which forwards it to both ranks."""
    got, saved, _ = preempt_and_resume(tmp_path, lambda proc, root: proc.send_signal(
        signal.SIGTERM))
    assert got == reference, f"resumed from step {saved}: final state differs"


def test_signal_on_one_rank_only_is_agreed_by_both(tmp_path, reference):
    """SIGUSR1 (SLURM's) reaches rank 1 alone: rank 0 learns the step from the store, both
    save it and exit with 128 + 10."""
    def to_rank1(proc, root):
        os.kill(progress(root, 1)[1], signal.SIGUSR1)
    got, saved, _ = preempt_and_resume(tmp_path, to_rank1)
    assert got == reference, f"resumed from step {saved}: final state differs"


def test_single_process_saves_at_the_boundary_and_exits_with_code(tmp_path):
    import torch
    p = torch.nn.Parameter(torch.ones(3))
    mgr = dckpt.CheckpointManager(tmp_path, save_on=Preemption(signal.SIGUSR1, exit_code=7))
    try:
        assert not mgr.save_if_preempted(0, {"p": p})
        os.kill(os.getpid(), signal.SIGUSR1)
        assert mgr.preempted
        with pytest.raises(SystemExit) as e:
            mgr.save_if_preempted(1, {"p": p})
        assert e.value.code == 7 and mgr.steps() == [1]
        # A second signal after the save changes nothing committed.
        os.kill(os.getpid(), signal.SIGUSR1)
        assert dckpt.CheckpointManager(tmp_path).steps() == [1]
    finally:
        mgr.preemption.uninstall()


def test_grace_period_warning_at_start(tmp_path, caplog):
    import torch
    mgr = dckpt.CheckpointManager(tmp_path)
    mgr.save(0, {"t": torch.zeros(10)})
    with caplog.at_level("WARNING", logger="dckpt"):
        m2 = dckpt.CheckpointManager(tmp_path, save_on=Preemption(signal.SIGUSR1, grace=0.0))
    m2.preemption.uninstall()
    assert "longer than the 0.0 s grace period" in caplog.text


def test_bad_arguments_are_typed():
    with pytest.raises(dckpt.InvalidArgumentError):
        Preemption("SIGTERM")
    with pytest.raises(dckpt.InvalidArgumentError):
        Preemption(signal.SIGTERM, margin=0)


def test_accelerator_save_on(tmp_path):
    """DckptAccelerator(save_on=...): save_state_if_preempted saves at the signalled step's
    boundary and exits; load_state brings the state back."""
    import torch
    from dckpt.integrations.accelerate import DckptAccelerator
    acc = DckptAccelerator(cpu=True, save_on=Preemption(signal.SIGUSR1))
    try:
        model = acc.prepare(torch.nn.Linear(3, 3))
        assert not acc.save_state_if_preempted(0, tmp_path / "ck")
        os.kill(os.getpid(), signal.SIGUSR1)
        with torch.no_grad():
            model.weight.fill_(2.0)
        with pytest.raises(SystemExit) as e:
            acc.save_state_if_preempted(1, tmp_path / "ck")
        assert e.value.code == 128 + signal.SIGUSR1
        with torch.no_grad():
            model.weight.zero_()
        acc.load_state(tmp_path / "ck")
        assert torch.equal(model.weight, torch.full((3, 3), 2.0))
    finally:
        acc.preemption.uninstall()

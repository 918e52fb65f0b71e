"""PreemptionCheckpoint (dckpt.integrations.lightning) on real Lightning: a signal at a random
moment of a 2-process torchrun job (Lightning's ddp on CPU) becomes one committed
last.ckpt of the step in progress, the processes exit with 128 + signal, Lightning's own
SIGTERM handling stays out of it, and fit(ckpt_path="last") continues bitwise identical to
a run never stopped (tests/helpers/jobs/lightning_preempt_job.py: dropout, AdamW + per-step
StepLR, a shuffled StatefulDataLoader, mid-epoch)."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("lightning")
pytest.importorskip("torchdata")

import dckpt  # noqa: E402
from helpers import JOBS, env  # noqa: E402

ENV = env(OMP_NUM_THREADS="1", DCKPT_PEER_TIMEOUT="30")
SLOW = os.environ.get("DCKPT_SLOW") == "1"
JOB = str(JOBS / "lightning_preempt_job.py")


def launch(root, out, *args, procs=2):
    cmd = [sys.executable, JOB, str(root), str(out), *map(str, args)]
    if procs > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                    str(procs), "--max-restarts", "0"]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(proc, timeout=240):
    try:
        text, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, text


def finals(out, procs):
    return [json.loads((Path(out) / f"final-{r}.json").read_text()) for r in range(procs)]


def progress(root, rank):
    try:
        step, pid = (Path(root) / f"progress-{rank}").read_text().split()
        return int(step), int(pid)
    except (OSError, ValueError):
        return -1, 0


def committed(text):
    """The steps each rank logged as its preemption checkpoint."""
    return [int(s) for s in re.findall(r"preemption checkpoint of step (\d+) committed", text)]


def check_checkpoint(root, step, procs):
    last = Path(root) / "checkpoints" / "last.ckpt"
    m = dckpt.read_manifest(last)  # a committed dckpt checkpoint directory
    assert m.meta["save_started"] <= m.created
    state = dckpt.load(last, keys=["global_step"])
    assert state["global_step"] == step
    for r in range(procs):
        assert (Path(root) / f"sigterm-{r}").read_text() == "False"  # Lightning's flag


@pytest.fixture(scope="module")
def reference2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lpref2")
    rc, text = finish(launch(tmp / "root", tmp / "out"))
    assert rc == 0, text[-4000:]
    return finals(tmp / "out", 2)


@pytest.fixture(scope="module")
def reference1(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lpref1")
    rc, text = finish(launch(tmp / "root", tmp / "out", procs=1))
    assert rc == 0, text[-4000:]
    return finals(tmp / "out", 1)


def preempt_and_resume(tmp_path, send):
    """Start the 2-process job, call send(proc, root) at a random moment mid-run, check the
    preemption checkpoint, resume, return the final state."""
    root, out = tmp_path / "root", tmp_path / "out"
    proc = launch(root, out)
    deadline = time.monotonic() + 120
    while min(progress(root, 0)[0], progress(root, 1)[0]) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, finish(proc)[1][-4000:]
        time.sleep(0.02)
    time.sleep(random.uniform(0, 0.8))  # 32 steps of >= 0.04 s: a random step mid-run
    seen = max(progress(root, 0)[0], progress(root, 1)[0])
    send(proc, root)
    rc, text = finish(proc)
    assert rc != 0, text[-4000:]  # stopped, not finished
    assert not (out / "final-0.json").exists(), text[-4000:]
    steps = committed(text)
    assert len(steps) == 2 and steps[0] == steps[1], text[-4000:]  # both ranks, one step
    saved = steps[0]
    # The step in progress or the next ones: the margin (2), and one more when the agreed
    # step ends an epoch.
    assert seen <= saved <= seen + 4, (seen, saved)
    check_checkpoint(root, saved, 2)
    rc, text = finish(launch(root, out))
    assert rc == 0, text[-4000:]
    return finals(out, 2), saved


def test_sigterm_to_torchrun_saves_the_step_in_progress_and_resumes_exactly(tmp_path,
                                                                            reference2):
    got, saved = preempt_and_resume(tmp_path, lambda proc, root: proc.send_signal(
        signal.SIGTERM))
    assert got == reference2, f"resumed from step {saved}: final state differs"


@pytest.mark.skipif(not SLOW, reason="DCKPT_SLOW=1: two more 2-process Lightning runs")
def test_signal_on_one_rank_only_is_agreed_by_both(tmp_path, reference2):
    """SIGUSR1 reaches rank 1 alone: rank 0 learns the step from the store."""
    got, saved = preempt_and_resume(
        tmp_path, lambda proc, root: os.kill(progress(root, 1)[1], signal.SIGUSR1))
    assert got == reference2, f"resumed from step {saved}: final state differs"


@pytest.mark.parametrize("variant", [
    ["--signal-at", 5, "--signal", "SIGUSR1", "--again", "--grace", 0],
    pytest.param(["--signal-at", 8, "--async"], marks=pytest.mark.skipif(
        not SLOW, reason="DCKPT_SLOW=1: the async plugin, at an epoch's last step")),
], ids=["sigusr1-twice-grace", "async-epoch-end"])
def test_one_process_exit_code_second_signal_and_grace(tmp_path, reference1, variant):
    """The job signals itself at a step (and again from inside the preemption save): the
    process exits with 128 + signal, the checkpoint of that step (the next one when the
    step ends an epoch) is committed, the resumed run warns that the save was longer than a
    0 s grace period and ends bitwise identical to the reference."""
    root, out = tmp_path / "root", tmp_path / "out"
    rc, text = finish(launch(root, out, *variant, procs=1))
    sig = signal.SIGUSR1 if "SIGUSR1" in variant else signal.SIGTERM
    assert rc == 128 + sig, text[-4000:]
    step = variant[1]
    want = step + 1 if step % 8 == 0 else step  # 8 steps per epoch
    assert committed(text) == [want], text[-4000:]
    check_checkpoint(root, want, 1)
    again = [x for x in variant if x in ("--async", "--grace", 0)]  # without the signal
    rc, text = finish(launch(root, out, *again, procs=1))
    assert rc == 0, text[-4000:]
    if "--grace" in variant:
        assert "longer than the 0.0 s grace period" in text, text[-4000:]
    assert finals(out, 1) == reference1


def test_needs_the_dckpt_plugin(tmp_path):
    import lightning as L
    import torch
    from dckpt.integrations.lightning import DckptCheckpointIO, PreemptionCheckpoint

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(2, 1)

        def training_step(self, batch, i):
            return self.w(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(torch.ones(4, 2)), batch_size=2)

    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False,
                        enable_progress_bar=False, default_root_dir=tmp_path,
                        callbacks=[PreemptionCheckpoint()])
    with pytest.raises(dckpt.InvalidArgumentError, match="needs the dckpt plugin"):
        trainer.fit(Net())
    with pytest.raises(dckpt.InvalidArgumentError, match="PreemptionCheckpoint"):
        DckptCheckpointIO(save_on=signal.SIGTERM)

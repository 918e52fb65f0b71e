"""A DDP training job that checkpoints on preemption, run under torchrun by
tests/test_preemption.py (and the example in docs/preemption.md).

    torchrun --standalone --nproc_per_node 2 preempt_job.py ROOT OUT_DIR --steps 60

Each step: a batch drawn from the global RNG (so a resume needs the RNG streams), a model
with dropout, SGD with momentum. ROOT/progress-<rank> holds the step reached and the pid;
OUT_DIR/final-<rank>.json the hex of the final parameters and optimizer state.
"""
import argparse
import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as tdist
from torch import nn

import dckpt

p = argparse.ArgumentParser()
p.add_argument("root")
p.add_argument("out")
p.add_argument("--steps", type=int, default=60)
p.add_argument("--sleep", type=float, default=0.05)
a = p.parse_args()

torch.set_num_threads(1)
tdist.init_process_group("gloo")
rank = tdist.get_rank()
dckpt.seed_everything(1234 + rank)
torch.manual_seed(0)  # the same initial weights on every rank
model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
ddp = nn.parallel.DistributedDataParallel(model)
opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
torch.manual_seed(1234 + rank)
state = {"model": model, "optimizer": opt}

mgr = dckpt.CheckpointManager(a.root, keep_last=2, save_on=(signal.SIGTERM, signal.SIGUSR1))
start = 0
if mgr.latest_step() is not None:
    start = mgr.restore(state).step + 1
progress = Path(a.root) / f"progress-{rank}"
for step in range(start, a.steps):
    x = torch.randn(8, 16)
    loss = (ddp(x) - x.sum(1, keepdim=True)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    # Atomic, so that the test never reads a half-written (empty) file.
    progress.with_suffix(".tmp").write_text(f"{step} {os.getpid()}")
    os.replace(progress.with_suffix(".tmp"), progress)
    time.sleep(a.sleep)  # a slower step, so that a signal lands mid-run
    mgr.save_if_preempted(step, state)  # the one line: save, commit and exit when signalled

out = Path(a.out)
out.mkdir(parents=True, exist_ok=True)
final = {k: v.numpy().tobytes().hex() for k, v in model.state_dict().items()}
final.update({f"momentum.{i}": s["momentum_buffer"].numpy().tobytes().hex()
              for i, s in opt.state_dict()["state"].items()})
(out / f"final-{rank}.json").write_text(json.dumps(final))
tdist.destroy_process_group()

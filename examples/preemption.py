"""Checkpoint on preemption: run under torchrun, send SIGTERM (or SIGUSR1) to torchrun, run
again: the run goes on from the step that was in progress, exactly.

    torchrun --standalone --nproc_per_node 2 examples/preemption.py runs/preempt
    # kill -TERM <torchrun pid>; then the same command again resumes
"""
import signal
import sys

import torch
import torch.distributed as tdist
from torch import nn

import dckpt

tdist.init_process_group("gloo")
dckpt.seed_everything(1234 + tdist.get_rank())
model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(16, 32), nn.ReLU(),
                                                          nn.Linear(32, 1)))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
state = {"model": model.module, "optimizer": opt}

mgr = dckpt.CheckpointManager(sys.argv[1], keep_last=2,
                              save_on=dckpt.Preemption((signal.SIGTERM, signal.SIGUSR1),
                                                       grace=30))
start = mgr.restore(state).step + 1 if mgr.latest_step() is not None else 0
for step in range(start, 100_000):
    x = torch.randn(64, 16)
    loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 1000 == 0:
        mgr.save(step, state)
    mgr.save_if_preempted(step, state)  # exits with 143 (SIGTERM) / 138 (SIGUSR1) after it

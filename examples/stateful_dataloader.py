"""torchdata's StatefulDataLoader in a dckpt state: saved and restored through its own
state_dict / load_state_dict, worker processes included.

    python examples/stateful_dataloader.py runs/sdl
"""
import sys

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

import dckpt

data = torch.utils.data.TensorDataset(torch.arange(1000.0))
loader = StatefulDataLoader(data, batch_size=10, shuffle=True, num_workers=2,
                            generator=torch.Generator().manual_seed(0))
mgr = dckpt.CheckpointManager(sys.argv[1], keep_last=2)
state = {"data": loader}
if mgr.latest_step() is not None:
    print(mgr.restore(state).summary())   # the loader continues mid-epoch
for step, (batch,) in enumerate(loader):
    if step % 20 == 0:
        mgr.save(step, state)

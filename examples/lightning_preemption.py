"""Lightning with a checkpoint on preemption: send SIGTERM (or SIGUSR1) to the job, run it
again: fit(ckpt_path="last") goes on from the step that was in progress, exactly.

    torchrun --standalone --nproc_per_node 2 examples/lightning_preemption.py runs/lp
    # kill -TERM <torchrun pid>: every rank saves the agreed step, exits with 143
    # the same command again resumes mid-epoch

One process: `python examples/lightning_preemption.py runs/lp`.
"""
import os
import signal
import sys

import lightning as L
import torch
from torch import nn
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

import dckpt
from dckpt.integrations.lightning import DckptCheckpointIO, PreemptionCheckpoint

world = int(os.environ.get("WORLD_SIZE", "1"))


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 1))

    def training_step(self, batch, i):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        x = torch.randn(100_000, 8, generator=torch.Generator().manual_seed(0))
        ds = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
        # A loader Lightning can resume mid-epoch; with several processes a sampler that
        # resumes too (Lightning's own sampler wrapper does not: use_distributed_sampler=False).
        sampler = StatefulDistributedSampler(ds, seed=0) if world > 1 else None
        return StatefulDataLoader(ds, batch_size=64, shuffle=sampler is None, sampler=sampler)


L.seed_everything(0)
trainer = L.Trainer(
    default_root_dir=sys.argv[1], max_epochs=20, accelerator="cpu", devices=world,
    strategy="ddp" if world > 1 else "auto", use_distributed_sampler=False,
    plugins=[DckptCheckpointIO()],
    # A fixed directory: the default one moves with each run's logger version, and
    # ckpt_path="last" looks in the current run's.
    callbacks=[L.pytorch.callbacks.ModelCheckpoint(
                   dirpath=os.path.join(sys.argv[1], "checkpoints"), save_last=True),
               # grace: warn when a save takes longer than torchrun's 30 s before SIGKILL
               PreemptionCheckpoint(save_on=dckpt.Preemption(
                   (signal.SIGTERM, signal.SIGUSR1), grace=30))])
trainer.fit(Net(), ckpt_path="last")  # "last": the preemption checkpoint when there is one

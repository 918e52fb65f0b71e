"""Lightning with dckpt checkpoints: one plugin, ModelCheckpoint unchanged. Run, stop it
(Ctrl-C) after an epoch, run again: fit(ckpt_path="last") continues exactly, RNG included.

    python examples/lightning_fit.py runs/lightning [--devices 2]
"""
import sys

import lightning as L
import torch
from torch import nn

from dckpt.integrations.lightning import DckptCheckpointIO


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 1))

    def training_step(self, batch, i):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        x = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, True)),
                                           batch_size=16, shuffle=True)


devices = int(sys.argv[sys.argv.index("--devices") + 1]) if "--devices" in sys.argv else 1
L.seed_everything(0)
trainer = L.Trainer(default_root_dir=sys.argv[1], max_epochs=20, accelerator="cpu",
                    devices=devices, strategy="ddp" if devices > 1 else "auto",
                    callbacks=[L.pytorch.callbacks.ModelCheckpoint(save_last=True)],
                    plugins=[DckptCheckpointIO()])     # or AsyncDckptCheckpointIO()
trainer.fit(Net(), ckpt_path="last")                   # "last": none yet starts fresh

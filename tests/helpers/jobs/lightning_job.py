"""A Lightning training job with DckptCheckpointIO, run by tests/test_lightning.py.

    python lightning_job.py DIR RESULT.json [--devices 2] [--stop-after-epoch E] [--resume]
                            [--async | --plain]

LightningModule: MLP with dropout, AdamW + StepLR, shuffled map-style data, 4 epochs,
ModelCheckpoint(save_last=True) unchanged. --stop-after-epoch E: the process exits
(os._exit) at the start of epoch E+1, after epoch E's checkpoint, as a killed job would.
--resume: fit(ckpt_path="last"). RESULT.json: sha256 of the final weights (rank 0).
"""
import argparse
import hashlib
import json
import os

import lightning as L
import torch
from torch import nn

from dckpt.integrations.lightning import AsyncDckptCheckpointIO, DckptCheckpointIO

p = argparse.ArgumentParser()
p.add_argument("dir")
p.add_argument("result")
p.add_argument("--devices", type=int, default=1)
p.add_argument("--stop-after-epoch", type=int)
p.add_argument("--resume", action="store_true")
p.add_argument("--plain", action="store_true")  # Lightning's own checkpoints
p.add_argument("--async", dest="async_", action="store_true")
a = p.parse_args()
torch.set_num_threads(1)


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 1))

    def training_step(self, batch, i):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.7)]

    def train_dataloader(self):
        g = torch.Generator().manual_seed(3)
        x = torch.randn(64, 8, generator=g)
        ds = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
        return torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True)


class Stop(L.Callback):
    def on_train_epoch_start(self, trainer, module):
        if a.stop_after_epoch is not None and trainer.current_epoch == a.stop_after_epoch + 1:
            trainer.strategy.checkpoint_io.teardown()  # async: epoch E's saves committed
            os._exit(0)


L.seed_everything(11)
trainer = L.Trainer(
    default_root_dir=a.dir, max_epochs=4, accelerator="cpu", devices=a.devices,
    strategy="ddp" if a.devices > 1 else "auto", logger=False, enable_progress_bar=False,
    enable_model_summary=False, callbacks=[Stop(), L.pytorch.callbacks.ModelCheckpoint(
        dirpath=os.path.join(a.dir, "ckpt"), save_last=True, save_top_k=-1)],
    plugins=[] if a.plain else [AsyncDckptCheckpointIO() if a.async_ else DckptCheckpointIO()])
model = Net()
trainer.fit(model, ckpt_path="last" if a.resume else None)
if trainer.is_global_zero:
    with open(a.result, "w") as f:
        json.dump({k: hashlib.sha256(v.numpy().tobytes()).hexdigest()
                   for k, v in model.state_dict().items()}, f)

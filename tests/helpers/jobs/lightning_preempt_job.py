"""A Lightning job that checkpoints on preemption (PreemptionCheckpoint), run by
tests/test_lightning_preemption.py alone or under torchrun (Lightning's ddp on CPU).

    [torchrun --standalone --nproc_per_node 2] lightning_preempt_job.py ROOT OUT_DIR
        [--async] [--signal-at STEP [--signal SIG] [--again]] [--grace SECONDS]

LightningModule: MLP with dropout, AdamW + a per-step StepLR, a shuffled StatefulDataLoader
(Lightning saves its position: mid-epoch resume), 4 epochs of 8 steps, ModelCheckpoint
(save_last=True) at each epoch's end, fit(ckpt_path="last"). Each step sleeps a little, so
that a signal lands mid-run. ROOT/progress-<rank>: the step reached and the pid.
--signal-at STEP: the job sends itself the signal at that step (--again: a second one from
inside the preemption save). OUT_DIR/final-<rank>.json: hex of the final weights and
optimizer state; ROOT/sigterm-<rank>: Lightning's trainer.received_sigterm when the
preemption exit passes Lightning's exception path.
"""
import argparse
import json
import os
import signal
import time
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torchdata.stateful_dataloader import StatefulDataLoader

from dckpt import Preemption
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from dckpt.integrations.lightning import (AsyncDckptCheckpointIO, DckptCheckpointIO,
                                          PreemptionCheckpoint)

p = argparse.ArgumentParser()
p.add_argument("root")
p.add_argument("out")
p.add_argument("--async", dest="async_", action="store_true")
p.add_argument("--signal-at", type=int)
p.add_argument("--signal", default="SIGTERM")
p.add_argument("--again", action="store_true")
p.add_argument("--sleep", type=float, default=0.04)
p.add_argument("--grace", type=float)  # the grace-period warning (at start, after saves)
a = p.parse_args()
torch.set_num_threads(1)
root = Path(a.root)
root.mkdir(parents=True, exist_ok=True)
world = int(os.environ.get("WORLD_SIZE", "1"))
sig = signal.Signals[a.signal]


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 1))

    def training_step(self, batch, i):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.8)
        return [opt], [{"scheduler": sched, "interval": "step"}]

    def train_dataloader(self):
        x = torch.randn(64 * world, 8, generator=torch.Generator().manual_seed(3))
        ds = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
        if world == 1:
            return StatefulDataLoader(ds, batch_size=8, shuffle=True)
        # Several processes: a sampler that resumes (Lightning's own, a
        # DistributedSamplerWrapper around a RandomSampler, draws each epoch's order from a
        # generator no checkpoint holds), hence use_distributed_sampler=False below.
        return StatefulDataLoader(ds, batch_size=8,
                                  sampler=StatefulDistributedSampler(ds, seed=7))


class Progress(L.Callback):
    def on_train_batch_end(self, trainer, module, outputs, batch, i):
        step = trainer.global_step
        # Atomic, so that the test never reads a half-written (empty) file.
        tmp = root / f"progress-{trainer.global_rank}.tmp"
        tmp.write_text(f"{step} {os.getpid()}")
        os.replace(tmp, root / f"progress-{trainer.global_rank}")
        if a.signal_at is not None and step == a.signal_at:
            os.kill(os.getpid(), sig)
        time.sleep(a.sleep)

    def on_exception(self, trainer, module, exception):
        # Lightning's own SIGTERM flag: it must not have seen the signal dckpt took.
        (root / f"sigterm-{trainer.global_rank}").write_text(str(trainer.received_sigterm))


class SignalDuringSave(DckptCheckpointIO):
    """A second signal arrives while the preemption checkpoint is being written."""

    def save_checkpoint(self, checkpoint_dict, path, storage_options=None):
        if a.again and Path(path).name == "last.ckpt" and self.preemption.signalled:
            os.kill(os.getpid(), sig)
        super().save_checkpoint(checkpoint_dict, path, storage_options)


L.seed_everything(11)
io = AsyncDckptCheckpointIO() if a.async_ else SignalDuringSave()
trainer = L.Trainer(
    max_epochs=4, accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto",
    use_distributed_sampler=False, logger=False, enable_progress_bar=False,
    enable_model_summary=False,
    default_root_dir=str(root), plugins=[io],
    callbacks=[Progress(), PreemptionCheckpoint(
        save_on=Preemption((signal.SIGTERM, signal.SIGUSR1), grace=a.grace)),
               # Its directory is resolved in its setup: ROOT/checkpoints.
               L.pytorch.callbacks.ModelCheckpoint(save_last=True)])
model = Net()
trainer.fit(model, ckpt_path="last")
out = Path(a.out)
out.mkdir(parents=True, exist_ok=True)
r = trainer.global_rank
opt = trainer.optimizers[0].state_dict()["state"]
final = {k: v.numpy().tobytes().hex() for k, v in model.state_dict().items()}
final.update({f"{k}.{i}": s[k].numpy().tobytes().hex() for i, s in opt.items()
              for k in ("exp_avg", "exp_avg_sq")})
(out / f"final-{r}.json").write_text(json.dumps(final))

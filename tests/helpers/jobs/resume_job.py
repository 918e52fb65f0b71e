"""A small but complete training job, run in its own process by the resume tests.

    python resume_job.py ROOT --total 12 [--stop-at 6] [--resume] [--weights-only] OUT.json

Transformer with dropout, shuffled DataLoader, AdamW, warmup + cosine schedule, GradScaler.
Writes per-step losses and the final parameters (hex of their bytes) to OUT.json.
"""
import argparse
import json
import math
import sys

import torch
from torch import nn

import dckpt
from dckpt.state.data import ResumableLoader
from tiny_lm import TinyLM  # beside this script: sys.path[0]

VOCAB, SEQ, BATCH = 50, 12, 4


def build(seed: int = 0):
    dckpt.seed_everything(seed)
    data = torch.randint(0, VOCAB, (40, SEQ + 1), generator=torch.Generator().manual_seed(1))
    loader = ResumableLoader(torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True))
    model = TinyLM(VOCAB)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    warmup, total = 3, 40
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup
        else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    return {"model": model, "optimizer": opt, "scheduler": sched, "scaler": scaler,
            "data": loader}


def train(state, step: int, stop: int, mgr=None, save_at=None, losses=None):
    model, opt, sched, scaler, loader = (state[k] for k in
                                         ("model", "optimizer", "scheduler", "scaler", "data"))
    model.train()
    while step < stop:
        for batch in loader:
            x, y = batch[:, :-1], batch[:, 1:]
            loss = nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            losses.append(loss.item())
            if mgr is not None and step == save_at:
                mgr.save(step, state, metrics={"loss": loss.item()}, epoch=loader.epoch,
                         step_in_epoch=loader.batches, loss_history=losses)
            if step >= stop:
                return step
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("out")
    ap.add_argument("--total", type=int, default=24)
    ap.add_argument("--stop-at", type=int)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--weights-only", action="store_true")
    ap.add_argument("--compression", default=None)
    a = ap.parse_args()
    state = build()
    mgr = dckpt.CheckpointManager(a.root, compression=a.compression)
    losses, step = [], 0
    if a.resume:
        if a.weights_only:
            dckpt.load(mgr.path(mgr.latest_step()), into=state, keys=["model"])
            step = mgr.latest_step()
        else:
            report = mgr.restore(state)
            step = report.step
            losses = list(report.counters["loss_history"])
    stop = a.stop_at or a.total
    train(state, step, stop, mgr, save_at=a.stop_at, losses=losses)
    params = {k: v.detach().numpy().tobytes().hex() for k, v in state["model"].state_dict().items()}
    json.dump({"losses": losses, "params": params}, open(a.out, "w"))


if __name__ == "__main__":
    sys.exit(main())

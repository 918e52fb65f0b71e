"""An accelerate training job, run in fresh processes (plain python, or torchrun) by
test_accelerate.py.

    accel_job.py PROJECT OUT.json --total 14 [--save-at 4 9] [--resume [DIR]] [--iteration N]

Transformer with dropout, shuffled DataLoader (6 batches per epoch, so saves land mid-epoch
and runs cross epochs), AdamW, warmup schedule, a registered custom object. Rank 0 writes
every rank's per-step losses, the data it saw, and the final parameters to OUT.json.
"""
import argparse
import hashlib
import json
import os
import sys

import torch
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch import nn

from dckpt.integrations.accelerate import DckptAccelerator
from tiny_lm import TinyLM  # beside this script: sys.path[0]

VOCAB, SEQ, BATCH, SAMPLES = 40, 10, 4, 24


class Progress:
    """Registered with register_for_checkpointing: the step and the loss history."""

    def __init__(self):
        self.step, self.losses, self.seen = 0, [], []

    def state_dict(self):
        return {"step": self.step, "losses": self.losses, "seen": self.seen}

    def load_state_dict(self, s):
        self.step, self.losses, self.seen = s["step"], list(s["losses"]), list(s["seen"])


def main():
    acc = run(parse())
    acc.wait_for_everyone()  # rank 0 still hashes the parameters
    acc.end_training()


def parse():
    ap = argparse.ArgumentParser()
    ap.add_argument("project")
    ap.add_argument("out")
    ap.add_argument("--total", type=int, default=14)
    ap.add_argument("--save-at", type=int, nargs="*", default=[])
    ap.add_argument("--resume", nargs="?", const="", default=None)
    ap.add_argument("--explicit", help="save to this directory instead of automatic naming")
    ap.add_argument("--total-limit", type=int)
    ap.add_argument("--iteration", type=int, help="set the save iteration (after any resume)")
    ap.add_argument("--split-batches", action="store_true")
    ap.add_argument("--fsdp", action="store_true", help="with accelerate's FSDP2 plugin")
    ap.add_argument("--gpu", action="store_true", help="on CUDA, deterministic algorithms")
    return ap.parse_args()


def run(a):

    pc = ProjectConfiguration(project_dir=a.project, automatic_checkpoint_naming=not a.explicit,
                              total_limit=a.total_limit)
    kw = {}
    if a.fsdp:
        from accelerate import FullyShardedDataParallelPlugin
        kw["fsdp_plugin"] = FullyShardedDataParallelPlugin(fsdp_version=2)
    if a.gpu:
        torch.use_deterministic_algorithms(True)  # needs CUBLAS_WORKSPACE_CONFIG=:4096:8
    acc = DckptAccelerator(cpu=not a.gpu, project_config=pc,
                           dataloader_config=DataLoaderConfiguration(split_batches=a.split_batches),
                           **kw)
    set_seed(0)
    data = torch.randint(0, VOCAB, (SAMPLES, SEQ + 1), generator=torch.Generator().manual_seed(1))
    batch = BATCH * 2 if a.split_batches else BATCH  # the global batch: any world size
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True)
    model = TinyLM(VOCAB)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    model, opt, sched, loader = acc.prepare(model, opt, sched, loader)
    progress = Progress()
    acc.register_for_checkpointing(progress)

    if a.resume is not None:
        acc.load_state(a.resume or None)  # moves the save iteration past the newest checkpoint
    if a.iteration is not None:
        acc.project_configuration.iteration = a.iteration
    model.train()
    while progress.step < a.total:
        for x in loader:
            inp, tgt = x[:, :-1], x[:, 1:]
            loss = nn.functional.cross_entropy(model(inp).reshape(-1, VOCAB), tgt.reshape(-1))
            acc.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
            progress.step += 1
            progress.losses.append(acc.gather(loss.detach()[None]).tolist())
            seen = acc.gather(x).cpu().numpy().tobytes()
            progress.seen.append(hashlib.sha1(seen).hexdigest()[:12])
            if progress.step in a.save_at:
                try:
                    acc.save_state(a.explicit)
                except ValueError as e:  # a refused save: each process says so, then stops
                    open(f"{a.out}.refused-{acc.process_index}", "w").write(str(e))
                    return acc
            if progress.step >= a.total:
                break
    if acc.is_main_process:
        params = hashlib.sha1(b"".join(_full(p).numpy().tobytes()
                                       for p in acc.unwrap_model(model).parameters())).hexdigest()
        json.dump({"losses": progress.losses, "seen": progress.seen, "params": params,
                   "world": acc.num_processes, "distributed_type": str(acc.distributed_type)},
                  open(a.out, "w"))
    return acc


def _full(p):
    p = p.detach()
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).cpu()


if __name__ == "__main__":
    main()
    # A gloo worker thread may still be releasing a finished collective's tensors (which
    # takes the GIL) while the interpreter finalizes, and that aborts the process
    # ("terminate called without an active exception"; seen in 1 of ~15 runs). All output
    # is written and closed by now, so leave without finalizing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

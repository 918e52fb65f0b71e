"""The demo's training job: a small causal transformer learning a synthetic Markov language,
trained with accelerate (DckptAccelerator), checkpointed every K steps with dckpt.

    python -m torch.distributed.run --nproc_per_node 2 -m dckpt.demo.train --project P ...
    python -m dckpt.demo.train --project P --resume DIR --no-save      # one process

Process 0 prints one machine-readable line per event ("@dckpt {json}") that the demo
driver turns into progress output; nothing else is needed to follow a run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch import nn

from ..bench.order import balanced
from ..integrations.accelerate import DckptAccelerator
from ..storage import commit

VOCAB, SEQ, GLOBAL_BATCH, SAMPLES = 64, 64, 16, 512
D_MODEL, LAYERS, HEADS, FF = 192, 3, 4, 576


class TinyLM(nn.Module):
    """A causal transformer language model with dropout (so RNG streams matter)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        self.pos = nn.Parameter(torch.randn(SEQ, D_MODEL) * 0.02)
        layer = nn.TransformerEncoderLayer(D_MODEL, HEADS, FF, dropout=0.1, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(D_MODEL, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(SEQ),
                             persistent=False)

    def forward(self, x):
        h = self.embed(x) + self.pos[: x.shape[1]]
        return self.head(self.blocks(h, mask=self.mask[: x.shape[1], : x.shape[1]],
                                     is_causal=True))


def markov_corpus() -> torch.Tensor:
    """Sequences from a fixed random chain where each token has 4 likely successors (and a 2%
    chance of any token): the loss falls from ln(64) = 4.16 towards about 1.5."""
    g = torch.Generator().manual_seed(1234)
    successors = torch.randint(0, VOCAB, (VOCAB, 4), generator=g)
    seqs = torch.empty(SAMPLES, SEQ + 1, dtype=torch.long)
    seqs[:, 0] = torch.randint(0, VOCAB, (SAMPLES,), generator=g)
    for t in range(SEQ):
        pick = successors[seqs[:, t], torch.randint(0, 4, (SAMPLES,), generator=g)]
        noise = torch.randint(0, VOCAB, (SAMPLES,), generator=g)
        seqs[:, t + 1] = torch.where(torch.rand(SAMPLES, generator=g) < 0.02, noise, pick)
    return seqs


class Progress:
    """Registered with accelerator.register_for_checkpointing: step and loss history."""

    def __init__(self):
        self.step, self.losses = 0, []

    def state_dict(self) -> dict:
        return {"step": self.step, "losses": self.losses}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.losses = int(state["step"]), list(state["losses"])


def emit(acc, kind: str, **fields) -> None:
    if acc.is_main_process:
        print("@dckpt " + json.dumps({"event": kind, **fields}), flush=True)


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="python -m dckpt.demo.train")
    ap.add_argument("--project", required=True)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10, help="checkpoint every K steps")
    ap.add_argument("--resume", nargs="?", const="", default=None,
                    help="resume from DIR, or the latest checkpoint when no DIR")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--bench", help="after training, time save/load against accelerate; "
                                    "write the figures to this JSON file")
    ap.add_argument("--result", help="write the per-step losses to this JSON file")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    # One thread per process: spinning OpenMP threads slow to a crawl on a busy machine.
    torch.set_num_threads(1)
    acc = DckptAccelerator(
        cpu=True, dataloader_config=DataLoaderConfiguration(split_batches=True),
        project_config=ProjectConfiguration(project_dir=a.project, total_limit=3,
                                            automatic_checkpoint_naming=True))
    set_seed(0)
    loader = torch.utils.data.DataLoader(markov_corpus(), batch_size=GLOBAL_BATCH, shuffle=True)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    warmup = 5
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(
        (s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s, a.steps) / a.steps))))
    model, opt, sched, loader = acc.prepare(model, opt, sched, loader)
    progress = Progress()
    acc.register_for_checkpointing(progress)
    emit(acc, "start", processes=acc.num_processes, batches_per_epoch=len(loader),
         params=sum(p.numel() for p in model.parameters()))

    if a.resume is not None:
        report = acc.load_state(a.resume or None)
        emit(acc, "resumed", step=progress.step, path=str(report.path), mb=report.bytes / 1e6,
             seconds=report.seconds, components=list(report.components), rng=report.rng_streams)

    model.train()
    t0 = time.perf_counter()
    while progress.step < a.steps:
        for x in loader:
            loss = nn.functional.cross_entropy(model(x[:, :-1]).reshape(-1, VOCAB),
                                               x[:, 1:].reshape(-1))
            acc.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
            progress.step += 1
            mean = acc.gather(loss.detach()[None]).mean().item()
            progress.losses.append(mean)
            emit(acc, "step", step=progress.step, loss=mean, elapsed=time.perf_counter() - t0)
            if not a.no_save and progress.step % a.every == 0:
                acc.project_configuration.iteration = progress.step  # name checkpoints by step
                s0 = time.perf_counter()
                path = acc.save_state()
                emit(acc, "saved", step=progress.step, path=str(path),
                     seconds=time.perf_counter() - s0)
            if progress.step >= a.steps:
                break
    if a.result and acc.is_main_process:
        Path(a.result).write_text(json.dumps({"losses": progress.losses,
                                              "processes": acc.num_processes}))
    if a.bench:
        figures = bench(acc, Path(a.project) / "bench", model, opt)
        if acc.is_main_process:
            Path(a.bench).write_text(json.dumps(figures))
    acc.wait_for_everyone()
    acc.end_training()
    return 0


def bench(acc: DckptAccelerator, root: Path, model, opt, repeats: int = 8) -> dict:
    """Time save_state/load_state of this very state: accelerate's own and dckpt's, each with
    and without fsync, interleaved in a balanced order (each system in each position and
    after each other system equally often), `repeats` times each; the median wall time of the
    collective call (all processes done). accelerate does not fsync: its durable variant
    fsyncs what its save_state wrote (every file, then their directories) afterwards."""
    pc = acc.project_configuration
    pc.automatic_checkpoint_naming = False  # explicit directories for both
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    state_bytes += sum(v.numel() * v.element_size() for s in opt.state_dict()["state"].values()
                       for v in s.values() if torch.is_tensor(v))
    opts = acc._dckpt_options

    def dckpt_save(fsync: bool):
        def save(d):
            opts["fsync"] = fsync
            try:
                acc.save_state(d)
            finally:
                opts.pop("fsync")
        return save

    def accelerate_durably(d):
        Accelerator.save_state(acc, d)
        acc.wait_for_everyone()  # every process's files are written
        if acc.is_main_process:
            for f in sorted(Path(d).rglob("*")):
                (commit.fsync_dir if f.is_dir() else commit.fsync_file)(f)
            commit.fsync_dir(Path(d))
            commit.fsync_dir(Path(d).parent)

    accelerate_load = lambda d: Accelerator.load_state(acc, d)  # noqa: E731
    systems = {
        "accelerate": (lambda d: Accelerator.save_state(acc, d), accelerate_load),
        "accelerate + fsync": (accelerate_durably, accelerate_load),
        "dckpt": (dckpt_save(True), acc.load_state),
        "dckpt, no fsync": (dckpt_save(False), acc.load_state),
    }
    times: dict = {name: {"save": [], "load": []} for name in systems}
    for r in range(repeats):
        for name in balanced(list(systems), r):
            save, load = systems[name]
            d = root / f"{list(systems).index(name)}-{r}"
            times[name]["save"].append(_timed(acc, lambda: save(d)))
            times[name]["load"].append(_timed(acc, lambda: load(d)))
    out = {"state_bytes": state_bytes, "processes": acc.num_processes, "repeats": repeats,
           "systems": {}}
    for i, name in enumerate(systems):
        fig = {k: sorted(v)[len(v) // 2] for k, v in times[name].items()}
        fig["disk_bytes"] = sum(f.stat().st_size for f in (root / f"{i}-0").rglob("*")
                                if f.is_file())
        out["systems"][name] = fig
    return out


def _timed(acc, fn) -> float:
    acc.wait_for_everyone()
    t0 = time.perf_counter()
    fn()
    acc.wait_for_everyone()
    return time.perf_counter() - t0


if __name__ == "__main__":
    code = main()
    # A gloo worker thread may still be releasing a finished collective's tensors (which
    # takes the GIL) while the interpreter finalizes, and that aborts the process
    # ("terminate called without an active exception"). Everything is written by now,
    # so leave without finalizing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

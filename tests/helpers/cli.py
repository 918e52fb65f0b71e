"""Real checkpoints for the CLI tests, built once per session and copied per test.

A small model trained for real (AdamW, warmup schedule, GradScaler, a ResumableLoader over a
shuffled DataLoader) and saved by a CheckpointManager, so every component verify looks at
is the genuine article.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from pathlib import Path

import torch
from torch import nn

import dckpt
from dckpt.cli import main
from dckpt.state.data import ResumableLoader


def build_state(seed: int = 0) -> dict:
    dckpt.seed_everything(seed)
    data = torch.randn(32, 9, generator=torch.Generator().manual_seed(1))
    loader = ResumableLoader(torch.utils.data.DataLoader(data, batch_size=4, shuffle=True))
    model = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.1), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    return {"model": model, "optimizer": opt, "scheduler": sched, "scaler": scaler,
            "data": loader}


def train(state: dict, steps: int, losses: list, on_step=None) -> None:
    """`steps` optimizer steps in one pass over the loader (epochs roll over inside), so the
    data position advances as in a real run; on_step(step) runs after each step."""
    model, opt, sched, scaler, loader = (state[k] for k in
                                         ("model", "optimizer", "scheduler", "scaler", "data"))
    done = 0
    while done < steps:
        for batch in loader:
            loss = nn.functional.mse_loss(model(batch[:, :8]), batch[:, 8:])
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            losses.append(loss.item())
            done += 1
            if on_step is not None:
                on_step(done)
            if done == steps:
                return


def make_root(root: Path, saves=(5, 10), **manager_kwargs) -> Path:
    """A manager root with checkpoints at the given steps of one continuous run."""
    state = build_state()
    mgr = dckpt.CheckpointManager(root, fsync=False, **manager_kwargs)
    losses: list = []

    def maybe_save(step: int) -> None:
        if step in saves:
            mgr.save(step, state, metrics={"loss": losses[-1]}, epoch=state["data"].epoch,
                     step_in_epoch=state["data"].batches, loss_history=losses)

    train(state, max(saves), losses, maybe_save)
    mgr.close()  # retired steps are removed in a thread: done before anyone lists the root
    return root


def run_cli(*argv: str) -> tuple[int, str, str]:
    """main(argv) in this process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def run_json(*argv: str) -> tuple[int, dict]:
    code, out, err = run_cli(*argv, "--json")
    assert out, err
    return code, json.loads(out)


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def snapshot(path: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under path (backups excluded)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*"))
            if p.is_file() and ".dckpt-backup" not in p.relative_to(path).parts}


def key_paths(obj, prefix: str = "") -> set[str]:
    """Every key path of a JSON document, list items merged under []."""
    out = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            p = f"{prefix}.{k}" if prefix else k
            out.add(p)
            out |= key_paths(v, p)
    elif isinstance(obj, list):
        for v in obj:
            out |= key_paths(v, prefix + "[]")
    return out


def _rank_sharded_save(rank: int, world: int, root: str) -> int:
    """FSDP2 (fully_shard on a CPU mesh) model and AdamW, one step, saved by a manager."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    mesh = init_device_mesh("cpu", (world,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    dckpt.CheckpointManager(root, fsync=False).save(1, {"model": model, "optimizer": opt})
    return rank


def sharded_root(root: Path) -> Path:
    """A real 2-rank FSDP2 save over gloo: tensors sharded across the ranks' data files."""
    from helpers.ranks import run_with_ranks
    run_with_ranks(2, _rank_sharded_save, str(root))
    return root

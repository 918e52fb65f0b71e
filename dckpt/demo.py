"""A first demo until the accelerate demo lands: save, verify and load a real model state."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch


def add_arguments(parser) -> None:
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")


def run(args) -> int:
    import dckpt
    from torch import nn
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(24)])
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(8, 1024)).sum().backward()
    opt.step()
    state = {"model": model, "optimizer": opt, "step": 1}
    root = Path(args.dir or tempfile.mkdtemp(prefix="dckpt-demo-"))
    res = dckpt.save(state, root / "ckpt", overwrite=True)
    print(f"saved {res.bytes / 1e6:.0f} MB in {res.seconds:.2f} s "
          f"({res.bytes / 1e9 / res.seconds:.2f} GB/s, fsync'd) to {res.path}")
    fresh = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(24)])
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    t0 = time.perf_counter()
    report = dckpt.load(res.path, into={"model": fresh, "optimizer": fresh_opt, "step": 0})
    dt = time.perf_counter() - t0
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 fresh.state_dict().values()))
    print(f"loaded and verified {report.bytes / 1e6:.0f} MB in {dt:.2f} s "
          f"({report.bytes / 1e9 / dt:.2f} GB/s); bitwise identical: {same}")
    return 0 if same else 1

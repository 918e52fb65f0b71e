"""Figures per rank: a save reports this rank's share beside the whole checkpoint's bytes,
and `dckpt inspect` prints identical ranks as one group, so what differs stands out."""
from __future__ import annotations

import subprocess
import sys

import torch

import dckpt
from helpers.ranks import run_with_ranks


def _save_rank(rank, world, path):
    torch.manual_seed(0)
    shared = torch.nn.Linear(64, 64)  # the same on every rank: written once in total
    own = torch.full((1000,), float(rank))  # per-rank values: each rank writes its own
    odd = {"lr": 0.1 if rank != world - 1 else 0.2}  # the last rank differs
    r = dckpt.save({"model": shared, "own": own, "sched": odd}, path)
    return [r.bytes, r.rank_bytes]


def test_each_rank_reports_its_share_and_inspect_groups_identical_ranks(tmp_path):
    path = tmp_path / "ck"
    figures = run_with_ranks(3, _save_rank, str(path), timeout=120)
    total = figures[0][0]
    assert all(f[0] == total for f in figures)
    assert sum(f[1] for f in figures) == total  # the shares add up to the whole
    assert all(f[1] >= 4000 for f in figures)  # each wrote at least its own tensor
    out = subprocess.run([sys.executable, "-m", "dckpt", "inspect", str(path)],
                         capture_output=True, text=True, check=True).stdout
    assert "ranks 0-1 (2, identical)" in out and "rank 2" in out, out

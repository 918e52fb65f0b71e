"""Bytes the remote tier sends over the client's link: a full save vs an incremental one.

    python benchmarks/bench_remote_tier.py [--base-mb 256] [--endpoint URL]

A LoRA-style state: a frozen base of 4096 x 4096 fp32 matrices (`--base-mb` of them) and
rank-16 adapters on each with their AdamW moments. A CheckpointManager with remote= saves
it three times, one optimizer step in between: step 1 (the first, full), step 2
(incremental: the base is a hard link to step 1's data), step 3 (full=True, for
comparison). Printed: each upload's bytes sent and bytes copied server-side
(mgr.upload_report), and the ratio full / incremental. Counts, not times: they do not
depend on the machine's load. Without --endpoint a moto server is started on loopback.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-mb", type=int, default=256)
    ap.add_argument("--endpoint")
    args = ap.parse_args()

    from helpers import s3server
    proc = None
    endpoint = args.endpoint
    if endpoint is None:
        endpoint, proc = s3server.start()
    os.environ.update(s3server.client_env(endpoint))
    import torch

    import dckpt

    n = max(1, args.base_mb // 64)  # 64 MiB per 4096 x 4096 fp32 matrix
    torch.manual_seed(0)
    base = [torch.randn(4096, 4096) for _ in range(n)]
    a = torch.nn.Parameter(torch.randn(n, 16, 4096) * 0.01)
    b = torch.nn.Parameter(torch.zeros(n, 4096, 16))
    opt = torch.optim.AdamW([a, b], lr=1e-3)

    def train() -> None:
        loss = sum(((b[i] @ a[i]) * base[i]).sum() for i in range(n))
        loss.backward()
        opt.step()
        opt.zero_grad()

    state = {"model": {"base": base, "lora_a": a, "lora_b": b}, "optim": opt}
    work = tempfile.mkdtemp(prefix="dckpt-bench-tier-")
    try:
        bucket = s3server.new_bucket(endpoint)
        mgr = dckpt.CheckpointManager(Path(work) / "run", remote=f"s3://{bucket}/lora",
                                      fsync=False)
        for step, full in ((1, False), (2, False), (3, True)):
            train()
            mgr.save(step, state, full=full)
            mgr.wait()
        rows = [mgr.upload_report(s) for s in (1, 2, 3)]
        mgr.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if proc is not None:
            proc.terminate()
            proc.wait(10)
    trainable = sum(x.numel() * 4 for x in (a, b)) * 3  # parameters + 2 AdamW moments
    print(f"base {n * 64} MiB frozen, trainable part {trainable:,} bytes "
          f"(parameters and AdamW moments)")
    print("| save | bytes sent over the client's link | bytes copied server-side |")
    print("|---|---|---|")
    for r, what in zip(rows, ("step 1 (first, full)", "step 2 (incremental)",
                              "step 3 (`full=True`, same state size)")):
        print(f"| {what} | {r.sent:,} | {r.copied:,} |")
    print(f"full / incremental bytes sent: {rows[2].sent / rows[1].sent:.1f}x")


if __name__ == "__main__":
    main()

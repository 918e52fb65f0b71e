"""The CUDA paths of async saves, checked on a GPU machine in under two minutes.

    python benchmarks/gpu_check.py [--gb 1.0] [--dir /tmp] [--record benchmarks/results/gpu.json]

Prints one PASS/FAIL line per check and the timings, exits non-zero on any FAIL:
  pinned staging   the staging arena is page-locked (cudaHostRegister, or the fallback)
  immediate        async save of a ~1 GB CUDA state: D2H on a side stream, synchronized
                   inside save(); every tensor changed right after save() returns; the
                   committed checkpoint holds the old bytes
  deferred         the same with snapshot="deferred": forward/backward run while the side
                   stream copies; optimizer.step() waits on the GPU (not the CPU) for it
  restore          the async checkpoint restores into a fresh CUDA model bit for bit
  cuda rng         per-device CUDA generator states captured at save() (dckpt.rng) and
                   restored by the manager: the draws after restore repeat those after save
Timings: blocked time of each save, D2H GB/s, sync dckpt save, durable torch.save.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dckpt  # noqa: E402
from dckpt.engine import checkpoint  # noqa: E402
from dckpt.storage import local as io  # noqa: E402
from dckpt.format import reader  # noqa: E402
from dckpt.manager.async_save import AsyncOptions  # noqa: E402
from dckpt.state.staging import Arena  # noqa: E402
from dckpt.bench.record import recording  # noqa: E402

WIDTH = 4096
FAILED: list[str] = []


def report(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        FAILED.append(name)


def build(gb: float):
    torch.manual_seed(0)
    layers = max(1, round(gb * 1e9 / 3 / (WIDTH * WIDTH * 4)))  # params + 2 moments
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)],
                                torch.nn.LayerNorm(WIDTH)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = {"model": model, "optimizer": opt}
    train_step(state)
    return state


def train_step(state) -> None:
    x = torch.randn(64, WIDTH, device="cuda")
    loss = state["model"](x).square().mean()
    state["optimizer"].zero_grad()
    loss.backward()
    state["optimizer"].step()


def digests(state) -> dict[str, str]:
    """sha256 of every tensor's bytes, read back to the CPU synchronously."""
    return {leaf.name: hashlib.sha256(io.byte_view(leaf.value.detach().cpu().contiguous()))
            .hexdigest() for leaf in checkpoint.snapshot(state).leaves}


def stored(path) -> dict[str, str]:
    m = reader.read_manifest(path)
    return {n: hashlib.sha256(reader.read_tensor_bytes(path, m, n).tobytes()).hexdigest()
            for n in m.tensors}


def mutate(state) -> None:
    with torch.no_grad():
        for leaf in checkpoint.snapshot(state).leaves:
            leaf.value.add_(1)


def check_pinned() -> None:
    a = Arena(64 << 20, pinned=True)
    how = "cudaHostRegister" if a._registered else "caching pinned allocator"
    report("pinned staging", bool(a.data.is_pinned()), how)
    a.close()


def check_mode(work: Path, state, mode: str) -> float:
    nbytes = sum(leaf.nbytes for leaf in checkpoint.snapshot(state).leaves)
    mgr = dckpt.CheckpointManager(work / mode, async_save=AsyncOptions(snapshot=mode))
    mgr.prepare(state)
    before = digests(state)
    torch.cuda.synchronize()
    h = mgr.save(1, state)
    inside = h.blocked_seconds
    train_step(state)  # forward/backward; step() waits (deferred: on the GPU) for the copy
    mutate(state)
    t0 = time.perf_counter()
    h.result()
    torch.cuda.synchronize()
    ok = stored(mgr.path(1)) == before
    report(f"{mode} snapshot consistent after mutation", ok,
           f"{nbytes / 1e9:.2f} GB, blocked {h.blocked_seconds * 1e3:.1f} ms "
           f"(inside save() {inside * 1e3:.1f} ms), committed {time.perf_counter() - t0:.2f} s "
           f"later, staging {mgr.staging_bytes / 1e9:.2f} GB pinned="
           f"{mgr._saver.pool._free[0].pinned}")
    if mode == "immediate":
        print(f"  D2H into pinned staging inside save(): {nbytes / inside / 1e9:.1f} GB/s")
        fresh = build_like(state)
        mgr.restore(fresh, restore_rng=False)
        report("restore of the async checkpoint into a fresh CUDA model",
               digests(fresh) == before)
    mgr.close()
    return h.blocked_seconds


def build_like(state):
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for m in state["model"]
                                  if isinstance(m, torch.nn.Linear)],
                                torch.nn.LayerNorm(WIDTH)).cuda()
    return {"model": model, "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-3)}


def check_cuda_rng(work: Path) -> None:
    torch.cuda.init()
    torch.cuda.manual_seed_all(123)
    torch.randn(10, device="cuda")  # move the generator off its seed
    captured = dckpt.rng.capture()
    ok_capture = "cuda" in captured and len(captured["cuda"]) == torch.cuda.device_count()
    after = torch.randn(1000, device="cuda").cpu()
    dckpt.rng.restore(captured)
    again = torch.randn(1000, device="cuda").cpu()
    report("cuda rng capture/restore (dckpt.rng)", ok_capture and torch.equal(after, again),
           f"{len(captured.get('cuda', []))} device(s)")

    model = torch.nn.Linear(8, 8).cuda()
    state = {"model": model}
    mgr = dckpt.CheckpointManager(work / "rng", async_save=True)
    mgr.save(1, state).result()
    draws = torch.randn(1000, device="cuda").cpu()
    torch.randn(5000, device="cuda")  # wander off
    report_ = mgr.restore(state)
    redraw = torch.randn(1000, device="cuda").cpu()
    report("cuda rng through an async save and restore",
           "cuda" in report_.rng_streams and torch.equal(draws, redraw),
           f"streams {report_.rng_streams}")
    mgr.close()


def timings(work: Path, state) -> None:
    mgr = dckpt.CheckpointManager(work / "sync")
    t0 = time.perf_counter()
    mgr.save(1, state)
    sync = time.perf_counter() - t0
    t0 = time.perf_counter()
    with open(work / "t.pt", "wb") as f:
        torch.save({k: v.state_dict() for k, v in state.items()}, f)
        f.flush()
        os.fsync(f.fileno())
    ts = time.perf_counter() - t0
    print(f"  sync dckpt save {sync:.2f} s, durable torch.save {ts:.2f} s")
    return ts


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0, help="state gigabytes on the GPU")
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--record", default=None,
                    help="also write a record for the docs generator (dckpt/bench/docs.py); "
                         "only when every check passes")
    a = ap.parse_args()
    with recording(a.record, kind="text", directory=a.dir):
        rc = run(a)
        if rc:
            raise SystemExit(rc)  # no record of a failed check
    return 0


def run(a) -> int:
    if not torch.cuda.is_available():
        print("FAIL cuda: no CUDA device visible")
        return 1
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_", dir=a.dir))
    t_start = time.perf_counter()
    try:
        check_pinned()
        state = build(a.gb)
        blocked = {m: check_mode(work, state, m) for m in ("immediate", "deferred")}
        ts = timings(work, state)
        for m, b in blocked.items():
            print(f"  {m}: blocked {b * 1e3:.1f} ms = {b / ts:.2%} of durable torch.save")
        check_cuda_rng(work)
    except Exception as e:  # a crash is a FAIL line too, with the rest of the report
        import traceback
        traceback.print_exc()
        report("no exception", False, f"{type(e).__name__}: {e}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"# {time.perf_counter() - t_start:.1f} s; {len(FAILED)} FAIL(s) {FAILED}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())

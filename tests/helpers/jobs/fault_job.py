"""One rank of the fault-injection harness (tests/test_faults.py), launched directly with
RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT as srun or mpirun start ranks: no torchrun
agent tears the job down, so a rank that hangs would hang for real.

Faults are injected at dckpt's collective steps: every exchange goes through
dckpt.distributed.collective._exchange_json, which this script wraps to count calls and, at the chosen call
on the chosen rank, raise (as a failing local step would) or die by SIGKILL (as the OOM
killer does). The calls of each operation are counted on a clean run first.

    fault_job.py raise ROOT OUT VICTIM           every step of every operation, one by one
    fault_job.py die ROOT OUT VICTIM OP INDEX    one death at call INDEX of OP

Each rank writes OUT/rank-<r>.json with what it saw.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as tdist

import dckpt
from dckpt.distributed import collective as dist
from dckpt.errors import DckptError
from dckpt.manager import AsyncOptions, CheckpointManager
from dckpt.tools.verify import verify

OPS = ("open", "save", "restore", "gc", "async_wait", "async_close")


class InjectedFault(RuntimeError):
    pass


class Injector:
    """Wraps dist._exchange_json (under all_gather_json, gather_json and broadcast_json):
    counts calls, and fails call `target` on the victim."""

    def __init__(self, victim: int):
        self.victim, self.calls, self.target, self.die = victim, 0, None, False
        self.real = dist._exchange_json
        dist._exchange_json = self

    def arm(self, target: int | None, die: bool = False) -> None:
        self.calls, self.target, self.die = 0, target, die

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.target and dist.rank() == self.victim:
            if self.die:
                os.kill(os.getpid(), signal.SIGKILL)
            raise InjectedFault(f"injected at collective call {self.calls} "
                                f"({kwargs.get('what') or (args[2] if len(args) > 2 else '')})")
        return self.real(*args, **kwargs)


def make_state(rank: int) -> dict:
    torch.manual_seed(100 + rank)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 8)).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt, "counter": {"n": 0}}


def advance(state: dict, step: int) -> None:
    """Change every tensor, so each save holds new bytes."""
    with torch.no_grad():
        for p in state["model"].parameters():
            p.add_(0.001 * step)
    state["counter"]["n"] = step


def fingerprint(state: dict) -> str:
    h = hashlib.sha256()
    for t in state["model"].state_dict().values():
        h.update(t.numpy().tobytes())
    for per in state["optimizer"].state_dict()["state"].values():
        for v in per.values():
            h.update(v.numpy().tobytes() if isinstance(v, torch.Tensor) else repr(v).encode())
    h.update(repr(state["counter"]).encode())
    return h.hexdigest()


def scramble(state: dict) -> None:
    with torch.no_grad():
        for p in state["model"].parameters():
            p.fill_(7.0)
    state["counter"]["n"] = -1


class Job:
    def __init__(self, root: Path):
        self.root, self.rank = root, dist.rank()
        self.state = make_state(self.rank)
        self.step = 0
        self.saved: dict[int, str] = {}  # step -> fingerprint of what was saved
        self.sync = CheckpointManager(root / "sync", keep_last=2)
        self.asyn = self._async_manager()
        self.save_next(self.sync)

    def _async_manager(self) -> CheckpointManager:
        return CheckpointManager(self.root / "async", keep_last=2,
                                 async_save=AsyncOptions(max_in_flight=1))

    def save_next(self, mgr: CheckpointManager, then=None) -> None:
        self.step += 1
        advance(self.state, self.step)
        self.saved[self.step] = fingerprint(self.state)
        handle = mgr.save(self.step, self.state)
        if then == "wait":
            mgr.wait()
        elif then == "close":
            mgr.close()
        elif hasattr(handle, "wait"):
            mgr.wait()

    def run(self, op: str) -> None:
        if op == "save":
            self.save_next(self.sync)
        elif op == "restore":
            self.sync.restore(self.state)
        elif op == "gc":
            self.sync.gc()
        elif op == "async_wait":
            self.save_next(self.asyn, "wait")
        elif op == "async_close":
            self.save_next(self.asyn, "close")
        elif op == "open":
            CheckpointManager(self.root / "sync", keep_last=2)

    def after(self, op: str) -> None:
        if op == "async_close":  # a closed manager is done: the job opens another
            self.asyn = self._async_manager()

    def check_resumes_exactly(self) -> None:
        """The same manager objects save and restore bit for bit after the failure."""
        for mgr in (self.sync, self.asyn):
            self.save_next(mgr, "wait")
            want = self.saved[self.step]
            scramble(self.state)
            report = mgr.restore(self.state)
            if report.step != self.step or fingerprint(self.state) != want:
                raise AssertionError(f"rank {self.rank}: restore of step {self.step} from "
                                     f"{mgr.root} is not exact (got step {report.step})")

    def committed_intact(self) -> list[str]:
        """Committed checkpoints that do not verify: a half commit would show here."""
        bad = []
        for sub in ("sync", "async"):
            for p in sorted((self.root / sub).glob("step-*")):
                if (p / "manifest.json").exists() and not verify(p).ok:
                    bad.append(str(p))
        return bad


def outcome(fn) -> dict:
    t0 = time.monotonic()
    try:
        fn()
        return {"raised": None, "seconds": time.monotonic() - t0}
    except BaseException as e:
        return {"raised": type(e).__name__, "message": str(e),
                "failed_rank": getattr(e, "rank", None), "seconds": time.monotonic() - t0}


def sweep_raises(job: Job, inj: Injector) -> list[dict]:
    """Every collective call of every operation, one injected failure each."""
    out = []
    for op in OPS:
        inj.arm(None)
        job.run(op)
        calls = inj.calls
        job.after(op)
        for target in range(1, calls + 1):
            inj.arm(target)
            got = outcome(lambda: job.run(op))
            inj.arm(None)
            job.after(op)
            after = outcome(job.check_resumes_exactly)
            dist.barrier()
            out.append({"op": op, "call": target, "of": calls, **got,
                        "resumed": after, "intact": job.committed_intact()})
    return out


def main() -> None:
    mode, root, out, victim = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    tdist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = tdist.get_rank()
    result: dict = {"rank": rank}
    try:
        job = Job(root)
        inj = Injector(victim)
        if mode == "raise":
            result["injections"] = sweep_raises(job, inj)
        else:
            op, target = sys.argv[5], int(sys.argv[6])
            last_good = job.step
            inj.arm(None)
            inj.arm(target, die=True)
            result["outcome"] = outcome(lambda: job.run(op))
            inj.arm(None)
            # The survivors alone: the last checkpoint committed before the death restores
            # exactly without the dead peer (a load needs no collective).
            scramble(job.state)
            path = job.sync.path(last_good)
            dckpt.load(path, into=job.state)
            result["previous_exact"] = fingerprint(job.state) == job.saved[last_good]
            result["intact"] = job.committed_intact()
    except BaseException as e:
        result["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    (out / f"rank-{rank}.json").write_text(json.dumps(result))
    if rank == 0 and mode == "die":
        # Rank 0 hosts the store: leaving before the other survivors have seen the death
        # would show them a store failure instead (the dead rank never writes a result).
        others = [r for r in range(1, tdist.get_world_size()) if r != victim]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(
                (out / f"rank-{r}.json").exists() for r in others):
            time.sleep(0.05)
    sys.stdout.flush()
    os._exit(0)  # no destroy_process_group: it would wait for a dead peer


if __name__ == "__main__":
    main()

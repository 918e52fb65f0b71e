"""Run a function on N real torch.distributed ranks (gloo on CPU by default) from a test.

    results = run_with_ranks(2, fn, arg1, arg2)   # fn(rank, world, *args) on every rank

Ranks are processes forked from a forkserver that imported torch once, so a launch costs
fork + process-group set-up, not N fresh torch imports. Each rank returns a JSON-able value
(written to a file, never pickled back); a rank that raises has its traceback reported. The
whole run is bounded by `timeout`: ranks still alive then are killed and the test fails
naming them, so a hang can never stall the suite.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

from . import free_port

# Imported once by the forkserver (torch._dynamo alone takes seconds, and FSDP2 pulls it in).
_PRELOAD = ["torch", "torch._dynamo", "torch.distributed", "torch.distributed.fsdp",
            "torch.distributed.tensor", "torch.nn.parallel", "torch.distributed.optim",
            "dckpt.engine.checkpoint", "dckpt.manager", "helpers.ranks"]
_ctx = None


class RankFailure(AssertionError):
    """One or more ranks raised, died or timed out."""


def _context():
    global _ctx
    if _ctx is None:
        _ctx = mp.get_context("forkserver")
        _ctx.set_forkserver_preload(_PRELOAD)
    return _ctx


def _entry(rank: int, world: int, port: int, out: str, fn, args, timeout: float,
           survivors: int, backend: str) -> None:
    import torch
    import torch.distributed as tdist
    torch.set_num_threads(1)  # N ranks share 2 cores: no oversubscription
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world))  # what torchrun announces
    result: dict
    try:
        tdist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                 world_size=world, timeout=timedelta(seconds=timeout))
        result = {"ok": fn(rank, world, *args)}
    except BaseException as e:  # reported to the parent, which fails the test
        result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    Path(out, f"rank-{rank}.json").write_text(json.dumps(result))
    _leave_together(survivors)
    os._exit(0)


def _leave_together(survivors: int, patience: float = 30.0) -> None:
    """Wait until the ranks expected to survive are done, so no rank exits while a peer
    still talks to it. Rank 0 hosts the store, so it leaves last. No
    destroy_process_group: it would wait for peers killed on purpose."""
    import torch.distributed as tdist
    if not tdist.is_initialized():
        return
    store = tdist.distributed_c10d._get_default_store()
    deadline = time.monotonic() + patience

    def wait_for(key: str, count: int) -> None:
        while time.monotonic() < deadline and store.add(key, 0) < count:
            time.sleep(0.005)

    try:
        store.add("run_with_ranks/done", 1)
        wait_for("run_with_ranks/done", survivors)
        if tdist.get_rank() == 0:
            wait_for("run_with_ranks/left", survivors - 1)
        else:
            store.add("run_with_ranks/left", 1)
    except Exception:  # the store went away with a dead rank 0: nothing left to wait for
        pass


def run_with_ranks(n: int, fn, *args, timeout: float = 60.0, may_die: tuple[int, ...] = (),
                   backend: str = "gloo"):
    """fn(rank, world, *args) on n ranks (gloo unless `backend` says otherwise); returns
    each rank's value in rank order.

    Ranks in `may_die` may exit without a result (their entry is None): for tests that kill
    a rank on purpose. Any other rank that raises, dies or outlives `timeout` fails the call.
    """
    ctx = _context()
    with tempfile.TemporaryDirectory(prefix="dckpt-ranks-") as out:
        port = free_port()
        survivors = n - len(may_die)
        procs = [ctx.Process(target=_entry, args=(r, n, port, out, fn, args, timeout, survivors,
                                                   backend),
                             daemon=True) for r in range(n)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
            procs[r].join()
        results, problems = [], []
        for r in range(n):
            f = Path(out, f"rank-{r}.json")
            res = json.loads(f.read_text()) if f.exists() else None
            if r in hung:
                problems.append(f"rank {r}: still running after {timeout:.0f} s (killed)")
            elif res is None and r not in may_die:
                problems.append(f"rank {r}: exited with code {procs[r].exitcode} and no result")
            elif res is not None and "error" in res:
                problems.append(f"rank {r}: {res['traceback']}")
            results.append(res["ok"] if res and "ok" in res else None)
        if problems:
            raise RankFailure("\n".join(problems))
        return results

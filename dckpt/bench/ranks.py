"""Two-rank variants: a gloo group of two processes, each holding half of the workload
(its own layers, as in pipeline or ZeRO-style partitioning), saving and loading together.

The processes live for one workload and take commands over pipes, so their runs are
interleaved with the single-process systems like any other. Rank 0 times each operation
from a barrier before it to a barrier after it. As for the single-process systems
(runner._measure_load), every rank flips every bit of its state before a load and checks
after it that the load restored the saved bytes: an inexact load is an error, not a time.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
import warnings
from pathlib import Path

from .measure import fsync_tree
from .workloads import Spec

SYSTEMS = ("dckpt 2 ranks", "DCP 2 ranks")


class RankPair:
    def __init__(self, spec: Spec, world: int = 2):
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.pipes, self.procs = [], []
        for r in range(world):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_serve, args=(child, spec, r, world, port), daemon=True)
            p.start()
            self.pipes.append(parent)
            self.procs.append(p)
        self.nbytes = sum(self._replies())  # each reports when built

    def run(self, op: str, system: str, path: Path) -> float:
        """Seconds rank 0 measured for `op` ("save" or "load") of `system` at `path`."""
        for pipe in self.pipes:
            pipe.send((op, system, str(path)))
        return self._replies()[0]

    def _replies(self) -> list:
        """Every rank's answer, all read before an error is raised: one left unread would
        be taken for the answer to the next command."""
        replies = []
        for pipe in self.pipes:
            if not pipe.poll(600):
                raise TimeoutError("a rank process did not answer within 10 minutes")
            replies.append(pipe.recv())
        for kind, value in replies:
            if kind == "error":
                raise RuntimeError(f"rank process failed: {value}")
        return [value for _, value in replies]

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(None)
            except (BrokenPipeError, OSError):
                pass
        for p in self.procs:
            p.join(30)
            if p.is_alive():
                p.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(pipe, spec: Spec, rank: int, world: int, port: int) -> None:
    import torch.distributed as tdist
    try:
        tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                 world_size=world)
        w = spec.build(seed=rank + 1, fraction=1 / world)
        # Distinct top-level keys: each rank owns its part (DCP would dedup equal keys).
        state = {f"rank{rank}": w.state()}
        reference = w.fingerprint()  # what every load must restore
        pipe.send(("ok", w.nbytes))
    except Exception as e:  # reported, then the parent gives up on the pair
        pipe.send(("error", f"{type(e).__name__}: {e}"))
        return
    while True:
        cmd = pipe.recv()
        if cmd is None:
            break
        op, system, path = cmd
        try:
            pipe.send(("ok", _timed(_OPS[(op, system)], op, system, state, w, Path(path), rank,
                                   reference)))
        except Exception as e:
            pipe.send(("error", f"rank {rank} {op} {system}: {type(e).__name__}: {e}"))
            if w.fingerprint() != reference:  # a load failed midway: as built again
                w.reset(spec.build(seed=rank + 1, fraction=1 / world))
    tdist.destroy_process_group()


def _timed(run, op: str, system: str, state: dict, w, path: Path, rank: int,
          reference: list[int]) -> float:
    """Seconds from a barrier before `run` to a barrier after it; a load after every bit of
    the state was flipped, and counted only once the state is the saved one again."""
    import torch.distributed as tdist
    if op == "load":
        w.perturb()
    tdist.barrier()
    t0 = time.perf_counter()
    run(state, w, path, rank)
    tdist.barrier()
    seconds = time.perf_counter() - t0
    if op == "load" and w.fingerprint() != reference:
        raise AssertionError(f"{system}: loaded state differs from the saved one")
    return seconds


def _dckpt_save(state, w, path: Path, rank: int) -> None:
    import dckpt
    dckpt.save(state, path)


def _dckpt_load(state, w, path: Path, rank: int) -> None:
    import dckpt
    dckpt.load(path, into=state)


def _dcp_state(w, rank: int) -> dict:
    return {f"rank{rank}": {"model": w.model.state_dict(), "optimizer": w.optimizer.state_dict()}}


def _dcp_save(state, w, path: Path, rank: int) -> None:
    import torch.distributed as tdist
    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(_dcp_state(w, rank),
                 storage_writer=dcp.FileSystemWriter(str(path), thread_count=_threads(),
                                                    sync_files=True))
    tdist.barrier()
    if rank == 0:
        fsync_tree(path)


def _threads() -> int:
    """DCP at its best, as in benchmarks/bench_dist.py: a writer thread per usable core."""
    return len(os.sched_getaffinity(0))


def _dcp_load(state, w, path: Path, rank: int) -> None:
    import torch.distributed.checkpoint as dcp
    sd = _dcp_state(w, rank)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(sd, storage_reader=dcp.FileSystemReader(str(path)))
    w.model.load_state_dict(sd[f"rank{rank}"]["model"])
    w.optimizer.load_state_dict(sd[f"rank{rank}"]["optimizer"])


_OPS = {("save", "dckpt 2 ranks"): _dckpt_save, ("load", "dckpt 2 ranks"): _dckpt_load,
        ("save", "DCP 2 ranks"): _dcp_save, ("load", "DCP 2 ranks"): _dcp_load}

__all__ = ["RankPair", "SYSTEMS"]

"""Saves and loads to object storage: dckpt against the peers, on the same S3 server.

    python benchmarks/bench_remote.py [--gb 1] [--rounds 3] [--endpoint URL]

The server is moto's standalone S3 server on loopback (started here unless --endpoint
names a running one). It runs in Python, so it, not a client, may be the limit: the
`ceiling` rows measure it with a plain parallel put/get of the same bytes (s3fs's own
concurrent `put`/`get` of files totalling the state's size), and each system's throughput
is also given as a fraction of that ceiling.

Systems, each in its documented best configuration for a remote path, in a balanced
(Williams) order, round by round, with an untimed warm-up of each:
- dckpt: `dckpt.save(state, "s3://...")` / `dckpt.load(url, into=state)` (hash-checked).
- DCP: torch.distributed.checkpoint with `FsspecWriter(url, thread_count=cores)` /
  `FsspecReader` (its fsspec storage), loading in place.
- torch.save + put: torch.save to a local file, `fs.put` it; load = `fs.get` +
  `torch.load(weights_only=True, mmap=True)` + copy into the live tensors.
- safetensors + put: `save_file` to a local file, `fs.put`; load = `fs.get` + `load_file` +
  copy.
A load counts only when every live tensor is bit-identical to the saved state afterwards
(the live state's bits are flipped before each load). Peak extra memory is the process's
resident high-water mark above its level at the start of the operation (PeakRss); client
CPU is this process's CPU time per GB moved (time.process_time: every thread of the
client, not the server's), the figure that a loaded machine distorts least.

The second part saves a LoRA-style state (a frozen base and small trained adapters) twice
through `CheckpointManager(local, remote=url)` with incremental saves and reports the bytes
the second save sent against a full one.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import dckpt  # noqa: E402
from dckpt.bench import workloads  # noqa: E402
from dckpt.bench.measure import PeakRss  # noqa: E402
from dckpt.bench.order import balanced, cycle_length  # noqa: E402
from dckpt.bench.record import recording  # noqa: E402


def flat_state(w: workloads.Workload) -> dict[str, torch.Tensor]:
    """Every tensor of the workload under a unique name: what every system saves."""
    out = {f"model.{k}": v for k, v in w.model.state_dict().items()}
    for i, per in w.optimizer.state_dict()["state"].items():
        for k, v in per.items():
            if isinstance(v, torch.Tensor):
                out[f"optim.{i}.{k}"] = v
    return out


def nbytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def flip(state: dict) -> None:
    for t in state.values():
        v = t.view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)
        torch.bitwise_not(v, out=v)


def same(state: dict, ref: dict) -> bool:
    return all(torch.equal(state[k].view(torch.uint8) if state[k].dim() else
                           state[k].reshape(1).view(torch.uint8),
                           ref[k].view(torch.uint8) if ref[k].dim() else
                           ref[k].reshape(1).view(torch.uint8)) for k in ref)


class Systems:
    """Save and load functions of each system against one bucket and a local scratch dir."""

    def __init__(self, fs, bucket: str, scratch: Path, threads: int):
        self.fs, self.bucket, self.scratch, self.threads = fs, bucket, scratch, threads

    def url(self, name: str) -> str:
        return f"s3://{self.bucket}/{name}-{uuid.uuid4().hex[:8]}"

    # dckpt
    def dckpt_save(self, state, url):
        dckpt.save(state, url)

    def dckpt_load(self, state, url):
        dckpt.load(url, into=state)

    # torch.distributed.checkpoint, fsspec storage
    def dcp_save(self, state, url):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
        dcp.save(state, storage_writer=FsspecWriter(url, thread_count=self.threads))

    def dcp_load(self, state, url):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
        dcp.load(state, storage_reader=FsspecReader(url))

    # torch.save / safetensors files, uploaded with the same client
    def _put(self, write, url):
        local = self.scratch / f"up-{uuid.uuid4().hex[:8]}"
        try:
            write(local)
            self.fs.put(str(local), url.removeprefix("s3://"))
        finally:
            local.unlink(missing_ok=True)

    def _get(self, read, url, state):
        local = self.scratch / f"down-{uuid.uuid4().hex[:8]}"
        try:
            self.fs.get(url.removeprefix("s3://"), str(local))
            loaded = read(local)
            for k, v in state.items():
                v.copy_(loaded[k])
            del loaded
        finally:
            local.unlink(missing_ok=True)

    def torch_save(self, state, url):
        self._put(lambda p: torch.save(state, p), url)

    def torch_load(self, state, url):
        self._get(lambda p: torch.load(p, weights_only=True, mmap=True), url, state)

    def st_save(self, state, url):
        from safetensors.torch import save_file
        self._put(lambda p: save_file(state, str(p)), url)

    def st_load(self, state, url):
        from safetensors.torch import load_file
        self._get(lambda p: load_file(str(p)), url, state)

    # the server's ceiling: s3fs's concurrent put/get of plain files of the same size
    def ceiling_files(self, total: int, parts: int) -> list[Path]:
        d = self.scratch / "ceiling"
        d.mkdir(exist_ok=True)
        block = os.urandom(1 << 20)
        files = []
        for i in range(parts):
            p = d / f"part{i}"
            with open(p, "wb") as f:
                left = total // parts
                while left > 0:
                    left -= f.write(block[:min(left, len(block))])
            files.append(p)
        return files

    def ceiling_put(self, files, url):
        self.fs.put([str(p) for p in files], [f"{url.removeprefix('s3://')}/{p.name}"
                                               for p in files])

    def ceiling_get(self, files, url):
        out = self.scratch / "ceiling-get"
        out.mkdir(exist_ok=True)
        self.fs.get([f"{url.removeprefix('s3://')}/{p.name}" for p in files],
                    [str(out / p.name) for p in files])
        shutil.rmtree(out)


SYSTEMS = {"dckpt": ("dckpt_save", "dckpt_load"),
           "DCP fsspec": ("dcp_save", "dcp_load"),
           "torch.save + put": ("torch_save", "torch_load"),
           "safetensors + put": ("st_save", "st_load")}


def run_io(sysm: Systems, state: dict, ref: dict, rounds: int, systems: list[str]) -> dict:
    """{system: {"save": [s], "load": [s], "save_peak": [B], "load_peak": [B], "exact": bool}}"""
    names = systems + ["ceiling"]
    files = sysm.ceiling_files(nbytes(state), sysm.threads * 2)
    out = {n: {"save": [], "load": [], "save_peak": [], "load_peak": [], "save_cpu": [],
               "load_cpu": [], "exact": True} for n in names}
    reps = max(rounds, 1)
    for rep in range(-1, reps):  # -1: the untimed warm-up of every system
        order = names if rep < 0 else balanced(names, rep % cycle_length(len(names)))
        for name in order:
            url = sysm.url(name.split()[0].lower())
            if name == "ceiling":
                save = lambda: sysm.ceiling_put(files, url)  # noqa: E731
                load = lambda: sysm.ceiling_get(files, url)  # noqa: E731
            else:
                s, l = SYSTEMS[name]
                save = lambda: getattr(sysm, s)(state, url)  # noqa: E731
                load = lambda: getattr(sysm, l)(state, url)  # noqa: E731
            with PeakRss() as pk:
                c0, t0 = time.process_time(), time.perf_counter()
                save()
                dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            if rep >= 0:
                out[name]["save"].append(dt)
                out[name]["save_cpu"].append(cpu)
                out[name]["save_peak"].append(pk.extra)
            if name != "ceiling":
                flip(state)
            with PeakRss() as pk:
                c0, t0 = time.process_time(), time.perf_counter()
                load()
                dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            if name != "ceiling":
                ok = same(state, ref)
                out[name]["exact"] &= ok
                if not ok:  # put the live state back for the next system
                    for k, v in state.items():
                        v.copy_(ref[k])
            if rep >= 0:
                out[name]["load"].append(dt)
                out[name]["load_cpu"].append(cpu)
                out[name]["load_peak"].append(pk.extra)
            sysm.fs.rm(url.removeprefix("s3://"), recursive=True)
            print(f"  round {rep}: {name}: save {out[name]['save'][-1:]} load "
                  f"{out[name]['load'][-1:]}", file=sys.stderr, flush=True)
    return out


def lora_bytes(bucket: str, scratch: Path, mb: int) -> dict:
    """Bytes the first and the second (incremental) save of a LoRA-style state send."""
    from dckpt.manager import CheckpointManager
    w = workloads.finetune(mb * 10**6)
    state = w.state()
    url = f"s3://{bucket}/lora-{uuid.uuid4().hex[:8]}"
    sent, copied = [], []
    # Incremental saves are the manager's default (incremental=True): the second step shares
    # the frozen base's chunks with the first, and the remote tier copies those objects
    # server-side instead of sending them again (remote_tier.UploadReport).
    mgr = CheckpointManager(scratch / "lora", remote=url, fsync=False)
    for step in (1, 2):
        for p in w.model.adapters.parameters():
            p.data.add_(0.01)
        mgr.save(step, state)
        mgr.wait()
        rep = mgr.upload_report(step)
        if rep is None:
            raise RuntimeError(f"step {step} was not uploaded to {url}")
        sent.append(rep.sent)
        copied.append(rep.copied)
    mgr.close()
    return {"state_bytes": w.nbytes, "first": sent[0], "second": sent[1],
            "second_copied": copied[1]}


def mb_s(nb: int, seconds: list[float]) -> float:
    return nb / statistics.median(seconds) / 1e6


def report(res: dict, nb: int) -> None:
    ceil = res["ceiling"]
    cs, cl = mb_s(nb, ceil["save"]), mb_s(nb, ceil["load"])
    dcp = res.get("DCP fsspec", ceil)
    print(f"| system | save MB/s | load MB/s | save / ceiling | load / ceiling | "
          f"save vs DCP | load vs DCP | peak extra save MB | peak extra load MB | "
          f"client CPU s/GB save | client CPU s/GB load | exact |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, r in res.items():
        s, l = mb_s(nb, r["save"]), mb_s(nb, r["load"])
        vs = (f"{s / mb_s(nb, dcp['save']):.2f}x", f"{l / mb_s(nb, dcp['load']):.2f}x")
        print(f"| {name} | {s:.0f} | {l:.0f} | {s / cs:.2f} | {l / cl:.2f} | {vs[0]} | {vs[1]} | "
              f"{max(r['save_peak']) / 1e6:.0f} | {max(r['load_peak']) / 1e6:.0f} | "
              f"{statistics.median(r['save_cpu']) / (nb / 1e9):.2f} | "
              f"{statistics.median(r['load_cpu']) / (nb / 1e9):.2f} | "
              f"{'n/a' if name == 'ceiling' else 'yes' if r['exact'] else 'NO'} |")
    print()
    d = res.get("dckpt")
    if d is None or "DCP fsspec" not in res:
        return
    goals = [("dckpt save >= 1.5x DCP fsspec", mb_s(nb, d["save"]) / mb_s(nb, dcp["save"]), 1.5),
             ("dckpt load >= 1.5x DCP fsspec", mb_s(nb, d["load"]) / mb_s(nb, dcp["load"]), 1.5)]
    peak = max(d["save_peak"] + d["load_peak"]) / 1e6
    print(f"Goals: " + "; ".join(f"{g}: {v:.2f}x ({'met' if v >= t and d['exact'] else 'NOT met'})"
                                 for g, v, t in goals)
          + f"; dckpt peak extra memory < 300 MB: {peak:.0f} MB "
          f"({'met' if peak < 300 else 'NOT met'}).")

def report_lora(lora: dict) -> None:
    if lora:
        ratio = lora["first"] / max(lora["second"], 1)
        print(f"\nLoRA-style state ({lora['state_bytes'] / 1e6:.0f} MB, frozen base): the first "
              f"save sent {lora['first'] / 1e6:.1f} MB, the incremental second "
              f"{lora['second'] / 1e6:.2f} MB (and copied {lora['second_copied'] / 1e6:.1f} MB "
              f"server-side): {ratio:.0f}x fewer bytes (goal >= 5x: "
              f"{'met' if ratio >= 5 else 'NOT met'}).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=1.0, help="model + AdamW state size")
    ap.add_argument("--rounds", type=int, default=4, help="timed rounds per system")
    ap.add_argument("--lora-mb", type=int, default=500)
    ap.add_argument("--endpoint", help="a running S3 server (default: start moto_server)")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="local scratch directory")
    ap.add_argument("--systems", default=",".join(SYSTEMS),
                    help="comma-separated subset of: " + ", ".join(SYSTEMS))
    ap.add_argument("--record", help="write the docs record here (dckpt/bench/record.py)")
    args = ap.parse_args()

    from helpers import s3server  # tests/helpers/s3server.py: the tests' loopback server
    proc = None
    endpoint = args.endpoint
    if endpoint is None:
        endpoint, proc = s3server.start()
    os.environ.update({k: v for k, v in s3server.client_env(endpoint).items()
                       if k not in os.environ or k == "AWS_ENDPOINT_URL"})
    import fsspec
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    bucket = s3server.new_bucket(endpoint)
    scratch = Path(tempfile.mkdtemp(prefix="dckpt-bench-remote-", dir=args.dir))
    threads = len(os.sched_getaffinity(0))
    try:
        with recording(args.record, kind="markdown", directory=scratch):
            w = workloads.transformer(int(args.gb * 1e9))
            state = flat_state(w)
            ref = {k: v.clone() for k, v in state.items()}
            nb = nbytes(state)
            print(f"State: {w.name}, {len(state)} tensors, {nb / 1e6:.0f} MB; server: "
                  f"moto_server on loopback; {args.rounds} rounds per system, balanced order; "
                  f"medians.\n")
            res = run_io(Systems(fs, bucket, scratch, threads), state, ref, args.rounds,
                         args.systems.split(","))
            lora = lora_bytes(bucket, scratch, args.lora_mb) if args.lora_mb else None
            report(res, nb)
            report_lora(lora)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if proc is not None:
            proc.terminate()


if __name__ == "__main__":
    main()

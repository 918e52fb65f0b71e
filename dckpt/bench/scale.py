"""Checkpoint metadata at scale: the real planning, record, index and lookup code run on the
metadata of a simulated job, and real gloo runs to hold the per-rank figures against.

A job (Job) is FSDP2-like: every one of `tensors` weights is a DTensor sharded by rows
over all `world` ranks, plus a few replicated tensors (written once, held in the index)
and a few per-rank tensors. Ranks are alike, so the simulation makes the metadata of a
few sample ranks for real (their WriteReport, run through the save's _write_records, which
writes their record files) and the index from every rank's summary (the sample's, with
that rank's name, span and hash: exactly what its _write_records would send). What is
timed is the code a save and a restore run, in this process, as CPU time
(time.process_time: the machine is shared, wall time means little):

- plan: a rank's layout hash and replica fingerprint (the repeated save's exchange); the
  first save's compact plan (sharding.compact_offers, assign_compact over every rank's
  message); and, up to ASSIGN_LIMIT offers, the full sharding.assign over every rank's
  offers that a job whose ranks hold different or replicated DTensors needs;
- commit: rank 0 decoding every rank's summary message, building the index, serializing it;
- restore: a rank reading the index and its own record file (the real readers, from a
  directory), decoding its tree and looking up every tensor block it restores;
  with the cyclic collector paused, as dckpt.load and dckpt.save run (engine/gcpause.py),
  so that a pass over the simulation's own data is not counted;
- reshard: a rank of half the world doing the same, reading the records it overlaps.

Bytes are the JSON each rank sends and receives through the collectives (the messages as
dckpt.distributed.collective writes them) and the metadata files each rank reads.
"""
from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from ..distributed import sharding
from ..engine import checkpoint as ck, gcpause
from ..format import lookup, split as splitfmt, tree as treecodec
from ..format.layout import rank_file
from ..format.manifest import Chunk
from ..storage import records
from ..storage.local import WriteOptions

ASSIGN_LIMIT = 400_000  # offers the first save's assign is run on; beyond, extrapolated
REPLICATED, PER_RANK = 8, 4
COLS = 16  # elements per row: shapes change digits, not the metadata's structure
ROWS_PER_RANK = 4
ITEM = 2  # bfloat16


@dataclass(frozen=True)
class Job:
    world: int
    tensors: int  # sharded tensors, each held by every rank

    def names(self) -> list[str]:
        return [f"layers.{i // 8}.{_KINDS[i % 8]}" for i in range(self.tensors)]

    @property
    def rows(self) -> int:
        return self.world * ROWS_PER_RANK


_KINDS = ["attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight",
          "mlp.up.weight", "mlp.down.weight", "mlp.gate.weight", "norm.weight"]


def _hash(rng: random.Random) -> int:
    return rng.getrandbits(64)


def _placement(world: int) -> dict:
    return {"kind": sharding.SHARDED, "mesh": {"shape": [world], "dim_names": None,
                                               "ranks": list(range(world))},
            "placements": ["Shard(dim=0)"]}


def state_names(job: Job) -> dict:
    """The state the real runs save: tree paths as flatten() names them."""
    return {"model": job.names(), "rep": [f"r{i}" for i in range(REPLICATED)],
            "mine": [f"m{i}" for i in range(PER_RANK)]}


def offers(job: Job, r: int) -> list[sharding.Offer]:
    """Rank r's offers, as sharding.offer() makes them from the state above."""
    place = {"mesh": _placement(job.world)["mesh"], "placements": ["Shard(dim=0)"]}
    out = [sharding.Offer(f"model/{n}", "bfloat16", "torch", [ROWS_PER_RANK, COLS],
                          [job.rows, COLS], [r * ROWS_PER_RANK, 0],
                          ROWS_PER_RANK * COLS * ITEM, place) for n in job.names()]
    out += [sharding.Offer(f"rep/r{i}", "float32", "torch", [COLS], [COLS], [0], COLS * 4,
                           None, f"{i:016x}") for i in range(REPLICATED)]
    out += [sharding.Offer(f"mine/m{i}", "float32", "torch", [COLS], [COLS], [0], COLS * 4,
                           None, f"{r * 100 + i:016x}") for i in range(PER_RANK)]
    return out


def _plain_offers(r: int) -> list[sharding.Offer]:
    """Rank r's plain offers (those of offers(job, r) without a placement)."""
    return ([sharding.Offer(f"rep/r{i}", "float32", "torch", [COLS], [COLS], [0], COLS * 4,
                            None, f"{i:016x}") for i in range(REPLICATED)]
            + [sharding.Offer(f"mine/m{i}", "float32", "torch", [COLS], [COLS], [0], COLS * 4,
                              None, f"{r * 100 + i:016x}") for i in range(PER_RANK)])


def report(job: Job, r: int) -> ck.WriteReport:
    """Rank r's WriteReport (what _write_rank returns after writing its data file)."""
    rng = random.Random(r)
    tensors, offset = {}, 0
    shard_bytes = ROWS_PER_RANK * COLS * ITEM

    def chunk(n: int) -> tuple:
        nonlocal offset
        c = (0, offset, n, n, 0, _hash(rng), _hash(rng))
        offset += n
        return c
    placement = _placement(job.world)
    for n in job.names():
        tensors[f"model/{n}"] = {
            "kind": "torch", "dtype": "bfloat16", "shape": [job.rows, COLS],
            "placement": placement, "shards": [{"offsets": [r * ROWS_PER_RANK, 0],
                                                "shape": [ROWS_PER_RANK, COLS], "rank": r,
                                                "chunks": [chunk(shard_bytes)]}]}
    for i in range(r, REPLICATED, job.world):  # written once: assign() deals them out
        tensors[f"rep/r{i}"] = {"kind": "torch", "dtype": "float32", "shape": [COLS],
                                "placement": {"kind": sharding.REPLICATED},
                                "shards": [{"offsets": [0], "shape": [COLS], "rank": r,
                                            "chunks": [chunk(COLS * 4)]}]}
    aliases = {}
    for i in range(PER_RANK):
        local = f"mine/m{i}@r{r}"
        aliases[f"mine/m{i}"] = local
        tensors[local] = {"kind": "torch", "dtype": "float32", "shape": [COLS],
                          "placement": {"kind": sharding.LOCAL},
                          "shards": [{"offsets": [0], "shape": [COLS], "rank": r,
                                      "chunks": [chunk(COLS * 4)]}]}
    tree = treecodec.encode({k: {n: treecodec.TensorRef(f"{k}/{n}") for n in v}
                             for k, v in state_names(job).items()})
    files = [{"name": rank_file(r), "size": offset, "rank": r}]
    return ck.WriteReport(files, tensors, aliases, None, tree, {}, 0)


def summary_for(sample: dict, job: Job, r: int, rng: random.Random) -> dict:
    """What rank r's _write_records sends, from a sample rank's (ranks are alike)."""
    lo, hi = Fraction(r, job.world), Fraction(r + 1, job.world)
    rec = {**sample["record"], "name": splitfmt.record_name(r), "rank": r,
           "hash": f"{_hash(rng):016x}",
           "span": [[lo.numerator, lo.denominator], [hi.numerator, hi.denominator]]}
    return {**sample, "record": rec, "files": [], "tensors": {}}


def _cpu(fn, *args):
    t = time.process_time()
    out = fn(*args)
    return out, time.process_time() - t


def _msg(r: int, value) -> str:
    """A message as the collectives carry it (engine.checkpoint._exchange)."""
    return json.dumps({"rank": r, "value": ck._wire(value)})


def simulate(job: Job, workdir: Path) -> dict:
    """One job's figures (see the module docstring). `workdir` receives the index and the
    sample ranks' record files."""
    world, out = job.world, {"world": job.world, "tensors": job.tensors}
    mid = world // 2
    # Made for real: the ranks restores read, and those that write a replicated tensor
    # (their summaries carry its records into the index).
    samples = sorted({0, 1, mid, world - 1, *range(min(REPLICATED, world))})
    opts = WriteOptions(None, True, 4 << 20, 1, False)

    # ---- plan ----------------------------------------------------------------------------
    mine = offers(job, mid)
    own, cpu_hash = _cpu(sharding.layout_hash, mine)
    fp, cpu_fp = _cpu(sharding.replica_fingerprint, None, mine,
                      tuple(f"rep/r{i}" for i in range(REPLICATED)))
    key = {"layout": own, "plan": "0123456789abcdef", "replicas": fp}
    key_msg = len(_msg(mid, ["/x/.step-000000001.tmp-0123456789ab", key]))
    out["plan_repeat"] = {"cpu_s": cpu_hash + cpu_fp, "sent": key_msg,
                          "received": world * key_msg}
    # The first save: the compact plan (every rank holds the same Shard-placed DTensors).
    # Every rank's message is made by compact_offers, but for speed from its plain offers
    # and mid's DTensor hash: the DTensor descriptors are the same on every rank.
    compact, cpu_compact = _cpu(sharding.compact_offers, mine)
    compact_msg = len(_msg(mid, compact))
    msgs = []
    for r in range(world):
        theirs = [o for o in offers(job, r) if o.placement is None] if r in (0, mid) or \
            r < REPLICATED else _plain_offers(r)
        msgs.append({"dt": compact["dt"], "dt_bytes": compact["dt_bytes"], "plain": theirs})
    assert sharding.compact_applies(msgs)
    plan, cpu_assign = _cpu(sharding.assign_compact, msgs, mine, mid)
    assert len(plan.writes) == len(mine) - REPLICATED + len(range(mid, REPLICATED, world))
    out["plan_first"] = {"sent": key_msg + compact_msg,
                         "received": world * (key_msg + compact_msg),
                         "cpu_s": cpu_compact + cpu_assign}
    # When the ranks' DTensors differ or replicate, every offer travels (sharding.assign).
    offers_msg = len(_msg(mid, [o.to_json() for o in mine]))
    full = {"sent": key_msg + compact_msg + offers_msg,
            "received": world * (key_msg + compact_msg + offers_msg)}
    n_offers = world * len(mine)
    if n_offers <= ASSIGN_LIMIT:
        everyone = [offers(job, r) for r in range(world)]
        _, full["assign_cpu_s"] = _cpu(sharding.assign, everyone, mid)
    full["offers"] = n_offers
    out["plan_first_full"] = full

    # ---- each rank's write: its record file and summary ------------------------------------
    ckpt = workdir / f"w{world}-t{job.tensors}"
    shutil.rmtree(ckpt, ignore_errors=True)
    ckpt.mkdir(parents=True)
    summaries, cpu_records = {}, []
    for r in samples:
        rep = report(job, r)
        summaries[r], cpu = _cpu(ck._write_records, ckpt, rep, r, False)
        cpu_records.append(cpu)
    rng = random.Random(world)
    # The template: a rank that wrote no replicated tensor (all are, past REPLICATED).
    plain = summaries[world - 1]  # writes no replicated tensor when world > REPLICATED
    every = [summaries[r] if r in summaries else summary_for(plain, job, r, rng)
             for r in range(world)]
    templ = summary_for(plain, job, mid, rng)
    assert templ["record"]["span"] == summaries[mid]["record"]["span"]
    out["record_bytes"] = summaries[mid]["record"]["size"]
    out["write_records_cpu_s"] = sum(cpu_records) / len(cpu_records)
    summary_msg = len(_msg(mid, summaries[mid]))

    # ---- rank 0's commit -----------------------------------------------------------------
    texts = [_msg(r, s) for r, s in enumerate(every)]
    data, cpu = _commit(texts, world, opts)
    (ckpt / "manifest.json").write_bytes(data)
    out["commit"] = {"cpu_s": cpu, "index_bytes": len(data),
                     "received": sum(len(x) for x in texts)}
    out["write"] = {"sent": summary_msg, "received_rank0": out["commit"]["received"]}
    outcome = len(json.dumps(json.loads(data)["meta"]["totals"]))
    out["save_repeat"] = {"sent": key_msg + summary_msg,
                          "received": world * key_msg + outcome}

    # ---- restore at the same world size ------------------------------------------------------
    out["restore"] = _restore(ckpt, job, mid, world, same=True)
    out["reshard_half"] = _restore(ckpt, job, 0, world // 2, same=False) if world >= 2 else None

    # ---- the single manifest of the layout before (estimated from a rank's share) -----------
    if world <= 64:
        reps = [report(job, r) for r in range(world)]
        single = ck._build_manifest(reps, world, {}, {}, {}, opts).to_bytes()
        out["single_manifest_bytes"] = len(single)
        out["single_estimated"] = False
    else:
        share = _single_share(job)
        out["single_manifest_bytes"] = share * world
        out["single_estimated"] = True
    shutil.rmtree(ckpt, ignore_errors=True)
    return out


@gcpause.during  # rank 0 commits inside dckpt.save, which pauses the collector
def _commit(texts: list[str], world: int, opts) -> tuple[bytes, float]:
    """Rank 0's metadata work at commit: decode every summary, build and serialize the index."""
    t = time.process_time()
    got = [json.loads(x)["value"] for x in texts]
    index = ck._build_index(got, {}, world, {"step": 1000}, {"loss": 1.5}, {}, opts, None)
    data = index.to_bytes()
    return data, time.process_time() - t


_share_cache: dict[int, int] = {}


def _single_share(job: Job) -> int:
    """Bytes one rank adds to a single manifest (measured at 16 and 32 ranks)."""
    if job.tensors not in _share_cache:
        opts = WriteOptions(None, True, 4 << 20, 1, False)
        sizes = []
        for w in (16, 32):
            j = Job(w, job.tensors)
            reps = [report(j, r) for r in range(w)]
            sizes.append(len(ck._build_manifest(reps, w, {}, {}, {}, opts).to_bytes()))
        _share_cache[job.tensors] = (sizes[1] - sizes[0]) // 16
    return _share_cache[job.tensors]


@gcpause.during  # as dckpt.load and dckpt.save run: no collector pass over the sim's data
def _restore(ckpt: Path, job: Job, r: int, world: int, same: bool) -> dict:
    """A rank of `world` restoring from the checkpoint of job.world: read the index and its
    record file, decode its tree, look up every block it restores (real readers)."""
    import dckpt.format.manifest as mf
    seen: list[int] = []
    real = mf._read_record

    def counted(path, ref):
        seen.append(ref.size)
        return real(path, ref)
    mf._read_record = counted
    try:
        t = time.process_time()
        m = ck.read_manifest(ckpt, rank=r)
        src = r if r < m.world_size else 0
        tree = treecodec.decode(m.ranks[src]["tree"])
        aliases = m.ranks[src].get("aliases", {})
        rows = job.rows // world
        for ref in treecodec.refs(tree):
            name = aliases.get(ref.name, ref.name)
            e = m.tensors[name]
            if e.placement and e.placement.get("kind") == sharding.SHARDED:
                lookup.ensure_block(m, name, [r * rows, 0], [rows, COLS])
                assert lookup.covered(m, name, [r * rows, 0], [rows, COLS]), name
        cpu = time.process_time() - t
    finally:
        mf._read_record = real
    index_bytes = (ckpt / "manifest.json").stat().st_size
    return {"cpu_s": cpu, "bytes": index_bytes + sum(seen), "records_read": len(seen)}


GRID = [(w, t) for w in (8, 64, 512, 4096, 16384) for t in (200, 1000, 2000)]


def run(grid=GRID, log=print) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="dckpt-scale-") as d:
        for w, t in grid:
            row = simulate(Job(w, t), Path(d))
            log(f"{w:>6} ranks x {t:>5} tensors: restore {row['restore']['bytes'] / 1e3:8.1f} KB "
                f"{row['restore']['cpu_s'] * 1e3:7.1f} ms; commit {row['commit']['cpu_s']:6.2f} s; "
                f"repeat plan sent {row['plan_repeat']['sent']} B")
            rows.append(row)
    return rows


def budget_ok(row: dict) -> dict:
    """The issue's goals at one grid point."""
    return {"restore_under_1MB": row["restore"]["bytes"] < 1 << 20,
            "restore_under_50ms": row["restore"]["cpu_s"] < 0.05,
            "commit_under_5s": row["commit"]["cpu_s"] < 5.0}


__all__ = ["Job", "simulate", "run", "GRID", "offers", "report", "state_names", "budget_ok"]


# ---- real runs ----------------------------------------------------------------------------
def real_run(world: int, tensors: int, timeout: float = 600.0) -> list[dict]:
    """Save twice (the second reusing the plan) and restore the Job(world, tensors) state on
    `world` real gloo processes; each rank's figures, in rank order."""
    import multiprocessing as mp
    import socket
    ctx = mp.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="dckpt-scale-real-") as d:
        q = ctx.Queue()
        procs = [ctx.Process(target=_real_rank, args=(r, world, port, tensors, d, q))
                 for r in range(world)]
        for p in procs:
            p.start()
        got = {}
        deadline = time.monotonic() + timeout
        try:
            while len(got) < world:
                r, value = q.get(timeout=max(1.0, deadline - time.monotonic()))
                got[r] = value
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    bad = {r: v for r, v in got.items() if "error" in v}
    if bad:
        raise RuntimeError(f"real run of {world} ranks failed: {bad}")
    return [got[r] for r in range(world)]


def _real_state(job: Job, r: int, fill: bool) -> dict:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (job.world,))
    g = torch.Generator().manual_seed(0)
    model = {}
    for n in job.names():
        full = (torch.randn(job.rows, COLS, generator=g) if fill
                else torch.zeros(job.rows, COLS)).to(torch.bfloat16)
        model[n] = distribute_tensor(full, mesh, [Shard(0)])
    return {"model": model,
            "rep": {f"r{i}": torch.full((COLS,), float(i) if fill else 0.0)
                    for i in range(REPLICATED)},
            "mine": {f"m{i}": torch.full((COLS,), float(r * 100 + i) if fill else 0.0)
                     for i in range(PER_RANK)}}


def _real_rank(r: int, world: int, port: int, tensors: int, root: str, q) -> None:
    import os
    import torch
    import torch.distributed as tdist
    import dckpt
    import dckpt.format.manifest as mf
    torch.set_num_threads(1)
    os.environ.update(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                      LOCAL_WORLD_SIZE=str(world))
    try:
        tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r,
                                 world_size=world)
        job = Job(world, tensors)
        state = _real_state(job, r, True)
        saves = []
        for i in range(2):
            res = dckpt.save(state, f"{root}/s{i}", threads=1)
            saves.append({"reused": res.plan_reused, "sent": res.sent_bytes,
                          "received": res.received_bytes, "record_bytes": res.metadata_bytes})
        live = _real_state(job, r, False)
        seen: list[int] = []
        real = mf._read_record

        def counted(path, ref):
            seen.append(ref.size)
            return real(path, ref)
        mf._read_record = counted
        path = Path(f"{root}/s1")
        tdist.barrier()
        t = time.process_time()
        m = ck.read_manifest(path, rank=r)
        meta_cpu = time.process_time() - t
        t = time.process_time()
        dckpt.load(path, into=live, manifest=m, threads=1)
        load_cpu = time.process_time() - t
        index_bytes = (path / "manifest.json").stat().st_size
        ok = all(torch.equal(a.to_local(), b.to_local())
                 for a, b in zip(live["model"].values(), state["model"].values()))
        tdist.barrier()
        q.put((r, {"saves": saves, "restore": {"bytes": index_bytes + sum(seen),
                                               "records_read": len(seen),
                                               "metadata_cpu_s": meta_cpu,
                                               "load_cpu_s": load_cpu, "bitwise": ok}}))
        tdist.destroy_process_group()
    except BaseException as e:  # reported to the parent
        q.put((r, {"error": f"{type(e).__name__}: {e}"}))

"""Collective checkpoints on real gloo process groups: DDP, FSDP2 + AdamW, ZeRO, resharding,
failures mid-save, per-rank RNG. Each test launches its ranks through run_with_ranks; the
functions named rank_* run inside those ranks and return JSON-able results."""
import hashlib
import os
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import dckpt
from dckpt.distributed import collective as dist
from dckpt.cli.inspect import describe, render
from dckpt.cli.output import Style
from dckpt.state.data import ResumableDistributedSampler, ResumableLoader
from dckpt.format.layout import is_staging
from dckpt.distributed.sharding import local_block
from dckpt.state.reading import TensorReader
from dckpt.state.tensors import torch_dtype
from helpers.ranks import run_with_ranks

FEATURES = 6


class Net(nn.Module):
    """Row counts 10, 7, 3 shard unevenly over 2 and 4 ranks (one rank gets no rows of l3)."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(FEATURES, 10), nn.Linear(10, 7), nn.Linear(7, 3)
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        return self.l3(self.drop(torch.relu(self.l2(torch.relu(self.l1(x))))))


def dataset():
    g = torch.Generator().manual_seed(7)
    return torch.utils.data.TensorDataset(torch.randn(48, FEATURES, generator=g),
                                          torch.randn(48, 3, generator=g))


def loader(rank, world):
    sampler = ResumableDistributedSampler(dataset(), world, rank, seed=5)
    return ResumableLoader(torch.utils.data.DataLoader(dataset(), batch_size=4, sampler=sampler))


def net(init_seed):
    torch.manual_seed(init_seed)  # the same on every rank: FSDP2 shards identical copies
    return Net()


def fsdp_state(rank, world, init_seed=0):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (world,))  # CPU even where a GPU is visible
    model = net(init_seed)
    for layer in (model.l1, model.l2, model.l3):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01, foreach=True)
    torch.manual_seed(1000 + rank)  # per-rank streams: dropout differs between ranks
    return {"model": model, "optimizer": opt, "data": loader(rank, world)}


def ddp_state(rank, world, init_seed=0, zero=False):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel
    model = DistributedDataParallel(net(init_seed))
    if zero:
        opt = ZeroRedundancyOptimizer(model.parameters(), torch.optim.AdamW, lr=0.05)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    torch.manual_seed(1000 + rank)
    return {"model": model, "optimizer": opt, "data": loader(rank, world)}


def batches(data):
    while True:  # one iter() of a ResumableLoader is one epoch
        yield from data


def train(state, steps, losses):
    """`steps` optimizer steps, continuing the loader where the previous call stopped."""
    model, opt = state["model"], state["optimizer"]
    it = state["data"].__dict__.setdefault("_batches", batches(state["data"]))
    model.train()
    for _ in range(steps):
        x, y = next(it)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def digests(state):
    """Hash of every local model tensor and optimizer state tensor: bitwise comparisons."""
    out = {}
    for k, v in state["model"].state_dict().items():
        out[f"model/{k}"] = hashlib.sha1(local(v).numpy().tobytes()).hexdigest()
    opt = state["optimizer"]
    inner = getattr(opt, "optim", opt)  # ZeRO: this rank's partition
    for i, st in inner.state_dict()["state"].items():
        for k, v in st.items():
            out[f"opt/{i}/{k}"] = hashlib.sha1(local(v).numpy().tobytes()).hexdigest()
    return out


# ---- DDP: replicated state written once, spread over ranks; per-rank RNG -------------------
def rank_ddp(rank, world, root, zero):
    state = ddp_state(rank, world, zero=zero)
    mgr = dckpt.CheckpointManager(root)
    train(state, 2, [])
    mgr.save(2, state)
    saved = digests(state)
    after_save = torch.rand(4).tolist()
    continued = train(state, 3, [])
    fresh = ddp_state(rank, world, init_seed=1, zero=zero)  # new objects, other weights
    torch.manual_seed(12345)  # the restore must bring this rank's streams back
    report = mgr.restore(fresh)
    restored = digests(fresh)
    again = torch.rand(4).tolist()
    resumed = train(fresh, 3, [])
    return {"rng": [after_save, again], "continued": continued, "resumed": resumed,
            "digests": [saved, restored], "notes": report.notes}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("zero", [False, True], ids=["adamw", "zero"])
def test_ddp(tmp_path, world, zero):
    res = run_with_ranks(world, rank_ddp, str(tmp_path), zero)
    for r in res:
        assert r["digests"][0] == r["digests"][1]  # restored state: bitwise the saved one
        # A fresh DDP object reduces in other buckets until it rebuilds them, so with more
        # than 2 ranks its sums may round differently: continuation is compared closely.
        assert r["resumed"] == pytest.approx(r["continued"], rel=1e-5)
        assert r["rng"][0] == r["rng"][1] and not r["notes"]
    assert len({tuple(r["rng"][0]) for r in res}) == world  # each rank its own stream

    m = dckpt.read_manifest(tmp_path / "step-000000002")
    assert m.world_size == world
    model = {n: t for n, t in m.tensors.items() if n.startswith("model/")}
    assert all(len(t.shards) == 1 and t.placement == {"kind": "replicated"}
               for t in model.values())  # each DDP parameter written once
    written = [sum(t.nbytes for t in m.tensors.values() if t.shards[0].rank == r)
               for r in range(world)]
    biggest = max(t.nbytes for t in m.tensors.values())
    assert min(written) > 0 and max(written) - min(written) <= biggest  # balanced
    opt = {n: t for n, t in m.tensors.items() if n.startswith("optimizer/")}
    kinds = {t.placement["kind"] for t in opt.values()}
    assert kinds == ({"owned"} if zero else {"replicated"})
    assert not [n for n in m.tensors if "@" in n]  # nothing stored per rank
    if zero:  # each partition written by its owner; loading alone consolidates all of it
        owners = {t.shards[0].rank for t in opt.values()}
        assert owners == set(range(world))
        full = dckpt.load(tmp_path / "step-000000002", keys=["optimizer"])["optimizer"]
        assert sorted(full["state"]) == list(range(6))


def rank_zero_reload(rank, world, root):
    """Restore a ZeRO checkpoint saved on another number of ranks into this partition."""
    state = ddp_state(rank, world, init_seed=1, zero=True)
    dckpt.CheckpointManager(root).restore(state)
    zero = state["optimizer"]
    return {zero._param_to_index[p]: {k: hashlib.sha1(v.numpy().tobytes()).hexdigest()
                                      for k, v in st.items()}
            for p, st in zero.optim.state.items()}


def test_zero_partitions_reshard_4_to_2(tmp_path):
    run_with_ranks(4, rank_ddp, str(tmp_path), True)
    parts = run_with_ranks(2, rank_zero_reload, str(tmp_path))
    full = dckpt.load(tmp_path / "step-000000002", keys=["optimizer"])["optimizer"]["state"]
    got = {int(i): st for part in parts for i, st in part.items()}
    assert sorted(got) == sorted(full) == list(range(6))  # new partition: all, once
    for i, st in got.items():
        assert st == {k: hashlib.sha1(v.numpy().tobytes()).hexdigest()
                      for k, v in full[i].items()}
    plain = torch.optim.AdamW(net(0).parameters(), lr=0.05)  # consolidate into one process
    dckpt.load(tmp_path / "step-000000002", into={"optimizer": plain}, keys=["optimizer"])
    for i, p in enumerate(plain.param_groups[0]["params"]):
        assert all(torch.equal(plain.state[p][k], full[i][k]) for k in full[i])


# ---- replica detection: equal plain tensors once, unequal ones per rank ---------------------
def rank_replicas(rank, world, path):
    from dckpt.storage import local as io
    from dckpt.distributed import sharding
    hashed = []  # bytes each digest covered: owned tensors must not be hashed at all
    real = io.hash64
    io.hash64 = lambda view: hashed.append(view.nbytes) or real(view)
    n = sharding.EAGER_DIGEST_BYTES // 4 + 1  # float32s: one past the size hashed eagerly
    same = torch.arange(2 * n, dtype=torch.float32)
    differs = same.clone()
    differs[-1] = rank  # a single element apart: must not be taken for a replica
    state = {"same": same, "same_t": same.reshape(2, n).t(), "differs": differs,
             "small": torch.tensor([1.0, float(rank)]), "tiny_same": torch.ones(3)}
    if rank == 1:
        state["own"] = torch.full((n,), 7.0)
    try:
        dckpt.save(state, path)
    finally:
        io.hash64 = real
    back = dckpt.load(path)
    return {"hashed": sum(hashed), "same": sorted(back) == sorted(state)
            and all(torch.equal(back[k], v) for k, v in state.items())}


def test_replicas_written_once_and_differing_copies_kept(tmp_path):
    path = tmp_path / "ckpt"
    res = run_with_ranks(2, rank_replicas, str(path))
    assert all(r["same"] for r in res)  # every rank gets its own values back, bitwise
    n = (1 << 16) // 4 + 1
    m = dckpt.read_manifest(path)
    kinds = {name: (t.placement or {}).get("kind") for name, t in m.tensors.items()}
    # "same_t" is a view of "same": one storage record holds both (tests/test_views.py)
    assert kinds == {"same~storage": "replicated", "tiny_same": "replicated",
                     "differs@r0": "local", "differs@r1": "local",
                     "small@r0": "local", "small@r1": "local", "own": "owned"}
    assert all(len(t.shards) == 1 for t in m.tensors.values())
    unique = 4 * (2 * n + 3 + 2 * (2 * n) + 2 * 2 + n)
    assert m.stored_bytes == unique  # each replica's bytes once, each differing copy twice
    assert res[1]["hashed"] == 4 * (2 * n + 2 * n + 2 + 3)  # not "own"


# ---- FSDP2 + AdamW: bitwise resume at the same world size ----------------------------------
def rank_fsdp_run(rank, world, root, total, stop):
    """Train to `stop` (saving there) or, with stop=None, resume from root and go on."""
    mgr = dckpt.CheckpointManager(root)
    if stop is None:
        state = fsdp_state(rank, world, init_seed=1)  # other weights: the restore must win
        torch.manual_seed(999)
        report = mgr.restore(state)
        losses = train(state, total - report.step, [])
    else:
        state = fsdp_state(rank, world)
        losses = train(state, stop, [])
        if stop < total:
            mgr.save(stop, state)
    return {"losses": losses, "digests": digests(state)}


def test_fsdp2_resume_is_bitwise_exact(tmp_path):
    total, stop = 9, 5  # 6 batches per rank and epoch: the save lands mid-epoch
    reference = run_with_ranks(2, rank_fsdp_run, str(tmp_path / "ref"), total, total)
    first = run_with_ranks(2, rank_fsdp_run, str(tmp_path / "run"), total, stop)
    resumed = run_with_ranks(2, rank_fsdp_run, str(tmp_path / "run"), total, None)
    for ref, a, b in zip(reference, first, resumed):  # per rank: its own losses and shards
        assert a["losses"] + b["losses"] == ref["losses"]
        assert b["digests"] == ref["digests"]
    assert reference[0]["losses"] != reference[1]["losses"]  # ranks saw different data

    m = dckpt.read_manifest(tmp_path / "run" / f"step-{stop:09d}")
    w = m.tensors["model/l1.weight"]
    assert w.placement["kind"] == "sharded" and w.placement["placements"] == ["Shard(dim=0)"]
    assert m.meshes[w.placement["mesh"]]["ranks"] == [0, 1]
    assert [(s.rank, s.offsets, s.shape) for s in w.shards] == [(0, [0, 0], [5, 6]),
                                                               (1, [5, 0], [5, 6])]
    assert m.tensors["optimizer/state/0/exp_avg"].placement["kind"] == "sharded"
    assert m.tensors["optimizer/state/0/step"].placement["kind"] == "replicated"
    doc = describe(tmp_path, m)  # what `dckpt inspect` shows, without reading tensors
    assert doc["meshes"] == m.meshes and doc["world_size"] == 2
    lines = render(doc, Style("never"), None)
    assert any("model/l1.weight" in x and "Shard(dim=0)" in x and "2 shards, ranks [0, 1]" in x
               for x in lines)


# ---- HSDP: a Replicate mesh dimension is written once ---------------------------------------
def rank_hsdp(rank, world, path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def build(seed):
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        model = net(seed)
        fully_shard(model, mesh=mesh)
        return {"model": model, "optimizer": torch.optim.AdamW(model.parameters(), lr=0.05),
                "data": loader(rank // 2, 2)}  # the replicas of a shard see the same data
    state = build(0)
    train(state, 2, [])
    dckpt.save(state, path)
    fresh = build(1)
    dckpt.load(path, into=fresh)
    blocks = {}
    for k, v in fresh["model"].state_dict().items():
        block, _, offsets = local_block(v)
        blocks[k] = [offsets, list(block.shape), hashlib.sha1(block.numpy().tobytes()).hexdigest()]
    return {"blocks": blocks, "same": digests(state) == digests(fresh)}


def test_hsdp_replicas_written_once(tmp_path):
    res = run_with_ranks(4, rank_hsdp, str(tmp_path / "c"))
    assert all(r["same"] for r in res)
    m = dckpt.read_manifest(tmp_path / "c")
    w = m.tensors["model/l1.weight"]
    assert w.placement["placements"] == ["Replicate()", "Shard(dim=0)"]
    assert m.meshes[w.placement["mesh"]]["dim_names"] == ["replicate", "shard"]
    assert len(w.shards) == 2 and len({s.rank for s in w.shards}) == 2
    full = dckpt.load(tmp_path / "c", keys=["model"])["model"]  # consolidated
    for r in res:
        for k, (offsets, shape, digest) in r["blocks"].items():
            index = tuple(slice(o, o + n) for o, n in zip(offsets, shape))
            assert hashlib.sha1(full[k][index].numpy().tobytes()).hexdigest() == digest, k


# ---- resharding 2 -> 4 -> 2 -> 1 -------------------------------------------------------------
def rank_fsdp_save(rank, world, root):
    state = fsdp_state(rank, world)
    train(state, 2, [])
    dckpt.CheckpointManager(root).save(2, state)
    return torch.rand(2).tolist()


def rank_reshard(rank, world, src_root, dst_root):
    """Load the latest checkpoint of src_root into a fresh FSDP2 state of this world size,
    check local shards against the consolidated tensors, save it under dst_root, and take
    a step."""
    state = fsdp_state(rank, world, init_seed=1)
    report = dckpt.CheckpointManager(src_root).restore(state)
    after = torch.rand(2).tolist()
    full = dckpt.load(report.path, keys=["model"])["model"]
    for k, v in state["model"].state_dict().items():
        block, _, offsets = local_block(v)
        index = tuple(slice(o, o + n) for o, n in zip(offsets, block.shape))
        assert torch.equal(block, full[k][index]), k
    dckpt.CheckpointManager(dst_root).save(2, state)
    after_save = torch.rand(2).tolist()
    train(state, 1, [])  # the loaded optimizer state has the new layout and works
    return {"notes": report.notes, "rng": after, "streams": report.rng_streams,
            "rng_after_save": after_save}


def global_tensors(path):
    """Every model and optimizer tensor of a checkpoint, assembled from its shards."""
    m = dckpt.read_manifest(path)
    reader, out = TensorReader(Path(path), m), {}
    for n, e in m.tensors.items():
        if n.startswith(("model/", "optimizer/")):
            out[n] = torch.empty(e.shape, dtype=torch_dtype(e.dtype))
            reader.request(n, out[n])
    reader.run()
    return out


def assert_same_global_tensors(a, b):
    ta, tb = global_tensors(a), global_tensors(b)
    assert ta and sorted(ta) == sorted(tb)
    for n in ta:
        assert torch.equal(ta[n], tb[n]), n


def test_resharding_2_to_4_to_2_to_1(tmp_path):
    saved_rng = run_with_ranks(2, rank_fsdp_save, str(tmp_path / "w2"))
    four = run_with_ranks(4, rank_reshard, str(tmp_path / "w2"), str(tmp_path / "w4"))
    step2, step4 = tmp_path / "w2" / "step-000000002", tmp_path / "w4" / "step-000000002"
    assert_same_global_tensors(step2, step4)
    m4 = dckpt.read_manifest(step4)
    assert m4.world_size == 4 and len(m4.tensors["model/l1.weight"].shards) == 4
    assert len(m4.tensors["model/l3.weight"].shards) == 3  # 3 rows: rank 3 holds none
    # RNG: ranks 0, 1 get their own streams back; the new ranks 2, 3 say they did not
    for r in (0, 1):
        assert four[r]["rng"] == saved_rng[r] and four[r]["streams"]
    for r in (2, 3):
        assert not four[r]["streams"]
        assert any("NOT restored" in n for n in four[r]["notes"])
    assert all("saved by 2 rank(s), loaded on 4" in four[r]["notes"][0] for r in range(4))

    two = run_with_ranks(2, rank_reshard, str(tmp_path / "w4"), str(tmp_path / "back2"))
    assert_same_global_tensors(step2, tmp_path / "back2" / "step-000000002")
    assert [t["rng"] for t in two] == [four[0]["rng_after_save"], four[1]["rng_after_save"]]

    # 4 -> 1: a plain single-process model and optimizer (consolidation)
    plain = {"model": net(3), "optimizer": None}
    plain["optimizer"] = torch.optim.AdamW(plain["model"].parameters(), lr=0.05)
    dckpt.load(step4, into=plain, keys=["model", "optimizer"])
    dckpt.save(plain, tmp_path / "w1")
    assert_same_global_tensors(step2, tmp_path / "w1")


# ---- a rank failing mid-save ---------------------------------------------------------------
def rank_fail_mid_save(rank, world, root, how):
    import dckpt.engine.checkpoint as ck
    state = ddp_state(rank, world)
    mgr = dckpt.CheckpointManager(root)
    train(state, 1, [])
    mgr.save(1, state)
    train(state, 1, [])
    if rank == 1:
        real = ck.io.write_file

        def failing(path, values, opts, *a, **k):
            real(path, values[: len(values) // 2], opts)  # some bytes land, then trouble
            if how == "die":
                os._exit(3)
            raise OSError(28, "No space left on device (injected)")
        ck.io.write_file = failing
    t0 = time.monotonic()
    try:
        with dist.timeout(4):
            mgr.save(2, state)
    except dckpt.DckptError as e:
        return {"error": type(e).__name__, "rank": getattr(e, "rank", None), "msg": str(e),
                "seconds": time.monotonic() - t0}
    except OSError as e:
        return {"error": "OSError", "msg": str(e), "seconds": time.monotonic() - t0}
    return {"error": None}


@pytest.mark.parametrize("how", ["raise", "die"])
def test_rank_failing_mid_save(tmp_path, how):
    world = 3
    res = run_with_ranks(world, rank_fail_mid_save, str(tmp_path), how,
                         may_die=(1,) if how == "die" else ())
    for r in (0, 2):
        assert res[r]["error"] == "DistributedError" and res[r]["rank"] == 1, res[r]
        assert res[r]["seconds"] < 15
    if how == "raise":
        assert res[1]["error"] == "OSError" and "No space left" in res[1]["msg"]
        assert "No space left" in res[0]["msg"]  # the others learn why
    else:
        assert "did not arrive" in res[0]["msg"]
    mgr = dckpt.CheckpointManager(tmp_path)
    assert mgr.steps() == [1]
    assert not [p for p in tmp_path.iterdir() if is_staging(p.name)]
    assert dckpt.load(mgr.path(1), keys=["model"])["model"]  # previous one intact, verified


def rank_save_onto_existing(rank, world, path):
    try:
        dckpt.save({"w": torch.full((4,), float(rank))}, path)
    except dckpt.errors.DckptError as e:
        return type(e).__name__
    return None


def test_existing_target_refused_on_every_rank(tmp_path):
    path = tmp_path / "ckpt"
    assert run_with_ranks(2, rank_save_onto_existing, str(path)) == [None, None]
    before = dckpt.read_manifest(path).to_bytes()
    res = run_with_ranks(2, rank_save_onto_existing, str(path))
    assert res == ["CheckpointExistsError"] * 2  # the same typed error everywhere
    assert dckpt.read_manifest(path).to_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging debris


def rank_exchanges(rank, world):
    """Exchanges of each kind; then how many keys the store holds once this process's
    cleanup has had time, against the count before them."""
    import torch.distributed as tdist
    store = tdist.distributed_c10d._get_default_store()

    def settled(want=None, within=10.0):
        """The store's key count once it is `want` (or, for None, the same in 3 looks
        in a row), on every rank, or after `within` seconds."""
        deadline, seen = time.monotonic() + within, []
        while True:
            tdist.barrier()  # gloo: no store keys
            seen.append(store.num_keys())
            if want is None:
                ok = len(seen) >= 3 and len(set(seen[-3:])) == 1
            else:
                ok = seen[-1] == want
            done = torch.tensor([int(ok or time.monotonic() > deadline)])
            tdist.all_reduce(done, tdist.ReduceOp.MIN)  # every rank decides alike
            if done.item():
                return seen[-1]
            time.sleep(0.05)

    dist.barrier()  # the first operation starts the heartbeat (one key per rank)
    before = settled()
    values = []
    for i in range(30):
        values.append(dist.all_gather_json([rank, i]))
        values.append(dist.gather_json(rank * i))
        values.append(dist.broadcast_json({"i": i} if rank == 1 else None, src=1))
    return {"values": values, "before": before, "after": settled(before)}


def test_exchanges_leave_no_keys_in_the_store():
    """Each exchange's keys are deleted once every rank has read them (by a thread of each
    process, off the exchange's path): a long job's store does not grow by a save's keys."""
    res = run_with_ranks(2, rank_exchanges)
    for rank, r in enumerate(res):
        assert r["after"] == r["before"], r
        for i in range(30):
            assert r["values"][3 * i] == [[0, i], [1, i]]
            assert r["values"][3 * i + 1] == ([0, i] if rank == 0 else None)
            assert r["values"][3 * i + 2] == {"i": i}

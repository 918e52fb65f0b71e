"""dckpt.save / dckpt.load: one checkpoint directory, written atomically, read verified.

Collective when a process group is initialized: every rank writes its own data file, rank 0
writes the manifest after every rank reported (in the split layout, the default when
distributed, each rank writes its own record file and rank 0 only the index; see
docs/FORMAT.md and docs/SCALE.md), and a failure on any rank aborts the commit on all ranks.
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch

from .. import __version__, errors
from . import gcpause, incremental
from ..distributed import collective as dist, partitioned, sharding
from .. import storage
from ..storage import local as io, records
from ..errors import DckptError, DistributedError, ManifestError
from ..format import tree as treecodec
from ..format.layout import rank_file
from ..format import split as splitfmt
from ..format.manifest import VIEWS_VERSION, Chunk, FileEntry, Manifest, Shard, TensorEntry
from ..storage import commit
from ..state.flatten import Flat, Leaf, component_kind, flatten
from ..state.reading import TensorReader
from ..state.restore import RestoreReport, materialize, restore_into


@dataclass
class SaveResult:
    """What save() committed: the checkpoint directory, its logical and stored sizes, the
    time taken and the manifest written (of a split checkpoint: read on first use, the
    index and this rank's records), and what this rank's exchanges cost."""
    path: Path | str  # a URL string for an object store
    seconds: float
    _manifest: Manifest | None = field(repr=False)
    # (logical bytes of all tensors saved by every rank, bytes in the data files, this
    # rank's share of the first: the shards it wrote); None: counted from the manifest on
    # first use (one pass over every chunk, which a training loop rarely asks for)
    _sizes: tuple[int, int, int] | None = field(default=None, repr=False)
    notes: list[str] = field(default_factory=list)  # e.g. why an incremental save was full
    sent_bytes: int = 0  # JSON this rank sent through the save's collectives
    received_bytes: int = 0  # and received
    plan_reused: bool = False  # the layout was the last save's: only its hash was exchanged
    rank: int = 0
    metadata_bytes: int = 0  # this rank's record file (split layout), or the manifest

    @classmethod
    def of(cls, path: Path | str, m: Manifest, seconds: float, rank: int) -> "SaveResult":
        return cls(path, seconds, m, rank=rank)

    def _counted(self) -> tuple[int, int, int]:
        if self._sizes is None:
            m, mine, stored = self.manifest, 0, 0
            for t in m.tensors.values():
                for s in t.shards:
                    if s.rank == self.rank:
                        mine += sum([c.raw for c in s.chunks])
                    stored += sum([c.stored for c in s.chunks])
            self._sizes = (m.total_bytes, stored, mine)
        return self._sizes

    @property
    def bytes(self) -> int:
        """Logical bytes of all tensors saved by every rank."""
        return self._counted()[0]

    @property
    def stored_bytes(self) -> int:
        """Bytes in the data files."""
        return self._counted()[1]

    @property
    def rank_bytes(self) -> int:
        """This rank's share of `bytes`: the shards it wrote."""
        return self._counted()[2]

    @property
    def manifest(self) -> Manifest:
        """The manifest written; of a split checkpoint, read on first use (its index and
        this rank's records; other records are fetched when a lookup needs them)."""
        if self._manifest is None:
            self._manifest = read_manifest(self.path, rank=self.rank)
        return self._manifest

    def traffic(self, sent0: int, received0: int, reused: bool) -> None:
        """Record what this rank's exchanges cost since dist.traffic() read (sent0,
        received0) at the start of the save, and whether the plan was reused."""
        sent, received = dist.traffic()
        self.sent_bytes, self.received_bytes = sent - sent0, received - received0
        self.plan_reused = reused


@dataclass
class Snapshot:
    """A state reduced to what a save writes. The tree and per-rank extras are encoded (a
    copy: later changes to the live objects do not reach them); the leaves alias the live
    tensors unless they were staged (dckpt.state.staging) for a background write."""
    flat: Flat
    tree: Any
    rank_state: Any

    @property
    def leaves(self) -> list[Leaf]:
        return self.flat.leaves


def snapshot(state: Any, rank_state: dict | None = None) -> Snapshot:
    """Flatten `state` (calling state_dict() on objects) and encode its non-tensor part."""
    with torch.no_grad():  # DTensor.to_local() then returns the shard, not an autograd view
        flat = flatten(partitioned.adapt(state), tensor_hook=sharding.dtensor_leaf)
    return Snapshot(flat, treecodec.encode(flat.tree), treecodec.encode(rank_state or {}))


@gcpause.during
@dist.collective
def save(state: Any, path: str | os.PathLike, *, compression: str | int | None = None,
         shuffle: bool = True, chunk_size: int = io.DEFAULT_CHUNK_SIZE, threads: int = 0,
         fsync: bool = True, overwrite: bool = False, counters: dict | None = None,
         metrics: dict | None = None, meta: dict | None = None, rank_state: dict | None = None,
         base: str | os.PathLike | incremental.Base | None = None, group=None,
         storage_options: dict | None = None, layout: str | None = None) -> SaveResult:
    """Save `state` (a nested dict/list of tensors, arrays, values and objects with
    state_dict()) as a checkpoint directory at `path`.

    compression: None (raw), "zstd" (level 1) or a zstd level; shuffle applies a byte shuffle
    by element size before zstd. rank_state: extra per-rank values (RNG streams) stored in
    the manifest beside the tree. base: a committed checkpoint; chunks unchanged since it
    are not written again but shared with it by hard link (see dckpt/engine/incremental.py).
    path may be an object store URL ("s3://bucket/run/ck", any fsspec URL): the files are
    uploaded and the manifest object written last is the commit (docs/STORAGE.md);
    storage_options go to the fsspec file system (credentials otherwise come from the
    standard chain: AWS_* variables, config files).

    Distributed (see dckpt/distributed/sharding.py): DTensor shards are written by their owners with
    global offsets, tensors replicated on every rank once in total, the rest per rank.
    layout: "single" (one manifest) or "split" (an index and a record file per rank, the
    default when distributed; docs/FORMAT.md); see choose_layout.
    """
    # write() undecorated: one pause and one collective scope for the call, not two.
    return _commit_snapshot(lambda: snapshot(state, rank_state), path, compression=compression,
                            shuffle=shuffle, chunk_size=chunk_size, threads=threads,
                            fsync=fsync, overwrite=overwrite, counters=counters,
                            metrics=metrics, meta=meta, base=base, group=group,
                            storage_options=storage_options, layout=layout)


@gcpause.during
@dist.collective
def write(snap: Snapshot | Callable[[], Snapshot], path: str | os.PathLike, *,
          compression: str | int | None = None, shuffle: bool = True,
          chunk_size: int = io.DEFAULT_CHUNK_SIZE, threads: int = 0, fsync: bool = True,
          overwrite: bool = False, counters: dict | None = None, metrics: dict | None = None,
          meta: dict | None = None, base: str | os.PathLike | incremental.Base | None = None,
          group=None, mode: io.Background = io.FOREGROUND,
          storage_options: dict | None = None, layout: str | None = None,
          spares: str | os.PathLike | None = None) -> SaveResult:
    """Write and commit a snapshot (or what a callable returns, taken inside the first
    phase so that its failure aborts every rank); collective over `group` like save().
    mode: how the bytes are written (the async saver's direct writes and duty cycle).
    spares: a directory of retired data files to write over (storage/spares.py)."""
    return _commit_snapshot(snap, path, compression=compression, shuffle=shuffle,
                            chunk_size=chunk_size, threads=threads, fsync=fsync,
                            overwrite=overwrite, counters=counters, metrics=metrics, meta=meta,
                            base=base, group=group, mode=mode, storage_options=storage_options,
                            layout=layout, spares=spares)


def local_snapshot(snap: Snapshot) -> Snapshot:
    """`snap` with its DTensor shards stored as plain tensors of their local shape: a rank's
    own single-rank checkpoint (load(..., local_shards=True) reads it back into the live
    DTensors). Nothing is copied."""
    return replace(snap, flat=replace(snap.flat, leaves=sharding.as_local(snap.flat.leaves)))


def _commit_snapshot(snap, path, *, compression, shuffle, chunk_size, threads, fsync,
                     overwrite, counters, metrics, meta, base, group,
                     mode: io.Background = io.FOREGROUND,
                     storage_options: dict | None = None, layout=None,
                     spares=None) -> SaveResult:
    """The save protocol: the home of its collective exchanges, in this order on every rank
    (each carries a failure too, so a rank that raises makes every rank abort and none
    hangs; rank 0 then removes the staging directory):

    1. "plan" (all-gather): rank 0 has begun (storage.begin: the staging location, or the
       error every rank raises); every rank sends its plan key: a hash of its offers
       (sharding.layout_hash), the id of the plan it last agreed to for that layout (one
       of the last few it saved), and a hash of its digests of that plan's replicas. When
       every rank's key names the same plan and the replica hashes agree, that plan is
       reused (steps 2-3 are skipped): a few hundred bytes per rank, whatever the number
       of tensors.
    2. "offers" (all-gather, only without reuse): every rank's offers in compact form (a
       hash of its DTensors, their bytes, its plain sharding.Offers); when the ranks'
       DTensors differ or replicate, a second exchange, "offers (all)", of every Offer.
    3. "replicas", only when sharding.undecided(offers) is not empty (the same on every
       rank): each rank's digests of those tensors, added to the offers. Then every rank
       computes the same sharding.assign_compact / assign: its WritePlan, cached for step 1.
    4. "write": each rank writes its plan through storage.write_files. Single layout
       (all-gather): it sends its WriteReport and every rank builds the same manifest.
       Split layout (gather_json to rank 0): it writes its own record file and sends rank 0
       only a summary (_write_split).
    5. "save commit" (broadcast): rank 0 commits (storage.finish: the manifest or index,
       last) and broadcasts the outcome.

    The typed objects (Begun, Offer, WritePlan, WriteReport) are made once and passed down;
    they become JSON only inside _exchange. SaveResult says what this rank's exchanges sent
    and received."""
    staged: list = []  # rank 0's staging location, once it exists
    store = storage.for_path(path, storage_options)
    try:
        return _write(snap, path, staged, store, compression=compression, shuffle=shuffle,
                      chunk_size=chunk_size, threads=threads, fsync=fsync, overwrite=overwrite,
                      counters=counters, metrics=metrics, meta=meta, base=base, group=group,
                      mode=mode, layout=layout, spares=spares)
    except BaseException:
        # Ctrl-C (KeyboardInterrupt), SystemExit, or any error: the phases below remove the
        # staging directory on the errors they exchange, this on everything else, so no
        # interrupted save leaves its bytes behind. After a commit it no longer exists.
        for tmp in staged:
            store.abort(tmp)
        raise


def _write(snap, path, staged: list, store: storage.Storage, *, compression, shuffle,
           chunk_size, threads, fsync, overwrite, counters, metrics, meta, base, group,
           mode, layout=None, spares=None) -> SaveResult:
    t0 = time.perf_counter()
    sent0, received0 = dist.traffic()
    threads = dist.threads_per_rank(threads, io.default_threads())
    target = storage.location(path)
    base = incremental.Base.of(base)
    r, world = dist.rank(group), dist.world_size(group)
    layout = choose_layout(layout, world)

    # Phase 1: rank 0 opens the staging directory while every rank flattens its state; the
    # exchange tells all ranks its name and, when the layout is one saved lately, that its
    # plan holds (plan reuse: a few bytes per rank instead of every offer).
    begun = offers = failure = key = cache = None
    cache_key = (dist.group_key(group), world, r)
    try:
        # The whole call is checked before anything is created, and inside this phase, so
        # that a bad argument on any rank fails every rank (nothing fails at commit).
        opts = io.WriteOptions(compression, shuffle, chunk_size, threads, fsync,
                               spares=None if spares is None else str(spares)).validate()
        metrics = plain_metrics(metrics)
        counters = plain_json(counters or {}, "counters")
        meta = plain_json(meta or {}, "meta")
        if base is not None and storage.is_remote(target):
            raise errors.InvalidArgumentError(
                f"base= (an incremental save, which shares chunks by hard link) needs a local "
                f"target, not {target}; nothing was written")
        if r == 0:
            begun = _begin(store, target, overwrite)
            if begun.staging:
                staged.append(storage.location(begun.staging))
        if begun is None or begun.staging:
            snap = snap() if callable(snap) else snap
            offers, own = sharding.offer_layout(snap.flat, world)
            cache = _plans.get((*cache_key, own))
            key = {"layout": own, "plan": cache.plan_id if cache else None,
                   "replicas": sharding.replica_fingerprint(snap.flat, offers,
                                                           cache.plan.replicated)
                   if cache else None}
    except Exception as e:
        failure = e
    staged = storage.location(begun.staging) if begun and begun.staging else None
    gathered = _exchange([begun, key], failure, "plan", store, staged, target, group)
    begun = Begun.of(gathered[0][0])
    if begun.error:
        raise _rebuilt(*begun.error)
    tmp = storage.location(begun.staging)
    keys = [g[1] for g in gathered]
    reused = (keys[0]["plan"] is not None
              and all((k["plan"], k["replicas"]) == (keys[0]["plan"], keys[0]["replicas"])
                      for k in keys))
    everyone = None if reused else _agree(snap, offers, store, tmp, target, group)

    def agreed() -> sharding.WritePlan:  # inside the write phase: its error is exchanged
        if reused:
            return cache.plan
        how, agreed_offers = everyone
        plan = (sharding.assign_compact(agreed_offers, offers, r) if how == "compact"
                else sharding.assign(agreed_offers, r))
        if len(_plans) >= _MAX_PLANS:
            del _plans[next(iter(_plans))]
        _plans[(*cache_key, keys[r]["layout"])] = sharding.PlanCache(
            keys[r]["layout"], sharding.plan_id([k["layout"] for k in keys]), plan)
        return plan

    if layout == SPLIT:
        return _write_split(snap, agreed, store, tmp, target, opts, mode, r, world, base,
                            counters, metrics, meta, fsync, group, t0, (sent0, received0),
                            reused)
    syncs = commit.Syncs()  # this rank's data fsyncs: see _durable
    try:
        # A single process builds its manifest records at once (no JSON form to send).
        report = _write_rank(store, tmp, snap, agreed(), opts, mode, r, base, syncs,
                             wire=dist.active(group))
        _durable(syncs, r)
        failure = None
    except Exception as e:
        report, failure = None, e
    reports = [WriteReport.of(x) for x in
               _exchange(report, failure, "write", store, tmp, target, group)]

    if base is not None:
        meta = {**(meta or {}), incremental.META_KEY: incremental.summarize(base, reports)}
    m = _build_manifest(reports, world, counters, metrics, meta, opts)
    outcome = None
    if r == 0:
        try:
            store.finish(tmp, target, m, fsync, syncs)
        except Exception as e:
            store.abort(tmp)
            if not dist.active(group):
                raise
            outcome = f"{type(e).__name__}: {e}"
    outcome = dist.broadcast_json(outcome, 0, group, what="save commit")
    if outcome:
        raise DistributedError(f"commit of {target} failed on rank 0: {outcome}", 0)
    result = SaveResult.of(target, m, time.perf_counter() - t0, r)
    result.traffic(sent0, received0, reused)
    return result


def _write_split(snap, agreed, store: storage.Storage, tmp: Path, target: Path, opts, mode,
                 r: int, world: int, base, counters, metrics, meta, fsync: bool, group,
                 t0: float, traffic0: tuple[int, int], reused: bool) -> SaveResult:
    """The write and commit of the split layout (format/split.py): each rank writes its data
    files and its own record file, then sends rank 0 a summary of a few hundred bytes (its
    record file's name, size, hash and span, and the records of the replicated tensors it
    wrote, which the index holds for every rank); rank 0 writes only the index, last, and
    broadcasts the outcome. No rank holds another rank's records."""
    summary = failure = None
    syncs = commit.Syncs()  # this rank's data and record fsyncs: see _durable
    try:
        plan = agreed()
        report = _write_rank(store, tmp, snap, plan, opts, mode, r, base, syncs)
        summary = _write_records(store, tmp, report, r, fsync, syncs)
        _durable(syncs, r)
    except Exception as e:
        failure = e
    msg = ({"rank": r, "value": summary} if failure is None
           else {"rank": r, "error": f"{type(failure).__name__}: {failure}"})
    gathered = dist.gather_json(msg, 0, group, what=f"save write of {target}")
    outcome = None
    if r == 0:
        failed = [g for g in gathered if "error" in g]
        if failed:
            store.abort(tmp)
            outcome = {"rank": failed[0]["rank"], "error": f"rank {failed[0]['rank']} "
                       f"failed (write): {failed[0]['error']}"}
        else:
            try:
                summaries = [g["value"] for g in gathered]
                index = _build_index(summaries, plan.owned, world, counters, metrics, meta,
                                     opts, base)
                store.finish(tmp, target, index, fsync, syncs)
                outcome = index.meta["totals"]
            except Exception as e:
                store.abort(tmp)
                if not dist.active(group):
                    raise
                outcome = {"rank": 0, "error": f"commit of {target} failed on rank 0: "
                                               f"{type(e).__name__}: {e}"}
    outcome = dist.broadcast_json(outcome, 0, group, what="save commit")
    if failure is not None:
        raise failure
    if "error" in outcome:
        raise DistributedError(f"save to {target} aborted: {outcome['error']}", outcome["rank"])
    result = SaveResult(target, time.perf_counter() - t0, None,
                        (outcome["bytes"], outcome["stored_bytes"], summary["bytes"]), rank=r,
                        metadata_bytes=summary["record"]["size"])
    result.traffic(*traffic0, reused)
    return result


def _durable(syncs: commit.Syncs, r: int) -> None:
    """A rank's files are durable before it reports them written: every rank but 0 waits
    for its fsyncs here. Rank 0 waits inside store.finish, just before the commit point, so
    that its fsyncs run while it waits for the other ranks and builds the manifest."""
    if r != 0:
        syncs.wait()


def _write_records(store: storage.Storage, tmp: Path | str, report: "WriteReport", r: int,
                   fsync: bool, syncs: commit.Syncs) -> dict:
    """Write this rank's record file (fsync'd in `syncs`) and return its summary for
    rank 0."""
    own, index_tensors, meshes = {}, {}, []
    raw = stored = 0
    for name, t in report.tensors.items():
        shards = []
        for sh in t["shards"]:
            chunks = [c if type(c) is Chunk else Chunk(*c) for c in sh["chunks"]]
            for c in chunks:
                raw += c.raw
                stored += c.stored
            shards.append(Shard(sh["offsets"], sh["shape"], sh["rank"], chunks))
        rec = TensorEntry(t["dtype"], t["shape"], shards, t["kind"],
                          _index_mesh(t["placement"], meshes))
        if rec.placement and rec.placement.get("kind") == sharding.REPLICATED:
            index_tensors[name] = rec.to_json()  # every rank needs it: the index holds it
        else:
            own[name] = rec
    entry = {"tree": report.tree, "aliases": report.aliases, **report.extra}
    span = splitfmt.span_of([(s.offsets, s.shape, t.shape) for t in own.values()
                             for s in t.shards if s.shape != t.shape])
    data = splitfmt.record_bytes(r, report.files, own, entry, meshes)
    ref = splitfmt.RecordRef.of(r, data, span)
    if storage.is_remote(tmp):
        store.write_bytes(str(storage.join(tmp, ref.name)), data)
    else:
        commit.write_staged(tmp / ref.name, data, fsync, syncs)
    return {"record": ref.to_json(), "files": report.files if index_tensors else [],
            "tensors": index_tensors, "stats": report.stats, "views": report.views,
            "bytes": raw, "stored_bytes": stored}


def _build_index(summaries: list[dict], owned: tuple[str, ...], world: int, counters, metrics,
                 meta, opts, base) -> Manifest:
    """Rank 0: the index from every rank's summary. Its size: one record entry per rank,
    the replicated tensors' records, one name per owned tensor."""
    files, tensors, refs = [], {}, []
    for r, sm in enumerate(summaries):
        first = len(files)
        files.extend(FileEntry(**f) for f in sm["files"])
        for name, t in sm["tensors"].items():
            shards = [Shard(x["offsets"], x["shape"], x["rank"],
                            [Chunk(first + c[0], c[1], c[2], c[3], c[4], int(c[5], 16),
                                   int(c[6], 16)) for c in x["chunks"]]) for x in t["shards"]]
            tensors[name] = TensorEntry(t["dtype"], t["shape"], shards, t["kind"],
                                        t.get("placement"))
        ref = sm["record"]
        span = ref["span"]
        refs.append(splitfmt.RecordRef(ref["name"], ref["size"], int(ref["hash"], 16), r,
                                       None if span is None else (tuple(span[0]), tuple(span[1]))))
    if base is not None:
        stats = [SimpleNamespace(stats=sm["stats"]) for sm in summaries]
        meta = {**(meta or {}), incremental.META_KEY: incremental.summarize(base, stats)}
    info = {"dckpt": __version__, "torch": str(torch.__version__), "numpy": np.__version__,
            "python": platform.python_version(), "compression": str(opts.compression),
            "chunk_size": opts.chunk_size}
    totals = {"bytes": sum(sm["bytes"] for sm in summaries),
              "stored_bytes": sum(sm["stored_bytes"] for sm in summaries)}
    return Manifest(world_size=world, files=files, tensors=tensors, ranks=[],
                    counters=counters or {}, metrics=metrics or {},
                    meta={"library": info, "totals": totals, **(meta or {})},
                    version=splitfmt.SPLIT_VERSION,
                    split=splitfmt.SplitIndex.of(refs, dict(sorted(owned.items()))))


SINGLE, SPLIT = "single", "split"
LAYOUT_ENV = "DCKPT_LAYOUT"
# This process's last agreed plans per (group, world size, rank, own layout hash): see
# sharding.PlanCache. More than one: a process may save several layouts in turn (a model
# and its EMA copy, two managers, a memory tier's state beside the root's).
_plans: dict[tuple, sharding.PlanCache] = {}
_MAX_PLANS = 4


def choose_layout(layout: str | None, world: int) -> str:
    """The manifest layout of a save: "single" (one manifest.json, docs/FORMAT.md versions
    1-2) or "split" (an index plus a record file per rank, version 3). By default
    ($DCKPT_LAYOUT, else): split when distributed, single otherwise."""
    layout = layout or os.environ.get(LAYOUT_ENV) or (SPLIT if world > 1 else SINGLE)
    if layout not in (SINGLE, SPLIT):
        raise errors.InvalidArgumentError(f"layout={layout!r}: expected 'single' or 'split'")
    return layout


def _agree(snap, offers, store, tmp: Path, target: Path, group):
    """The plan exchange: every rank's offers (and, for possible replicas, digests), from
    which every rank computes the same assignment. First in compact form (its DTensor
    offers as one hash, sharding.compact_offers); only when the ranks' DTensors differ or
    replicate, every offer. Returns ("compact", every rank's compact offers) or ("full",
    every rank's offers)."""
    failure = None
    compact = _exchange(sharding.compact_offers(offers), failure, "offers", store, tmp,
                        target, group)
    if sharding.compact_applies(compact):
        plain = [[o if isinstance(o, sharding.Offer) else sharding.Offer.from_json(o)
                  for o in m["plain"]] for m in compact]
        late = sharding.undecided(plain)
        if late:
            try:
                digests, failure = sharding.late_digests(snap.flat, late), None
            except Exception as e:
                digests, failure = None, e
            plain = sharding.add_digests(plain, late, _exchange(digests, failure, "replicas",
                                                                store, tmp, target, group))
        return "compact", [{**m, "plain": p} for m, p in zip(compact, plain)]
    gathered = _exchange(offers, failure, "offers (all)", store, tmp, target, group)
    offers = [[o if isinstance(o, sharding.Offer) else sharding.Offer.from_json(o) for o in g]
              for g in gathered]
    late = sharding.undecided(offers)
    if late:  # large plain tensors on every rank: hash only these, to find the replicas
        try:
            digests, failure = sharding.late_digests(snap.flat, late), None
        except Exception as e:
            digests, failure = None, e
        offers = sharding.add_digests(offers, late, _exchange(digests, failure, "replicas",
                                                              store, tmp, target, group))
    return "full", offers


def as_number(v: Any) -> Any:
    """A 0-d tensor or numpy scalar (what a training loop has at hand) as a Python number;
    anything else unchanged."""
    if isinstance(v, torch.Tensor) and v.dim() == 0 and not v.is_complex():
        return v.item()
    if isinstance(v, (np.generic, np.ndarray)) and v.ndim == 0 and v.dtype.kind in "biuf":
        return v.item()
    return v


def plain_metrics(metrics: dict | None) -> dict:
    """`metrics` with numbers only (non-finite ones allowed: the manifest encodes them), or
    InvalidArgumentError naming the first that is not one."""
    out = {}
    for k, v in (metrics or {}).items():
        v = as_number(v)
        if not isinstance(k, str) or not isinstance(v, (int, float)):
            raise errors.InvalidArgumentError(
                f"metrics[{k!r:.80}] = {v!r:.80} ({type(v).__name__}): a metric is a number "
                "(int, float, a 0-d tensor or a numpy scalar) under a string name; nothing "
                "was written")
        out[k] = v
    return out


def plain_json(v: Any, where: str) -> Any:
    """`v` as what the manifest can hold (dicts with string keys, lists, strings, numbers
    incl. non-finite ones, bools, None; 0-d tensors and numpy scalars converted), or
    InvalidArgumentError naming where it is not."""
    v = as_number(v)
    if v is None or isinstance(v, (str, int, float)):
        return v
    if isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            raise errors.InvalidArgumentError(f"{where} has a key that is not a string; "
                                              "nothing was written")
        return {k: plain_json(x, f"{where}[{k!r}]") for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain_json(x, f"{where}[{i}]") for i, x in enumerate(v)]
    raise errors.InvalidArgumentError(
        f"{where} = {v!r:.80} ({type(v).__name__}) cannot be stored in the manifest (JSON "
        "values, 0-d tensors and numpy scalars can); nothing was written")


def _begin(store: storage.Storage, target: Path, overwrite: bool) -> "Begun":
    """Rank 0: the staging directory, or the error that every rank raises (the target
    exists, say)."""
    try:
        return Begun(str(store.begin(target, overwrite)), None)
    except DckptError as e:
        return Begun(None, (type(e).__name__, str(e), getattr(e, "path", None)))


def _rebuilt(name: str, message: str, path: str | None) -> DckptError:
    """Rank 0's begin error, of its type and with its path, on every rank."""
    cls = getattr(errors, name, DckptError)
    if path is not None and issubclass(cls, (errors.StorageError, errors.ManifestError)):
        return cls(message, path)
    return cls(message)


def _exchange(value, failure: Exception | None, phase: str, store: storage.Storage,
              tmp: Path | None, target: Path, group) -> list:
    """All ranks' `value`s; if any rank failed (or one never arrives), rank 0 removes the
    staging directory (if it made one) and every rank raises: its own error, or one naming
    the failed rank."""
    r = dist.rank(group)
    # JSON only where it travels: a single process keeps the typed objects as they are.
    msg = {"rank": r, "value": _wire(value) if dist.active(group) else value}
    if failure is not None:
        msg = {"rank": r, "error": f"{type(failure).__name__}: {failure}"}
    try:
        gathered = dist.all_gather_json(msg, group, what=f"save {phase} of {target}")
    except DistributedError:
        if r == 0 and tmp is not None:
            store.abort(tmp)
        raise
    failed = [g for g in gathered if "error" in g]
    if not failed:
        return [g["value"] for g in gathered]
    if r == 0 and tmp is not None:
        store.abort(tmp)
    dist.barrier(group, what=f"save abort of {target}")
    if failure is not None:
        raise failure
    raise DistributedError(f"save to {target} aborted: rank {failed[0]['rank']} failed "
                           f"({phase}): {failed[0]['error']}", failed[0]["rank"])


def _wire(value):
    """The one place the typed plan objects become JSON (for the exchanges)."""
    if hasattr(value, "to_json"):
        return value.to_json()
    if isinstance(value, (list, tuple)):
        return [_wire(v) for v in value]
    if isinstance(value, dict):
        return {k: _wire(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Begun:
    """Rank 0's storage.begin, for the "plan" exchange: the staging location, or the error
    every rank raises instead (its type name, message and path)."""
    staging: str | None
    error: tuple[str, str, str | None] | None

    def to_json(self) -> dict:
        return {"staging": self.staging, "error": None if self.error is None else list(self.error)}

    @classmethod
    def of(cls, v: "Begun | dict") -> "Begun":
        if isinstance(v, Begun):
            return v
        return cls(v["staging"], None if v["error"] is None else tuple(v["error"]))


@dataclass(frozen=True)
class WriteReport:
    """What one rank wrote, for the manifest: its files (FileEntry JSON), its tensors'
    records (manifest JSON, chunk file indices into its own files), tree aliases, the
    incremental statistics, its state tree, per-rank extras and its count of views."""
    files: list[dict]
    tensors: dict[str, dict]
    aliases: dict[str, str]
    stats: dict | None
    tree: Any
    extra: Any
    views: int
    # A single process's records as manifest TensorEntries already (then `tensors` is
    # empty): never sent, so _build_manifest takes them as they are.
    entries: dict[str, TensorEntry] | None = None

    def to_json(self) -> dict:
        return {"files": self.files, "tensors": self.tensors, "aliases": self.aliases,
                incremental.META_KEY: self.stats, "tree": self.tree, "extra": self.extra,
                "views": self.views}

    @classmethod
    def of(cls, v: "WriteReport | dict") -> "WriteReport":
        if isinstance(v, WriteReport):
            return v
        return cls(v["files"], v["tensors"], v["aliases"], v[incremental.META_KEY], v["tree"],
                   v["extra"], v["views"])


def _write_rank(store: storage.Storage, tmp: Path, snap: Snapshot, plan: sharding.WritePlan,
                opts: io.WriteOptions, mode: io.Background, r: int,
                base: incremental.Base | None, syncs: commit.Syncs,
                wire: bool = True) -> WriteReport:
    """Write the tensors the plan gives this rank into its data file(s), their fsyncs left
    running in `syncs`; returns its part of the manifest. wire: its records as
    JSON values, to send or to write as a record file; else (a single process, no
    placements to index) as the manifest's TensorEntries."""
    flat = snap.flat
    leaves = [flat.leaves[i] for _, i in plan.writes]
    names = [name for name, _ in plan.writes]
    fname = rank_file(r)
    files, chunks, stats = [], [], None
    if leaves and base is not None:
        chunks, files, stats = incremental.write_rank(base, tmp, fname, r, leaves, names, opts,
                                                      sharding.contiguous_cpu, store, mode,
                                                      syncs)
    elif leaves:
        values = [sharding.contiguous_cpu(x.value) for x in leaves]
        parts = io.part_count(sum(v.nbytes for v in values), opts)
        fnames = [rank_file(r, p) for p in range(parts)]
        paths = [str(storage.join(tmp, n)) for n in fnames]
        chunks = store.write_files(paths, values, opts, mode, syncs)
        files = [FileEntry(n, store.size(p), r) for n, p in zip(fnames, paths)]
    tensors = {}
    placements = plan.placements
    if not wire and not placements:
        # cs: the writer's fresh list of Chunks for the leaf, as it is; or the base's own
        # list, when nothing of the leaf changed: then its base record is this save's too.
        prior = base.manifest_for(r).tensors if base is not None else {}
        entries = {}
        for leaf, name, cs in zip(leaves, names, chunks):
            t = prior.get(name)
            if t is not None and len(t.shards) == 1 and t.shards[0].chunks is cs and \
                    t.shards[0].rank == r and t.placement is None:
                entries[name] = t
            else:
                entries[name] = TensorEntry(leaf.dtype, leaf.global_shape,
                                            [Shard(leaf.offsets, list(leaf.value.shape), r, cs)],
                                            "numpy" if leaf.is_numpy else "torch")
        return WriteReport([f.to_json() for f in files], {}, plan.aliases, stats, snap.tree,
                           snap.rank_state, snap.flat.views, entries)
    for leaf, name, cs in zip(leaves, names, chunks):
        # cs: the writer's fresh list of Chunks (tuples: JSON lists on the wire), as it is.
        tensors[name] = {
            "kind": "numpy" if leaf.is_numpy else "torch", "dtype": leaf.dtype,
            "shape": leaf.global_shape, "placement": placements.get(name),
            "shards": [{"offsets": leaf.offsets, "shape": list(leaf.value.shape), "rank": r,
                        "chunks": cs}]}
    return WriteReport([f.to_json() for f in files], tensors, plan.aliases, stats, snap.tree,
                       snap.rank_state, snap.flat.views)


def _build_manifest(reports: list[WriteReport], world: int, counters, metrics, meta,
                    opts) -> Manifest:
    files, tensors, ranks, meshes = [], {}, [], []
    for rep in reports:
        first = len(files)  # a rank's chunks index its own file list
        files.extend(FileEntry(**f) for f in rep.files)
        if rep.entries is not None:  # a single process's records, made by _write_rank
            for name, t in rep.entries.items():
                shards = [Shard(x.offsets, x.shape, x.rank, _chunks(x.chunks, first))
                          for x in t.shards] if first else t.shards
                if name in tensors:
                    tensors[name].shards.extend(shards)
                else:
                    tensors[name] = t if first == 0 else t._replace(shards=shards)
        for name, t in rep.tensors.items():
            shards = [Shard(s["offsets"], s["shape"], s["rank"], _chunks(s["chunks"], first))
                      for s in t["shards"]]
            if name in tensors:
                tensors[name].shards.extend(shards)
            else:
                tensors[name] = TensorEntry(t["dtype"], t["shape"], shards, t["kind"],
                                            _index_mesh(t["placement"], meshes))
        ranks.append({"tree": rep.tree, "aliases": rep.aliases, **rep.extra})
    info = {"dckpt": __version__, "torch": str(torch.__version__), "numpy": np.__version__,
            "python": platform.python_version(), "compression": str(opts.compression),
            "chunk_size": opts.chunk_size}
    # Version 2 only where a tree holds $view nodes, which version-1 readers do not know.
    version = VIEWS_VERSION if any(rep.views for rep in reports) else 1
    return Manifest(world_size=world, files=files, tensors=tensors, ranks=ranks,
                    counters=counters or {}, metrics=metrics or {},
                    meta={"library": info, **(meta or {})}, meshes=meshes, version=version)


def _chunks(records: list, first: int) -> list[Chunk]:
    """A shard's chunk records (Chunks, or JSON lists from another rank) as Chunks whose
    file indices count from `first`, the rank's first file in the manifest."""
    if first == 0 and all(type(c) is Chunk for c in records):
        return list(records)  # the usual single-process save: already what it needs
    return [Chunk(first + c[0], *c[1:]) for c in records]


def _index_mesh(placement: dict | None, meshes: list[dict]) -> dict | None:
    """Store each distinct device mesh once in the manifest; placements name it by index."""
    if not placement or "mesh" not in placement:
        return placement
    if placement["mesh"] not in meshes:
        meshes.append(placement["mesh"])
    return {**placement, "mesh": meshes.index(placement["mesh"])}


def read_manifest(path: str | os.PathLike, storage_options: dict | None = None,
                  rank: int | None = None) -> Manifest:
    """Parse and validate the manifest of the checkpoint at `path` (the one reader,
    dckpt.format.manifest.read_manifest, with the native record check); `path` may be an
    object store URL (storage_options as for save).

    rank: read what rank `rank` needs to restore: of a split checkpoint (docs/FORMAT.md,
    version 3) the index and that rank's record file (rank 0's for a rank the save did not
    have); other records are read when a lookup needs them (dckpt/format/lookup.py). None:
    the whole manifest."""
    if rank is None:
        return records.read_manifest(path, storage_options=storage_options)
    return records.read_for_rank(path, rank, storage_options)


def read_index(path: str | os.PathLike, storage_options: dict | None = None) -> Manifest:
    """The job-wide values of the checkpoint at `path` (counters, metrics, meta, world
    size) without reading any rank's records: of a split checkpoint its index only (its
    tensors are the replicated ones; see read_manifest for the rest); a single manifest
    whole."""
    return records.read_manifest(path, ranks=[], storage_options=storage_options)


@gcpause.during
def load(path: str | os.PathLike, into: dict | None = None, *, keys: list[str] | None = None,
         verify: bool = True, threads: int = 0, allow_missing: bool | list[str] = False,
         strict: bool = True, group=None, manifest: Manifest | None = None,
         storage_options: dict | None = None, local_shards: bool = False):
    """Load the checkpoint at `path`.

    Without `into`: returns the state as plain values (tensors, arrays, state dicts); for a
    sharded checkpoint that is the full, consolidated state.
    With `into` (the live state dict): restores in place, reading straight into existing
    tensor memory and calling load_state_dict() on objects; returns a RestoreReport.
    keys: only these top-level components. manifest: the already parsed manifest of `path`.
    path may be an object store URL (storage_options as for save): chunks are read by
    parallel ranged requests straight into the live tensors, each checked by its hash.
    local_shards: the checkpoint is one rank's own copy of its state (a memory-tier part,
    written from local_snapshot()): live DTensors are read as their local tensors.
    Components the checkpoint holds that were not restored are named in RestoreReport.notes
    (and .not_restored). An optimizer or scheduler of another class than the one saved is
    refused (StateMismatchError) unless strict=False.

    In a distributed job each rank reads only what its live state holds: the blocks of its
    DTensors' shards, found by global offsets whatever world size saved them, and its own
    per-rank state. A rank the checkpoint did not have takes rank 0's per-rank state, which
    RestoreReport.notes says. No collectives: ranks may load independently.
    """
    r, world = dist.rank(group), dist.world_size(group)
    m = manifest or read_manifest(path, storage_options, rank=r)
    src = r if r < m.world_size else 0
    if m.split is not None:
        if m.ranks[src] is None:
            records.read_records(m, path, [src], storage_options)
        records.lazily(m, path, storage_options)  # other records on demand (no-op once all read)
    entry = m.ranks[src]
    tree = treecodec.decode(entry["tree"])
    aliases = entry.get("aliases", {})
    if keys is not None:
        if not isinstance(tree, dict):
            raise ValueError("keys= needs a checkpoint whose state is a dict")
        unknown = [k for k in keys if k not in tree]
        if unknown:
            raise KeyError(f"components {unknown} are not in the checkpoint {path} "
                           f"(it has {list(tree)})")
        if into is None:  # with into=, restore_into keeps to the live keys and reports the rest
            tree = {k: tree[k] for k in keys}
    live = None
    if into is not None:
        live = partitioned.adapt({k: into[k] for k in (keys if keys is not None else into)
                                  if k in into})
    if m.split is not None and (into is None or partitioned.has_parts(tree)):
        records.read_records(m, path)  # the whole state, or every rank's partition trees
    if partitioned.has_parts(tree):
        tree = partitioned.merge_parts(tree, [treecodec.decode(e["tree"]) for e in m.ranks],
                                       live)
    where = storage.location(path)
    store = storage.for_path(where, storage_options)
    reader = TensorReader(where, m, verify,
                          dist.threads_per_rank(threads, io.default_threads()) if
                          not storage.is_remote(where) else threads, store=store)
    if into is None:
        return materialize(tree, m, reader, aliases)
    partitioned.init_states(live)
    block_of = sharding.local_block_of if local_shards else sharding.block_of
    report = restore_into(live, tree, m, reader, allow_missing, block_of=block_of,
                          tensor_names=aliases, strict=strict)
    partitioned.write_back(into, live)
    report.components = {k: component_kind(into[k]) for k in report.components}
    if m.world_size != world:
        report.notes.append(
            f"saved by {m.world_size} rank(s), loaded on {world}: sharded and replicated "
            "tensors were read by global offsets; per-rank state (tree, rank-local tensors) "
            f"of rank {r} came from saved rank {src}")
    return report


__all__ = ["save", "load", "read_manifest", "read_index", "snapshot", "write", "Snapshot", "SaveResult",
           "RestoreReport", "Leaf"]

"""The memory tier: each save committed to node-local memory and copied to another node.

CheckpointManager(root, memory="/dev/shm/dckpt/exp1/{node}", replicas=1, durable_every=10)
commits every save under the memory path of this rank's node (a tmpfs path: it survives a
restart of the training processes, not of the node) and sends each rank's files to its
partner rank(s) on other nodes (dckpt.distributed.replicate), which keep them beside their
own node's parts; every durable_every-th save also goes to `root` as without the tier.

    <memory>/step-000000010/rank-00002-of-00004/   rank 2's own part of step 10
    <memory>/replicas/step-000000010/rank-00000-of-00004/   a copy of rank 0's part, kept
                                                    here for the node of rank 0

A part is a normal single-rank dckpt checkpoint (manifest.json written last, every chunk
hashed) of what the rank holds: its DTensor shards by their local shape, its ZeRO
partition, its RNG streams, its copy of replicated tensors (so that it can be restored
without any other rank). A step is in the memory tier when each rank's part is somewhere.

restore() takes the newest step that every rank can get from some tier and, per rank,
tries its sources fastest first: its own node's part, the partner's replica (sent back over
the process group), the durable checkpoint under `root`, the same checkpoint in the remote
tier (remote=). Every source is read by the verified read path, so a missing or corrupt
copy (a flipped bit in a replica) falls through to the next one; a step that no source
completes falls back to an older step as restore() always did.
The report says per rank where its bytes came from and how long that took, with the
time of each phase (report.sources[rank]["phases"]: agreeing on the step, the replica
transfer, the verified read, keeping a fetched replica), as wall and CPU seconds of the
rank's process (every thread of it: gloo's and the native reader's too).

Parts name the world size they were saved by. After a change of world size, a step whose
every part is still on some node is restored from them, resharded (memory_reshard.py);
otherwise the durable tier serves (it reshards too). Retention removes the parts of other
world sizes once the node holds `keep` newer steps.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..distributed import collective as dist, replicate
from ..engine import checkpoint
from ..errors import (CheckpointNotFoundError, DckptError, DistributedError,
                      InvalidArgumentError, StateMismatchError)
from ..format.layout import is_committed, is_set_aside, parse_step_dir, staging_dir, step_dir
from ..storage import local as io
from . import memory_reshard as reshard
from .async_save import commit_group
from .memory_reshard import REPLICAS

log = logging.getLogger("dckpt")

MEMORY, REPLICA, DURABLE, REMOTE = "memory", "replica", "durable", "remote"


def part_name(rank: int, world: int) -> str:
    return f"rank-{rank:05d}-of-{world:05d}"


class Phases:
    """Wall and CPU seconds of a restore's phases on this rank (CPU: the whole process)."""

    def __init__(self):
        self.spent: dict[str, list[float]] = {}
        self._at = (time.perf_counter(), time.process_time())

    def mark(self, name: str) -> None:
        """What was spent since the last mark goes to `name`."""
        now = (time.perf_counter(), time.process_time())
        got = self.spent.setdefault(name, [0.0, 0.0])
        got[0] += now[0] - self._at[0]
        got[1] += now[1] - self._at[1]
        self._at = now

    def json(self) -> dict:
        return {k: {"wall": round(w, 6), "cpu": round(c, 6)} for k, (w, c) in self.spent.items()}


@dataclass(frozen=True)
class Source:
    """One place a rank's bytes of a step can come from."""
    tier: str  # MEMORY | REPLICA | DURABLE
    holder: int | None = None  # REPLICA: the rank that keeps the copy


class MemoryTier:
    """The memory tier of one CheckpointManager on this rank. Made collectively (inside the
    manager's constructor): the ranks exchange their nodes to pick partners."""

    def __init__(self, memory: str | os.PathLike, *, replicas: int = 1,
                 durable_every: int = 10, node: str | None = None, keep: int = 2, group=None):
        for name, v, low in (("replicas", replicas, 0), ("durable_every", durable_every, 1),
                             ("memory_keep", keep, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise InvalidArgumentError(f"{name} must be an int >= {low}, not {v!r}")
        self.node = replicate.node_id(node)
        self.dir = Path(str(memory).replace("{node}", self.node))
        self.replicas, self.durable_every, self.keep = replicas, durable_every, keep
        self.group = group
        self.rank, self.world = dist.rank(group), dist.world_size(group)
        self.notes: list[str] = []
        self._saves = 0
        failure = None
        try:
            (self.dir / REPLICAS).mkdir(parents=True, exist_ok=True)
        except Exception as e:
            failure = e
        self.nodes = dist.exchange(self.node, failure, group, f"memory tier {self.dir}: nodes")
        self.partners = replicate.partners(self.nodes, replicas)
        self.sources = replicate.holders_of(self.partners, self.rank)  # whose copies I keep
        if replicas and len(set(self.nodes)) == 1:
            self.notes.append(f"all {self.world} rank(s) run on node {self.node!r}: the memory "
                              "tier is not replicated (losing this node loses it; the "
                              "durable tier remains)")
            log.warning("dckpt: %s", self.notes[-1])
        # Every rank makes both groups in the same order (the p2p one is collective).
        self.p2p = commit_group(group)
        self.solo = replicate.solo_group(group)
        try:
            self._remove_debris()
        except OSError as e:  # after the last exchange: never this rank's error alone
            log.warning("dckpt: could not clear staging debris under %s: %s", self.dir, e)

    # ---- where parts live ----------------------------------------------------------------
    def part(self, step: int, rank: int | None = None) -> Path:
        r = self.rank if rank is None else rank
        return self.dir / step_dir(step) / part_name(r, self.world)

    def replica(self, step: int, rank: int) -> Path:
        return self.dir / REPLICAS / step_dir(step) / part_name(rank, self.world)

    def _steps(self, base: Path, rank: int) -> list[int]:
        """Steps with a committed part of `rank` (this world size) under `base`, oldest first."""
        name, out = part_name(rank, self.world), []
        if base.is_dir():
            for p in base.iterdir():
                s = parse_step_dir(p.name)
                if s is not None and is_committed(p / name):
                    out.append(s)
        return sorted(out)

    def own_steps(self) -> list[int]:
        return self._steps(self.dir, self.rank)

    def replica_steps(self, rank: int) -> list[int]:
        return self._steps(self.dir / REPLICAS, rank)

    def newest(self) -> int | None:
        """The newest step this rank holds a part of (its own or a replica)."""
        steps = self.own_steps() + [s for q in self.sources for s in self.replica_steps(q)]
        other = reshard.newest(self)  # a step of another world size (restore reshards it)
        steps += [other] if other is not None else []
        return max(steps) if steps else None

    # ---- save ----------------------------------------------------------------------------
    def durable_due(self, asked: bool | None = None) -> bool:
        """Whether this save also goes to the durable root: every durable_every-th save of
        this manager, or as `asked` (a preemption save always is)."""
        self._saves += 1
        return asked if asked is not None else self._saves % self.durable_every == 0

    def save(self, step: int, snap, ctr: dict, metrics: dict, group, threads: int,
             mode: io.Background = io.FOREGROUND):
        """Commit this rank's part of `step`, send it to the partners and keep theirs, then
        apply the tier's retention. Collective over `group` (inside the caller's operation).
        Returns (the snapshot taken, this rank's SaveResult), the snapshot for the durable
        write of the same step."""
        failure = result = None
        own = self.part(step)
        try:
            snap = snap() if callable(snap) else snap
            own.parent.mkdir(parents=True, exist_ok=True)
            # tmpfs: fsync would cost a syscall per file and protect nothing.
            # The shards' global places: what a restore at another world size needs.
            result = checkpoint.write(
                checkpoint.local_snapshot(snap), own, counters=ctr, metrics=metrics,
                overwrite=True, group=self.solo, fsync=False, threads=threads, mode=mode,
                meta={reshard.META: {"rank": self.rank, "world": self.world,
                                     "node": self.node,
                                     "shards": reshard.shard_geometry(snap.flat.leaves)}})
        except Exception as e:
            failure = e
        what = f"memory tier save of step {step}"
        received = replicate.transfer({p: own for p in self.partners[self.rank]},
                                      lambda src: staging_dir(self.replica(step, src)), group,
                                      self.p2p, f"{what}: replication", failure)
        failure = None
        try:
            for src, got in received.items():
                if isinstance(got, str):
                    raise CheckpointNotFoundError(f"rank {src} sent no part: {got}")
                _commit_dir(got, self.replica(step, src))
        except Exception as e:
            failure = e
            for got in received.values():
                if isinstance(got, Path):
                    shutil.rmtree(got, ignore_errors=True)
        dist.raise_if_any_failed(failure, group, f"{what}: replicas")
        # Only now: until every replica of `step` is in, the older steps are the ones a
        # lost node can come back from.
        self._retain()
        return snap, result

    def _retain(self) -> None:
        """Keep the newest `keep` steps of this rank's part and of the replicas it holds.
        A failure to delete is logged, never raised: the save is committed."""
        for base, rank in [(self.dir, self.rank), *((self.dir / REPLICAS, q)
                                                     for q in self.sources)]:
            for s in self._steps(base, rank)[:-self.keep]:
                _remove(base / step_dir(s) / part_name(rank, self.world))
        try:  # parts an earlier job of another world size left on this node
            reshard.retire(self, _remove)
        except OSError as e:
            log.warning("dckpt: could not clear parts of other world sizes under %s: %s",
                        self.dir, e)

    def _remove_debris(self) -> None:
        """Staging directories of this rank's parts and of the replicas it receives, left by
        a process killed while writing them."""
        mine = [(self.dir, self.rank), *((self.dir / REPLICAS, q) for q in self.sources)]
        for base, rank in mine:
            prefix = "." + part_name(rank, self.world)
            for step in (base.iterdir() if base.is_dir() else []):
                if parse_step_dir(step.name) is None or not step.is_dir():
                    continue
                for p in step.iterdir():
                    if p.name.startswith(prefix) and p.name != prefix:
                        shutil.rmtree(p, ignore_errors=True)
        reshard.remove_debris(self)

    # ---- restore -------------------------------------------------------------------------
    def restore(self, mgr, state: dict, step: int | None, *, allow_missing, keys,
                restore_rng: bool, strict: bool, t0: float):
        """CheckpointManager.restore with the memory tier (see the module docstring)."""
        from . import manager as m  # manager.py imports this module
        group, r = mgr.group, self.rank
        phases = Phases()
        failure = mine = None
        try:
            durable = remote = None
            if r == 0:
                durable = [s for s in mgr.steps() if not is_set_aside(mgr.path(s))]
                remote = _remote_steps(mgr)
            mine = {"own": self.own_steps(), "durable": durable, "remote": remote,
                    "asked": step, "others": reshard.listing(self),
                    "saved": reshard.saved_at(self),
                    "held": {str(q): self.replica_steps(q) for q in self.sources}}
        except Exception as e:
            failure = e
        info = dist.exchange(mine, failure, group, f"restore from {self.dir}: tiers")
        asked = sorted({x["asked"] for x in info if x["asked"] is not None})
        if len(asked) > 1 or (asked and any(x["asked"] is None for x in info)):
            raise StateMismatchError([f"ranks asked to restore different steps: {asked}"])
        plans = self._plans(info)
        resized = reshard.candidates(info)  # step -> the other world size that saved it
        # Newest first. Of one step: this world size's parts (a save since the resize),
        # else the parts of another world size before the durable tier (both reshard;
        # memory is the faster); of two saves of the step in memory, the later first.
        order = []
        for s in sorted(set(plans) | set(resized), reverse=True):
            if step not in (None, s):
                continue
            ours_first = _in_memory(info, s) and (
                s not in resized or reshard.newest_save(info, self.world, s)
                >= reshard.newest_save(info, resized[s], s))
            ways = [None, resized.get(s)] if ours_first else [resized.get(s), None]
            order += [(s, w) for w in ways if (w is None and s in plans) or
                      (w is not None and w == resized.get(s))]
        if not order:
            what = f"step {step}" if step is not None else "committed checkpoint"
            raise CheckpointNotFoundError(
                f"no {what} that every rank can restore: not in the memory tier "
                f"{self.dir} (of all nodes) nor under {mgr.root}"
                + (f" nor under {mgr._remote.url}" if mgr._remote is not None else ""))
        kw = dict(restore_rng=restore_rng, allow_missing=allow_missing, keys=keys,
                  strict=strict, verify=mgr.verify, threads=mgr.threads)
        skipped: list[str] = []
        phases.mark("agree")
        for i, (s, world) in enumerate(order):
            if world is None:
                attempt, records, notes, bad = self._restore_step(mgr, state, s, plans[s], kw,
                                                                  phases)
            else:
                attempt, records, notes, bad = reshard.restore_step(self, mgr, state, s, world,
                                                                    info, kw, phases)
            if not bad:
                break
            if i + 1 < len(order) and all(h[2] for _, h in bad):
                where = f" from the {world}-rank save's memory tier" if world else ""
                skipped.append(f"step {s}{where} could not be restored (rank {bad[0][0]}: "
                               f"{bad[0][1][1].splitlines()[0]})")
                log.warning("dckpt: %s; falling back to step %d", skipped[-1], order[i + 1][0])
                continue
            mine_bad = dict(bad).get(r)
            if mine_bad is not None and attempt is not None and attempt.failure is not None:
                raise attempt.failure
            raise DistributedError(f"restore of step {s}: rank {bad[0][0]} failed: "
                                   f"{bad[0][1][1]}", bad[0][0])
        if skipped:
            notes.insert(0, f"fell back to step {s}, the newest intact checkpoint: "
                         + "; ".join(skipped) + f". Everything restored comes from step {s}")
        c = attempt.manifest.counters
        out = m.resumed(attempt, s, rank=r, restore_rng=restore_rng, epoch=c.get("epoch"),
                        step_in_epoch=c.get("step_in_epoch"), notes=self.notes + notes)
        out.sources = records
        out.seconds = time.perf_counter() - t0
        log.info("dckpt: %s", out.summary())
        return out

    def _plans(self, info: list[dict]) -> dict[int, list[list[Source]]]:
        """step -> per rank its sources, fastest first; only steps every rank can get."""
        durable = set(info[0]["durable"] or [])
        remote = set(info[0].get("remote") or [])
        steps = durable | remote
        for x in info:
            steps.update(x["own"])
            for held in x["held"].values():
                steps.update(held)
        plans = {}
        for s in steps:
            per_rank = []
            for q in range(self.world):
                src = [Source(MEMORY)] if s in info[q]["own"] else []
                src += [Source(REPLICA, h) for h in self.partners[q]
                        if s in info[h]["held"].get(str(q), [])]
                src += [Source(DURABLE)] if s in durable else []
                src += [Source(REMOTE)] if s in remote else []
                per_rank.append(src)
            if all(per_rank):
                plans[s] = per_rank
        return plans

    def _restore_step(self, mgr, state, s: int, sources: list[list[Source]], kw: dict,
                      phases: Phases):
        """Restore step `s` on every rank, in rounds: in round i each rank not yet restored
        tries its i-th source (replicas are sent by their holders within the round), then
        the ranks exchange how it went. Returns (this rank's last Attempt, per-rank
        records, notes on copies that failed, [(rank, hit)] of ranks that got nowhere)."""
        from . import manager as m
        group, r = mgr.group, self.rank
        done = [False] * self.world
        given_up: set[int] = set()  # a failure no other copy can cure (a mismatching state)
        records: dict[int, dict] = {}
        notes: list[str] = []
        last: dict[int, list] = {}
        attempt = None
        start = time.perf_counter()
        for i in range(max(len(x) for x in sources)):
            tries = {q: sources[q][i] for q in range(self.world)
                     if not done[q] and q not in given_up and i < len(sources[q])}
            if not tries:
                break
            t = time.perf_counter()
            got = None
            fetch = {q: src.holder for q, src in tries.items() if src.tier == REPLICA}
            if fetch:  # the same on every rank: every rank takes part in the transfer
                outgoing = {}
                for q, h in fetch.items():
                    if h == r:
                        p = self.replica(s, q)
                        outgoing[q] = p if is_committed(p) else f"{p} is gone"
                received = replicate.transfer(outgoing, lambda src: staging_dir(self.part(s)),
                                              group, self.p2p, f"restore of step {s}: replicas")
                got = received.get(fetch.get(r, -1))
                phases.mark("transfer")
            hit = None
            if r in tries:
                src = tries[r]
                attempt = self._try(mgr, state, s, src, got, kw, m, phases)
                if attempt.failure is None:
                    hit = [True, self._describe(src, mgr, s), False, False,
                           {"tier": src.tier, "from": self._describe(src, mgr, s),
                            "seconds": time.perf_counter() - t,
                            "since_start": time.perf_counter() - start,
                            "bytes": attempt.report.bytes, "phases": phases.json()}]
                else:
                    e = attempt.failure
                    hit = [False, f"{type(e).__name__}: {e}", m._damaged(e),
                           getattr(e, "live_state_changed", False), self._describe(src, mgr, s)]
            hits = dist.all_gather_json(hit, group, f"restore of step {s}: round {i}")
            phases.mark("agree")
            for q, h in enumerate(hits):
                if h is None:
                    continue
                if h[0]:
                    done[q], records[q] = True, h[4]
                else:
                    last[q] = h
                    if not h[2]:
                        given_up.add(q)
                    notes.append(f"rank {q}: step {s} from {h[4]} failed "
                                 f"({h[1].splitlines()[0]})")
        bad = [(q, last[q]) for q in range(self.world) if not done[q]]
        return attempt, records, notes, bad

    def _describe(self, src: Source, mgr, s: int) -> str:
        if src.tier == MEMORY:
            return f"memory of node {self.node}"
        if src.tier == REPLICA:
            return f"replica on rank {src.holder} (node {self.nodes[src.holder]})"
        if src.tier == REMOTE:
            return f"remote {mgr._remote.step_url(s)}"
        return f"durable {mgr.path(s)}"

    def _try(self, mgr, state, s: int, src: Source, got, kw: dict, m, phases: Phases):
        """Load this rank's bytes of step `s` from `src` (verified): an Attempt."""
        try:
            return self._load(mgr, state, s, src, got, kw, m, phases)
        finally:
            phases.mark("read")  # the replica path marks its own phases: then ~0 here

    def _load(self, mgr, state, s: int, src: Source, got, kw: dict, m, phases: Phases):
        if src.tier == DURABLE:
            return m.load_step(state, mgr.path(s), rank=self.rank, group=mgr.group, **kw)
        if src.tier == REMOTE:  # the same checkpoint's objects, each chunk hash-checked
            return m.load_step(state, mgr._remote.step_url(s), rank=self.rank,
                               group=mgr.group, storage_options=mgr._remote.storage_options,
                               **kw)
        if src.tier == MEMORY:
            return m.load_step(state, self.part(s), rank=0, group=self.solo,
                               local_shards=True, **kw)
        # A replica: the holder's bytes, staged beside this node's parts and read verified;
        # kept as this node's part of the step once intact (the node is whole again).
        if not isinstance(got, Path):
            a = m.Attempt(self.part(s))
            a.failure = CheckpointNotFoundError(
                f"replica of rank {self.rank}'s part of step {s} on rank {src.holder}: "
                f"{got or 'nothing was sent'}")
            return a
        a = m.load_step(state, got, rank=0, group=self.solo, local_shards=True, **kw)
        phases.mark("read")
        if a.failure is None:
            try:
                _commit_dir(got, self.part(s))
                a.path = self.part(s)
                phases.mark("keep")
                return a
            except OSError as e:
                log.warning("dckpt: restored step %d from a replica, but could not keep it "
                            "as %s: %s", s, self.part(s), e)
        shutil.rmtree(got, ignore_errors=True)
        phases.mark("keep")
        return a


def _in_memory(info: list[dict], s: int) -> bool:
    """Whether some rank holds a part of step `s` of this world size (own or replica)."""
    return any(s in x["own"] or any(s in h for h in x["held"].values()) for x in info)


def _remote_steps(mgr) -> list[int]:
    """The remote tier's committed steps; none (with a warning) when it cannot be listed."""
    if mgr._remote is None:
        return []
    try:
        return mgr._remote.steps()
    except DckptError as e:
        log.warning("dckpt: the remote tier %s cannot be listed (%s); restoring without it",
                    mgr._remote.url, e)
        return []


def _commit_dir(staged: Path, target: Path) -> None:
    """Put a received part in place: renamed (the files, manifest among them, are complete
    once the transfer returned); an older directory of that name is removed first."""
    if target.exists():
        _remove(target)
    os.rename(staged, target)


def _remove(path: Path) -> None:
    """Remove a part: renamed aside first, so a crash mid-delete leaves debris that is
    recognized as such, never a half-deleted part that looks committed."""
    trash = staging_dir(path)
    try:
        os.rename(path, trash)
    except OSError as e:
        log.warning("dckpt: could not remove %s from the memory tier: %s", path, e)
        return
    shutil.rmtree(trash, ignore_errors=True)
    try:
        path.parent.rmdir()  # the step's directory, once its last part is gone
    except OSError:
        pass

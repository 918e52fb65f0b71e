"""Restoring a memory-tier step saved at another world size, and retiring such parts.

A job restarted at another world size finds on its surviving nodes the parts the old job
left: `<memory>/step-N/rank-q-of-W/` (own parts of the old ranks that ran there) and
`<memory>/replicas/step-N/rank-q-of-W/` (the copies those nodes kept for their partners).
When every part 0..W-1 of the old job's step N is on some node, that step is restored with
the resharding rules of any checkpoint (checkpoint.load: sharded tensors by global offsets,
per-rank state of new rank r from old rank r, or old rank 0 for a new rank):

1. Every node that lacks some part gets it from a node that holds it (replicate.transfer,
   in rounds of one part per pair of ranks; received parts are kept under `replicas/`
   like any copy, retention removes them).
2. Each rank reads the manifests of the W parts on its node (each validated and checked
   by its self hash) and joins them into one W-rank manifest in memory (assemble): a
   DTensor's shards are placed by the global shape and offsets its part records in
   `meta.memory_tier.shards` (a part stores each shard by its local shape); a plain tensor
   that every part holds alike (same raw chunk hashes) is kept once, one that differs is
   named per old rank and the rank's tree maps to it. The files stay where they are
   (FileEntry.dir, relative to the memory directory).
3. The normal verified read restores the live state from it: every chunk read is checked
   by its hash, exactly as for a durable checkpoint.

A step that cannot be completed this way (a part missing everywhere, or damaged) is given
up for the next candidate, usually the durable tier, as for any other source.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path

from ..distributed import collective as dist, replicate
from ..distributed.sharding import DTensorLeaf
from ..engine import checkpoint
from ..errors import DckptError, IncompleteCheckpointError, ManifestError
from ..format.layout import (TMP_MARK, is_committed, is_staging, parse_step_dir, staging_dir,
                             step_dir)
from ..format.manifest import FileEntry, Manifest, Shard, TensorEntry
from ..storage import records

log = logging.getLogger("dckpt")

REPLICAS = "replicas"  # under the memory path: the copies a node keeps for its partners
_PART = re.compile(r"^rank-(\d{5})-of-(\d{5})$")
META = "memory_tier"


def parse_part_name(name: str) -> tuple[int, int] | None:
    """(rank, world) of a part directory's name, or None."""
    m = _PART.match(name)
    if not m:
        return None
    rank, world = int(m.group(1)), int(m.group(2))
    return (rank, world) if 0 <= rank < world else None


def shard_geometry(leaves) -> dict[str, list[list[int]]]:
    """What a part must record to be resharded: per DTensor leaf, its global shape and the
    offsets of its local block (the part itself stores the block by its local shape)."""
    return {x.name: [list(x.global_shape), list(x.offsets)]
            for x in leaves if isinstance(x, DTensorLeaf)}


# ---- what a node holds -----------------------------------------------------------------------
def _parts(tier, all_worlds: bool = False):
    """(world, step, rank, path) of every committed part on this node (replicas first): of
    the world sizes other than the current one, or of all."""
    for base in (tier.dir / REPLICAS, tier.dir):
        if not base.is_dir():
            continue
        for d in base.iterdir():
            s = parse_step_dir(d.name)
            if s is None:
                continue
            try:
                inside = list(d.iterdir())
            except (FileNotFoundError, NotADirectoryError):  # removed by retention meanwhile
                continue
            for p in inside:
                rw = parse_part_name(p.name)
                if rw is not None and (all_worlds or rw[1] != tier.world) and is_committed(p):
                    yield rw[1], s, rw[0], p


def located(tier) -> dict[tuple[int, int, int], Path]:
    """(world, step, rank) -> the committed part on this node, of every world size but the
    current one; a node's own part before a replica of it."""
    return {(w, s, q): p for w, s, q, p in _parts(tier)}


def listing(tier) -> dict[str, dict[str, list[int]]]:
    """located() for the restore's exchange: {world: {step: [ranks]}}."""
    out: dict[str, dict[str, list[int]]] = {}
    for w, s, q in sorted(located(tier)):
        out.setdefault(str(w), {}).setdefault(str(s), []).append(q)
    return out


def saved_at(tier) -> dict[str, float]:
    """"world/step" -> when the newest part of that save on this node was written (its
    manifest's `created`), for every world size, this one too: of two saves of one step
    (a job that resumed from an older step and saved it again at another size), the later
    is the one to restore."""
    out: dict[str, float] = {}
    for w, s, _, p in _parts(tier, all_worlds=True):
        t = _created(p)
        if t is not None and t > out.get(f"{w}/{s}", float("-inf")):
            out[f"{w}/{s}"] = t
    return out


def _created(part: Path) -> float | None:
    """The part's manifest's `created`, read by the validating reader; None when it is
    unreadable (its restore says why)."""
    try:
        return float(checkpoint.read_index(part).created)
    except (DckptError, OSError, TypeError, ValueError):
        return None


def newest_save(info: list[dict], world: int, s: int) -> float:
    """When the newest part of the `world`-rank save of step `s` was written, over every
    node's report (-inf when none says)."""
    return max((x.get("saved", {}).get(f"{world}/{s}", float("-inf")) for x in info),
               default=float("-inf"))


def candidates(info: list[dict]) -> dict[int, int]:
    """step -> the other world size whose every part is on some node, from every rank's
    listing; of two such, the later save (then the larger world)."""
    held: dict[tuple[int, int], set[int]] = {}
    for x in info:
        for w, steps in (x.get("others") or {}).items():
            for s, ranks in steps.items():
                held.setdefault((int(w), int(s)), set()).update(ranks)
    best: dict[int, tuple[float, int]] = {}
    for (w, s), ranks in sorted(held.items()):
        if ranks == set(range(w)):
            best[s] = max((newest_save(info, w, s), w), best.get(s, (float("-inf"), 0)))
    return {s: w for s, (_, w) in best.items()}


def newest(tier) -> int | None:
    """The newest step of another world size this node holds any part of."""
    steps = [s for _, s, _ in located(tier)]
    return max(steps) if steps else None


# ---- retention -------------------------------------------------------------------------------
def retire(tier, remove) -> None:
    """Remove parts of other world sizes from this node once the node holds `keep` newer
    steps (of any world size): memory_keep bounds what the tier holds across a resize.
    Run by the node's lowest rank only (the parts belong to no current rank)."""
    if tier.rank != min(q for q, n in enumerate(tier.nodes) if n == tier.node):
        return
    old = list(_parts(tier))
    if not old:
        return
    window = set(sorted({s for _, s, _, _ in _parts(tier, all_worlds=True)})[-tier.keep:])
    for w, s, q, path in old:
        if s not in window:
            remove(path)


def remove_debris(tier) -> None:
    """Staging directories of parts of other world sizes (a fetch interrupted by a crash).
    The node's lowest rank only, as retire()."""
    if tier.rank != min(q for q, n in enumerate(tier.nodes) if n == tier.node):
        return
    for base in (tier.dir, tier.dir / REPLICAS):
        for d in (base.iterdir() if base.is_dir() else []):
            if parse_step_dir(d.name) is None or not d.is_dir():
                continue
            for p in d.iterdir():
                if is_staging(p.name):
                    rw = parse_part_name(p.name[1:].partition(TMP_MARK)[0])
                    if rw is not None and rw[1] != tier.world:
                        shutil.rmtree(p, ignore_errors=True)


# ---- joining the parts -----------------------------------------------------------------------
def _geometry(m: Manifest, path: Path, q: int, world: int) -> dict[str, tuple[list, list]]:
    """The part's own account of itself, validated: which old rank, and its shard places."""
    mt = m.meta.get(META) if isinstance(m.meta, dict) else None
    if not isinstance(mt, dict) or mt.get("rank") != q or mt.get("world") != world:
        raise ManifestError(f"{path}: not rank {q}'s part of a {world}-rank save (its meta "
                            f"says {mt and {k: mt.get(k) for k in ('rank', 'world')}})",
                            str(path), "meta")
    shards = mt.get("shards")
    if shards is None:  # a part of an earlier version: its DTensors' places are unknown
        raise ManifestError(f"{path}: the part does not record its shards' places "
                            f"(meta.{META}.shards): it cannot be resharded", str(path), "meta")
    if not isinstance(shards, dict):
        raise ManifestError(f"{path}: meta.{META}.shards is not a mapping", str(path), "meta")
    out = {}
    for name, g in shards.items():
        e = m.tensors.get(name)
        ok = (e is not None and isinstance(g, list) and len(g) == 2
              and all(isinstance(v, list) and len(v) == len(e.shape)
                      and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                              for i in v) for v in g)
              and all(o + n <= G for G, o, n in zip(g[0], g[1], e.shape)))
        if not ok:
            raise ManifestError(f"{path}: tensor {name!r}: shard place {g!r:.200} does not fit "
                                "its stored block", str(path), "meta")
        out[name] = (g[0], g[1])
    return out


def assemble(parts: list[tuple[int, Path, Manifest]], base: Path, world: int) -> Manifest:
    """One `world`-rank manifest of the parts [(old rank, directory, its manifest)] (every
    old rank once, in order); its files are found relative to base.parent."""
    files: list[FileEntry] = []
    tensors: dict[str, TensorEntry] = {}
    alike: dict[str, tuple] = {}  # plain tensor -> what its first copy holds
    ranks: list[dict] = []
    first = parts[0][2]
    for q, path, m in parts:
        if m.world_size != 1 or len(m.ranks) != 1 or (m.split and not m.split.complete):
            raise ManifestError(f"{path}: a memory-tier part is a single-rank checkpoint",
                                str(path), "world_size")
        if m.counters != first.counters:
            raise IncompleteCheckpointError(
                f"{path}: rank {q}'s part of the step has other counters than rank "
                f"{parts[0][0]}'s: parts of different saves", str(path))
        geometry = _geometry(m, path, q, world)
        rel = os.path.relpath(path, base.parent)
        shift = len(files)
        for f in m.files:
            if f.dir is not None:
                raise ManifestError(f"{path}: file {f.name} lies in another checkpoint",
                                    str(path), "files")
            files.append(FileEntry(f.name, f.size, q, rel))
        renamed: dict[str, str] = {}
        for name, e in m.tensors.items():
            if len(e.shards) != 1:
                raise ManifestError(f"{path}: tensor {name!r} has {len(e.shards)} blocks",
                                    str(path), "tensors")
            chunks = [c._replace(file=c.file + shift) for c in e.shards[0].chunks]
            if name in geometry:
                gshape, offsets = geometry[name]
                have = tensors.get(name)
                if have is None:
                    tensors[name] = TensorEntry(e.dtype, list(gshape), [], e.kind)
                elif (have.dtype, have.shape, have.kind) != (e.dtype, list(gshape), e.kind) \
                        or name in alike:
                    raise ManifestError(f"{path}: tensor {name!r} is {e.dtype}{gshape} here, "
                                        f"{have.dtype}{have.shape} in another part",
                                        str(path), "tensors")
                if any(s.offsets == offsets and s.shape == e.shape
                       for s in tensors[name].shards):
                    continue  # a block several old ranks held (Replicate): read once
                tensors[name].shards.append(Shard(list(offsets), list(e.shape), q, chunks))
                continue
            holds = (e.dtype, e.kind, tuple(e.shape), tuple((c.raw, c.raw_hash) for c in chunks))
            if name not in tensors:
                alike[name] = holds
            elif alike.get(name) == holds:
                continue  # the same bytes as the first copy: a replicated tensor
            else:
                renamed[name] = name = _free(f"{name}@r{q}", tensors)
            tensors[name] = TensorEntry(e.dtype, list(e.shape),
                                        [Shard([0] * len(e.shape), list(e.shape), q, chunks)],
                                        e.kind, e.placement)
        entry = dict(m.ranks[0])
        own = dict(entry.get("aliases") or {})
        aliases = {t: renamed.get(n, n) for t, n in own.items()}
        aliases.update({n: new for n, new in renamed.items() if n not in own.values()})
        entry["aliases"] = aliases
        ranks.append(entry)
    joined = Manifest(world_size=world, files=files, tensors=tensors, ranks=ranks,
                      counters=first.counters, metrics=first.metrics, meta=first.meta,
                      created=first.created, version=max(m.version for _, _, m in parts))
    return _validated(joined, base)


def _validated(m: Manifest, base: Path) -> Manifest:
    """`m` through the reader's own validation, as if read from disk: shards inside their
    tensor, disjoint and tiling it (no element left unread), chunks inside their files and
    never sharing bytes, trees and aliases well formed. The files' directories (paths into
    the memory tier, which a manifest on disk may not name) are put back after."""
    dirs = [f.dir for f in m.files]
    for i, f in enumerate(m.files):
        f.dir = f"part-{i}"
    checked = records.parse(m.to_bytes(), str(base))
    for f, d in zip(checked.files, dirs):
        f.dir = d
    return checked


def _free(name: str, taken: dict) -> str:
    out, i = name, 0
    while out in taken:
        i += 1
        out = f"{name}.{i}"
    return out


# ---- the collective restore ------------------------------------------------------------------
def restore_step(tier, mgr, state, s: int, world: int, info: list[dict], kw: dict, phases):
    """Restore step `s` of the `world`-rank job from the parts on the nodes (see the module
    docstring). Collective over mgr.group. Returns what MemoryTier._restore_step returns:
    (this rank's Attempt, per-rank records, notes on copies that failed, [(rank, hit)] of
    ranks that failed)."""
    from . import manager as m
    group, r = mgr.group, tier.rank
    t = time.perf_counter()
    have: dict[str, set[int]] = {}  # node -> old ranks whose part of `s` it holds
    for x, got in enumerate(info):
        ranks = (got.get("others") or {}).get(str(world), {}).get(str(s), [])
        have.setdefault(tier.nodes[x], set()).update(ranks)
    fetched, fetch_failure = _fetch_missing(tier, s, world, have, group)
    phases.mark("transfer")
    # Every node's receivers have put their parts in place before any rank reads them.
    states = dist.all_gather_json(fetch_failure, group, f"restore of step {s}: parts fetched")
    phases.mark("agree")
    attempt = m.Attempt(tier.dir / step_dir(s))
    base = tier.dir / step_dir(s)
    try:
        if any(states):
            q = next(i for i, x in enumerate(states) if x)
            raise IncompleteCheckpointError(f"parts of step {s} could not be fetched to the "
                                            f"node of rank {q}: {states[q]}", str(base))
        here = located(tier)
        missing = [q for q in range(world) if (world, s, q) not in here]
        if missing:
            raise IncompleteCheckpointError(
                f"step {s}: the parts of ranks {missing} of the {world}-rank save are not in "
                f"the memory tier {tier.dir} of node {tier.node} (gone since it was listed)",
                str(base))
        parts = [(q, here[(world, s, q)], checkpoint.read_manifest(here[(world, s, q)]))
                 for q in range(world)]
        combined = assemble(parts, base, world)
        attempt = m.load_step(state, base, rank=r, group=group, manifest=combined, **kw)
    except Exception as e:
        attempt.failure = e
    phases.mark("read")
    hit = None
    if attempt.failure is None:
        src = _describe(tier, s, world, fetched)
        hit = [True, src, False, False,
               {"tier": "memory", "from": src, "resharded_from": world,
                "seconds": time.perf_counter() - t, "since_start": time.perf_counter() - t,
                "bytes": attempt.report.bytes, "phases": phases.json()}]
    else:
        e = attempt.failure
        hit = [False, f"{type(e).__name__}: {e}", m._damaged(e),
               getattr(e, "live_state_changed", False),
               f"the memory tier of the {world}-rank save (node {tier.node})"]
    hits = dist.all_gather_json(hit, group, f"restore of step {s}: resharded from memory")
    phases.mark("agree")
    records, notes, bad = {}, [], []
    for q, h in enumerate(hits):
        if h[0]:
            records[q] = h[4]
        else:
            bad.append((q, h))
            notes.append(f"rank {q}: step {s} from {h[4]} failed ({h[1].splitlines()[0]})")
    if not bad:
        notes.append(f"step {s} was saved by {world} rank(s): restored on {tier.world} from "
                     "the memory tier of the surviving nodes, resharded (each rank's parts: "
                     "report.sources)")
    return attempt, records, notes, bad


def _describe(tier, s: int, world: int, fetched: dict[int, int]) -> str:
    here = located(tier)
    own = [q for q in range(world) if here.get((world, s, q), Path()).parent.parent == tier.dir]
    kept = [q for q in range(world) if q not in own and q not in fetched]
    out = f"memory of node {tier.node}, parts of the {world}-rank save: own {own}"
    if kept:
        out += f", replicas {kept}"
    if fetched:
        out += ", fetched " + ", ".join(
            f"{q} from rank {h} (node {tier.nodes[h]})" for q, h in sorted(fetched.items()))
    return out


def _fetch_missing(tier, s: int, world: int, have: dict[str, set[int]], group):
    """Send every node the parts of step `s` it lacks: from the lowest rank of the first node
    holding a part to the lowest rank of the node lacking it, one part per pair of ranks and
    round; each received part is kept under the node's replicas. The same plan on every
    rank. Returns ({old rank: sending rank} of the parts this node received, this rank's
    failure as a string or None)."""
    lead = {}
    for q, n in enumerate(tier.nodes):
        lead.setdefault(n, q)
    holder = {}
    for n, q0 in lead.items():
        for q in sorted(have.get(n, ())):
            holder.setdefault(q, q0)
    sends: list[tuple[int, int, int]] = []  # (holder rank, receiving rank, old rank)
    for n, q0 in lead.items():
        sends += [(holder[q], q0, q) for q in range(world)
                  if q not in have.get(n, set()) and q in holder]
    rounds: list[list[tuple[int, int, int]]] = []
    for send in sends:  # the first round where this pair of ranks is free
        for rd in rounds:
            if all((h, d) != send[:2] for h, d, _ in rd):
                rd.append(send)
                break
        else:
            rounds.append([send])
    fetched: dict[int, int] = {}
    failure = None
    here = located(tier) if any(h == tier.rank for h, _, _ in sends) else {}
    for i, rd in enumerate(rounds):
        outgoing = {}
        for h, d, q in rd:
            if h == tier.rank:
                p = here.get((world, s, q))
                outgoing[d] = p if p is not None else f"rank {q}'s part of step {s} is gone"
        expect = {h: q for h, d, q in rd if d == tier.rank}

        def into(src: int) -> Path:
            return staging_dir(_kept(tier, s, expect[src], world))
        got = replicate.transfer(outgoing, into, group, tier.p2p,
                                 f"restore of step {s}: parts of the {world}-rank save, "
                                 f"round {i}")
        for src, d in got.items():
            q = expect[src]
            try:
                if isinstance(d, str):
                    raise IncompleteCheckpointError(d)
                target = _kept(tier, s, q, world)
                if target.exists():
                    shutil.rmtree(target, ignore_errors=True)
                os.rename(d, target)
                fetched[q] = src
            except Exception as e:
                failure = failure or f"{type(e).__name__}: {e}"
                log.warning("dckpt: restore of step %d: rank %d's part of the %d-rank save "
                            "from rank %d could not be kept: %s", s, q, world, src, e)
                if isinstance(d, Path):
                    shutil.rmtree(d, ignore_errors=True)
    return fetched, failure


def _kept(tier, s: int, q: int, world: int) -> Path:
    return tier.dir / REPLICAS / step_dir(s) / f"rank-{q:05d}-of-{world:05d}"

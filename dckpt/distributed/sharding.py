"""Who writes which tensor bytes in a collective save, and which block a rank reads back.

Every tensor leaf of a rank falls in one of four classes:

  sharded     a DTensor's local shard (FSDP2 parameters and optimizer states). All ranks'
              shards form one manifest tensor under the tree name, each shard placed by its
              global offsets. A block several ranks hold (Replicate mesh dims) is written once.
  replicated  a plain tensor that every rank holds with the same dtype, shape and XXH3 hash
              (DDP parameters, replicated optimizer state): written once in total. Only
              tensors every rank holds alike are hashed (a pass over their memory), in a
              second exchange; small ones are hashed with the first.
  owned       a plain tensor only one rank holds (a ZeRO partition's state): written by it
              under the tree name, so any rank of any world size can find it.
  local       anything else (per-rank buffers that differ): each rank writes its own copy as
              "<name>@r<rank>"; the rank's tree maps its name to that via `aliases`.

Blocks that several ranks hold go to the holder that has written the fewest bytes so far,
largest first, so the write load is spread evenly. Every rank computes the same assignment
from the same all-gathered offers, so no further communication is needed.
"""
from __future__ import annotations

import json
import math
import sys
import weakref
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import xxhash

from ..format.split import compact_mesh, expand_ranks
from ..storage import local as io
from ..errors import UnsupportedStateError
from ..state.flatten import Flat, Leaf
from ..state.tensors import TORCH_NAMES

SHARDED, REPLICATED, OWNED, LOCAL = "sharded", "replicated", "owned", "local"


@dataclass
class DTensorLeaf(Leaf):
    """A DTensor's local shard; `placement` records its mesh and placements for the manifest."""
    placement: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Offer:
    """What a rank holds of one tensor: the unit of the plan exchange. Made once by
    offer(), its digest filled in (a new Offer) by add_digests(); JSON only on the wire."""
    name: str
    dtype: str
    kind: str  # "torch" | "numpy"
    shape: list[int]  # of the local block
    global_shape: list[int]
    offsets: list[int]
    nbytes: int
    placement: dict | None = None  # a DTensor's mesh and placements
    digest: str | None = None  # hash of the bytes, to recognize replicas

    def with_digest(self, digest: str | None) -> "Offer":
        # dataclasses.replace, at half its cost: asked for every small tensor at each save.
        return Offer(self.name, self.dtype, self.kind, self.shape, self.global_shape,
                     self.offsets, self.nbytes, self.placement, digest)

    def to_json(self) -> dict:
        p = self.placement
        if p is not None and "mesh" in p:  # a mesh's rank list as a range where it is one
            p = {**p, "mesh": compact_mesh(p["mesh"])}
        return {"name": self.name, "dtype": self.dtype, "kind": self.kind, "shape": self.shape,
                "global": self.global_shape, "offsets": self.offsets, "nbytes": self.nbytes,
                "placement": p, "digest": self.digest}

    @classmethod
    def from_json(cls, d: dict) -> "Offer":
        p = d["placement"]
        if p is not None and "mesh" in p:
            p = {**p, "mesh": {**p["mesh"], "ranks": expand_ranks(p["mesh"]["ranks"])}}
        return cls(d["name"], d["dtype"], d["kind"], d["shape"], d["global"], d["offsets"],
                   d["nbytes"], p, d["digest"])


@dataclass(frozen=True)
class WritePlan:
    """What one rank writes, agreed by all (assign): (manifest name, leaf index) pairs in
    file order, tree-name aliases, and the manifest placement record of every tensor it
    writes."""
    writes: list[tuple[str, int]]
    aliases: dict[str, str]
    placements: dict[str, dict]
    bytes_per_rank: list[int]
    replicated: tuple[str, ...] = ()  # every rank's replicated tensors, sorted (plan reuse)
    owned: dict[str, int] = field(default_factory=dict)  # every owned tensor -> its writer


# ---- DTensors ------------------------------------------------------------------------------
def is_dtensor(t) -> bool:
    # DTensors exist only once torch.distributed.tensor is imported; don't import it here.
    mod = sys.modules.get("torch.distributed.tensor")
    cls = getattr(mod, "DTensor", None) if mod else None
    return cls is not None and isinstance(t, cls)


def local_block(t, path: str = "") -> tuple[torch.Tensor, list[int], list[int]]:
    """A DTensor's local tensor, its global shape, and the offsets of the local tensor in it."""
    placements = tuple(t.placements)
    if placements not in _stored_placements:
        _check_placements(placements, path)
    shape, offsets = _block_geometry(t.device_mesh, placements, tuple(t.shape))
    with torch.no_grad():  # the local tensor itself, not a view made by an autograd function
        local = t.to_local()
    if list(local.shape) != list(shape):
        raise UnsupportedStateError(
            f"DTensor at '{path}': local tensor {list(local.shape)} is not the block "
            f"{list(shape)} its placements describe (padded shard?)", path)
    return local, list(t.shape), list(offsets)


# Placement tuples found storable; checking costs more than the rest of a tensor's
# description, and a state has a handful of distinct tuples over hundreds of tensors.
_stored_placements: set = set()


def _check_placements(placements: tuple, path: str) -> None:
    for p in placements:
        if p.is_partial():
            raise UnsupportedStateError(
                f"DTensor at '{path}' has a Partial placement (pending reduction); "
                "redistribute it to Shard or Replicate before saving", path)
        if not (p.is_shard() or p.is_replicate()) or type(p).__name__ == "_StridedShard":
            raise UnsupportedStateError(
                f"DTensor at '{path}' has placement {p}; only Shard and Replicate are "
                "stored by offsets", path)
    _stored_placements.add(placements)


# Per mesh: (placements, global shape) -> (local shape, offsets), and the manifest record of
# the mesh. Both cost ~0.5 ms to compute and repeat for every parameter and moment.
_geometry: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_mesh_records: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _block_geometry(mesh, placements: tuple, shape: tuple) -> tuple[list[int], list[int]]:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    known = _geometry.setdefault(mesh, {})
    if (placements, shape) not in known:
        local, offsets = compute_local_shape_and_global_offset(shape, mesh, placements)
        known[(placements, shape)] = (list(local), list(offsets))
    return known[(placements, shape)]


def block_of(t):
    """restore's hook: where a live DTensor's local data sits in the global tensor."""
    return local_block(t) if is_dtensor(t) else None


def local_block_of(t):
    """restore's hook for a rank's own copy of its shards (a memory-tier part): a live
    DTensor is read as its local tensor, stored by its local shape."""
    if not is_dtensor(t):
        return None
    local = local_block(t)[0]
    return local, list(local.shape), None


def as_local(leaves: list[Leaf]) -> list[Leaf]:
    """The leaves with every DTensor shard described as a plain tensor of its local shape:
    what a rank's own single-rank copy of its state stores (local_block_of reads it back)."""
    return [Leaf(x.name, x.value, list(x.value.shape), [0] * len(x.value.shape),
                 x.replicated, x.storage) if isinstance(x, DTensorLeaf) else x
            for x in leaves]


def mesh_record(mesh) -> dict:
    if mesh not in _mesh_records:
        names = mesh.mesh_dim_names
        _mesh_records[mesh] = {"shape": list(mesh.mesh.shape),
                               "dim_names": list(names) if names else None,
                               "ranks": [int(x) for x in mesh.mesh.flatten().tolist()]}
    return _mesh_records[mesh]


def dtensor_leaf(t: torch.Tensor, name: str) -> Leaf | None:
    """flatten's tensor_hook: describe a DTensor by its local shard; None for other tensors."""
    if not is_dtensor(t):
        return None
    if t.dtype not in TORCH_NAMES:
        raise UnsupportedStateError(f"tensor at '{name}' has unsupported dtype {t.dtype}", name)
    local, gshape, offsets = local_block(t, name)
    placement = {"mesh": mesh_record(t.device_mesh), "placements": [repr(p) for p in t.placements]}
    return DTensorLeaf(name, local.detach(), gshape, offsets, placement=placement)


# ---- planning a save -----------------------------------------------------------------------
def contiguous_cpu(v):
    if isinstance(v, np.ndarray):
        return np.ascontiguousarray(v)
    if v.is_cpu and v.is_contiguous():  # the common case, per leaf per save
        return v.detach() if v.requires_grad else v  # leaves are detached: no new object
    return v.detach().to("cpu").contiguous()


# Plain tensors up to this size are hashed with the offer: a few microseconds each, and it
# spares the extra exchange for states whose only plain tensors are small (FSDP2's steps).
EAGER_DIGEST_BYTES = 1 << 16


def offer(flat: Flat, world: int) -> list[Offer]:
    """What this rank holds, for the all-gather that decides who writes what. Small plain
    tensors carry a hash of their bytes when distributed, so replicas can be recognized;
    larger ones get theirs only if every rank turns out to hold them (late_digests)."""
    out = []
    for leaf in flat.leaves:
        placement = digest = None
        if isinstance(leaf, DTensorLeaf):
            placement = leaf.placement
        elif world > 1 and leaf.nbytes <= EAGER_DIGEST_BYTES:
            digest = _digest(leaf)
        out.append(Offer(leaf.name, leaf.dtype, "numpy" if leaf.is_numpy else "torch",
                         list(leaf.value.shape), leaf.global_shape, leaf.offsets, leaf.nbytes,
                         placement, digest))
    return out


# A training job flattens the same layout at every save: the offers it makes (but for the
# digests of small plain tensors, which follow the values) and their layout hash are kept
# for the last two layouts, found by layout_key (exact keys: a few hundred bytes per
# tensor). A state holding DTensors is described anew each time (its placements and
# meshes are not in the key).
_layouts: dict[tuple, tuple[list[Offer], str]] = {}
_MAX_LAYOUTS = 4  # a training loop saves one layout or a few (engine.checkpoint._MAX_PLANS)


def layout_key(flat: Flat) -> tuple | None:
    """Everything offer() takes from the leaves but their values: name, dtype, kind, local
    and global shapes, offsets. None where a leaf is a DTensor shard."""
    key = []
    for leaf in flat.leaves:
        if isinstance(leaf, DTensorLeaf):
            return None
        key.append((leaf.name, leaf.dtype, leaf.is_numpy, tuple(leaf.value.shape),
                    tuple(leaf.global_shape), tuple(leaf.offsets)))
    return tuple(key)


def offer_layout(flat: Flat, world: int) -> tuple[list[Offer], str]:
    """offer(flat, world) and its layout_hash, from the last saves' when the layout is one
    of theirs (only the eager digests are computed again)."""
    key = layout_key(flat)
    hit = _layouts.get(key) if key is not None else None
    if hit is None:
        offers = offer(flat, world)
        own = layout_hash(offers)
        if key is not None:
            if len(_layouts) >= _MAX_LAYOUTS:
                del _layouts[next(iter(_layouts))]
            # Kept with lists of their own: this save's leaves (and manifest) hold these.
            _layouts[key] = ([replace(o, digest=None, shape=list(o.shape),
                                      global_shape=list(o.global_shape),
                                      offsets=list(o.offsets)) for o in offers], own)
        return offers, own
    offers, own = hit
    if world > 1:  # as offer() does: small plain tensors carry their digest
        offers = [o.with_digest(_digest(leaf)) if leaf.nbytes <= EAGER_DIGEST_BYTES else o
                  for o, leaf in zip(offers, flat.leaves)]
    return list(offers), own


def _digest(leaf: Leaf) -> str:
    v = leaf.value
    if type(v) is torch.Tensor and v.is_cpu and not v.requires_grad and \
            v.dtype in io.NUMPY_DTYPES and v.is_contiguous():
        # The usual small CPU tensor: its numpy view hashes the same bytes (0-d included)
        # at a third of the cost of the general path, for a hundred of them per save.
        return "%016x" % io.hash64(v.numpy())
    host = contiguous_cpu(v)
    if isinstance(host, np.ndarray) or leaf.value.device.type == "cpu":
        leaf.value = host  # no new memory (unless it was strided): the write reuses it
    # A device tensor's host copy is dropped: only its writer needs one, later.
    return f"{io.hash64(io.byte_view(host)):016x}"


def undecided(offers: list[list[Offer]]) -> list[str]:
    """Names that may be replicas but carry no digest yet: plain tensors that every rank
    holds with the same kind, dtype and shape. The same list on every rank."""
    world = len(offers)
    if world < 2:
        return []
    seen: dict[str, list[Offer]] = {}
    for items in offers:
        for it in items:
            seen.setdefault(it.name, []).append(it)
    return [name for name, its in seen.items()
            if len(its) == world and its[0].digest is None
            and not any(it.placement for it in its)
            and all((it.kind, it.dtype, it.shape) == (its[0].kind, its[0].dtype, its[0].shape)
                    for it in its)]


def late_digests(flat: Flat, names: list[str]) -> list[str]:
    """This rank's digests of the named leaves, in the order of `names`."""
    leaves = {leaf.name: leaf for leaf in flat.leaves}
    return [_digest(leaves[n]) for n in names]


def add_digests(offers: list[list[Offer]], names: list[str],
                digests: list[list[str]]) -> list[list[Offer]]:
    """The offers with the late digests (digests[rank][k] for names[k]) filled in."""
    out = []
    for items, mine in zip(offers, digests):
        found = dict(zip(names, mine))
        out.append([it.with_digest(found[it.name]) if it.name in found else it
                    for it in items])
    return out


def write_order(nbytes: int, name: str) -> tuple:
    """Where a block goes in its writer's file: largest first, then by name. assign() sorts
    by it and the async staging layout (manager.async_save.storage_order) too, so that
    the O_DIRECT write sends large tensors straight from the staging arena."""
    return (-nbytes, name)


def assign(offers: list[list[Offer]], me: int, extra_load: list[int] | None = None) -> WritePlan:
    """Decide every rank's writes from all ranks' offers (same result on every rank).
    extra_load: bytes each rank writes besides these offers (assign_compact's DTensor
    blocks), counted before the shared blocks are dealt out. Raises ValueError when the
    ranks' states cannot form one checkpoint."""
    world = len(offers)
    holders: dict[str, list[tuple[int, int, Offer]]] = {}
    for r, items in enumerate(offers):
        for i, it in enumerate(items):
            holders.setdefault(it.name, []).append((r, i, it))

    writes: list[list[tuple[str, int]]] = [[] for _ in range(world)]
    aliases: list[dict[str, str]] = [{} for _ in range(world)]
    placements: dict[str, dict] = {}
    # (nbytes, name, (offsets, shape) or (), [(holder rank, leaf index)])
    blocks: list[tuple[int, str, tuple, list[tuple[int, int]]]] = []
    for name, hs in holders.items():
        first = hs[0][2]
        if any(h[2].placement for h in hs):
            _check_sharded(name, hs)
            placements[name] = {"kind": SHARDED, **first.placement}
            for key, who in _distinct_blocks(hs).items():
                blocks.append((who[0][2], name, key, [(r, i) for r, i, _ in who]))
        elif len(hs) == world and _same(hs, ("kind", "dtype", "shape", "digest")):
            if world > 1:
                placements[name] = {"kind": REPLICATED}
            blocks.append((first.nbytes, name, (), [(r, i) for r, i, _ in hs]))
        elif len(hs) == 1:
            placements[name] = {"kind": OWNED}
            blocks.append((first.nbytes, name, (), [(hs[0][0], hs[0][1])]))
        else:
            for r, i, it in hs:
                local = f"{name}@r{r}"
                writes[r].append((local, i))
                aliases[r][name] = local
                placements[local] = {"kind": LOCAL}

    load = [sum(offers[r][i].nbytes for _, i in writes[r]) + (extra_load[r] if extra_load else 0)
            for r in range(world)]
    # Single-holder blocks first (they are fixed), then shared ones largest first, each to
    # the least-loaded holder: the greedy longest-processing-time rule.
    blocks.sort(key=lambda b: (len(b[3]) > 1, *write_order(b[0], b[1]), b[2]))
    for nbytes, name, _, who in blocks:
        r, i = min(who, key=lambda h: (load[h[0]], h[0]))
        writes[r].append((name, i))
        load[r] += nbytes
    mine = {n for n, _ in writes[me]}
    return WritePlan(writes[me], aliases[me], {n: p for n, p in placements.items() if n in mine},
                     load, tuple(sorted(n for n, p in placements.items()
                                        if p["kind"] == REPLICATED)),
                     {n: w for w in range(world) for n, _ in writes[w]
                      if placements.get(n, {}).get("kind") == OWNED})


# ---- the first plan without every rank's DTensor offers -------------------------------------
# FSDP2 holds every weight as a DTensor sharded over all ranks: the offers are ranks x
# tensors, and exchanging them all is what makes a first save's plan O(ranks x tensors) per
# rank. When every rank holds the same DTensors (names, dtypes, global shapes, meshes,
# placements: one hash says so) and no placement replicates (only Shard), each block has
# exactly one holder, who writes it: assign would decide the same without seeing them. So a
# rank sends that hash, the bytes of its blocks, and only its plain offers in full.
def dtensor_key(offers: list[Offer]) -> str | None:
    """The hash of this rank's DTensor descriptors, or None where the compact plan does not
    apply (a Replicate placement, an empty DTensor)."""
    h = xxhash.xxh3_64()
    meshes: dict[int, str] = {}
    for o in offers:
        p = o.placement
        if p is None:
            continue
        if any(not x.startswith("Shard(") for x in p["placements"]) or \
                math.prod(o.global_shape) == 0:
            return None
        mesh = p["mesh"]
        if id(mesh) not in meshes:
            meshes[id(mesh)] = f"{xxhash.xxh3_64_intdigest(json.dumps(mesh, sort_keys=True).encode()):x}"
        h.update(f"{o.name}\0{o.dtype}\0{o.kind}\0{o.global_shape}{meshes[id(mesh)]}"
                 f"{p['placements']}\n".encode())
    return f"{h.intdigest():016x}"


def compact_offers(offers: list[Offer]) -> dict:
    """What a rank sends for the compact plan: see dtensor_key."""
    return {"dt": dtensor_key(offers),
            "dt_bytes": sum(o.nbytes for o in offers if o.placement is not None),
            "plain": [o for o in offers if o.placement is None]}


def compact_applies(msgs: list[dict]) -> bool:
    return msgs[0]["dt"] is not None and all(m["dt"] == msgs[0]["dt"] for m in msgs)


def assign_compact(msgs: list[dict], mine: list[Offer], me: int) -> WritePlan:
    """assign() from every rank's compact_offers (compact_applies), this rank's own offers
    in full: the same writes, DTensor blocks by their holders first."""
    plain = [[o if isinstance(o, Offer) else Offer.from_json(o) for o in m["plain"]]
             for m in msgs]
    plan = assign(plain, me, [m["dt_bytes"] for m in msgs])
    where = [i for i, o in enumerate(mine) if o.placement is None]
    blocks = sorted(((o.name, i) for i, o in enumerate(mine)
                     if o.placement is not None and math.prod(o.shape) > 0),
                    key=lambda w: write_order(mine[w[1]].nbytes, w[0]))
    placements = {**plan.placements, **{n: {"kind": SHARDED, **mine[i].placement}
                                        for n, i in blocks}}
    return WritePlan(blocks + [(n, where[i]) for n, i in plan.writes], plan.aliases, placements,
                     plan.bytes_per_rank, plan.replicated, plan.owned)


# ---- reusing a plan ------------------------------------------------------------------------
# A training job saves the same layout (names, shapes, owners) again and again. Each rank
# then sends a hash of its offers instead of the offers: the exchange is O(1) in the
# number of tensors. The digests of the tensors the plan treats as replicas still change
# with their values, so each rank also sends one hash over them: equal on every rank means
# they are still replicas; otherwise the offers are exchanged again.
def layout_hash(offers: list[Offer]) -> str:
    """What the plan depends on of one rank's offers, except replica digests: a hash of
    names, dtypes, shapes, offsets and placements in leaf order."""
    h = xxhash.xxh3_64()
    meshes: dict[int, str] = {}  # a mesh (every rank's number) is hashed once, not per offer
    for o in offers:
        p = o.placement
        if p is not None:
            mesh = p["mesh"]
            if id(mesh) not in meshes:
                meshes[id(mesh)] = f"{xxhash.xxh3_64_intdigest(json.dumps(mesh, sort_keys=True).encode()):x}"
            p = [meshes[id(mesh)], p["placements"]]
        h.update(f"{o.name}\0{o.dtype}\0{o.kind}\0{o.shape}{o.global_shape}{o.offsets}"
                 f"{o.nbytes}{p}\n".encode())
    return f"{h.intdigest():016x}"


@dataclass(frozen=True)
class PlanCache:
    """This rank's last agreed plan: its own layout hash, the hash of every rank's (the
    plan's identity, equal on all ranks), and the plan."""
    own: str
    plan_id: str
    plan: WritePlan


def plan_id(layout_hashes: list[str]) -> str:
    return f"{xxhash.xxh3_64_intdigest(','.join(layout_hashes).encode()):016x}"


def replica_fingerprint(flat: Flat, offers: list[Offer], names: tuple[str, ...]) -> str:
    """One hash over this rank's digests of `names` (the plan's replicas), in order."""
    known = {o.name: o.digest for o in offers if o.digest is not None}
    leaves = {leaf.name: leaf for leaf in flat.leaves} if len(known) < len(names) else {}
    h = xxhash.xxh3_64()
    for n in names:
        h.update((known.get(n) or _digest(leaves[n])).encode())
    return f"{h.intdigest():016x}"


def _same(hs, fields) -> bool:
    return all(getattr(h[2], f) == getattr(hs[0][2], f) for h in hs for f in fields)


def _check_sharded(name: str, hs) -> None:
    if not all(h[2].placement for h in hs):
        raise ValueError(f"tensor '{name}' is a DTensor on some ranks and a plain tensor "
                         "on others")
    if not _same(hs, ("kind", "dtype", "global_shape")):
        raise ValueError(f"DTensor '{name}' has different dtypes or global shapes on "
                         "different ranks")


def _distinct_blocks(hs) -> dict[tuple, list[tuple[int, int, int]]]:
    """(offsets, shape) -> [(rank, leaf index, nbytes)]: each block once, with its holders.
    Empty local shards are dropped unless the whole tensor is empty."""
    gshape = hs[0][2].global_shape
    total = math.prod(gshape)
    out: dict[tuple, list] = {}
    for r, i, it in hs:
        if math.prod(it.shape) == 0 and total > 0:
            continue
        out.setdefault((tuple(it.offsets), tuple(it.shape)), []).append((r, i, it.nbytes))
    if total == 0:
        out = dict(list(out.items())[:1])
    covered = sum(math.prod(shape) for _, shape in out)
    if covered != total:
        raise ValueError(f"DTensor '{hs[0][2].name}': the ranks' shards hold {covered} of "
                         f"its {total} elements (overlapping or missing shards)")
    return {k: [(r, i, n) for r, i, n in v] for k, v in out.items()}

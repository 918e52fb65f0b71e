"""Copies of a rank's checkpoint files on another node: who keeps whose, and the transfer.

Each rank's node comes from the launcher (torchrun's GROUP_RANK, else NODE_RANK, else the
host name) or is given. Nodes are ordered by their lowest rank, which the launcher keeps
when a node is replaced, so the pairing survives a restart on a new host: rank r's
partners are the ranks at r's position among its node's ranks on the next `replicas`
nodes (cyclically). With one node there is no partner.

transfer() moves whole files between ranks over a gloo group with point-to-point
send/recv, inside a dckpt operation: the file lists travel first through an exchange
(which also carries a rank's failure), and the wait for the bytes is watched like any
exchange (collective.wait_until), so a dead or failed peer is every rank's error within
seconds, never a hang. Nothing received is trusted: the bytes land in a checkpoint
directory whose manifest and chunk hashes the normal verified read checks.
"""
from __future__ import annotations

import mmap
import os
import socket
import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from ..errors import DistributedError
from . import collective as dist

# Point-to-point messages are cut to this size: gloo's transport handles any size, but
# bounded messages keep a slow peer from holding one huge buffer in flight.
PIECE = 64 << 20
NODE_ENVS = ("GROUP_RANK", "NODE_RANK")


def node_id(node: str | None = None) -> str:
    """This process's node: `node`, the launcher's node rank, else the host name."""
    if node is not None:
        return str(node)
    for k in NODE_ENVS:
        if os.environ.get(k):
            return f"node{os.environ[k]}"
    return socket.gethostname()


def partners(nodes: list[str], replicas: int = 1) -> list[list[int]]:
    """rank -> the ranks (on other nodes) that keep copies of its files. `nodes[r]` is rank
    r's node. Empty lists with one node, or replicas=0."""
    order: list[str] = []
    members: dict[str, list[int]] = {}
    for r, n in enumerate(nodes):
        if n not in members:
            order.append(n)
            members[n] = []
        members[n].append(r)
    k = min(replicas, len(order) - 1)
    out: list[list[int]] = []
    for r, n in enumerate(nodes):
        at, pos = order.index(n), members[n].index(r)
        mine = []
        for j in range(1, k + 1):
            other = members[order[(at + j) % len(order)]]
            mine.append(other[pos % len(other)])
        out.append(mine)
    return out


def holders_of(partner_lists: list[list[int]], rank: int) -> list[int]:
    """The ranks whose copies `rank` keeps (those that name it as a partner)."""
    return [q for q, ps in enumerate(partner_lists) if rank in ps]


def solo_group(group=None):
    """A gloo group of this rank alone, for writing and reading a rank's own checkpoint
    without any exchange (a single-rank checkpoint); None when not distributed. Only this
    rank takes part in making it."""
    if not dist.active(group):
        return None
    me = tdist.get_rank()
    return tdist.new_group(ranks=[me], backend="gloo", use_local_synchronization=True)


def files_of(directory: Path) -> list[tuple[str, int]]:
    """The regular files of a checkpoint directory, manifest last (name, size)."""
    names = sorted(p.name for p in directory.iterdir() if p.is_file())
    names.sort(key=lambda n: n == "manifest.json")
    return [(n, (directory / n).stat().st_size) for n in names]


def _valid(src: int, offer) -> list[tuple[str, int]]:
    """A peer's file list, checked before anything is allocated for it."""
    if not isinstance(offer, list):
        raise DistributedError(f"rank {src} sent a malformed file list", src)
    out = []
    for item in offer:
        if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str)
                or not isinstance(item[1], int) or isinstance(item[1], bool) or item[1] < 0
                or "/" in item[0] or "\\" in item[0] or item[0] in ("", ".", "..")
                or "\0" in item[0]):
            raise DistributedError(f"rank {src} sent a malformed file entry {item!r:.100}", src)
        out.append((item[0], item[1]))
    return out


def transfer(outgoing: dict[int, Path | str], into, group, p2p, what: str,
             failure: BaseException | None = None) -> dict[int, Path | str]:
    """Send the files of directory outgoing[dst] to each rank dst (a string instead: why
    this rank has nothing to send it). What rank src sends this one lands in the new
    directory into(src) (made here; the caller renames or removes it). Returns, per rank
    that sent this one something, that directory (or its reason for sending nothing).
    Collective over `group` (its exchange and watch), with the bytes moving over the gloo
    group `p2p` of the same ranks. `failure`: this rank's error so far, which makes every
    rank raise here.

    The bytes go from the sender's file pages to the receiver's (both memory-mapped): the
    socket copy is the only one."""
    me = dist.rank(group)
    offers: dict[str, object] = {}
    try:
        if failure is None:
            for dst, d in outgoing.items():
                offers[str(dst)] = d if isinstance(d, str) else [list(f) for f in files_of(d)]
    except Exception as e:
        failure = e
    gathered = dist.exchange(offers, failure, group, f"{what}: file lists")
    incoming: dict[int, list[tuple[str, int]] | str] = {}
    for src, theirs in enumerate(gathered):
        if src != me and str(me) in theirs:
            o = theirs[str(me)]
            incoming[src] = o if isinstance(o, str) else _valid(src, o)
    works, peers, maps, bufs = [], set(), [], []
    received: dict[int, Path | str] = {}
    try:
        for src, files in incoming.items():  # receives first: every send finds its match
            if isinstance(files, str):
                received[src] = files
                continue
            d = received[src] = Path(into(src))
            d.mkdir(parents=True)
            for name, size in files:
                bufs.append(_mapped(d / name, size, maps, write=True))
                works += [(src, w) for w in _pieces(tdist.irecv, bufs[-1], src, p2p)]
            peers.add(src)
        for dst, d in outgoing.items():
            if isinstance(d, str) or dst == me:
                continue
            for name, size in (tuple(x) for x in offers[str(dst)]):
                bufs.append(_mapped(Path(d) / name, size, maps, write=False))
                works += [(dst, w) for w in _pieces(tdist.isend, bufs[-1], dst, p2p)]
            peers.add(dst)
        if works:
            _wait_all(works, peers, group, f"{what}: bytes")
    finally:
        works.clear()
        bufs.clear()  # the tensors over the mappings first, then the mappings
        for m in maps:
            try:
                m.close()
            except BufferError:  # a tensor still views it (a transfer left behind)
                pass
    return received


def _mapped(path: Path, size: int, maps: list, write: bool) -> torch.Tensor | None:
    """The bytes of `path` as a uint8 tensor over a mapping of the file (None when empty):
    for a receive, a new file of `size` bytes; for a send, the file as it is, which must
    still have the size announced."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL if write else os.O_RDONLY
    fd = os.open(path, flags, 0o644)
    try:
        if write:
            os.ftruncate(fd, size)
        elif os.fstat(fd).st_size != size:
            raise DistributedError(f"{path} changed size while being sent "
                                   f"({os.fstat(fd).st_size}, announced {size} bytes)")
        if size == 0:
            return None
        # A private mapping of a file being sent: writable for torch, never written.
        m = mmap.mmap(fd, size, access=mmap.ACCESS_WRITE if write else mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    maps.append(m)
    return torch.frombuffer(m, dtype=torch.uint8)


def _wait_all(works: list[tuple[int, Any]], peers: set[int], group, what: str) -> None:
    """Wait for the point-to-point works under the collective watch. Gloo's send and recv
    works complete only inside wait(), so a daemon thread waits on them and the caller
    polls it: a dead peer is found by its heartbeat even while gloo still waits (that
    thread is then left behind with the broken group)."""
    errors: list[tuple[int, BaseException]] = []

    def run() -> None:
        for peer, w in works:
            try:
                w.wait()
            except BaseException as e:  # the connection to `peer` broke: it died, likely
                errors.append((peer, e))
                return

    t = threading.Thread(target=run, name="dckpt-transfer", daemon=True)
    t.start()
    dist.wait_until(lambda: not t.is_alive(), lambda: sorted(peers), group, what)
    if errors:
        peer, e = errors[0]
        raise DistributedError(f"dckpt {what}: the transfer with rank {peer} failed (it "
                               f"probably died): {e}", peer) from e


def _pieces(op, buf: torch.Tensor | None, peer: int, p2p) -> list:
    if buf is None:
        return []
    g = tdist.get_global_rank(p2p, peer) if p2p is not None else peer
    return [op(buf[at:at + PIECE], g, group=p2p) for at in range(0, buf.numel(), PIECE)]

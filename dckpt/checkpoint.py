"""dckpt.save / dckpt.load: one checkpoint directory, written atomically, read verified.

Collective when a process group is initialized: every rank writes its own data file, rank 0
writes the manifest after every rank reported its records, and a failure on any rank aborts
the commit on all ranks.
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, commit, dist, errors, incremental, io
from .errors import CheckpointNotFoundError, DckptError, DistributedError, ManifestError
from .format import tree as treecodec
from .format.layout import rank_file
from .format.manifest import MANIFEST_NAME, Chunk, FileEntry, Manifest, Shard, TensorEntry, parse
from .state.flatten import Flat, Leaf, flatten
from .state.reading import TensorReader
from .state.restore import RestoreReport, materialize, restore_into


@dataclass
class SaveResult:
    path: Path
    bytes: int  # logical bytes of all tensors saved by every rank
    stored_bytes: int  # bytes in the data files
    seconds: float
    manifest: Manifest = field(repr=False)


def save(state: Any, path: str | os.PathLike, *, compression: str | int | None = None,
         shuffle: bool = True, chunk_size: int = io.DEFAULT_CHUNK_SIZE, threads: int = 0,
         fsync: bool = True, overwrite: bool = False, counters: dict | None = None,
         metrics: dict | None = None, meta: dict | None = None, rank_state: dict | None = None,
         base: str | os.PathLike | incremental.Base | None = None, group=None) -> SaveResult:
    """Save `state` (a nested dict/list of tensors, arrays, values and objects with
    state_dict()) as a checkpoint directory at `path`.

    compression: None (raw), "zstd" (level 1) or a zstd level; shuffle applies a byte shuffle
    by element size before zstd. rank_state: extra per-rank values (RNG streams) stored in
    the manifest beside the tree. base: a committed checkpoint; chunks unchanged since it
    are not written again but shared with it by hard link (see dckpt/incremental.py).
    """
    t0 = time.perf_counter()
    opts = io.WriteOptions(compression, shuffle, chunk_size, threads, fsync).validate()
    target = Path(path)
    base = incremental.Base.of(base)
    flat = flatten(state)
    encoded = treecodec.encode(flat.tree)
    rank_extra = treecodec.encode(rank_state or {})
    r, world = dist.rank(group), dist.world_size(group)

    tmp_name = error = None
    if r == 0:
        try:
            tmp_name = str(commit.begin(target, overwrite))
        except DckptError as e:
            error = [type(e).__name__, str(e)]
    tmp_name, error = dist.broadcast_json([tmp_name, error], 0, group)
    if error:
        raise getattr(errors, error[0], DckptError)(error[1])
    tmp = Path(tmp_name)

    report: dict = {"rank": r}
    try:
        report.update(_write_rank(tmp, flat, opts, r, world, base))
        report["tree"] = encoded
        report["extra"] = rank_extra
    except Exception as e:  # reported to rank 0 so every rank aborts together
        report["error"] = f"{type(e).__name__}: {e}"
        local_error = e
    else:
        local_error = None
    reports = dist.all_gather_json(report, group)
    failed = [rep for rep in reports if "error" in rep]
    if failed:
        if r == 0:
            commit.abort(tmp)
        dist.barrier(group)
        if local_error is not None:
            raise local_error
        raise DistributedError(f"save to {target} aborted: rank {failed[0]['rank']} failed: "
                               f"{failed[0]['error']}", failed[0]["rank"])

    if base is not None:
        meta = {**(meta or {}), incremental.META_KEY: incremental.summarize(base, reports)}
    m = _build_manifest(reports, world, counters, metrics, meta, opts)
    outcome = None
    if r == 0:
        try:
            commit.finish(tmp, target, m, fsync)
        except Exception as e:
            commit.abort(tmp)
            if not dist.active(group):
                raise
            outcome = f"{type(e).__name__}: {e}"
    outcome = dist.broadcast_json(outcome, 0, group)
    if outcome:
        raise DistributedError(f"commit of {target} failed on rank 0: {outcome}", 0)
    return SaveResult(target, m.total_bytes, m.stored_bytes, time.perf_counter() - t0, m)


def _write_rank(tmp: Path, flat: Flat, opts: io.WriteOptions, r: int, world: int,
                base: incremental.Base | None) -> dict:
    """Write this rank's tensors into its data file; returns its part of the manifest."""
    leaves = flat.leaves
    fname = rank_file(r)
    names = [leaf.name if world == 1 else f"{leaf.name}@r{r}" for leaf in leaves]
    files, chunks, stats = [], [], None
    if leaves and base is not None:
        chunks, files, stats = incremental.write_rank(base, tmp, fname, r, leaves, names, opts,
                                                      _contiguous_cpu)
    elif leaves:
        chunks = io.write_file(str(tmp / fname), [_contiguous_cpu(x.value) for x in leaves], opts)
        files = [FileEntry(fname, (tmp / fname).stat().st_size, r)]
    tensors = {}
    for leaf, name, cs in zip(leaves, names, chunks):
        tensors[name] = {
            "kind": "numpy" if leaf.is_numpy else "torch", "dtype": leaf.dtype,
            "shape": leaf.global_shape,
            "shards": [{"offsets": leaf.offsets, "shape": list(leaf.value.shape), "rank": r,
                        "chunks": [c.as_native() for c in cs]}]}
    aliases = {leaf.name: f"{leaf.name}@r{r}" for leaf in leaves} if world > 1 else {}
    return {"files": [f.to_json() for f in files], "tensors": tensors, "aliases": aliases,
            incremental.META_KEY: stats}


def _contiguous_cpu(v):
    if isinstance(v, np.ndarray):
        return np.ascontiguousarray(v)
    return v.detach().to("cpu").contiguous()


def _build_manifest(reports: list[dict], world: int, counters, metrics, meta, opts) -> Manifest:
    files, tensors, ranks = [], {}, []
    for rep in reports:
        first = len(files)  # a rank's chunks index its own file list
        files.extend(FileEntry(**f) for f in rep["files"])
        for name, t in rep["tensors"].items():
            shards = [Shard(s["offsets"], s["shape"], s["rank"],
                            [Chunk(first + c[0], *c[1:]) for c in s["chunks"]])
                      for s in t["shards"]]
            if name in tensors:
                tensors[name].shards.extend(shards)
            else:
                tensors[name] = TensorEntry(t["dtype"], t["shape"], shards, t["kind"])
        ranks.append({"tree": rep["tree"], "aliases": rep["aliases"], **rep["extra"]})
    info = {"dckpt": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "compression": str(opts.compression),
            "chunk_size": opts.chunk_size}
    return Manifest(world_size=world, files=files, tensors=tensors, ranks=ranks,
                    counters=counters or {}, metrics=metrics or {},
                    meta={"library": info, **(meta or {})})


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Parse and validate the manifest of the checkpoint at `path`."""
    p = Path(path) / MANIFEST_NAME
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path} is not a committed checkpoint (no {MANIFEST_NAME})")
    except OSError as e:
        raise ManifestError(f"cannot read {p}: {e.strerror}", str(p)) from None
    return parse(data, str(p))


def load(path: str | os.PathLike, into: dict | None = None, *, keys: list[str] | None = None,
         verify: bool = True, threads: int = 0, allow_missing: bool | list[str] = False,
         group=None):
    """Load the checkpoint at `path`.

    Without `into`: returns the state as plain values (tensors, arrays, state dicts).
    With `into` (the live state dict): restores in place, reading straight into existing
    tensor memory and calling load_state_dict() on objects; returns a RestoreReport.
    keys: only these top-level components.
    """
    m = read_manifest(path)
    r = dist.rank(group)
    entry = m.ranks[r] if r < m.world_size else m.ranks[0]
    tree = treecodec.decode(entry["tree"])
    aliases = entry.get("aliases", {})
    if keys is not None:
        if not isinstance(tree, dict):
            raise ValueError("keys= needs a checkpoint whose state is a dict")
        unknown = [k for k in keys if k not in tree]
        if unknown:
            raise KeyError(f"components {unknown} are not in the checkpoint {path} "
                           f"(it has {list(tree)})")
        tree = {k: tree[k] for k in keys}
    reader = TensorReader(Path(path), m, verify, threads)
    if into is None:
        return materialize(tree, m, reader, aliases)
    if keys is not None:
        into_view = {k: into[k] for k in keys if k in into}
        report = restore_into(into_view, tree, m, reader, allow_missing, tensor_names=aliases)
        into.update(into_view)
        return report
    return restore_into(into, tree, m, reader, allow_missing, tensor_names=aliases)


__all__ = ["save", "load", "read_manifest", "SaveResult", "RestoreReport", "Leaf"]

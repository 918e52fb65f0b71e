"""dckpt inspect PATH: what a checkpoint holds, from its manifest alone.

Reads no tensor data and imports neither torch nor the native core, so it runs anywhere
numpy, zstandard and xxhash are installed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from . import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from .output import Style, add_output_arguments, number, print_json, size, table, when

SCHEMA = "dckpt.inspect/1"


def add_arguments(p) -> None:
    p.add_argument("path", help="a checkpoint directory (or a manager root: its newest step)")
    p.add_argument("--tensors", type=int, default=30, metavar="N",
                   help="list at most N tensors (default 30; 0 for none)")
    p.add_argument("--all", action="store_true", help="list every tensor")
    p.add_argument("--tree", action="store_true", help="print the state tree of a rank")
    p.add_argument("--rank", type=int, default=0, help="the rank whose tree --tree prints")
    add_output_arguments(p, "print everything as JSON (schema dckpt.inspect/1)")


def run(args) -> int:
    from ..errors import DckptError
    from ..errors import CheckpointNotFoundError
    from ..storage.records import read_manifest
    from ..storage.objectstore import is_url
    path = resolve(args.path if is_url(args.path) else Path(args.path))
    if path is None:
        from ..format.layout import not_a_checkpoint
        why = None if is_url(args.path) else not_a_checkpoint(Path(args.path))
        print(f"dckpt inspect: {why or f'{args.path} is not a checkpoint or a manager root with one'}",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        m = read_manifest(path)
    except CheckpointNotFoundError:  # no manifest.json
        print(f"dckpt inspect: {path} has no manifest.json (not a committed checkpoint)",
              file=sys.stderr)
        return EXIT_USAGE
    except DckptError as e:
        print(f"dckpt inspect: {e}", file=sys.stderr)
        return EXIT_FAILED
    doc = describe(path, m)
    if not 0 <= args.rank < m.world_size:
        print(f"dckpt inspect: --rank {args.rank} outside world size {m.world_size}",
              file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print_json(doc)
        return EXIT_OK
    style = Style(args.color)
    limit = None if args.all else args.tensors
    for line in render(doc, style, limit):
        print(line)
    if args.tree:
        from ..format.tree import decode
        print(style(f"state tree of rank {args.rank}", "bold"))
        for line in tree_lines(decode(m.ranks[args.rank]["tree"]), m, "  "):
            print(line)
    return EXIT_OK


def resolve(path: Path | str) -> Path | str | None:
    """A checkpoint directory as given, or the newest committed step of a root. For an
    object store URL: the prefix if it holds a manifest object, else its newest step
    prefix that does (a step without one is absent)."""
    from ..format.layout import is_committed, parse_step_dir
    if isinstance(path, str):
        return _resolve_url(path)
    if not path.is_dir():
        return None
    if (path / "manifest.json").exists() or parse_step_dir(path.name) is not None:
        return path
    steps = sorted((s, p) for p in path.iterdir()
                   if (s := parse_step_dir(p.name)) is not None and is_committed(p))
    return steps[-1][1] if steps else None


def _resolve_url(url: str) -> str | None:
    from ..format.layout import parse_step_dir
    from ..storage.objectstore import connect, join
    url = url.rstrip("/")
    names = {o.url[len(url) + 1:] for o in connect(url).list(url)}
    if "manifest.json" in names:
        return url
    steps = sorted(s for n in names if n.endswith("/manifest.json") and n.count("/") == 1
                   and (s := parse_step_dir(n.split("/")[0])) is not None)
    from ..format.layout import step_dir
    return join(url, step_dir(steps[-1])) if steps else None


def _identical_ranks(ranks: list[dict]) -> list[tuple[list[int], dict]]:
    """Ranks whose components, RNG streams and gaps read the same, grouped (first rank's
    order): at hundreds of replicated ranks, one block shows what they share and the
    others stand out."""
    groups: dict[str, tuple[list[int], dict]] = {}
    for r in ranks:
        key = json.dumps({k: v for k, v in r.items() if k != "rank"}, sort_keys=True)
        groups.setdefault(key, ([], r))[0].append(r["rank"])
    return list(groups.values())


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    spans: list[list[int]] = []
    for r in ranks:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


def describe(path: Path, m) -> dict:
    """The JSON document of `inspect`: manifest facts, components, tensors, totals."""
    from ..format import anatomy
    from ..format.tree import refs
    ranks = []
    for r in range(m.world_size):
        view = anatomy.rank_view(m, r)
        comps = []
        for c in view.components:
            names = {view.aliases.get(x.name, x.name) for x in refs(c.state)}
            comps.append({"key": c.key, "kind": c.kind, "type": c.type_name,
                          "tensors": len(names),
                          "bytes": sum(m.tensors[n].nbytes for n in names if n in m.tensors),
                          "summary": _component_summary(c)})
        ranks.append({"rank": r, "components": comps, "rng_streams": view.rng_streams,
                      "missing": view.missing()})
    tensors = []
    for name, t in m.tensors.items():
        stored = t.stored_bytes
        tensors.append({
            "name": name, "kind": t.kind, "dtype": t.dtype, "shape": t.shape,
            "placement": t.placement,
            "shards": [{"rank": s.rank, "offsets": s.offsets, "shape": s.shape,
                        "chunks": len(s.chunks)} for s in t.shards],
            "bytes": t.nbytes, "stored_bytes": stored,
            "ratio": round(t.nbytes / stored, 4) if stored else None,
            "codecs": sorted({_codec(c.codec) for s in t.shards for c in s.chunks})})
    total, stored = m.total_bytes, m.stored_bytes
    return {
        "schema": SCHEMA, "path": str(path), "format_version": m.version,
        "created": m.created, "world_size": m.world_size,
        **({"meshes": m.meshes} if m.meshes else {}),  # device meshes of sharded tensors
        "versions": m.meta.get("library", {}),
        "meta": {k: v for k, v in m.meta.items() if k != "library"},
        "counters": m.counters, "metrics": m.metrics, "ranks": ranks,
        "files": [{"name": f.name, "dir": f.dir, "rank": f.rank, "size": f.size}
                  for f in m.files],
        "tensors": tensors,
        "totals": {"tensors": len(m.tensors), "bytes": total, "stored_bytes": stored,
                   "ratio": round(total / stored, 4) if stored else None,
                   "files": len(m.files)},
    }


def _incremental(d: dict) -> str:
    """New vs shared bytes of an incremental checkpoint (docs/FORMAT.md)."""
    try:
        line = (f"incremental: {size(int(d['new_bytes']))} written, "
                f"{size(int(d['referenced_bytes']))} shared by hard link with "
                f"{d.get('base')} ({int(d['referenced_chunks'])} chunk(s)); "
                f"{int(d.get('depth', 0))} save(s) since a full one")
    except (KeyError, TypeError, ValueError):
        return f"incremental: {_short(d, 100)}"
    if d.get("fallback"):
        line += f"; not shared: {_short(d['fallback'], 80)}"
    return line


def _codec(code: int) -> str:
    from ..format.manifest import CODEC_NAMES
    return CODEC_NAMES.get(code, str(code))


def _component_summary(c) -> str:
    from ..format import anatomy
    s = c.state if isinstance(c.state, dict) else {}
    if c.kind == "scheduler":
        info = anatomy.scheduler_info(c)
        lr = f", lr {', '.join(f'{v:.3g}' for v in info.last_lr[:2])}" if info.last_lr else ""
        return f"last_epoch {info.last_epoch}{lr}"
    if c.kind == "optimizer":
        groups = s.get("param_groups") if isinstance(s.get("param_groups"), list) else []
        lrs, _, _ = anatomy.optimizer_lrs(c)
        per = s.get("state")
        n = len(per) if isinstance(per, dict) else 0
        lr = f", lr {', '.join(f'{v:.3g}' for v in sorted(set(lrs))[:2])}" if lrs else ""
        return f"{len(groups)} param group(s), state for {n} parameter(s){lr}"
    if c.kind == "data":
        epoch, batches = anatomy.loader_position(c)
        return f"epoch {epoch}, {batches} batch(es) consumed"
    if c.kind == "scaler":
        return f"scale {s.get('scale')}"
    if c.kind == "value":
        text = repr(c.state)
        return text if len(text) <= 60 else text[:57] + "..."
    return ""


def render(doc: dict, style: Style, limit: int | None) -> list[str]:
    out = [style(f"checkpoint {doc['path']}", "bold")]
    v = doc["versions"]
    out.append(f"  format v{doc['format_version']}, created {when(doc['created'])}, "
               f"world size {doc['world_size']}")
    for i, mesh in enumerate(doc.get("meshes", [])):
        names = f" ({', '.join(mesh['dim_names'])})" if mesh.get("dim_names") else ""
        out.append(f"  device mesh {i}: shape {_shape(mesh['shape'])}{names}, "
                   f"ranks {_short(mesh['ranks'], 60)}")
    if v:
        libs = ", ".join(f"{k} {v[k]}" for k in ("dckpt", "torch", "numpy", "python") if k in v)
        opts = (f"; compression {v.get('compression')}, chunks of "
                f"{v['chunk_size'] / (1 << 20):g} MiB" if "chunk_size" in v else "")
        out.append(f"  written by {libs}{opts}")
    for key, value in doc["meta"].items():
        if key == "incremental" and isinstance(value, dict):
            out.append("  " + _incremental(value))
            continue
        out.append(f"  {key}: {_short(value, 100)}")
    c = doc["counters"]
    if c:
        parts = []
        first = ["step", "epoch", "step_in_epoch"]
        ordered = [k for k in first if k in c] + [k for k in c if k not in first]
        for k, val in ((k, c[k]) for k in ordered):
            if k == "loss_history" and isinstance(val, list):
                last = f", last {number(val[-1])}" if val else ""
                parts.append(f"loss_history {len(val)} value(s){last}")
            elif val is not None:
                parts.append(f"{k} {_short(val, 60)}")
        out.append(style("counters", "bold") + "  " + ", ".join(parts))
    if doc["metrics"]:
        out.append(style("metrics", "bold") + "   " + ", ".join(
            f"{k} {number(val)}" for k, val in doc["metrics"].items()))
    groups = _identical_ranks(doc["ranks"])
    for ranks, r in groups[:16]:
        out.append(style(f"rank {ranks[0]}" if len(ranks) == 1 else
                         f"ranks {_ranges(ranks)} ({len(ranks)}, identical)", "bold"))
        for comp in r["components"]:
            label = comp["type"].rsplit(".", 1)[-1] if comp["type"] else ""
            tens = f"{comp['tensors']} tensor(s), {size(comp['bytes'])}" if comp["tensors"] else ""
            bits = [b for b in (label, tens, comp["summary"]) if b]
            out.append(f"  {comp['key']:<12} {comp['kind']:<10} {'; '.join(bits)}")
        rng = ", ".join(r["rng_streams"]) or style("none", "yellow")
        out.append(f"  {'rng':<12} {'streams':<10} {rng}")
        if r["missing"]:
            out.append("  " + style(f"missing for an exact resume: {', '.join(r['missing'])}",
                                    "yellow"))
    if len(groups) > 16:
        out.append(f"  ... {len(groups) - 16} more group(s) of ranks (--json lists them)")
    t = doc["totals"]
    ratio = f", ratio {t['ratio']:.2f}" if t["ratio"] else ""
    out.append(style("tensors", "bold") + f"  {t['tensors']}, {size(t['bytes'])} "
               f"({size(t['stored_bytes'])} stored{ratio}) in {t['files']} file(s)")
    shown = doc["tensors"] if limit is None else doc["tensors"][:limit]
    if shown:
        rows = []
        for x in shown:
            shards = x["shards"]
            layout = (f"{len(shards)} shards, ranks {sorted({s['rank'] for s in shards})}"
                      if len(shards) > 1 else f"rank {shards[0]['rank']}")
            if len(shards) == 1 and shards[0]["shape"] != x["shape"]:
                layout += f" block {shards[0]['shape']}"
            p = x["placement"]
            if p:
                how = ", ".join(p.get("placements", [])) if p.get("kind") == "sharded" else ""
                layout = f"{p.get('kind')}{' ' + how if how else ''}; {layout}"
            rows.append([x["name"], x["dtype"], _shape(x["shape"]), size(x["bytes"]),
                         f"{x['ratio']:.2f}" if x["ratio"] else "-", layout])
        out += ["  " + line for line in table(
            rows, ["name", "dtype", "shape", "bytes", "ratio", "layout"], style, right={3, 4})]
    if len(shown) < len(doc["tensors"]):
        out.append(f"  ... {len(doc['tensors']) - len(shown)} more (--all lists every tensor)")
    return out


def _shape(shape: list[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _short(value, width: int) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def tree_lines(node, m, indent: str, key: str = "", depth: int = 0) -> list[str]:
    """The decoded tree, tensors shown as dtype[shape], long containers elided."""
    from ..format.tree import ArrayRef, DtypeRef, ObjectState, TensorRef, ViewRef
    label = f"{key}: " if key else ""
    if isinstance(node, ViewRef):  # its own dtype and shape, in the storage record it names
        return [f"{indent}{label}<{node.dtype}{_shape(list(node.shape))} view of {node.name} "
                f"at element {node.offset}>"]
    if isinstance(node, (TensorRef, ArrayRef)):
        t = m.tensors.get(node.name)
        desc = f"{t.dtype}{_shape(t.shape)}" if t else "missing!"
        return [f"{indent}{label}<{desc} {node.name}>"]
    if isinstance(node, DtypeRef):
        return [f"{indent}{label}<dtype {node.name}>"]
    if isinstance(node, bytes):
        return [f"{indent}{label}<{len(node)} bytes>"]
    if isinstance(node, ObjectState):
        lines = [f"{indent}{label}<{node.type_name}>"]
        if isinstance(node.state, dict):
            for k, v in node.state.items():
                lines += tree_lines(v, m, indent + "  ", str(k), depth + 1)
        else:
            lines += tree_lines(node.state, m, indent + "  ", "", depth + 1)
        return lines
    if isinstance(node, dict):
        items = list(node.items())
        lines = [f"{indent}{label}{{{len(items)} key(s)}}"] if label else []
        for k, v in items[:50]:
            lines += tree_lines(v, m, indent + ("  " if label else ""), str(k), depth + 1)
        if len(items) > 50:
            lines.append(f"{indent}  ... {len(items) - 50} more key(s)")
        return lines
    if isinstance(node, (list, tuple)):
        if all(not isinstance(x, (dict, list, tuple, ObjectState, TensorRef, ArrayRef))
               for x in node):
            return [f"{indent}{label}{_short(list(node), 100)}"]
        lines = [f"{indent}{label}[{len(node)} item(s)]"]
        for i, v in enumerate(node[:20]):
            lines += tree_lines(v, m, indent + "  ", str(i), depth + 1)
        if len(node) > 20:
            lines.append(f"{indent}  ... {len(node) - 20} more item(s)")
        return lines
    return [f"{indent}{label}{_short(node, 100)}"]

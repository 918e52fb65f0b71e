"""dckpt convert SRC DST: import torch.save / safetensors / accelerate / HF Trainer checkpoints
into dckpt, export a dckpt checkpoint's model weights to a .safetensors file, or copy a dckpt
checkpoint (incremental ones included) into a standalone directory."""
from __future__ import annotations

import sys
from pathlib import Path

from . import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from .output import Style, add_output_arguments, plural, print_json, size


def add_arguments(p) -> None:
    from ..tools.convert import SOURCES
    p.add_argument("src", help="source: a .pt/.pth/.bin file, a .safetensors file, an "
                               "accelerate save_state folder, an HF Trainer checkpoint-N "
                               "folder, or a dckpt checkpoint (to export)")
    p.add_argument("dst", help="a new dckpt checkpoint directory (from a dckpt checkpoint: a "
                               "standalone copy without shared chunks), or a .safetensors or "
                               ".pt/.pth/.bin file when exporting from a dckpt checkpoint")
    p.add_argument("--from", dest="source", choices=SOURCES, default="auto",
                   help="source kind (default: detected)")
    p.add_argument("--component", help="export: the component to write (default: the model)")
    p.add_argument("--compression", help="zstd compression for the dckpt written (e.g. zstd, 3)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--no-verify", action="store_true", help="do not verify what was written")
    add_output_arguments(p, "print the result as JSON (schema dckpt.convert/1)")


def _standalone(src: Path, dst: Path, args) -> int:
    """A dckpt checkpoint (incremental or not) copied into a self-contained directory that
    holds only the chunks its manifest uses (dckpt.incremental.consolidate)."""
    from ..errors import CheckpointExistsError, DckptError
    from ..engine.incremental import consolidate
    try:
        m = consolidate(src, dst, overwrite=args.overwrite)
    except CheckpointExistsError as e:
        print(f"dckpt convert: {e}", file=sys.stderr)
        return EXIT_USAGE
    except DckptError as e:
        print(f"dckpt convert: {e}", file=sys.stderr)
        return EXIT_FAILED
    doc = {"schema": "dckpt.convert/1", "source": "dckpt", "src": str(src), "dst": str(dst),
           "standalone": True, "tensors": len(m.tensors), "bytes": m.total_bytes,
           "stored_bytes": sum(f.size for f in m.files)}
    if args.json:
        print_json(doc)
    else:
        print(f"wrote a standalone copy of {src}: {doc['tensors']} tensors, "
              f"{size(doc['stored_bytes'])} stored -> {dst}")
    return EXIT_OK


def run(args) -> int:
    from ..tools.convert import (EXPORT_SUFFIXES, ConvertError, convert, export_safetensors,
                                 export_torch)
    from ..tools.convert.sources import detect
    src, dst = Path(args.src), Path(args.dst)
    style = Style(args.color)
    try:
        kind = detect(src) if args.source == "auto" else args.source
        if kind == "dckpt" and dst.suffix not in EXPORT_SUFFIXES:
            return _standalone(src, dst, args)
        if kind == "dckpt":
            export = export_safetensors if dst.suffix == ".safetensors" else export_torch
            out = export(src, dst, component=args.component, overwrite=args.overwrite)
            doc = {"schema": "dckpt.convert/1", "source": "dckpt", "src": str(src),
                   "dst": str(dst), **out}
            if args.json:
                print_json(doc)
            else:
                print(f"exported component '{out['component']}' of {src}: {out['tensors']} "
                      f"tensors, {size(out['bytes'])} -> {dst}")
                if out["skipped"]:
                    print(f"  non-tensor entries left out: {', '.join(out['skipped'][:8])}")
            return EXIT_OK
        compression = args.compression
        if compression is not None and compression.isdigit():
            compression = int(compression)
        result = convert(src, dst, source=kind, overwrite=args.overwrite,
                         compression=compression)
    except ConvertError as e:
        print(f"dckpt convert: {e}", file=sys.stderr)
        return EXIT_USAGE
    status = None
    if not args.no_verify:
        from ..tools.verify import verify
        report = verify(dst)
        status = report.status
        ok = report.ok
    else:
        ok = True
    doc = {**result.to_json(), "status": status}
    if args.json:
        print_json(doc)
        return EXIT_OK if ok else EXIT_FAILED
    comps = ", ".join(f"{k} ({v})" if k != v else k for k, v in result.components.items())
    print(f"converted {result.source} checkpoint {src} -> {dst}")
    print(f"  components: {comps}; {result.tensors} tensors, {size(result.bytes)}")
    rng = (f"{result.rng_processes} process(es)" if result.rng_processes
           else style("none in the source", "yellow") + " (`dckpt repair` can add fresh ones)")
    print(f"  rng streams: {rng}")
    if result.counters:
        shown = {k: v for k, v in result.counters.items() if k != "loss_history"}
        if "loss_history" in result.counters:
            shown["loss_history"] = plural(len(result.counters["loss_history"]), "value")
        print("  counters: " + ", ".join(f"{k} {v}" for k, v in shown.items()))
    for note in result.notes:
        print(f"  note: {note}")
    if status is not None:
        color = {"COMPLETE": "green", "PARTIAL": "yellow", "INCOMPLETE": "red"}[status]
        print(f"  verify: {style(status, color, 'bold')}"
              + ("" if ok else " (verification failed: run `dckpt verify` for details)")
              + (" (run `dckpt verify` to see what is missing)" if ok and status != "COMPLETE"
                 else ""))
    return EXIT_OK if ok else EXIT_FAILED

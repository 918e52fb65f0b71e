"""dckpt export CKPT OUT --format hf: a checkpoint's model weights as a Hugging Face Hub
folder (sharded safetensors + index, config and tokenizer files), streamed shard by shard
(dckpt/tools/export.py)."""
from __future__ import annotations

from . import EXIT_OK
from .output import add_output_arguments, print_json, size


def add_arguments(p) -> None:
    p.add_argument("ckpt", help="a committed dckpt checkpoint (a step directory)")
    p.add_argument("out", help="the folder to write (must not exist unless --overwrite)")
    p.add_argument("--format", default="hf", choices=("hf",),
                   help="hf: model-0000k-of-0000n.safetensors + model.safetensors.index.json")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest weight file, as save_pretrained takes it (5GB, 500MB, 4GiB)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                   help="cast floating-point tensors (default: as stored)")
    p.add_argument("--component", help="the component to export (default: the model)")
    p.add_argument("--config-from", help="a folder with config.json and tokenizer files "
                                         "(default: the checkpoint, then its parent folder)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    add_output_arguments(p, "print the result as JSON (schema dckpt.export/1)")


def run(args) -> int:
    from ..tools.export import export
    # Typed errors (a size it cannot read, OUT exists, no model) exit 2 through cli._run.
    r = export(args.ckpt, args.out, format=args.format, max_shard_size=args.max_shard_size,
               dtype=args.dtype, component=args.component, config_from=args.config_from,
               overwrite=args.overwrite)
    doc = {"schema": "dckpt.export/1", "ckpt": args.ckpt, "out": str(r.path),
           "component": r.component, "files": r.files, "tensors": r.tensors, "bytes": r.bytes,
           "copied": r.copied}
    if args.json:
        print_json(doc)
    else:
        print(f"exported {r.tensors} tensors of '{r.component}' ({size(r.bytes)}) in "
              f"{len(r.files)} file(s) to {r.path}"
              + (f"; copied {', '.join(r.copied)}" if r.copied else
                 "; no config.json found (pass --config-from)"))
    return EXIT_OK

"""Export a checkpoint's model weights in the Hugging Face Hub layout, shard by shard.

    dckpt.export("runs/exp1/step-000001000", "hf-model", max_shard_size="2GB", dtype="bf16")
    dckpt export runs/exp1/step-000001000 hf-model --format hf --max-shard-size 2GB

OUT holds `model.safetensors` (one shard) or `model-0000k-of-0000n.safetensors` with
`model.safetensors.index.json` (several), as `save_pretrained` writes them, plus the config
and tokenizer files found beside the checkpoint (in it, in its parent folder as
DckptTrainer lays it out, or in `config_from`). Any checkpoint: one saved on N ranks with
FSDP2 (DTensor) shards is read by global offsets, each tensor whole.

Streaming: the shards are planned from the manifest (names, shapes, dtypes) before any
byte is read; each shard's tensors are then read (verified), cast, written and dropped, so
the extra memory is about one shard. OUT is written under a temporary name and renamed
when complete: an interrupted export leaves no half folder under OUT's name.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine import checkpoint
from ..errors import CheckpointExistsError, InvalidArgumentError
from ..format.anatomy import rank_view
from ..format.dtypes import ITEMSIZE
from ..format.tree import ObjectState, TensorRef, ViewRef, decode

# What from_pretrained / AutoTokenizer read beside the weights.
PASS_THROUGH = ("config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
                "preprocessor_config.json", "processor_config.json", "chat_template.jinja",
                "chat_template.json")
DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
          "fp32": "float32", "float32": "float32"}
_WRAPPERS = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")  # DDP, compile, FSDP1 prefixes
_SIZE = re.compile(r"^\s*([0-9.]+)\s*([kmgt]i?b?|b)?\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20,
          "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40}


@dataclass
class ExportResult:
    """What export() wrote: the folder, its weight files, tensors, bytes, copied files."""
    path: Path
    files: list[str]
    tensors: int
    bytes: int
    copied: list[str] = field(default_factory=list)
    component: str = "model"


def parse_size(v: int | str) -> int:
    """Bytes from 5000000, "5GB" (SI, like save_pretrained's max_shard_size) or "4GiB"."""
    if isinstance(v, int) and not isinstance(v, bool):
        n = v
    else:
        m = _SIZE.match(str(v))
        if not m or (m.group(2) or "").lower() not in _UNITS:
            raise InvalidArgumentError(f"max_shard_size: cannot read {v!r} as a size "
                                       "(examples: 5GB, 500MB, 4GiB, 1000000)")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    if n <= 0:
        raise InvalidArgumentError(f"max_shard_size must be positive, not {v!r}")
    return n


def _weights(tree: Any, prefix: str = "") -> dict[str, TensorRef]:
    """name -> tensor reference of every tensor in a model's state (nested dicts joined
    with dots, as state_dict keys are)."""
    if isinstance(tree, ObjectState):
        tree = tree.state
    out: dict[str, TensorRef] = {}
    if isinstance(tree, TensorRef):
        out[prefix or "weight"] = tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_weights(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _unwrapped(names: list[str]) -> dict[str, str]:
    """Stored name -> Hub name, without the prefix a wrapper (DDP, torch.compile) added to
    every key."""
    out = {n: n for n in names}
    for p in _WRAPPERS:
        if names and all(k.startswith(p) for k in out.values()):
            out = {n: k[len(p):] for n, k in out.items()}
    return out


def _nbytes(m, ref: TensorRef, cast: str | None) -> int:
    """Bytes tensor `ref` takes in the export (after the cast), from the manifest alone."""
    if isinstance(ref, ViewRef):
        shape, stored = ref.shape, ref.dtype
    else:
        entry = m.tensors[ref.name]
        shape, stored = entry.shape, entry.dtype
    n = 1
    for d in shape:
        n *= d
    floating = stored.startswith(("float", "bfloat"))
    return n * ITEMSIZE.get(cast if cast and floating else stored, 1)


def plan(sizes: dict[str, int], max_shard_size: int) -> list[list[str]]:
    """Names in order, cut into shards of at most max_shard_size bytes (a larger tensor
    gets a shard of its own), as save_pretrained cuts them."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in sizes.items():
        if shards[-1] and used + n > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards


def export(ckpt: str | os.PathLike, out: str | os.PathLike, *, format: str = "hf",
           max_shard_size: int | str = "5GB", dtype: str | None = None,
           component: str | None = None, config_from: str | os.PathLike | None = None,
           overwrite: bool = False, verify: bool = True) -> ExportResult:
    """Write the model weights of checkpoint `ckpt` to the folder `out` in the Hub layout
    (module docstring). dtype: "bf16", "fp16" or "fp32" casts floating-point tensors;
    component: the component to export (default: the model); config_from: a folder with
    config/tokenizer files (default: the checkpoint and its parent folder)."""
    import torch
    from safetensors.torch import save_file

    from ..format.layout import TMP_MARK
    from ..state.reading import TensorReader
    from ..state.restore import materialize
    if format != "hf":
        raise InvalidArgumentError(f"export format {format!r}: only 'hf' is supported")
    if dtype is not None and dtype not in DTYPES:
        raise InvalidArgumentError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    cast = getattr(torch, DTYPES[dtype]) if dtype else None
    limit = parse_size(max_shard_size)
    ckpt, out = Path(ckpt), Path(out)
    if out.exists() and not overwrite:
        raise CheckpointExistsError(f"{out} exists: pass overwrite=True (--overwrite) to "
                                    "replace it, or export to a new folder")
    m = checkpoint.read_manifest(ckpt)
    try:
        component = rank_view(m, 0).model_key(component)
    except ValueError as e:
        raise InvalidArgumentError(f"{ckpt} {e} (component=, --component)") from None
    tree = decode(m.ranks[0]["tree"])
    refs = _weights(tree[component] if isinstance(tree, dict) and component in tree else tree)
    if not refs:
        raise InvalidArgumentError(f"component {component!r} of {ckpt} holds no tensors")
    hub = _unwrapped(list(refs))
    sizes = {n: _nbytes(m, refs[n], DTYPES[dtype] if dtype else None) for n in refs}
    shards = plan(sizes, limit)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])

    tmp = out.with_name(f".{out.name}{TMP_MARK}export")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        weight_map = {}
        aliases = m.ranks[0].get("aliases", {})
        for shard, fname in zip(shards, names):
            # Only this shard's tensors are read: the sub-tree names nothing else.
            reader = TensorReader(ckpt, m, verify)
            values = materialize({n: refs[n] for n in shard}, m, reader, aliases)
            tensors, seen = {}, set()
            for n in shard:
                t = values[n]
                if cast is not None and t.is_floating_point():
                    t = t.to(cast)
                # safetensors stores no shared storage: tied weights get their own copy.
                key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
                if key in seen:
                    t = t.clone()
                seen.add(key)
                tensors[hub[n]] = t.contiguous()
                weight_map[hub[n]] = fname
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            del values, tensors  # one shard in memory at a time
        total = sum(sizes.values())
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(
                weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        copied = _pass_through(ckpt, tmp, config_from)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, names, len(refs), total, copied, component)


def _pass_through(ckpt: Path, dst: Path, config_from) -> list[str]:
    """Copy the config and tokenizer files from the first folder that has config.json (or
    any of them): config_from, else the checkpoint, else its parent folder."""
    if config_from is not None:
        places = [Path(config_from)]
        if not places[0].is_dir():
            raise InvalidArgumentError(f"config_from: {config_from} is not a folder")
    else:
        places = [ckpt, ckpt.parent]
    for place in places:
        found = [n for n in PASS_THROUGH if (place / n).is_file()]
        if found:
            for n in found:
                shutil.copyfile(place / n, dst / n)
            return found
    return []

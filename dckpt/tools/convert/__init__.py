"""Convert checkpoints into dckpt, and dckpt model weights out to safetensors.

    convert("run/checkpoint-500", "ckpt")          # HF Trainer folder -> dckpt
    convert("state.pt", "ckpt")                    # torch.save file (weights_only) -> dckpt
    export_safetensors("ckpt", "model.safetensors")

Nothing is unpickled: torch files load with weights_only=True (plus plain numpy arrays for
RNG states); what needs more is skipped and named in the result's notes. Imported components
are recorded as objects, so `CheckpointManager.restore` / `dckpt.load(into=...)` hand them
to the live model's, optimizer's and scheduler's load_state_dict().
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import UnsupportedStateError
from .sources import READERS, Imported, detect, read_accelerate_state
from .torchfiles import ConvertError

SOURCES = ("auto", *READERS)
# Destinations that name a file: exports of a dckpt checkpoint, never a checkpoint directory.
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
EXPORT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)


class _ImportedState:
    """Carries an imported state dict through flatten(), which records it as an object."""

    __module__ = "dckpt.convert"  # the type name checkpoints record: stable across moves

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state

    def load_state_dict(self, state: dict) -> None:
        self._state = state


class ImportedModel(_ImportedState):
    pass


class ImportedOptimizer(_ImportedState):
    pass


class ImportedScheduler(_ImportedState):
    pass


class ImportedScaler(_ImportedState):
    pass


class ImportedData(_ImportedState):
    pass


class ImportedObject(_ImportedState):
    pass


_WRAP = {"model": ImportedModel, "optimizer": ImportedOptimizer,
         "scheduler": ImportedScheduler, "scaler": ImportedScaler, "data": ImportedData,
         "object": ImportedObject}


@dataclass
class ConvertResult:
    source: str
    src: str
    dst: str
    components: dict[str, str] = field(default_factory=dict)  # key -> kind
    tensors: int = 0
    bytes: int = 0
    rng_processes: int = 0
    counters: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"schema": "dckpt.convert/1", "source": self.source, "src": self.src,
                "dst": self.dst, "components": self.components, "tensors": self.tensors,
                "bytes": self.bytes, "rng_processes": self.rng_processes,
                "counters": self.counters, "notes": self.notes}


def read(src: str | os.PathLike, source: str = "auto") -> Imported:
    """Read a source checkpoint into memory (state dicts, counters, RNG streams)."""
    src = Path(src)
    kind = detect(src) if source == "auto" else source
    if kind == "dckpt":
        raise ConvertError(f"{src} is already a dckpt checkpoint", str(src))
    if kind not in READERS:
        raise ConvertError(f"unknown source kind {kind!r} (one of {', '.join(READERS)})")
    if kind in ("torch", "safetensors") and not src.is_file():
        raise ConvertError(f"{src} is not a file", str(src))
    if kind in ("hf-trainer", "accelerate") and not src.is_dir():
        raise ConvertError(f"{src} is not a folder", str(src))
    return READERS[kind](src)


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, source: str = "auto",
            overwrite: bool = False, compression: str | int | None = None,
            fsync: bool = True) -> ConvertResult:
    """Write the checkpoint at `src` as a dckpt checkpoint directory `dst`."""
    if Path(dst).suffix in EXPORT_SUFFIXES:
        # A directory named model.pt would be taken for a torch.save file by every tool.
        raise ConvertError(f"{dst} names a file ({Path(dst).suffix}), but a dckpt checkpoint is "
                           "a directory: give a destination without that suffix (files are "
                           "only written when exporting from a dckpt checkpoint)", str(dst))
    imp = read(src, source)
    return write(imp, dst, overwrite=overwrite, compression=compression, fsync=fsync)


def write(imp: Imported, dst: str | os.PathLike, *, overwrite: bool = False,
          compression: str | int | None = None, fsync: bool = True) -> ConvertResult:
    from ...engine import checkpoint
    from ...storage import commit
    from ...format import tree as treecodec
    from ...state.flatten import flatten
    state: dict[str, Any] = {}
    notes = list(imp.notes)
    kinds = {}
    for key, (kind, value) in imp.components.items():
        wrapped = _WRAP[kind](value) if kind in _WRAP and isinstance(value, dict) else value
        try:
            treecodec.encode(flatten({key: wrapped}).tree)
        except UnsupportedStateError as e:
            notes.append(f"skipped component '{key}': {e}")
            continue
        state[key] = wrapped
        kinds[key] = kind
    meta = {"imported": {"from": imp.source, "path": imp.path,
                         "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "notes": notes,
                         **imp.meta}}
    rng = [r for r in imp.rng if r]
    res = checkpoint.save(state, dst, overwrite=overwrite, compression=compression,
                          fsync=fsync, counters=imp.counters or None,
                          metrics=imp.metrics or None, meta=meta,
                          rank_state={"rng": rng[0]} if rng else None)
    if len(rng) > 1:
        # One tree, replicated: every process of the source run gets its own RNG streams.
        m = res.manifest
        base = m.ranks[0]
        m.ranks = [base] + [{"tree": base["tree"], "aliases": base.get("aliases", {}),
                             "rng": treecodec.encode(r)} for r in rng[1:]]
        m.world_size = len(rng)
        commit.write_file_durably(Path(dst) / "manifest.json", m.to_bytes(), fsync)
    return ConvertResult(imp.source, imp.path, str(dst), kinds, len(res.manifest.tensors),
                         res.bytes, len(rng), dict(imp.counters), notes)


def export_safetensors(ckpt: str | os.PathLike, dst: str | os.PathLike, *,
                       component: str | None = None, overwrite: bool = False) -> dict:
    """Write one component's tensors (default: the model) as a safetensors file for
    inference. Tied weights are written as separate copies (safetensors shares no storage).
    Returns {"component", "tensors", "bytes", "skipped"}."""
    return _export(ckpt, dst, component, overwrite, torch_file=False)


def export_torch(ckpt: str | os.PathLike, dst: str | os.PathLike, *,
                 component: str | None = None, overwrite: bool = False) -> dict:
    """Write one component's tensors (default: the model) as a torch.save file of a flat
    state dict ({"0.weight": tensor, ...}) that `torch.load(dst, weights_only=True)` and
    `model.load_state_dict` take; tied weights keep sharing one storage. Writing it needs no
    pickle of anything but tensors and str keys; dckpt itself never loads it.
    Returns {"component", "tensors", "bytes", "skipped"}."""
    return _export(ckpt, dst, component, overwrite, torch_file=True)


def _export(ckpt, dst, component: str | None, overwrite: bool, torch_file: bool) -> dict:
    import torch
    from safetensors.torch import save_file

    from ...engine import checkpoint
    from ...format import anatomy
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise ConvertError(f"{dst} exists; pass overwrite to replace it", str(dst))
    m = checkpoint.read_manifest(ckpt)
    try:
        component = anatomy.rank_view(m, 0).model_key(component)
    except ValueError as e:
        raise ConvertError(f"{ckpt} {e}") from None
    loaded = checkpoint.load(ckpt, keys=[component])[component]
    tensors, skipped = {}, []
    _collect(loaded, "", tensors, skipped)
    if not tensors:
        raise ConvertError(f"component {component!r} holds no tensors")
    seen: dict[int, str] = {}
    for k, t in list(tensors.items()):
        if torch_file:
            break  # torch.save keeps shared storages shared
        key = t.untyped_storage().data_ptr() if t.numel() else id(t)
        if key in seen:
            tensors[k] = t.clone()
        else:
            seen[key] = k
        tensors[k] = tensors[k].contiguous()
    meta = {"format": "pt", "dckpt_source": str(ckpt), "dckpt_component": component}
    if "step" in m.counters:
        meta["step"] = str(m.counters["step"])
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a leftover or a planted link: not written through
    if torch_file:
        torch.save(tensors, tmp)
    else:
        save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, dst)
    return {"component": component, "tensors": len(tensors),
            "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
            "skipped": skipped}


def _collect(node: Any, prefix: str, out: dict, skipped: list) -> None:
    import torch
    if isinstance(node, torch.Tensor):
        out[prefix or "tensor"] = node
    elif isinstance(node, dict):
        for k, v in node.items():
            _collect(v, f"{prefix}.{k}" if prefix else str(k), out, skipped)
    elif node is not None:
        skipped.append(prefix)


__all__ = ["convert", "read", "write", "export_safetensors", "export_torch", "ConvertResult", "ConvertError",
           "Imported", "read_accelerate_state", "detect", "SOURCES"]

"""Readers for the checkpoints people already have. Each returns an `Imported`: components
as state dicts, training counters, per-process RNG streams, and notes on what was skipped.

    torch file     a .pt/.pth/.bin from torch.save (state dict or training-checkpoint dict)
    safetensors    a .safetensors file: model weights
    hf-trainer     a Hugging Face Trainer checkpoint-N folder
    accelerate     an Accelerator.save_state folder

`read_accelerate_state` is the importer the accelerate integration can reuse.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import torchfiles
from .torchfiles import ConvertError


@dataclass
class Imported:
    source: str  # "torch" | "safetensors" | "hf-trainer" | "accelerate"
    path: str
    components: dict[str, tuple[str, Any]] = field(default_factory=dict)  # key -> (kind, state)
    counters: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    rng: list[dict] = field(default_factory=list)  # per process, dckpt.rng layout
    notes: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


def read_torch_file(path: Path) -> Imported:
    out = Imported("torch", str(path))
    obj = torchfiles.load(path)
    if torchfiles.is_flat_state_dict(obj):
        out.components["model"] = ("model", obj)
    elif isinstance(obj, dict):
        comps, out.counters, out.metrics, rng = torchfiles.split_training_dict(
            obj, path.name, out.notes)
        out.components.update(comps)
        if rng:
            out.rng.append(rng)
    else:
        raise ConvertError(f"{path.name} holds a {type(obj).__name__}, not a state dict",
                           str(path))
    return out


def read_safetensors(path: Path) -> Imported:
    from safetensors import safe_open
    out = Imported("safetensors", str(path))
    out.components["model"] = ("model", _load_safetensors(path))
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
    if md:
        out.meta["safetensors_metadata"] = dict(md)
    return out


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConvertError(f"{path.name} is not a readable safetensors file: {e}",
                           str(path)) from None


def _model_weights(folder: Path, stem_safe: str, stem_bin: str, notes: list[str]) -> dict | None:
    """Weights saved whole (model.safetensors / pytorch_model.bin) or sharded with an index."""
    single = folder / f"{stem_safe}.safetensors"
    if single.is_file():
        return _load_safetensors(single)
    for index_name, loader in ((f"{stem_safe}.safetensors.index.json", _load_safetensors),
                               (f"{stem_bin}.bin.index.json", torchfiles.load)):
        index = folder / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError) as e:
                raise ConvertError(f"{index_name}: bad index ({e})", str(index)) from None
            weights: dict = {}
            for name in shards:
                if "/" in name or name.startswith("."):
                    raise ConvertError(f"{index_name} names a shard outside the folder: "
                                       f"{name!r}", str(index))
                weights.update(loader(folder / name))
            return weights
    single = folder / f"{stem_bin}.bin"
    if single.is_file():
        return torchfiles.load(single)
    return None


def _optional(folder: Path, name: str, out: Imported):
    """A torch.save file if present and loadable without pickle, else None (noted)."""
    p = folder / name
    if not p.is_file():
        return None
    try:
        return torchfiles.load(p)
    except ConvertError as e:
        out.notes.append(f"skipped {name}: {e}")
        return None


def read_hf_trainer(folder: Path) -> Imported:
    out = Imported("hf-trainer", str(folder))
    weights = _model_weights(folder, "model", "pytorch_model", out.notes)
    if weights is None:
        weights = _model_weights(folder, "adapter_model", "adapter_model", out.notes)
    if weights is None:
        raise ConvertError(f"{folder} has no model weights (model.safetensors, "
                           "pytorch_model.bin or a sharded index)", str(folder))
    out.components["model"] = ("model", weights)
    for key, name in (("optimizer", "optimizer.pt"), ("scheduler", "scheduler.pt"),
                      ("scaler", "scaler.pt")):
        state = _optional(folder, name, out)
        if state is not None:
            out.components[key] = (key, state)
    rng_files = sorted(folder.glob("rng_state_*.pth"), key=_index_of) or (
        [folder / "rng_state.pth"] if (folder / "rng_state.pth").is_file() else [])
    for p in rng_files:
        state = _optional(folder, p.name, out)
        if state is not None:
            out.rng.append(torchfiles.rng_from_legacy(state, out.notes, p.name))
    state_file = folder / "trainer_state.json"
    if state_file.is_file():
        _trainer_state(state_file, out)
    else:
        out.notes.append("no trainer_state.json: step and epoch unknown")
    if (folder / "training_args.bin").is_file():
        out.notes.append("skipped training_args.bin: a pickled TrainingArguments object "
                         "(configuration, not training state)")
    return out


def _index_of(p: Path) -> int:
    m = re.search(r"_(\d+)\.\w+$", p.name)
    return int(m.group(1)) if m else 0


def _trainer_state(path: Path, out: Imported) -> None:
    try:
        st = json.loads(path.read_text())
    except ValueError as e:
        out.notes.append(f"trainer_state.json unreadable ({e}): step and epoch unknown")
        return
    step = st.get("global_step")
    if isinstance(step, int):
        out.counters["step"] = step
    epoch = st.get("epoch")
    max_steps, epochs = st.get("max_steps"), st.get("num_train_epochs")
    spe = None
    if isinstance(max_steps, int) and isinstance(epochs, (int, float)) and epochs > 0:
        spe = math.ceil(max_steps / epochs)
        out.counters["steps_per_epoch"] = spe
    if isinstance(epoch, (int, float)):
        whole = int(math.floor(epoch + 1e-9))
        out.counters["epoch"] = whole
        if spe and isinstance(step, int):
            out.counters["step_in_epoch"] = max(0, step - whole * spe)
    history = st.get("log_history") if isinstance(st.get("log_history"), list) else []
    losses = [e["loss"] for e in history if isinstance(e, dict)
              and isinstance(e.get("loss"), (int, float))]
    if losses:
        out.counters["loss_history"] = [float(x) for x in losses]
    for e in history:
        if isinstance(e, dict):
            out.metrics.update({k: float(v) for k, v in e.items()
                                if k.startswith("eval_") and isinstance(v, (int, float))})
    if isinstance(st.get("best_metric"), (int, float)):
        out.metrics["best_metric"] = float(st["best_metric"])
    out.meta["trainer_state"] = {k: v for k, v in st.items() if k != "log_history"}


def read_accelerate_state(folder: Path) -> Imported:
    """An `Accelerator.save_state` folder: models, optimizers, schedulers, scaler, data-loader
    states, custom objects and every process's RNG streams. Components keep accelerate's
    names (model, model_1, optimizer, ...; custom objects as custom_0, ...)."""
    out = Imported("accelerate", str(folder))
    i = 0
    while True:
        suffix = "" if i == 0 else f"_{i}"
        weights = _model_weights(folder, f"model{suffix}", f"pytorch_model{suffix}", out.notes)
        if weights is None:
            break
        out.components[f"model{suffix}"] = ("model", weights)
        i += 1
    if i == 0:
        raise ConvertError(f"{folder} has no model weights (model.safetensors or "
                           "pytorch_model.bin)", str(folder))
    for base, kind in (("optimizer", "optimizer"), ("scheduler", "scheduler"),
                       ("dl_state_dict", "data")):
        for p in sorted(folder.glob(f"{base}*.bin"), key=_index_of):
            if not re.fullmatch(rf"{base}(_\d+)?\.bin", p.name):
                continue
            state = _optional(folder, p.name, out)
            if state is not None:
                out.components[p.stem] = (kind, state)
    scaler = _optional(folder, "scaler.pt", out)
    if scaler is not None:
        out.components["scaler"] = ("scaler", scaler)
    for p in sorted(folder.glob("sampler*.bin")):
        out.notes.append(f"skipped {p.name}: accelerate pickles the sampler object itself; the "
                         "data position comes from dl_state_dict when present")
    for p in sorted(folder.glob("custom_checkpoint_*.pkl"), key=_index_of):
        state = _optional(folder, p.name, out)
        if state is not None:
            out.components[f"custom_{_index_of(p)}"] = ("object", state)
    steps = set()
    for p in sorted(folder.glob("random_states_*.pkl"), key=_index_of):
        state = _optional(folder, p.name, out)
        if isinstance(state, dict):
            out.rng.append(torchfiles.rng_from_legacy(state, out.notes, p.name))
            if isinstance(state.get("step"), int):
                steps.add(state["step"])
    if len(steps) == 1:
        # Accelerator.step counts gradient-accumulation micro-steps inside accumulate(),
        # not optimizer steps: kept under its own name, never as the global step.
        out.counters["accelerate_step"] = steps.pop()
    return out


def detect(src: Path) -> str:
    """The kind of source at `src`; raises ConvertError when it is none of them."""
    if src.is_file():
        if src.suffix == ".safetensors":
            return "safetensors"
        if src.suffix in (".pt", ".pth", ".bin", ".ckpt", ".tar"):
            return "torch"
        raise ConvertError(f"{src.name}: unknown file type (expected .pt/.pth/.bin or "
                           ".safetensors)", str(src))
    if not src.is_dir():
        raise ConvertError(f"{src} does not exist", str(src))
    names = {p.name for p in src.iterdir()}
    if "manifest.json" in names:
        return "dckpt"
    if "trainer_state.json" in names or any(n.startswith("rng_state") for n in names):
        return "hf-trainer"
    if any(n.startswith("random_states_") for n in names) or "optimizer.bin" in names:
        return "accelerate"
    if names & {"model.safetensors", "pytorch_model.bin"}:
        return "hf-trainer"
    raise ConvertError(f"{src}: not a recognised checkpoint folder (no trainer_state.json, "
                       "random_states_*.pkl or manifest.json)", str(src))


READERS = {"torch": read_torch_file, "safetensors": read_safetensors,
           "hf-trainer": read_hf_trainer, "accelerate": read_accelerate_state}

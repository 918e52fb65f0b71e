"""Reading `torch.save` files without running pickled code, and the layouts found in them.

`torch.load(weights_only=True)` allows tensors and plain containers only. On top of that we
allow numpy's array reconstruction (an ndarray of a plain dtype, nothing else), because
every RNG state file stores numpy's generator state as an array; Hugging Face does the
same. Anything else a file pickles (a sampler object, TrainingArguments) is refused with
the names of the globals it would need, and the import reports it as skipped.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ...errors import DckptError


class ConvertError(DckptError):
    """A source cannot be converted; names the file and why."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


class PickleRequired(ConvertError):
    """The file holds Python objects that only real unpickling (running code from the file)
    could restore; callers that may unpickle trusted files tell this from a broken file."""


def _numpy_globals() -> list:
    import numpy as np
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    dtype_classes = [type(np.dtype(t)) for t in ("u1", "u4", "i4", "i8", "f4", "f8", "b1")]
    return [_reconstruct, scalar, np.ndarray, np.dtype, *dtype_classes]


def load(path: str | Path) -> Any:
    """torch.load(path, weights_only=True) plus plain numpy arrays; raises ConvertError."""
    import pickle

    import torch
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            needs = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:
            needs = []
        what = f" (it pickles {', '.join(needs[:4])})" if needs else ""
        raise PickleRequired(f"{path.name} holds Python objects that only unpickling could "
                             f"restore{what}; dckpt loads no pickle", str(path)) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ConvertError(f"{path.name} is not a readable torch.save file: {why}",
                           str(path)) from None


# ---- RNG states in the layouts other tools save ------------------------------------------

_PYTHON_KEYS = ("python", "random_state", "python_rng_state")
_NUMPY_KEYS = ("numpy", "numpy_random_seed", "numpy_rng_state")
_TORCH_KEYS = ("cpu", "torch_manual_seed", "torch_rng_state", "torch")
_CUDA_KEYS = ("cuda", "torch_cuda_manual_seed", "cuda_rng_state_all", "cuda_rng_state")


def rng_from_legacy(d: dict, notes: list[str], where: str) -> dict:
    """dckpt's RNG layout (see dckpt.rng) from an HF / accelerate / hand-written RNG dict.
    Streams that do not have the expected form are skipped with a note."""
    out: dict = {}
    if not isinstance(d, dict):
        return out
    for keys, name, conv in ((_PYTHON_KEYS, "python", _python_state),
                             (_NUMPY_KEYS, "numpy", _numpy_state),
                             (_TORCH_KEYS, "torch", _torch_state),
                             (_CUDA_KEYS, "cuda", _cuda_states)):
        key = next((k for k in keys if k in d and d[k] is not None), None)
        if key is None:
            continue
        try:
            out[name] = conv(d[key])
        except (TypeError, ValueError, AttributeError) as e:
            notes.append(f"{where}: RNG stream '{key}' not imported: {e}")
    return out


def _python_state(v) -> dict:
    version, internal, gauss = v
    if not (isinstance(internal, (tuple, list)) and len(internal) == 625
            and all(isinstance(x, int) for x in internal)):
        raise ValueError("not a Mersenne Twister state of 625 integers")
    if gauss is not None and not isinstance(gauss, float):
        raise ValueError("bad gauss value")
    return {"version": int(version), "state": list(internal), "gauss": gauss}


def _numpy_state(v) -> dict:
    import numpy as np
    if isinstance(v, dict):  # np.random.get_state(legacy=False)
        kind, st = v["bit_generator"], v["state"]
        keys, pos = st["key"], st["pos"]
        has_gauss, cached = v.get("has_gauss", 0), v.get("gauss", 0.0)
    else:
        kind, keys, pos, has_gauss, cached = v
    keys = np.asarray(keys)
    if kind != "MT19937" or keys.shape != (624,):
        raise ValueError("not a legacy MT19937 state")
    if not isinstance(cached, (int, float)) or not math.isfinite(float(cached)):
        raise ValueError("bad cached gaussian")
    return {"kind": "MT19937", "keys": keys.astype("<u4").tobytes(), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _torch_state(v) -> bytes:
    import torch
    if not isinstance(v, torch.Tensor) or v.dtype != torch.uint8:
        raise ValueError("not a uint8 generator state tensor")
    return v.contiguous().numpy().tobytes()


def _cuda_states(v) -> list[bytes]:
    items = v if isinstance(v, (list, tuple)) else [v]
    return [_torch_state(t) for t in items]


# ---- whole training checkpoints saved as one dict ------------------------------------------

_COMPONENT_KEYS = {
    "model": ("model", "model_state_dict", "state_dict", "module", "net", "model_state"),
    "optimizer": ("optimizer", "optimizer_state_dict", "optim", "optimizer_state"),
    "scheduler": ("scheduler", "scheduler_state_dict", "lr_scheduler", "lr_scheduler_state_dict"),
    "scaler": ("scaler", "grad_scaler", "scaler_state_dict", "amp"),
}
_STEP_KEYS = ("global_step", "step", "iteration", "iter", "num_updates")
_LOSS_KEYS = ("loss_history", "epoch_losses", "losses", "train_losses")
_RNG_KEYS = ("rng_states", "rng_state", "rng", "random_states")


def is_flat_state_dict(obj: Any) -> bool:
    import torch
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def split_training_dict(obj: dict, where: str, notes: list[str]):
    """A checkpoint dict as many training scripts save it -> (components, counters,
    metrics, rng). Unknown entries are kept as components of their own."""
    comps: dict[str, tuple[str, Any]] = {}
    used: set = set()
    for kind, keys in _COMPONENT_KEYS.items():
        key = next((k for k in keys if k in obj and isinstance(obj[k], dict)), None)
        if key is not None:
            comps[kind] = (kind, obj[key])
            used.add(key)
    counters: dict = {}
    step_key = next((k for k in _STEP_KEYS if _is_int(obj.get(k))), None)
    if step_key:
        counters["step"] = int(obj[step_key])
        used.add(step_key)
    if _is_int(obj.get("epoch")):
        counters["epoch"] = int(obj["epoch"])
        used.add("epoch")
    loss_key = next((k for k in _LOSS_KEYS if isinstance(obj.get(k), (list, tuple))), None)
    if loss_key:
        counters["loss_history"] = [float(x) for x in obj[loss_key]
                                    if isinstance(x, (int, float))]
        used.add(loss_key)
    metrics = {k: float(v) for k, v in obj.items()
               if k not in used and isinstance(v, float) and not isinstance(v, bool)}
    used |= set(metrics)
    rng: dict = {}
    rng_key = next((k for k in _RNG_KEYS if isinstance(obj.get(k), dict)), None)
    if rng_key:
        rng = rng_from_legacy(obj[rng_key], notes, f"{where}[{rng_key!r}]")
        used.add(rng_key)
    for k, v in obj.items():
        if k not in used:
            comps[str(k)] = ("value", v)
    return comps, counters, metrics, rng


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)

"""Shared tools of the attack suite (tests/test_attack_*.py): states whose bytes are known,
manifest surgery that re-seals the self hash, bit flips, and the trial counts of both modes.

DCKPT_SLOW=1 turns on the long runs (docs/RELIABILITY.md); DCKPT_ATTACKS=medium a reduced
but meaningful slice of them, what CI runs (.ci/run); the counts below are per mode.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import xxhash

from dckpt.format.manifest import MANIFEST_NAME, _canonical

SLOW = os.environ.get("DCKPT_SLOW") == "1"
MEDIUM = not SLOW and os.environ.get("DCKPT_ATTACKS") == "medium"


def trials(normal: int, slow: int, medium: int | None = None) -> int:
    if SLOW:
        return slow
    return medium if MEDIUM and medium is not None else normal


def known_state(step: int, scale: int = 1) -> dict:
    """A state whose every byte follows from `step`: several dtypes, shapes, a numpy array,
    plain values. `scale` multiplies the tensor sizes."""
    g = torch.Generator().manual_seed(1000 + step)
    return {
        "w": torch.randn(64 * scale, 33, generator=g),
        "b": torch.randn(7, generator=g).to(torch.bfloat16),
        "idx": torch.randint(-2**40, 2**40, (129 * scale,), generator=g),
        "mask": torch.rand(50, generator=g) > 0.5,
        "half": torch.randn(3, 5, 2, generator=g).half(),
        "np": np.random.default_rng(step).standard_normal(40 * scale),
        "empty": torch.empty(0, 4),
        "step": step,
        "info": {"name": f"step {step}", "hist": [0.5, step * 1.5], "pair": (step, "x")},
    }


def model_state(step: int) -> dict:
    """A model with an optimizer that has taken steps, so both carry tensors."""
    torch.manual_seed(step)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.randn(3, 6)).sum().backward()
        opt.step()
    return {"model": model, "optimizer": opt, "extra": known_state(step)}


def assert_same(a, b, path: str = "") -> None:
    """Bitwise equality of nested states (tensors by bytes, dtype and shape)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert a.contiguous().view(-1).view(torch.uint8).numpy().tobytes() == \
            b.contiguous().view(-1).view(torch.uint8).numpy().tobytes(), path
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, path
        assert a.tobytes() == b.tobytes(), path
    elif isinstance(a, dict):  # the manifest's canonical JSON sorts keys: order may differ
        assert isinstance(b, dict) and sorted(map(str, a)) == sorted(map(str, b)), path
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}/{i}")
    else:
        assert a == b and type(a) is type(b), (path, a, b)


# ---- manifest surgery ------------------------------------------------------------------------

def manifest_obj(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / MANIFEST_NAME).read_bytes())


def seal(obj: dict) -> bytes:
    """Manifest bytes with a valid self hash, so only the schema checks can object."""
    body = {k: v for k, v in obj.items() if k != "self_hash"}
    body["self_hash"] = f"{xxhash.xxh3_64_intdigest(_canonical(body)):016x}"
    return _canonical(body) + b"\n"


def rewrite_manifest(ckpt: Path, obj: dict) -> None:
    (Path(ckpt) / MANIFEST_NAME).write_bytes(seal(obj))


def tree_child(node: dict, key: str):
    """The value at `key` of an encoded tree dict: a plain object, or $dict pairs (a dict
    whose keys are not in sorted order)."""
    if "$dict" in node:
        return next(v for k, v in node["$dict"] if k == key)
    return node[key]


def tree_set(node: dict, key: str, value) -> None:
    """Set `key` of an encoded tree dict, in either form."""
    if "$dict" not in node:
        node[key] = value
        return
    pairs = [p for p in node["$dict"] if p[0] != key]
    node["$dict"] = pairs + [[key, value]]


def json_paths(node, prefix=(), sample_lists=True):
    """Every path into a JSON value (root excluded). Long lists contribute their first and
    last element only when sample_lists, so a 625-word RNG state is two paths, not 625."""
    if isinstance(node, dict):
        items = list(node.items())
    elif isinstance(node, list):
        idx = range(len(node))
        if sample_lists and len(node) > 2:
            idx = [0, len(node) - 1]
        items = [(i, node[i]) for i in idx]
    else:
        return
    for k, v in items:
        yield prefix + (k,)
        yield from json_paths(v, prefix + (k,), sample_lists)


def substituted(obj: dict, path: tuple, value) -> dict:
    out = copy.deepcopy(obj)
    node = out
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return out


MUTATIONS = ("os.rename", "os.remove", "os.rmdir", "os.link", "os.mkdir", "os.truncate",
             "os.unlink")


def killed_at(k: int, fn, timeout: float = 60.0) -> bool:
    """Run fn in a forked child that SIGKILLs itself at its k-th file-system mutation (an
    open for writing counts). True if it died there, False if fn finished first."""
    pid = os.fork()
    if pid == 0:
        try:
            count = [0]

            def hook(event, args):
                writing = event == "open" and (
                    (isinstance(args[1], str) and any(c in args[1] for c in "wax+")) or
                    (isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR)))
                if event in MUTATIONS or writing:
                    count[0] += 1
                    if count[0] == k:
                        os.kill(os.getpid(), signal.SIGKILL)

            sys.addaudithook(hook)
            fn()
        except BaseException as e:  # noqa: BLE001
            print(f"victim failed: {type(e).__name__}: {e}", file=sys.stderr)
            os._exit(3)
        os._exit(0)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
                return True
            assert os.WEXITSTATUS(status) == 0, f"victim failed at mutation {k}"
            return False
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"victim hung at mutation {k}")
        time.sleep(0.002)

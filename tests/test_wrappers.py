"""Checkpoints name tensors as the plain module does: a model saved through DDP,
DataParallel, torch.compile or accelerate's prepare() loads into the bare module (for
evaluation, or on another launcher), and back into a wrapped one. Older checkpoints that
recorded `module.` / `_orig_mod.` names still load."""
from __future__ import annotations

import torch
from torch import nn

import dckpt
from helpers.ranks import run_with_ranks


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _names(path) -> set[str]:
    return set(dckpt.read_manifest(path).tensors)


def _ddp_rank(rank, world, root):
    from accelerate import Accelerator
    from torch.nn.parallel import DistributedDataParallel as DDP
    ddp = DDP(_model(0))
    dckpt.save({"model": ddp}, f"{root}/ddp")
    acc = Accelerator(cpu=True)
    prepared = acc.prepare(_model(1))
    assert isinstance(prepared, DDP)
    dckpt.save({"model": prepared}, f"{root}/accelerate")
    plain = _model(5)
    dckpt.load(f"{root}/ddp", into={"model": plain})
    ok = _same(plain, ddp.module)
    dckpt.load(f"{root}/accelerate", into={"model": plain})
    ok = ok and _same(plain, prepared.module)
    back = DDP(_model(7))
    dckpt.load(f"{root}/ddp", into={"model": back})
    return ok and _same(back.module, ddp.module)


def test_ddp_and_accelerate_checkpoints_load_into_the_plain_module(tmp_path):
    assert all(run_with_ranks(2, _ddp_rank, str(tmp_path), timeout=180))
    for name in ("ddp", "accelerate"):
        names = _names(tmp_path / name)
        assert "model/0.weight" in names and not any("module." in n for n in names)


def test_data_parallel_and_compiled_models_save_plain_names(tmp_path):
    base = _model(0)
    for i, wrapped in enumerate([nn.DataParallel(base), torch.compile(base),
                                 torch.compile(nn.DataParallel(base))]):
        path = tmp_path / f"w{i}"
        dckpt.save({"model": wrapped}, path)
        assert _names(path) == {"model/0.weight", "model/0.bias", "model/2.weight",
                                "model/2.bias"}
        plain = _model(3)
        dckpt.load(path, into={"model": plain})
        assert _same(plain, base)
        again = torch.compile(_model(4))
        dckpt.load(path, into={"model": again})
        assert _same(again._orig_mod, base)


class _OldWrapper(nn.Module):
    """Saves `module.`-prefixed names, as DDP did before dckpt unwrapped it."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.module = inner


def test_checkpoints_with_wrapper_prefixes_still_load(tmp_path):
    base = _model(0)
    dckpt.save({"model": _OldWrapper(_OldWrapper(base))}, tmp_path / "old")
    assert "model/module.module.0.weight" in _names(tmp_path / "old")
    plain = _model(9)
    dckpt.load(tmp_path / "old", into={"model": plain})
    assert _same(plain, base)
    ddp_like = nn.DataParallel(_model(8))
    dckpt.load(tmp_path / "old", into={"model": ddp_like})
    assert _same(ddp_like.module, base)

"""The edges a new user meets first (issue 17): errors that say what to do, exit codes that
do not depend on the reader, partial restores that say what they left behind."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import dckpt
from helpers.cli import build_state, make_root, run_cli
from helpers import env



@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_root(tmp_path_factory.mktemp("edges") / "run", saves=(3, 6))


# ---- not a checkpoint: a torch.save file, a manager root ----------------------------------

def test_load_of_a_torch_save_file_says_convert(tmp_path):
    f = tmp_path / "model.pt"
    torch.save({"w": torch.ones(3)}, f)
    with pytest.raises(dckpt.NotACheckpointError) as e:
        dckpt.load(f)
    msg = str(e.value)
    assert "not a dckpt checkpoint" in msg and "dckpt convert" in msg and str(f) in msg
    assert "Not a directory" not in msg and e.value.path == str(f)
    assert isinstance(e.value, dckpt.CheckpointNotFoundError)  # old handlers still catch it
    code, _, err = run_cli("verify", f)
    assert code == 2 and "dckpt convert" in err
    code, _, err = run_cli("inspect", f)
    assert code == 2 and "dckpt convert" in err


def test_load_of_a_manager_root_names_restore_and_latest(root):
    with pytest.raises(dckpt.NotACheckpointError) as e:
        dckpt.load(root, into=build_state())
    msg = str(e.value)
    assert "CheckpointManager root" in msg and ".restore(state)" in msg and "--latest" in msg
    assert "step-000000006" in msg  # the newest, to load directly
    from dckpt.tools.verify import verify_checkpoint
    with pytest.raises(dckpt.NotACheckpointError, match="--latest"):
        verify_checkpoint(root)


def test_diff_accepts_manager_roots(root, tmp_path):
    other = make_root(tmp_path / "other", saves=(3,))
    code, out, err = run_cli("diff", root, other)
    assert code == 1, err
    assert "step-000000006" in out and "step-000000003" in out  # each root's newest step
    code, out, _ = run_cli("diff", root, root / "step-000000006")
    assert code == 0 and out.rstrip().endswith("identical")


# ---- exit codes do not depend on the reader -----------------------------------------------

def _piped_exit_code(argv: list[str], read_bytes: int) -> int:
    """Run the CLI with stdout into a pipe whose reader closes after `read_bytes`, as
    `| head -c` does."""
    p = subprocess.Popen([sys.executable, "-m", "dckpt", *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env())
    p.stdout.read(read_bytes)
    p.stdout.close()  # the reader goes away; the writer's next write gets EPIPE
    err = p.stderr.read()
    code = p.wait(timeout=120)
    assert b"Traceback" not in err and b"Exception ignored" not in err, err
    return code


def test_diff_exit_code_survives_a_closed_pipe(root):
    a, b = str(root / "step-000000003"), str(root / "step-000000006")
    argv = ["diff", a, b, "--all"]
    assert _piped_exit_code(argv, 1 << 20) == 1  # read everything
    assert _piped_exit_code(argv, 0) == 1  # the reader is gone before the first line
    assert _piped_exit_code(["diff", a, a, "--json"], 0) == 0
    assert _piped_exit_code(["verify", str(root), "-v"], 0) == 0


# ---- convert to a .pt name: an export file, never a directory called model.pt -------------

def test_convert_to_pt_exports_a_torch_file(tmp_path):
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied: the file keeps them one storage, as torch.save does
    model = nn.ModuleDict({"emb": emb, "head": head, "norm": nn.LayerNorm(4)})
    ck = tmp_path / "ck"
    dckpt.save({"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}, ck)
    for name in ("model.pt", "model.bin"):
        code, out, err = run_cli("convert", ck, tmp_path / name)
        assert code == 0, err
        f = tmp_path / name
        assert f.is_file() and "exported component 'model'" in out
        back = torch.load(f, weights_only=True)
        want = model.state_dict()
        assert list(back) == list(want)
        for k in want:
            assert torch.equal(back[k], want[k]) and back[k].dtype == want[k].dtype
        assert back["emb.weight"].data_ptr() == back["head.weight"].data_ptr()
        fresh = nn.ModuleDict({"emb": nn.Embedding(10, 4), "head": nn.Linear(4, 10, bias=False),
                               "norm": nn.LayerNorm(4)})
        fresh.load_state_dict(back)
    code, _, err = run_cli("convert", ck, tmp_path / "model.pt")  # exists: not replaced
    assert code == 2 and "overwrite" in err


def test_convert_into_a_file_name_is_refused(tmp_path):
    src = tmp_path / "state.pt"
    torch.save({"w": torch.ones(3)}, src)
    code, _, err = run_cli("convert", src, tmp_path / "out.pt")
    assert code == 2 and "names a file" in err and "directory" in err
    assert not (tmp_path / "out.pt").exists()


# ---- partial restores say what they left behind; another optimizer class is refused -------

def test_partial_restore_names_what_was_left_behind(root):
    state = build_state()
    live = {"model": state["model"], "optimizer": state["optimizer"]}
    rep = dckpt.CheckpointManager(root).restore(live, restore_rng=False)
    assert set(rep.components) == {"model", "optimizer"}
    assert any("not restored" in n and "scheduler (LambdaLR)" in n and "scaler (GradScaler)" in n
               and "data (ResumableLoader)" in n for n in rep.notes), rep.notes
    assert "scheduler" in rep.summary()
    out = dckpt.load(root / "step-000000006", into=build_state(), keys=["model"])
    assert set(out.not_restored) == {"optimizer", "scheduler", "scaler", "data"}
    assert any("not restored" in n for n in out.notes)
    full = dckpt.load(root / "step-000000006", into=build_state())
    assert full.not_restored == {} and full.notes == []


def _trained(opt_cls, sched_cls=None):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = opt_cls(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    state = {"model": model, "optimizer": opt}
    if sched_cls is not None:
        state["scheduler"] = sched_cls(opt)
        state["scheduler"].step()
    return state


def test_optimizer_of_another_class_is_refused_unless_not_strict(tmp_path):
    ck = tmp_path / "ck"
    dckpt.save(_trained(torch.optim.AdamW), ck)
    live = _trained(torch.optim.SGD)
    before = {k: v.clone() for k, v in live["model"].state_dict().items()}
    sgd_state = repr(live["optimizer"].state_dict())
    with pytest.raises(dckpt.StateMismatchError) as e:
        dckpt.load(ck, into=live)
    msg = str(e.value)
    assert "torch.optim.adamw.AdamW" in msg and "torch.optim.sgd.SGD" in msg
    assert "strict=False" in msg and "optimizer" in msg
    # refused before anything was read or handed over
    assert all(torch.equal(before[k], v) for k, v in live["model"].state_dict().items())
    assert repr(live["optimizer"].state_dict()) == sgd_state
    root = tmp_path / "run"
    mgr = dckpt.CheckpointManager(root, fsync=False)
    mgr.save(1, _trained(torch.optim.AdamW))
    with pytest.raises(dckpt.StateMismatchError, match="AdamW"):
        mgr.restore(_trained(torch.optim.SGD), restore_rng=False)
    rep = dckpt.load(ck, into=live, strict=False)
    assert any("AdamW state loaded into a torch.optim.sgd.SGD" in n for n in rep.notes)
    # the same class, and a scheduler of its own class, restore without a word
    same = _trained(torch.optim.AdamW, lambda o: torch.optim.lr_scheduler.StepLR(o, 2))
    ck2 = tmp_path / "ck2"
    dckpt.save(same, ck2)
    assert dckpt.load(ck2, into=_trained(torch.optim.AdamW,
                                         lambda o: torch.optim.lr_scheduler.StepLR(o, 2))).notes == []
    with pytest.raises(dckpt.StateMismatchError, match="StepLR"):
        dckpt.load(ck2, into=_trained(torch.optim.AdamW,
                                      lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.9)))


def test_wrapped_optimizer_takes_its_inner_class(tmp_path):
    """accelerate's AcceleratedOptimizer wraps the real one: a plain AdamW checkpoint
    restores into it, and its checkpoint restores into a plain AdamW."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    acc = Accelerator(cpu=True)
    plain, ck = _trained(torch.optim.AdamW), tmp_path / "plain"
    dckpt.save(plain, ck)
    wrapped = _trained(torch.optim.AdamW)
    wrapped["optimizer"] = acc.prepare(wrapped["optimizer"])
    assert isinstance(wrapped["optimizer"], AcceleratedOptimizer)
    dckpt.load(ck, into=wrapped)
    dckpt.save(wrapped, tmp_path / "wrapped")
    dckpt.load(tmp_path / "wrapped", into=_trained(torch.optim.AdamW))
    sgd = _trained(torch.optim.SGD)
    sgd["optimizer"] = acc.prepare(sgd["optimizer"])
    with pytest.raises(dckpt.StateMismatchError, match="AdamW"):
        dckpt.load(ck, into=sgd)

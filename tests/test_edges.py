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
from cli_fixtures import build_state, make_root, run_cli

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_root(tmp_path_factory.mktemp("edges") / "run", saves=(3, 6))


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


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
    from dckpt.verify import verify_checkpoint
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
                         stderr=subprocess.PIPE, env=_env())
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

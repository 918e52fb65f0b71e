"""The package's layers (docs/ARCHITECTURE.md) hold: import-linter's contracts of
pyproject.toml pass, only dckpt.storage imports the native core, and nothing but the public
entry points sits at the top of the package."""
import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, env

PKG = REPO / "dckpt"


def test_import_linter_contracts_are_kept():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not os.path.exists(exe):
        pytest.fail("lint-imports is missing: install the test extras (pip install -e .[test])")
    r = subprocess.run([exe], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def _imports_native(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if "_native" in (node.module or "").split(".") or \
                    any(a.name == "_native" for a in node.names):
                return True
        elif isinstance(node, ast.Import) and any("_native" in a.name for a in node.names):
            return True
    return False


def test_only_storage_imports_the_native_core():
    # import-linter does not see compiled modules, so this one is checked here.
    users = sorted(str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
                   if p.parts[len(PKG.parts)] != "storage" and _imports_native(p))
    assert users == []


def test_only_entry_points_at_the_top():
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "errors.py"]


def _files_on_stack() -> list[str]:
    """dckpt's files on the Python stack, outermost first, consecutive repeats merged."""
    import traceback
    out: list[str] = []
    for frame in traceback.extract_stack()[:-2]:
        f = Path(frame.filename)
        if PKG in f.parents:
            name = str(f.relative_to(PKG))
            if not out or out[-1] != name:
                out.append(name)
    return out


def test_save_and_load_stacks_are_short(tmp_path, monkeypatch):
    """From dckpt.save to the native pwrite, and from dckpt.load to the native pread, the
    call passes through at most 6 of dckpt's files and never back into one it left
    (docs/ARCHITECTURE.md, "One save, file by file")."""
    import torch

    import dckpt
    from dckpt import _native
    stacks = {}

    def spy(what, fn):
        def call(*args, **kwargs):
            stacks[what] = _files_on_stack()
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(_native, "write_chunks", spy("save", _native.write_chunks))
    monkeypatch.setattr(_native, "read_chunks", spy("load", _native.read_chunks))
    dckpt.save({"w": torch.arange(4.0)}, tmp_path / "c")
    live = {"w": torch.zeros(4)}
    dckpt.load(tmp_path / "c", into=live)
    assert torch.equal(live["w"], torch.arange(4.0))
    assert stacks["save"] == ["engine/gcpause.py", "distributed/collective.py",
                              "engine/checkpoint.py", "storage/local.py"]
    assert stacks["load"] == ["engine/gcpause.py", "engine/checkpoint.py", "state/restore.py",
                              "state/reading.py", "storage/local.py"]
    for files in stacks.values():
        assert len(files) <= 6 and len(set(files)) == len(files)


def test_local_backend_provides_every_storage_call():
    """The local and the object store backends have each call of the Storage contract,
    with its parameters."""
    import inspect

    from dckpt import storage
    from dckpt.storage.local import LOCAL
    from dckpt.storage.remote import RemoteStorage
    assert storage.for_path("/tmp") is LOCAL
    assert storage.for_path("file:///tmp") is LOCAL
    calls = [n for n, v in vars(storage.Storage).items()
             if callable(v) and not n.startswith("_")]
    assert sorted(calls) == ["abort", "begin", "finish", "read_into", "size", "verify_chunks",
                             "write_bytes", "write_file", "write_files"]
    for name in calls:
        want = list(inspect.signature(getattr(storage.Storage, name)).parameters)[1:]
        assert list(inspect.signature(getattr(LOCAL, name)).parameters) == want, name
        remote = list(inspect.signature(getattr(RemoteStorage, name)).parameters)[1:]
        assert remote == want, name

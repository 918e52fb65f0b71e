"""What a user of the installed package sees: py.typed, the license, the public API in
dir(dckpt) and __all__, and docstrings that help() shows."""
from __future__ import annotations

import importlib.util
import inspect
import pydoc
import re
import subprocess
import sys
import tomllib

import dckpt
from helpers import REPO



def test_py_typed_is_installed_with_the_package(tmp_path):
    """setuptools' build step copies what an install puts in site-packages."""
    out = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "dckpt" / "py.typed").is_file()
    assert (tmp_path / "dckpt" / "engine" / "checkpoint.py").is_file()


def test_license_file_matches_the_declared_license():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "Typing :: Typed" in project["classifiers"]
    assert any(c.startswith("Programming Language :: Python :: 3.") for c in project["classifiers"])


def test_dir_lists_the_public_api():
    public = set(dckpt.__all__)
    assert public <= set(dir(dckpt))
    assert not {n for n in dir(dckpt) if not n.startswith("_")} - public  # no helpers shown
    for name in dckpt.__all__:
        assert getattr(dckpt, name) is not None
    errors = {n for n, v in vars(dckpt.errors).items()
              if isinstance(v, type) and issubclass(v, Exception)
              and v.__module__ == "dckpt.errors"}
    assert errors <= public
    assert {"save", "load", "CheckpointManager", "ResumeReport", "RestoreReport",
            "SaveResult", "seed_everything", "data"} <= public
    # every `dckpt.X` the docs use is exported, or is a submodule
    used = set()
    for doc in [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        # (not the JSON schema names such as `dckpt.ls/1`)
        used |= set(re.findall(r"\bdckpt\.([A-Za-z_]\w*)\b(?!/)", doc.read_text()))
    missing = {n for n in used - public
               if importlib.util.find_spec(f"dckpt.{n}") is None}
    assert not missing, missing


def _doc_problems(name: str, obj) -> list[str]:
    doc = inspect.getdoc(obj) or ""
    out = []
    if not doc or doc.startswith(f"{name}("):  # a dataclass's generated signature is no help
        out.append(name)
    if inspect.isclass(obj) and not issubclass(obj, Exception):
        for attr, member in vars(obj).items():
            if attr.startswith("_") or not (inspect.isfunction(member)
                                            or isinstance(member, property)):
                continue
            if not (member.__doc__ or "").strip():
                out.append(f"{name}.{attr}")
    return out


def test_public_functions_and_classes_have_docstrings():
    problems = []
    for name in dckpt.__all__:
        obj = getattr(dckpt, name)
        if not inspect.ismodule(obj):
            problems += _doc_problems(name, obj)
        elif not (obj.__doc__ or "").strip():
            problems.append(name)
    assert not problems, problems
    shown = pydoc.render_doc(dckpt.CheckpointManager, renderer=pydoc.plaintext)
    assert "Numbered checkpoints of one run" in shown and "keep_last" in shown
    assert "report.step" in pydoc.render_doc(dckpt.CheckpointManager.restore,
                                             renderer=pydoc.plaintext)

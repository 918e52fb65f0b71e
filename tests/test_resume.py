"""The reason dckpt exists: a resumed run continues bit for bit; a weights-only one does not."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import JOBS

JOB = str(JOBS / "resume_job.py")
TOTAL, STOP = 24, 13  # 10 batches per epoch: the save lands mid-epoch


def run(*args, cwd):
    out = subprocess.run([sys.executable, JOB, *map(str, args)], cwd=cwd, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    run(d / "root", d / "ref.json", "--total", TOTAL, cwd=d)
    return json.loads((d / "ref.json").read_text())


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_resume_is_bitwise_exact(tmp_path, reference, compression):
    extra = ["--compression", compression] if compression else []
    run(tmp_path / "root", tmp_path / "a.json", "--total", TOTAL, "--stop-at", STOP, *extra,
        cwd=tmp_path)
    run(tmp_path / "root", tmp_path / "b.json", "--total", TOTAL, "--resume", *extra,
        cwd=tmp_path)
    first = json.loads((tmp_path / "a.json").read_text())
    resumed = json.loads((tmp_path / "b.json").read_text())
    assert first["losses"] == reference["losses"][:STOP]
    assert resumed["losses"] == reference["losses"]  # history restored + continuation
    assert resumed["params"] == reference["params"]


def test_weights_only_resume_diverges(tmp_path, reference):
    run(tmp_path / "root", tmp_path / "a.json", "--total", TOTAL, "--stop-at", STOP, cwd=tmp_path)
    run(tmp_path / "root", tmp_path / "b.json", "--total", TOTAL, "--resume", "--weights-only",
        cwd=tmp_path)
    resumed = json.loads((tmp_path / "b.json").read_text())
    assert resumed["losses"] != reference["losses"][STOP:]
    assert resumed["params"] != reference["params"]

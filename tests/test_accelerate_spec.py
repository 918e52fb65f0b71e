"""accelerate's own tests/test_state_checkpointing.py is the specification of DckptAccelerator:
run here unchanged, in a fresh interpreter, with `accelerate.Accelerator` replaced by
DckptAccelerator and accelerate's save_accelerator_state/load_accelerator_state (and its
custom-object writer and reader) made to raise (tests/helpers/accelerate_spec_patch.py).

accelerate ships that file in its source archive, not in its wheel, and this repository does
not commit it: scripts/setup.sh (`make setup`) downloads the archive of the installed version
into .cache/accelerate/, and this test reads the file from there."""
import importlib.metadata
import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET

import pytest

from helpers import REPO, TESTS

VERSION = importlib.metadata.version("accelerate")
ARCHIVE = REPO / ".cache" / "accelerate" / f"accelerate-{VERSION}.tar.gz"
SPEC = f"accelerate-{VERSION}/tests/test_state_checkpointing.py"
# The tests that need an accelerator device: skipped on a CPU-only machine, for that alone.
NEEDS_DEVICE = {"test_map_location"}


def test_accelerates_checkpointing_tests_pass_with_dckpt(tmp_path):
    if not ARCHIVE.is_file():
        pytest.fail(f"{ARCHIVE} is missing: run `make setup` (scripts/setup.sh downloads "
                    f"accelerate {VERSION}'s source archive, which holds {SPEC})")
    with tarfile.open(ARCHIVE) as tar:
        (tmp_path / "test_state_checkpointing.py").write_bytes(tar.extractfile(SPEC).read())
    # In every interpreter of the run: pytest's, and those `accelerate launch` starts.
    (tmp_path / "sitecustomize.py").write_text("import helpers.accelerate_spec_patch\n")
    path = [str(tmp_path), str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), OMP_NUM_THREADS="1")
    junit = tmp_path / "results.xml"
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
         "helpers.accelerate_spec_patch", f"--junitxml={junit}", "test_state_checkpointing.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert junit.is_file(), res.stdout[-3000:] + res.stderr[-3000:]
    outcome = {}
    for case in ET.parse(junit).iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skip = case.find("skipped")
        name = f"{case.get('classname').rsplit('.', 1)[-1]}::{case.get('name')}"
        outcome[name] = ("failed: " + (bad.get("message") or "")[:300] if bad is not None else
                         "skipped: " + (skip.get("message") or "") if skip is not None else
                         "passed")
    ran = {n: o for n, o in outcome.items() if not o.startswith("skipped")}
    print(f"accelerate {VERSION} test_state_checkpointing.py with DckptAccelerator: "
          f"{len(outcome)} tests, {sum(o == 'passed' for o in ran.values())} passed, "
          f"{len(outcome) - len(ran)} skipped")
    assert len(ran) >= 16, outcome  # the file's checkpointing tests were collected and ran
    failed = {n: o for n, o in ran.items() if o != "passed"}
    assert not failed and res.returncode == 0, (failed, res.stdout[-3000:])
    for n, o in outcome.items():
        if o.startswith("skipped"):
            base = n.split("::")[-1].rsplit("_use_", 1)[0]
            assert base in NEEDS_DEVICE and "GPU" in o, f"{n} {o}"

"""Hostile checkpoints that attack the reader's resources rather than its checks: files that
hang an open (FIFOs), read forever (/dev/zero), expand when parsed, declare allocations no
machine has, exhaust inodes, or lead outside the checkpoint through symbolic links.

Every attack on a reader runs in a subprocess: a hang there is killed by an alarm and
reported, so a regression fails the test instead of hanging the suite; memory attacks run
under an address-space limit, so an unbounded read or allocation shows up as an untyped
MemoryError instead of taking the machine."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import dckpt
from dckpt.format.manifest import MANIFEST_NAME, _canonical

import xxhash

from attacks import manifest_obj, model_state, tree_child, tree_set

REPO = str(Path(__file__).resolve().parent.parent)


def run_job(script: str, *args: str, timeout: float = 300, env: dict | None = None) -> dict:
    """Run `script` in a fresh interpreter; it prints 'NAME RESULT ...' lines."""
    environ = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    environ["PYTHONPATH"] = REPO + os.pathsep + environ.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                         text=True, timeout=timeout, env=environ)
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert lines, out.stdout + out.stderr[-3000:]
    return lines


# Each attempt runs under an alarm: an open() blocked on a FIFO is interrupted, reported as
# HUNG, and the next attempt runs. Exit codes of the CLI are reported as "EXIT n".
ATTEMPTS = r"""
import contextlib, io, resource, signal, sys
import dckpt, torch
from dckpt.errors import DckptError
from dckpt.cli import main as cli

class Hung(BaseException):
    pass

def alarm(*_):
    raise Hung()

signal.signal(signal.SIGALRM, alarm)
if len(sys.argv) > 1 and sys.argv[1].startswith("as="):
    # Address space: what is mapped now plus this many MiB.
    vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1])
    resource.setrlimit(resource.RLIMIT_AS, (vm * 1024 + (int(sys.argv.pop(1)[3:]) << 20),
                                            resource.RLIM_INFINITY))
root, step, other = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ckpt, base = f"{root}/step-{step:09d}", f"{root}/step-{other:09d}"

def run_cli(*argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = cli(list(argv))
    return f"EXIT {code} {out.getvalue()[-2000:]}"

attempts = {
    "load": lambda: dckpt.load(ckpt),
    "restore": lambda: dckpt.CheckpointManager(root).restore(
        {"extra": {}}, step=step, allow_missing=True),
    "inspect": lambda: run_cli("inspect", ckpt),
    "ls": lambda: run_cli("ls", root),
    "diff": lambda: run_cli("diff", base, ckpt),
    "consolidate": lambda: dckpt.incremental.consolidate(ckpt, f"{root}/../consolidated"),
    "verify": lambda: run_cli("verify", ckpt),
}
for name in sys.argv[4].split(","):
    signal.alarm(20)
    try:
        result = attempts[name]()
        print(name, result.replace("\n", " ") if isinstance(result, str) else "LOADED")
    except Hung:
        print(name, "HUNG")
    except DckptError as e:
        print(name, "TYPED", type(e).__name__, str(e)[:300].replace("\n", " "))
    except BaseException as e:
        print(name, "UNTYPED", type(e).__name__, str(e)[:300].replace("\n", " "))
    finally:
        signal.alarm(0)
print("maxrss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10, "MiB")
"""

ENTRY_POINTS = ["load", "restore", "inspect", "ls", "diff", "consolidate", "verify"]


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    root = tmp_path_factory.mktemp("resources") / "root"
    mgr = dckpt.CheckpointManager(root, compression="zstd", chunk_size=4096)
    mgr.save(1, model_state(1))
    mgr.save(2, model_state(2))
    return root


@pytest.fixture
def root(two_steps, tmp_path):
    out = tmp_path / "root"
    shutil.copytree(two_steps, out)
    return out


def manifest_of(root: Path, step: int) -> Path:
    return root / f"step-{step:09d}" / MANIFEST_NAME


def attack(root: Path, names=ENTRY_POINTS, memory_mib: int | None = None) -> dict:
    args = [f"as={memory_mib}"] if memory_mib else []
    return run_job(ATTEMPTS, *args, str(root), "2", "1", ",".join(names))


def refused(result: str, why: str) -> bool:
    """A typed error, or the CLI's failure exit (1 or 2) with a message, naming `why`."""
    return ((result.startswith("TYPED") or result.startswith(("EXIT 1", "EXIT 2")))
            and why in result)


# ---- 1. a FIFO manifest hangs nothing ---------------------------------------------------------

def test_fifo_manifest_hangs_no_reader(root):
    """manifest.json replaced by a FIFO nobody writes: every reader refuses it at once
    (an open without O_NONBLOCK waits for a writer forever)."""
    path = manifest_of(root, 2)
    path.unlink()
    os.mkfifo(path)
    results = attack(root)
    assert sorted(results) == sorted(ENTRY_POINTS), results
    for name in ENTRY_POINTS:
        if name == "ls":  # lists the step as "bad manifest", naming the problem
            assert results[name].startswith("EXIT 0") or refused(results[name], "FIFO"), results
            continue
        assert refused(results[name], "FIFO"), (name, results[name])


def test_ls_names_the_fifo(root):
    """`dckpt ls` shows the step with a bad manifest and why, and goes on with the rest."""
    path = manifest_of(root, 2)
    path.unlink()
    os.mkfifo(path)
    out = subprocess.run([sys.executable, "-m", "dckpt", "ls", "--json", str(root)],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": REPO})
    steps = {e["step"]: e for e in json.loads(out.stdout)["checkpoints"]}
    assert steps[1]["status"] == "committed"
    assert steps[2]["status"] == "bad manifest" and "FIFO" in steps[2]["problem"], steps[2]


# ---- 2. manifest reads are bounded before reading ---------------------------------------------

def test_manifest_linked_to_dev_zero(root):
    """manifest.json -> /dev/zero: a read until EOF never ends (5.5 GB, then MemoryError).
    Refused as a link, unread, by every reader, in a process that could not map 256 MiB."""
    path = manifest_of(root, 2)
    path.unlink()
    path.symlink_to("/dev/zero")
    results = attack(root, memory_mib=256)
    for name in ENTRY_POINTS:
        if name == "ls":
            assert results[name].startswith("EXIT 0"), results
            continue
        assert refused(results[name], "symbolic link"), (name, results[name])


def test_sparse_gigabyte_manifest(root):
    """A 1 GiB sparse manifest is refused by its size before any of it is read (it was read
    whole, then the 512 MiB limit applied): in a process that cannot map 256 MiB more."""
    path = manifest_of(root, 2)
    with open(path, "r+b") as f:
        f.truncate(1 << 30)
    results = attack(root, memory_mib=256)
    for name in ENTRY_POINTS:
        if name == "ls":
            assert results[name].startswith("EXIT 0"), results
            continue
        assert refused(results[name], "exceeds the"), (name, results[name])


# ---- 3. what a parsed manifest may allocate is bounded -----------------------------------------

def splice(ckpt: Path, obj: dict, marker: bytes, text: bytes) -> None:
    """Write obj with `marker` (a JSON string in it) replaced by `text`, sealed: so a huge
    manifest is made without building it as Python objects."""
    body = {k: v for k, v in obj.items() if k != "self_hash"}
    digest = xxhash.xxh3_64_intdigest(_canonical(body).replace(marker, text, 1))
    body["self_hash"] = f"{digest:016x}"
    (ckpt / MANIFEST_NAME).write_bytes(_canonical(body).replace(marker, text, 1) + b"\n")


def test_manifest_of_empty_lists(root):
    """20M empty lists in a 60 MB manifest (sealed): parsed, they take about 1.3 GB (26x).
    Refused by counting before parsing, in a process that could not map 512 MiB more."""
    ckpt = root / "step-000000002"
    obj = manifest_obj(ckpt)
    tree_set(tree_child(obj["ranks"][0]["tree"], "extra"), "lists", "LISTS")
    n = 20_000_000
    splice(ckpt, obj, b'"LISTS"', b"[" + b"[]," * (n - 1) + b"[]]")
    results = attack(root, ["load", "inspect", "verify"], memory_mib=512)
    for name in ("load", "inspect", "verify"):
        assert refused(results[name], "JSON values exceed the limit"), (name, results[name])
    print("empty lists: peak RSS", results["maxrss"])


def test_manifest_of_empty_tensor_records(root):
    """600,000 empty tensor records (valid ones: shape [0]) in a 60 MB manifest: parsed and
    checked, they took about 1 GB and 15 s in inspect. Refused by their count."""
    ckpt = root / "step-000000002"
    obj = manifest_obj(ckpt)
    obj["tensors"]["!marker"] = "RECORDS"
    record = (b'{"dtype":"float32","kind":"torch","shape":[0],"shards":[{"chunks":[],'
              b'"offsets":[0],"rank":0,"shape":[0]}]}')
    n = 600_000  # names sort before every real one, so the bytes stay canonical
    text = b",".join(b'"!%07d":' % i + record for i in range(n))
    splice(ckpt, obj, b'"!marker":"RECORDS"', text)
    results = attack(root, ["load", "inspect"])
    for name in ("load", "inspect"):
        assert refused(results[name], "tensor records exceed the limit"), (name, results[name])
    print("empty tensor records: peak RSS", results["maxrss"])

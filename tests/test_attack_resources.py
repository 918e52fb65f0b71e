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
import torch
import zstandard

import dckpt
from dckpt.format.manifest import MANIFEST_NAME, _canonical
from dckpt.tools.verify import verify

import xxhash

import helpers
from helpers.attacks import SLOW, manifest_obj, model_state, rewrite_manifest, tree_child, tree_set



def run_job(script: str, *args: str, timeout: float = 300, env: dict | None = None) -> dict:
    """Run `script` in a fresh interpreter; it prints 'NAME RESULT ...' lines."""
    environ = helpers.env(OMP_NUM_THREADS="1", **(env or {}))
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
    "verify_deep": lambda: run_cli("verify", "--deep", "--threads", "1", ckpt),
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
    assert set(ENTRY_POINTS) <= set(results), results
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
                         env=helpers.env())
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


# ---- 4. allocation and decompression bombs ----------------------------------------------------

GIB = 1 << 30


def add_tensor(ckpt: Path, name: str, file: str, size: int, chunks: list, numel: int) -> None:
    """Declare a uint8 tensor `name` of `numel` elements in `chunks` of data file `file`
    (`size` bytes), and put it in the tree at extra/<name>; re-sealed."""
    obj = manifest_obj(ckpt)
    obj["files"].append({"name": file, "size": size, "rank": 0})
    index = len(obj["files"]) - 1
    obj["tensors"][name] = {"kind": "torch", "dtype": "uint8", "shape": [numel], "shards": [
        {"offsets": [0], "shape": [numel], "rank": 0,
         "chunks": [[index, *c] for c in chunks]}]}
    tree_set(tree_child(obj["ranks"][0]["tree"], "extra"), name, {"$tensor": name})
    rewrite_manifest(ckpt, obj)


@pytest.fixture(scope="module")
def gib_frame():
    """A valid zstd frame of 1 GiB of zeros (about 32 KB), and the hash of those zeros."""
    zeros = bytes(1 << 20)
    comp = zstandard.ZstdCompressor(level=1).compressobj(size=GIB)
    frame = b"".join(comp.compress(zeros) for _ in range(GIB >> 20)) + comp.flush()
    h = xxhash.xxh3_64()
    for _ in range(GIB >> 20):
        h.update(zeros)
    return frame, h.intdigest()


def zstd_bomb(ckpt: Path, frame: bytes, raw_hash: int) -> None:
    """Two valid 1 GiB zstd frames of zeros: a 66 KB checkpoint holding 2 GiB, which
    passes every check (it is a real, if very compressible, tensor)."""
    (ckpt / "bomb.dckpt").write_bytes(frame + frame)
    stored = f"{xxhash.xxh3_64_intdigest(frame):016x}"
    chunks = [[i * len(frame), len(frame), GIB, 1, f"{raw_hash:016x}", stored] for i in (0, 1)]
    add_tensor(ckpt, "bomb", "bomb.dckpt", 2 * len(frame), chunks, 2 * GIB)


def test_zstd_bomb_over_the_ceiling(root, gib_frame):
    """With DCKPT_MAX_LOAD_BYTES=1 GiB, loading the 2 GiB bomb is refused before anything
    is allocated for it, naming the tensor and its file (the process could not map
    512 MiB more: an allocation first would be an untyped allocator error)."""
    zstd_bomb(root / "step-000000002", *gib_frame)
    results = run_job(ATTEMPTS, "as=512", str(root), "2", "1", "load,restore",
                      env={"DCKPT_MAX_LOAD_BYTES": str(GIB)})
    for name in ("load", "restore"):
        r = results[name]
        assert r.startswith("TYPED ResourceLimitError") and "'bomb'" in r \
            and "bomb.dckpt" in r and "over the limit" in r, (name, r)


def test_allocation_failure_is_typed(root, gib_frame):
    """Under the default ceiling (the machine's memory) the bomb may be loaded, but this
    process cannot map 512 MiB more: torch's allocator fails, and that is a typed error
    naming the tensor; `verify --deep` cannot allocate its 1 GiB decode buffer, and reports
    the chunk instead of failing with an untyped ChunkError."""
    zstd_bomb(root / "step-000000002", *gib_frame)
    results = run_job(ATTEMPTS, "as=512", str(root), "2", "1", "load,restore,verify_deep",
                      env={"DCKPT_MAX_LOAD_BYTES": ""})
    for name in ("load", "restore"):
        r = results[name]
        assert r.startswith("TYPED ResourceLimitError") and "'bomb'" in r \
            and "cannot allocate" in r, (name, r)
    r = results["verify_deep"]
    assert r.startswith("EXIT 1") and "cannot allocate a 1073741824-byte buffer" in r, r


def test_terabyte_over_sparse_file(root):
    """2^40 uint8 elements declared over a 32 MiB sparse file: 1,024 chunks of 1 GiB, each
    stored in 32 KiB (the zstd bound lets that through), so the file-size check passes.
    Refused by the ceiling before torch is asked for a terabyte."""
    ckpt = root / "step-000000002"
    stored = (GIB >> 15)
    with open(ckpt / "sparse.dckpt", "wb") as f:
        f.truncate(1024 * stored)
    chunks = [[i * stored, stored, GIB, 1, "0" * 16, "0" * 16] for i in range(1024)]
    add_tensor(ckpt, "tera", "sparse.dckpt", 1024 * stored, chunks, 1 << 40)
    results = run_job(ATTEMPTS, "as=512", str(root), "2", "1", "load,restore",
                      env={"DCKPT_MAX_LOAD_BYTES": ""})
    for name in ("load", "restore"):
        r = results[name]
        assert r.startswith("TYPED ResourceLimitError") and "'tera'" in r \
            and "over the limit" in r, (name, r)


@pytest.mark.skipif(not SLOW, reason="allocates 2 GiB (DCKPT_SLOW=1)")
def test_zstd_bomb_loads_where_it_fits(root, gib_frame):
    """Highly compressible is not hostile: under the default ceiling the bomb is a valid
    tensor of 2 GiB of zeros, and loads as one."""
    zstd_bomb(root / "step-000000002", *gib_frame)
    state = dckpt.load(root / "step-000000002")
    bomb = state["extra"]["bomb"]
    assert bomb.numel() == 2 * GIB and not bomb.any()


# ---- 6. symbolic links inside a checkpoint ----------------------------------------------------

def link_out(ckpt: Path, outside: Path) -> Path:
    """Move the checkpoint's data file outside and leave a symbolic link to it: the bytes
    are exactly the saved ones, so only the link itself can be objected to."""
    data = ckpt / "rank-00000.dckpt"
    outside.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(data, outside)
    data.symlink_to(outside)
    return data


def test_load_and_verify_refuse_a_linked_data_file(root, tmp_path):
    """A data file that is a link outside the root: load, restore and verify refuse it,
    naming it (they followed it and loaded the outside file); the native reader on its
    own refuses it too (O_NOFOLLOW), so a link swapped in after the check is caught."""
    ckpt = root / "step-000000002"
    data = link_out(ckpt, tmp_path / "elsewhere" / "outside.dckpt")
    for load in (lambda: dckpt.load(ckpt),
                 lambda: dckpt.CheckpointManager(root).restore(model_state(0), step=2)):
        with pytest.raises(dckpt.errors.IncompleteCheckpointError, match="symbolic link") as e:
            load()
        assert e.value.path == str(data)
    report = verify(ckpt)
    assert not report.ok
    assert any("rank-00000.dckpt (rank 0) is a symbolic link" in c.message
               for c in report.all_checks()), [c.message for c in report.all_checks()]
    m = dckpt.read_manifest(ckpt)
    name, t = next((n, t) for n, t in m.tensors.items() if t.shards[0].chunks)
    dest = torch.empty(t.nbytes, dtype=torch.uint8)
    with pytest.raises(dckpt.errors.StorageError, match="symbolic link"):
        dckpt.storage.local.read_into([str(data)], [dest], [t.itemsize], [t.shards[0].chunks], [name])
    with pytest.raises(dckpt.errors.IncompleteCheckpointError, match="symbolic link"):
        dckpt.incremental.consolidate(ckpt, tmp_path / "consolidated")


def test_incremental_save_does_not_link_an_outside_file(tmp_path):
    """The base's data file is a link to a file outside the root: an incremental save
    hard-linked the link into the new checkpoint, which then depended on the outside file
    too. Now it writes the chunks again: no file of the new checkpoint is a link or the
    outside inode, and it loads bitwise."""
    root = tmp_path / "root"
    mgr = dckpt.CheckpointManager(root, chunk_size=4096)
    state = {"frozen": torch.randn(4096), "step": torch.zeros(1)}
    mgr.save(1, state)
    outside = tmp_path / "elsewhere" / "outside.dckpt"
    link_out(mgr.path(1), outside)
    state["step"] += 1
    r = mgr.save(2, state)
    new = mgr.path(2)
    inode = outside.stat().st_ino
    files = list(new.iterdir())
    assert not any(p.is_symlink() for p in files)
    assert all(p.stat().st_ino != inode for p in files), [p.name for p in files]
    assert outside.stat().st_nlink == 1
    meta = dckpt.read_manifest(new).meta["incremental"]
    assert "not a regular file" in meta["fallback"] and meta["referenced_chunks"] == 0, meta
    back = dckpt.load(new)
    assert all(torch.equal(back[k], v) for k, v in state.items())


# ---- 5. inode exhaustion ----------------------------------------------------------------------

@pytest.fixture
def few_inodes(tmp_path):
    """A real tmpfs with 64 inodes (plenty of space): it runs out of inodes, not bytes."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,nr_inodes=64,mode=0755",
                          "tmpfs", str(mnt)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({out.stderr.strip() or out.returncode})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def use_inodes(mnt: Path, leave: int) -> None:
    """Create empty files until exactly `leave` inodes stay free."""
    fill = mnt / "fill"
    shutil.rmtree(fill, ignore_errors=True)
    fill.mkdir()
    i = 0
    while os.statvfs(mnt).f_favail > leave:
        (fill / str(i)).touch()
        i += 1


def test_out_of_inodes(few_inodes):
    """With 0, 1, 2, ... inodes left, a save either commits or raises StorageError naming
    the path (a bare OSError(ENOSPC) came from creating the staging directory), and the
    previous step stays the latest, intact, with nothing left behind. A manager whose root
    cannot be created raises StorageError too."""
    from dckpt.errors import StorageError
    from helpers.attacks import assert_same, known_state
    root = few_inodes / "root"
    mgr = dckpt.CheckpointManager(root, chunk_size=16384)
    mgr.save(1, known_state(1, scale=4))
    outcomes = {}
    for leave in range(6):
        use_inodes(few_inodes, leave)
        try:
            dckpt.CheckpointManager(root, chunk_size=16384).save(2, known_state(2, scale=4))
        except StorageError as e:
            path = e.path  # rank 0's begin error keeps its path on every rank
            assert "No space left on device" in str(e) and str(root) in path, e
            what = Path(path).name.split(".tmp")[0].lstrip(".").split(".")[0]
            outcomes[f"StorageError at {what}"] = outcomes.get(f"StorageError at {what}", 0) + 1
            assert sorted(p.name for p in root.iterdir()) == [".lock", "latest",
                                                              "step-000000001"]
        else:
            outcomes["saved"] = outcomes.get("saved", 0) + 1
            assert_same(dckpt.load(mgr.path(2)), known_state(2, scale=4))
            shutil.rmtree(mgr.path(2))
        assert mgr.latest_step() == 1
        assert_same(dckpt.load(mgr.path(1)), known_state(1, scale=4))
    print(f"\nout of inodes: {outcomes}")
    assert outcomes.get("StorageError at step-000000002") and outcomes.get("saved"), outcomes
    use_inodes(few_inodes, 0)
    with pytest.raises(StorageError, match="no free inodes"):
        dckpt.CheckpointManager(few_inodes / "new-root")

"""The edges of a save (issue 17): nothing reported saved and then gone, no temporary left
by an interrupted save, no crash at commit for values a training loop has at hand, typed
errors before anything is written."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import dckpt
from dckpt import CheckpointManager
from dckpt.errors import StepOrderError
from helpers.ranks import run_with_ranks
from helpers import env



def state(v: float = 0.0):
    m = torch.nn.Linear(2, 2)
    torch.nn.init.constant_(m.weight, v)
    return {"model": m}


def listing(root: Path) -> list[str]:
    return sorted(os.listdir(root))


def run_child(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env(),
                          capture_output=True, text=True, timeout=timeout)


# ---- a step lower than the newest is refused, before anything is written -----------------
def test_lower_step_is_refused_before_anything_is_written(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    for s in (30, 40, 50):
        mgr.save(s, state(s))
    before = listing(tmp_path)
    with pytest.raises(StepOrderError) as e:
        mgr.save(5, state(5))
    assert "step 5" in str(e.value) and "step 50" in str(e.value)
    assert "another root" in str(e.value)  # tells the user how to proceed
    assert (e.value.step, e.value.newest) == (5, 50)
    assert listing(tmp_path) == before  # no directory, no temporary
    assert (tmp_path / "latest").read_text().strip() == "step-000000050"
    assert mgr.steps() == [30, 40, 50]
    mgr.save(60, state(60))  # a higher step goes on as usual
    assert mgr.steps() == [40, 50, 60]
    assert (tmp_path / "latest").read_text().strip() == "step-000000060"


def test_two_runs_sharing_a_root(tmp_path):
    """Another process's run saved a newer step: this run's next, lower step is refused with
    both steps named; the other run's checkpoints and `latest` stay as they were."""
    a = CheckpointManager(tmp_path, keep_last=2)
    a.save(10, state(10))
    other = run_child("""
        import sys, torch, dckpt
        m = torch.nn.Linear(2, 2)
        dckpt.CheckpointManager(sys.argv[1], keep_last=2).save(100, {"model": m})
        try:
            dckpt.CheckpointManager(sys.argv[1], keep_last=2).save(7, {"model": m})
        except dckpt.errors.StepOrderError as e:
            print("REFUSED", e)
        """, str(tmp_path))
    assert other.returncode == 0, other.stderr
    assert "REFUSED" in other.stdout and "step 7" in other.stdout and "step 100" in other.stdout
    with pytest.raises(StepOrderError, match="step 11 .* step 100"):
        a.save(11, state(11))
    assert a.steps() == [10, 100]
    assert (tmp_path / "latest").read_text().strip() == "step-000000100"
    report = a.restore(state())
    assert report.step == 100


def test_retention_spares_the_step_latest_names(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=1)
    mgr.save(1, state(1))
    mgr.save(2, state(2))
    assert mgr.steps() == [2]
    mgr.save(3, state(3))
    # `latest` moved back by hand (or not moved, disk full): retention must not delete it.
    (tmp_path / "latest").write_text("step-000000002\n")
    assert mgr._doomed()[0] == []
    assert mgr._doomed(saved=3)[0] == []
    mgr.gc()  # gc repairs the pointer first, then retention may delete step 2
    assert mgr.steps() == [3]
    assert (tmp_path / "latest").read_text().strip() == "step-000000003"


def rank_lower_step(rank, world, root):
    mgr = CheckpointManager(root, keep_last=2)
    mgr.save(20, state(20))
    try:
        mgr.save(5, state(5))
        refused = None
    except StepOrderError as e:
        refused = [e.step, e.newest]
    mgr.save(30, state(30))  # no rank was left behind in a collective
    return {"refused": refused, "steps": mgr.steps()}


def test_lower_step_is_refused_on_every_rank(tmp_path):
    res = run_with_ranks(2, rank_lower_step, str(tmp_path))
    assert [r["refused"] for r in res] == [[5, 20], [5, 20]]
    assert res[0]["steps"] == [20, 30]
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


# ---- an interrupted save leaves nothing behind ---------------------------------------------
INTERRUPTED_SAVE = """
    import signal, sys, torch, dckpt
    # Ctrl-C as in a terminal, even where this process inherited SIGINT ignored or blocked
    # (from a background job of a shell without job control, or from what ran before in
    # the test process): a child keeps both across exec.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    root, mode = sys.argv[1], sys.argv[2]
    big = {"w": torch.full((150_000_000,), 1.5)}  # 600 MB
    # One writer thread: the other core stays free for the test, which must see the first
    # bytes and send the signal while the save is still writing (two writers on two cores
    # once finished before it got to run).
    if mode == "manager":
        mgr = dckpt.CheckpointManager(root, threads=1)
        mgr.save(1, {"w": torch.arange(4.0)})
        print("ready", flush=True)
        mgr.save(2, big)
    else:
        dckpt.save({"w": torch.arange(4.0)}, root + "/step-000000001")
        print("ready", flush=True)
        dckpt.save(big, root + "/step-000000002", threads=1)
    print("done", flush=True)
"""


@pytest.mark.parametrize("mode", ["manager", "bare"])
def test_ctrl_c_mid_save_removes_the_temporary(tmp_path, mode):
    import signal
    import time
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(INTERRUPTED_SAVE),
                              str(tmp_path), mode], env=env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        written = []
        while not written and time.monotonic() < deadline and child.poll() is None:
            written = [f for d in tmp_path.glob(".step-000000002.tmp-*")
                       for f in d.glob("rank-*") if f.stat().st_size > 0]
            time.sleep(0.001)
        assert written, "the save ended before any data reached the staging directory"
        child.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal sends
        out, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert "done" not in out and "KeyboardInterrupt" in err, err[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step")) == [
        "step-000000001"]
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    back = dckpt.load(tmp_path / "step-000000001")  # the previous checkpoint, intact
    assert torch.equal(back["w"], torch.arange(4.0))


class Exploding:
    """A state object whose state_dict() raises something that is not an Exception."""

    def state_dict(self):
        raise SystemExit("stop")

    def load_state_dict(self, sd):
        pass


def test_base_exception_while_saving_removes_the_temporary(tmp_path):
    with pytest.raises(SystemExit):
        dckpt.save({"x": torch.zeros(3), "obj": Exploding()}, tmp_path / "ck")
    assert os.listdir(tmp_path) == []
    mgr = CheckpointManager(tmp_path / "root")
    with pytest.raises(SystemExit):
        mgr.save(1, {"x": torch.zeros(3), "obj": Exploding()})
    assert [p for p in os.listdir(tmp_path / "root") if ".tmp-" in p] == []


# ---- a failed load: restore() falls back, a bare load says what it changed -----------------
def big_state(v: float):
    torch.manual_seed(int(v))
    return {"w": torch.randn(64, 1024) + v, "b": torch.full((4096,), v),
            "opt": {"lr": v, "moment": torch.randn(3, 5)}}


def corrupt_chunk(ckpt: Path, tensor: str, index: int = -1) -> None:
    """Flip one byte in the middle of one stored chunk of `tensor`."""
    m = dckpt.read_manifest(ckpt)
    ch = m.tensors[tensor].shards[0].chunks[index]
    f = m.files[ch.file].path(ckpt)
    data = bytearray(f.read_bytes())
    data[ch.offset + ch.stored // 2] ^= 0x40
    f.write_bytes(bytes(data))


def assert_bitwise(live, want):
    assert live.keys() == want.keys()
    for k in want:
        a, b = live[k], want[k]
        if isinstance(b, dict):
            assert_bitwise(a, b)
        elif isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        else:
            assert a == b


def test_restore_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path, chunk_size=4096)
    for s in (1, 2, 3):
        mgr.save(s, big_state(s))
    corrupt_chunk(mgr.path(3), "b")  # the last chunk read: the others are already in place
    live = big_state(99)
    report = mgr.restore(live)
    assert report.step == 2
    assert "fell back to step 2" in report.notes[0] and "step 3" in report.notes[0]
    assert "CorruptCheckpointError" in report.notes[0]
    assert_bitwise(live, big_state(2))  # completely step 2, nothing of the failed attempt

    # Asked for step 3 by name: no fallback, and the error says the state was changed.
    live = big_state(99)
    with pytest.raises(dckpt.errors.CorruptCheckpointError, match="PARTLY OVERWRITTEN"):
        mgr.restore(live, step=3)


def test_bare_load_failure_says_live_state_was_partly_overwritten(tmp_path):
    dckpt.save(big_state(1), tmp_path / "ck", chunk_size=4096)
    corrupt_chunk(tmp_path / "ck", "b")
    live = big_state(99)
    with pytest.raises(dckpt.errors.CorruptCheckpointError) as e:
        dckpt.load(tmp_path / "ck", into=live)
    assert "PARTLY OVERWRITTEN" in str(e.value) and "tensor 'b'" in str(e.value)
    assert e.value.live_state_changed and e.value.tensor == "b"
    # A mismatch is found before any read: nothing changed, and the error does not say so.
    with pytest.raises(dckpt.errors.StateMismatchError) as e:
        dckpt.load(tmp_path / "ck", into={"w": torch.zeros(2)})
    assert "PARTLY" not in str(e.value)


def rank_fallback(rank, world, root, phase):
    mgr = CheckpointManager(root)
    if phase == "save":
        for s in (1, 2):
            mgr.save(s, {"mine": torch.full((2048,), float(10 * s + rank))})
        return None
    live = {"mine": torch.full((2048,), -1.0)}
    report = mgr.restore(live)
    return {"step": report.step, "notes": report.notes, "value": live["mine"].unique().tolist()}


def test_restore_falls_back_on_every_rank_when_one_rank_hits_damage(tmp_path):
    run_with_ranks(2, rank_fallback, str(tmp_path), "save")
    m = dckpt.read_manifest(tmp_path / "step-000000002")
    [name] = [n for n, t in m.tensors.items() if t.shards[0].rank == 1]
    corrupt_chunk(tmp_path / "step-000000002", name)  # only rank 1 reads it
    res = run_with_ranks(2, rank_fallback, str(tmp_path), "restore")
    assert [r["step"] for r in res] == [1, 1]
    assert [r["value"] for r in res] == [[10.0], [11.0]]
    assert all("fell back to step 1" in r["notes"][0] for r in res)


# ---- values a training loop has at hand ----------------------------------------------------
def test_metrics_from_a_training_loop_are_stored(tmp_path):
    import json
    import math

    import numpy as np
    mgr = CheckpointManager(tmp_path, keep_last=1, keep_best=1, metric="loss")
    mgr.save(1, state(1), metrics={"loss": torch.tensor(0.5), "acc": np.float32(0.25)},
             loss_history=[torch.tensor(2.0), np.float64(1.0), float("nan")])
    mgr.save(2, state(2), metrics={"loss": float("nan"), "grad": float("inf"),
                                   "low": np.float64(-np.inf)})  # diverged
    mgr.save(3, state(3), metrics={"loss": torch.tensor(float("nan"))})
    # keep_best ignores NaN: step 1 stays the best, beside the newest.
    assert mgr.steps() == [1, 3]
    m1, m2 = dckpt.read_manifest(mgr.path(1)), dckpt.read_manifest(tmp_path / "step-000000003")
    assert m1.metrics == {"loss": 0.5, "acc": 0.25} and type(m1.metrics["loss"]) is float
    assert m1.counters["loss_history"][:2] == [2.0, 1.0]
    assert math.isnan(m1.counters["loss_history"][2])
    assert math.isnan(m2.metrics["loss"])
    assert m2.counters["best"] == {"metric": "loss", "mode": "min", "step": 1, "value": 0.5}
    raw = (mgr.path(3) / "manifest.json").read_text()
    assert '"loss":{"$float":"nan"}' in raw
    # No NaN literal (a substring test would trip on base64 RNG bytes: strict parse instead).
    json.loads(raw, parse_constant=lambda c: pytest.fail(f"literal {c} in the manifest"))
    assert mgr.restore(state()).metrics["loss"] != mgr.restore(state()).metrics["loss"]  # nan


def test_non_finite_metrics_in_ls_and_inspect(tmp_path):
    import json
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, state(1), metrics={"loss": float("nan"), "gnorm": float("-inf")})
    for args in (["ls", str(tmp_path)], ["inspect", str(mgr.path(1))]):
        r = run_child("import sys; from dckpt.cli import main; sys.exit(main(sys.argv[1:]))",
                      *args, "--json")
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"literal {c}"))
        assert '{"$float": "nan"}' in json.dumps(doc) and '{"$float": "-inf"}' in json.dumps(doc)
        r = run_child("import sys; from dckpt.cli import main; sys.exit(main(sys.argv[1:]))",
                      *args)
        assert r.returncode == 0 and "nan" in r.stdout and "-inf" in r.stdout, r.stderr


@pytest.mark.parametrize("bad", ["fast", torch.tensor([1.0, 2.0]), [1.0], None,
                                 torch.tensor(1 + 2j)])
def test_bad_metric_is_refused_before_anything_is_written(tmp_path, bad):
    with pytest.raises(dckpt.errors.InvalidArgumentError, match=r"metrics\['loss'\]"):
        dckpt.save(state(), tmp_path / "ck", metrics={"loss": bad})
    assert os.listdir(tmp_path) == []
    mgr = CheckpointManager(tmp_path / "root")
    with pytest.raises(dckpt.errors.InvalidArgumentError):
        mgr.save(1, state(), metrics={"loss": bad})
    assert [p for p in os.listdir(tmp_path / "root") if p != ".lock"] == []


def test_unstorable_counter_or_meta_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(dckpt.errors.InvalidArgumentError, match=r"counters\['x'\]"):
        dckpt.save(state(), tmp_path / "ck", counters={"x": object()})
    with pytest.raises(dckpt.errors.InvalidArgumentError, match=r"meta\['t'\]"):
        dckpt.save(state(), tmp_path / "ck", meta={"t": torch.zeros(3)})
    assert os.listdir(tmp_path) == []
    with pytest.raises(dckpt.errors.InvalidArgumentError, match="step"):
        CheckpointManager(tmp_path / "root").save(True, state())


def test_manifest_rejects_a_malformed_float_tag(tmp_path):
    from dckpt.format.manifest import Manifest, parse
    ranks = [{"tree": {}}]
    data = Manifest(metrics={"loss": float("inf")}, ranks=ranks).to_bytes()
    assert parse(data).metrics == {"loss": float("inf")}
    bad = Manifest(metrics={"loss": {"$float": "huge"}}, ranks=ranks).to_bytes()
    with pytest.raises(dckpt.errors.ManifestError, match="metrics"):
        parse(bad)
    with pytest.raises(dckpt.errors.ManifestError):
        parse(data.replace(b'{"$float":"inf"}', b"Infinity"))  # literals stay refused


def rank_bad_argument(rank, world, root, what):
    bad = {"metrics": {"metrics": {"loss": "diverged" if rank == 1 else 1.0}},
           "compression": {"compression": "banana" if rank == 1 else None}}[what]
    try:
        dckpt.save(state(rank), os.path.join(root, "ck"), **bad)
        raised = None
    except dckpt.errors.DckptError as e:
        raised = type(e).__name__
    dckpt.save(state(rank), os.path.join(root, "ok"))  # no rank was left behind
    return raised


@pytest.mark.parametrize("what", ["metrics", "compression"])
def test_bad_argument_on_one_rank_fails_every_rank_before_writing(tmp_path, what):
    res = run_with_ranks(2, rank_bad_argument, str(tmp_path), what)
    assert res == ["DistributedError", "InvalidArgumentError"]
    assert sorted(os.listdir(tmp_path)) == ["ok"]


@pytest.mark.parametrize("bad", ["lz4", "banana", True, False, 23, -1, 1.5, "ZSTD"])
def test_unknown_compression_is_refused_before_anything_is_written(tmp_path, bad):
    with pytest.raises(dckpt.errors.InvalidArgumentError, match="zstd.*level 1-22") as e:
        dckpt.save(state(), tmp_path / "ck", compression=bad)
    assert repr(bad) in str(e.value)
    assert os.listdir(tmp_path) == []
    with pytest.raises(dckpt.errors.InvalidArgumentError):
        CheckpointManager(tmp_path / "root", compression=bad)


@pytest.mark.parametrize("ok", [None, "none", "raw", "zstd", 0, 1, 3, 22])
def test_known_compression_values_save(tmp_path, ok):
    dckpt.save(state(1), tmp_path / "ck", compression=ok)
    assert torch.equal(dckpt.load(tmp_path / "ck")["model"]["weight"], torch.ones(2, 2))


# ---- a directory the process cannot write: StorageError, like the manager ------------------
READ_ONLY_SAVE = """
    import os, subprocess, sys, torch, dckpt
    ro = sys.argv[1]
    if os.geteuid() == 0:  # root writes through mode bits: mount the directory read-only
        subprocess.run(["mount", "--bind", ro, ro], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", ro], check=True)
    else:
        os.chmod(ro, 0o555)
    for target in (os.path.join(ro, "ck"), os.path.join(ro, "sub", "ck")):
        try:
            dckpt.save({"w": torch.zeros(3)}, target)
            print("SAVED", target)
        except dckpt.errors.StorageError as e:
            print("STORAGE", e.path, "|", e)
    try:
        dckpt.CheckpointManager(os.path.join(ro, "root"))
    except dckpt.errors.StorageError as e:
        print("MANAGER STORAGE", e)
"""


def test_save_to_a_read_only_directory_raises_storage_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
            pytest.skip("root without a private mount namespace: no real read-only directory")
        # A private mount namespace: the read-only mount is seen by the child alone.
        cmd = ["unshare", "-m", "--propagation", "private", sys.executable, "-c",
               textwrap.dedent(READ_ONLY_SAVE), str(ro)]
    else:
        cmd = [sys.executable, "-c", textwrap.dedent(READ_ONLY_SAVE), str(ro)]
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and all("STORAGE" in x for x in lines), r.stdout + r.stderr
    assert "Read-only file system" in lines[0] or "Permission denied" in lines[0]
    assert str(ro) in lines[0] and all("save where this process may write" in x for x in lines)
    os.chmod(ro, 0o755)
    assert os.listdir(ro) == []


def test_save_under_a_regular_file_raises_storage_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(dckpt.errors.StorageError, match="Not a directory"):
        dckpt.save(state(), tmp_path / "file" / "ck")


def test_async_save_refuses_a_lower_step_and_a_bad_metric(tmp_path):
    with CheckpointManager(tmp_path, keep_last=2, async_save=True) as mgr:
        mgr.save(10, state(10)).wait()
        with pytest.raises(dckpt.errors.InvalidArgumentError):
            mgr.save(11, state(11), metrics={"loss": "x"})  # at the call, not later
        handle = mgr.save(5, state(5))
        with pytest.raises(dckpt.errors.AsyncSaveError) as e:
            handle.wait()
        assert isinstance(e.value.__cause__, StepOrderError)
    assert CheckpointManager(tmp_path).steps() == [10]
    assert (tmp_path / "latest").read_text().strip() == "step-000000010"


def test_restore_falls_back_past_a_damaged_manifest(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, big_state(1))
    mgr.save(2, big_state(2))
    man = mgr.path(2) / "manifest.json"
    man.write_bytes(man.read_bytes()[:100])
    live = big_state(99)
    report = mgr.restore(live)
    assert report.step == 1 and "ManifestError" in report.notes[0]
    assert_bitwise(live, big_state(1))

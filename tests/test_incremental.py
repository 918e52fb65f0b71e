"""Incremental checkpoints: unchanged chunks are shared by hard link, never written again.

The fine-tuning run below freezes a base model under small trainable adapters with AdamW,
the case incremental checkpoints exist for. Crashes are real SIGKILLs of a forked process
at every file-system mutation of a gc or a save (counted by an audit hook).
"""
import contextlib
import io as stdio
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import dckpt
from dckpt import CheckpointManager
from dckpt.storage import local as io
from dckpt.cli import main
from dckpt.errors import CorruptCheckpointError
from dckpt.format.reader import read_manifest, read_tensor_bytes
from dckpt.engine.incremental import Base, VersionCache, _same_tensor, consolidate, fingerprint
from helpers.attacks import killed_at
from helpers.ranks import run_with_ranks

CHUNK = 64 << 10


class LoraModel(torch.nn.Module):
    """A frozen base (~1.5 MB) and a low-rank trainable adapter."""

    def __init__(self):
        super().__init__()
        self.base = torch.nn.Sequential(torch.nn.Linear(256, 768), torch.nn.ReLU(),
                                        torch.nn.Linear(768, 256))
        self.base.requires_grad_(False)
        self.lora_a = torch.nn.Parameter(torch.randn(256, 4) * 0.1)
        self.lora_b = torch.nn.Parameter(torch.randn(4, 256) * 0.1)

    def forward(self, x):
        return self.base(x) + x @ self.lora_a @ self.lora_b


def fresh(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = LoraModel()
    opt = torch.optim.AdamW([model.lora_a, model.lora_b], lr=1e-2)
    return {"model": model, "optim": opt}


def train(state: dict, steps: int = 1) -> None:
    for _ in range(steps):
        x = torch.randn(16, state["model"].lora_a.shape[0])
        state["model"](x).pow(2).mean().backward()
        state["optim"].step()
        state["optim"].zero_grad()


def trainable_bytes(state: dict) -> int:
    """What a checkpoint after a training step must write: adapters and optimizer state."""
    n = sum(p.numel() * p.element_size() for p in state["model"].parameters() if p.requires_grad)
    for per_param in state["optim"].state.values():
        n += sum(t.numel() * t.element_size() for t in per_param.values())
    return n


def as_bytes(obj):
    """A comparable form of a state dict in which tensors compare bit for bit."""
    if isinstance(obj, torch.Tensor):
        return (str(obj.dtype), tuple(obj.shape),
                obj.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    if isinstance(obj, dict):
        return {k: as_bytes(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [as_bytes(v) for v in obj]
    return obj


def snapshot(state: dict) -> dict:
    return {k: as_bytes(v.state_dict()) for k, v in state.items()}


def restored(mgr: CheckpointManager, step: int) -> dict:
    live = fresh(seed=123)  # different values everywhere
    mgr.restore(live, step, restore_rng=False)
    return snapshot(live)


def deep_verify(path: Path) -> int:
    """Every chunk of every tensor decodes to its raw hash; returns the chunks checked."""
    m = dckpt.read_manifest(path)
    paths, n = [str(f.path(path)) for f in m.files], 0
    for name, t in m.tensors.items():
        chunks = [c for s in t.shards for c in s.chunks]
        assert io.verify_chunks(paths, chunks, [t.itemsize] * len(chunks), deep=True) == [], name
        n += len(chunks)
    return n


def own_file_size(path: Path) -> int:
    return (path / "rank-00000.dckpt").stat().st_size if (path / "rank-00000.dckpt").exists() else 0


def test_frozen_base_finetune_writes_only_the_trainable_part(tmp_path):
    state = fresh()
    mgr = CheckpointManager(tmp_path, keep_last=2, chunk_size=CHUNK)
    assert mgr.incremental
    snaps, sizes = {}, {}
    for step in range(1, 6):
        train(state)
        result = mgr.save(step, state)
        snaps[step] = snapshot(state)
        meta = result.manifest.meta.get("incremental")
        sizes[step] = own_file_size(mgr.path(step))
        if step == 1:
            assert meta is None and sizes[1] == result.bytes  # the first save is full
            continue
        # Only the adapters and AdamW's moments and step counters were written ...
        assert sizes[step] == trainable_bytes(state) == meta["new_bytes"]
        assert meta["referenced_bytes"] == result.bytes - sizes[step]
        assert meta["base"] == f"step-{step - 1:09d}" and meta["depth"] == step - 1
        # ... and the base model is the very file step 1 wrote, linked, not copied.
        links = [p for p in mgr.path(step).iterdir() if p.name.startswith("ref-")]
        mgr.wait()  # the retired step's directory is removed in the background
        assert [p.name for p in links] == ["ref-r0-step-000000001-rank-00000.dckpt"]
        assert links[0].stat().st_nlink == 2  # kept: step 1 and 2, then two links
        assert mgr.steps() == list(range(max(1, step - 1), step + 1))
        for kept in mgr.steps():
            assert restored(mgr, kept) == snaps[kept]
    assert sizes[5] * 30 < sizes[1]
    # Retention deleted steps 1-3, whose file holds the base: 4 and 5 still load and verify.
    assert not mgr.path(1).exists() and deep_verify(mgr.path(4)) > 20
    assert restored(mgr, 4) == snaps[4] and restored(mgr, 5) == snaps[5]
    # The open-format oracle reads a shared chunk through the link.
    m = read_manifest(mgr.path(5))
    w = read_tensor_bytes(mgr.path(5), m, "model/base.0.weight")
    assert w.tobytes() == state["model"].base[0].weight.numpy().tobytes()


def test_unchanged_state_writes_no_data_file(tmp_path):
    state = fresh()
    train(state)
    dckpt.save(state, tmp_path / "a", chunk_size=CHUNK)
    r = dckpt.save(state, tmp_path / "b", chunk_size=CHUNK, base=tmp_path / "a")
    assert r.manifest.meta["incremental"]["new_bytes"] == 0
    assert not (tmp_path / "b" / "rank-00000.dckpt").exists()
    assert [f.name for f in r.manifest.files] == ["ref-r0-a-rank-00000.dckpt"]
    assert as_bytes(dckpt.load(tmp_path / "b")["model"]) == snapshot(state)["model"]


def test_large_changes_go_into_one_file_per_writer(tmp_path):
    """With enough to write (io.part_count: 16 MiB per file of what the save expects to
    write, the base's own new bytes), an incremental save writes one file per writer thread,
    as a full save does (one file's writers take turns on its inode lock); files that end up
    without a chunk are removed, the rest numbered first."""
    g = torch.Generator().manual_seed(4)
    state = {f"w{i}": torch.randn(1 << 20, generator=g) for i in range(10)}  # 40 MiB
    dckpt.save(state, tmp_path / "a", threads=2)
    with torch.no_grad():
        for t in state.values():
            t.add_(1.0)
    r = dckpt.save(state, tmp_path / "b", threads=2, base=tmp_path / "a")
    own = sorted(f.name for f in r.manifest.files)
    assert own == ["rank-00000-1.dckpt", "rank-00000.dckpt"], own
    assert {c.file for t in r.manifest.tensors.values() for c in t.shards[0].chunks} == {0, 1}
    back = dckpt.load(tmp_path / "b")
    assert all(torch.equal(back[k], v) for k, v in state.items())
    # A few tensors change (8 MiB) at each step: once the base's own save wrote that little
    # too, one file of new data, the links after it.
    for step in "cd":
        with torch.no_grad():
            state["w3"].add_(1.0)
            state["w7"].add_(1.0)
        r = dckpt.save(state, tmp_path / step, threads=2, base=tmp_path / chr(ord(step) - 1))
        assert r.manifest.meta["incremental"]["new_bytes"] == 8 << 20
    names = [f.name for f in r.manifest.files]
    assert names[0] == "rank-00000.dckpt" and all(n.startswith("ref-") for n in names[1:]), names
    assert not (tmp_path / "d" / "rank-00000-1.dckpt").exists()
    back = dckpt.load(tmp_path / "d")
    assert all(torch.equal(back[k], v) for k, v in state.items())
    assert main(["verify", str(tmp_path / "d")]) == 0


def test_only_comparable_chunks_are_shared(tmp_path):
    """Same name, dtype, block and chunk length, else written again; changed chunks too."""
    big = torch.randn(40_000)  # 160 KB: 3 chunks of 64 KiB
    state = {"w": big, "dtype": torch.zeros(1000), "shape": torch.zeros(10, 10),
             "grows": torch.ones(30_000)}
    dckpt.save(state, tmp_path / "a", chunk_size=CHUNK)
    big2 = big.clone()
    big2[20_000] += 1  # the middle chunk changes
    new = {"w": big2, "dtype": torch.zeros(1000, dtype=torch.int32),
           "shape": torch.zeros(100), "grows": torch.ones(50_000)}
    r = dckpt.save(new, tmp_path / "b", chunk_size=CHUNK, base=tmp_path / "a")
    own = {c: [ch.file == 0 for ch in r.manifest.tensors[c].shards[0].chunks] for c in new}
    assert own == {"w": [False, True, False], "dtype": [True], "shape": [True],
                   "grows": [True] * 4}
    back = dckpt.load(tmp_path / "b")
    assert all(torch.equal(back[k], v) for k, v in new.items())
    # Another chunk size lines up only tensors of one chunk.
    r = dckpt.save(new, tmp_path / "c", chunk_size=CHUNK * 2, base=tmp_path / "b")
    own = {c: {ch.file for ch in r.manifest.tensors[c].shards[0].chunks} for c in new}
    assert own == {"w": {0}, "dtype": {1}, "shape": {1}, "grows": {0}}


def test_damaged_base_file_is_not_shared_further(tmp_path):
    """Chunks of a base file whose size no longer matches its manifest are written again;
    sharing stops at the first such chunk, since chunks are compared by position."""
    x, y, z = (torch.full((CHUNK // 4,), float(v)) for v in (1, 2, 3))
    dckpt.save({"w": torch.cat([x, y, z])}, tmp_path / "a", chunk_size=CHUNK)
    r = dckpt.save({"w": torch.cat([x, y + 1, z])}, tmp_path / "b", chunk_size=CHUNK,
                   base=tmp_path / "a")
    assert [c.file for c in r.manifest.tensors["w"].shards[0].chunks] == [1, 0, 1]
    with open(tmp_path / "a" / "rank-00000.dckpt", "ab") as f:  # b's link: the same inode
        f.write(b"junk")
    # Chunk 0 of the new data equals the base's chunk 1, which lies in b's own file.
    new = torch.cat([y + 1, y + 1, z])
    r = dckpt.save({"w": new}, tmp_path / "c", chunk_size=CHUNK, base=tmp_path / "b")
    meta = r.manifest.meta["incremental"]
    assert "size differs" in meta["fallback"] and meta["referenced_chunks"] == 0
    assert torch.equal(dckpt.load(tmp_path / "c")["w"], new)


def test_full_every_and_full_on_demand(tmp_path):
    state = fresh()
    mgr = CheckpointManager(tmp_path, full_every=3, chunk_size=CHUNK)
    depths = []
    for step in range(1, 8):
        train(state)
        r = mgr.save(step, state, full=(step == 6))
        depths.append(r.manifest.meta.get("incremental", {}).get("depth", 0))
    assert depths == [0, 1, 2, 0, 1, 0, 1]
    full = mgr.path(6)
    assert sorted(p.name for p in full.iterdir()) == ["manifest.json", "rank-00000.dckpt"]
    off = CheckpointManager(tmp_path / "off", incremental=False, chunk_size=CHUNK)
    off.save(1, state)
    assert "incremental" not in off.save(2, state).manifest.meta


def test_consolidate_exports_a_standalone_copy(tmp_path):
    state = fresh()
    mgr = CheckpointManager(tmp_path / "run", chunk_size=CHUNK, compression="zstd")
    for step in (1, 2, 3):
        train(state)
        mgr.save(step, state)
    src = mgr.path(3)
    m = consolidate(src, tmp_path / "export")
    out = tmp_path / "export"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "rank-00000.dckpt"]
    assert "incremental" not in m.meta and m.meta["consolidated_from"] == "step-000000003"
    # Only live chunks were copied: stale adapter copies in the linked files are not.
    assert (out / "rank-00000.dckpt").stat().st_size == m.stored_bytes
    linked = sum(f.stat().st_size for f in src.iterdir() if f.suffix == ".dckpt")
    assert m.stored_bytes < linked
    expected = snapshot(state)
    shutil.rmtree(tmp_path / "run")  # the export needs nothing of the run
    assert deep_verify(out) > 0
    live = fresh(seed=5)
    train(live)
    dckpt.load(out, into=live)
    assert snapshot(live) == expected
    # A damaged stored chunk is refused, naming the tensor, and leaves no export behind.
    m = dckpt.read_manifest(out)
    c = m.tensors["model/base.0.weight"].shards[0].chunks[1]
    with open(out / "rank-00000.dckpt", "r+b") as f:
        f.seek(c.offset + 7)
        b = f.read(1)
        f.seek(c.offset + 7)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(CorruptCheckpointError, match="model/base.0.weight"):
        consolidate(out, tmp_path / "export2")
    assert not (tmp_path / "export2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export2")]


def test_cli_verify_inspect_convert_an_incremental_checkpoint(tmp_path, run):
    def cli(*argv):
        out = stdio.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(stdio.StringIO()):
            code = main([str(a) for a in argv])
        return code, out.getvalue()

    root, snaps, _ = run
    step = root / "step-000000004"
    assert cli("verify", root, "--deep", "--no-progress")[0] == 0
    code, out = cli("inspect", step, "--json")
    meta = json.loads(out)["meta"]["incremental"]
    assert code == 0 and meta["base"] == "step-000000003" and meta["referenced_bytes"] > 0
    assert "shared by hard link with step-000000003" in cli("inspect", step)[1]
    code, out = cli("convert", step, tmp_path / "alone", "--json")
    assert code == 0 and json.loads(out)["standalone"]
    assert sorted(p.name for p in (tmp_path / "alone").iterdir()) == ["manifest.json",
                                                                      "rank-00000.dckpt"]
    assert cli("verify", tmp_path / "alone", "--deep", "--no-progress")[0] == 0
    back = dckpt.load(tmp_path / "alone")
    assert {k: as_bytes(v) for k, v in back.items()} == snaps[4]
    assert cli("convert", step, tmp_path / "alone")[0] == 2  # exists


def test_links_across_file_systems_fall_back_to_writing(tmp_path):
    other = Path("/dev/shm")
    if not other.is_dir() or other.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another file system than the test directory")
    state = fresh()
    train(state)
    base = other / f"dckpt-incr-{os.getpid()}"
    try:
        dckpt.save(state, base, chunk_size=CHUNK)
        r = dckpt.save(state, tmp_path / "b", chunk_size=CHUNK, base=base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    meta = r.manifest.meta["incremental"]
    assert "cannot link" in meta["fallback"] and meta["referenced_chunks"] == 0
    assert as_bytes(dckpt.load(tmp_path / "b")["model"]) == snapshot(state)["model"]


# ---- the version cache: skip hashing, never a wrong reference ---------------------------

def test_trusted_versions_skip_hashing_frozen_tensors(tmp_path):
    state = fresh()
    mgr = CheckpointManager(tmp_path, trust_versions=True, chunk_size=CHUNK)
    frozen = sum(p.numel() * 4 for p in state["model"].base.parameters())
    for step in (1, 2, 3):  # the first incremental save after a full one hashes all
        train(state)
        r = mgr.save(step, state)
    assert r.manifest.meta["incremental"]["unhashed_bytes"] == frozen
    # An in-place write (bumps the version) is hashed again and written.
    with torch.no_grad():
        state["model"].base[0].bias.add_(1.0)
    r = mgr.save(4, state)  # no training since step 3: everything else is trusted
    meta = r.manifest.meta["incremental"]
    assert meta["unhashed_bytes"] == r.bytes - 768 * 4 and meta["new_bytes"] == 768 * 4
    # A replaced tensor (new storage) is never trusted.
    state["model"].base[2].weight = torch.nn.Parameter(torch.randn(256, 768),
                                                       requires_grad=False)
    r = mgr.save(5, state)
    meta = r.manifest.meta["incremental"]
    assert meta["unhashed_bytes"] == r.bytes - 256 * 768 * 4 == meta["referenced_bytes"]
    assert restored(mgr, 5) == snapshot(state)


def test_version_cache_checks_the_base_it_is_used_with(tmp_path):
    """A base rewritten by someone else under the same name is not trusted."""
    state = fresh()
    mgr = CheckpointManager(tmp_path, trust_versions=True, chunk_size=CHUNK)
    train(state)
    mgr.save(1, state)
    mgr.save(2, state)  # records what step 2 holds
    other = fresh(seed=99)
    CheckpointManager(tmp_path, incremental=False, chunk_size=CHUNK).save(2, other,
                                                                          overwrite=True)
    r = mgr.save(3, state)
    assert r.manifest.meta["incremental"]["unhashed_bytes"] == 0
    assert restored(mgr, 3) == snapshot(state)


def test_version_cache_rejects_a_freed_and_reused_tensor():
    cache = VersionCache()
    t = torch.ones(1000)
    fp = fingerprint(t)
    assert fingerprint(t.detach())[1:] == fp[1:]
    del t
    u = torch.zeros(1000)  # may reuse the freed memory, version 0 again
    assert not cache.lookup("x", fingerprint(u), None)
    assert not _same_tensor(fp, fingerprint(u))
    assert fingerprint(np.ones(3)) is None
    with torch.inference_mode():
        assert fingerprint(torch.ones(3)) is None


# ---- crashes: SIGKILL at every mutation of a gc or a save -------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict]:
    """Four incremental checkpoints, all kept, and what each holds."""
    root = tmp_path_factory.mktemp("run") / "root"
    state = fresh()
    mgr = CheckpointManager(root, chunk_size=CHUNK, fsync=False)
    snaps = {}
    for step in range(1, 5):
        train(state)
        mgr.save(step, state)
        snaps[step] = snapshot(state)
    train(state)
    return root, snaps, state


def copy_run(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)  # keeps hard links
    return dst


def check_intact(root: Path, snaps: dict, must_have: list[int]) -> None:
    mgr = CheckpointManager(root)  # also removes debris
    assert set(must_have) <= set(mgr.steps())
    for step in mgr.steps():
        deep_verify(mgr.path(step))
        back = dckpt.load(mgr.path(step))
        assert {k: as_bytes(v) for k, v in back.items()} == snaps[step], step


def test_sigkill_during_gc_loses_nothing(tmp_path, run):
    src, snaps, _ = run
    k, kills = 0, 0
    while True:
        k += 1
        root = copy_run(src, tmp_path / f"run{k}")
        if not killed_at(k, lambda: CheckpointManager(root, keep_last=1, fsync=False).gc()):
            break
        kills += 1
        # Whatever instant it died at, every checkpoint still committed is whole, and the
        # newest (the one retention keeps) is among them.
        check_intact(root, snaps, must_have=[4])
        CheckpointManager(root, keep_last=1).gc()
        assert CheckpointManager(root).steps() == [4]
        check_intact(root, snaps, must_have=[4])
    assert kills >= 10  # gc removed three linked step directories: many crash points


def test_sigkill_during_incremental_save_loses_nothing(tmp_path, run):
    src, snaps, state = run
    snaps = {**snaps, 5: snapshot(state)}
    k, kills = 0, 0
    while True:
        k += 1
        root = copy_run(src, tmp_path / f"run{k}")
        mgr = lambda: CheckpointManager(root, keep_last=2, chunk_size=CHUNK, fsync=False)
        if not killed_at(k, lambda: mgr().save(5, state)):
            break
        kills += 1
        check_intact(root, snaps, must_have=[4])
        assert not [p for p in root.iterdir() if ".tmp-" in p.name]  # debris was removed
    assert kills >= 5
    assert CheckpointManager(root).steps() == [4, 5]


def test_gc_reports_only_bytes_it_frees(tmp_path, run):
    root = copy_run(run[0], tmp_path / "root")
    plan = CheckpointManager(root, keep_last=1).gc(dry_run=True)
    own = (root / "step-000000001" / "rank-00000.dckpt").stat().st_size
    # Step 1's data file holds the base model that step 4 still uses: not freed.
    assert plan["removed_steps"] == [1, 2, 3] and plan["freed_bytes"] < own / 10
    assert Base(root / "step-000000004").depth == 3


# ---- distributed: each rank deduplicates the shards it writes ---------------------------

class ShardedLora(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.base = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(),
                                        torch.nn.Linear(512, 64))
        self.base.requires_grad_(False)
        self.lora_a = torch.nn.Parameter(torch.randn(64, 4) * 0.1)
        self.lora_b = torch.nn.Parameter(torch.randn(4, 64) * 0.1)

    def forward(self, x):
        return self.base(x) + x @ self.lora_a @ self.lora_b


def fsdp_lora(seed: int) -> dict:
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(seed)  # the same on every rank: FSDP2 shards identical copies
    model = ShardedLora()
    fully_shard(model.base)
    fully_shard(model)
    return {"model": model, "optim": torch.optim.AdamW([model.lora_a, model.lora_b])}


def local_bytes(state: dict) -> dict:
    out = {f"model/{k}": v for k, v in state["model"].state_dict().items()}
    for i, st in state["optim"].state_dict()["state"].items():
        out.update({f"optim/{i}/{k}": v for k, v in st.items()})
    return {k: as_bytes(v.to_local() if hasattr(v, "to_local") else v) for k, v in out.items()}


def rank_lora_run(rank, world, root):
    state = fsdp_lora(0)
    mgr = CheckpointManager(root, keep_last=2, chunk_size=8192)
    torch.manual_seed(100 + rank)  # each rank its own data
    own, links = [], []
    for step in (1, 2, 3):
        train(state)
        mgr.save(step, state)
        d = mgr.path(step)
        own.append((d / f"rank-{rank:05d}.dckpt").stat().st_size)
        links.append(sorted(p.name for p in d.iterdir() if p.name.startswith(f"ref-r{rank}-")))
    saved = local_bytes(state)
    dckpt.save(state, root + "-full", fsync=False)
    fresh = fsdp_lora(7)
    train(fresh)  # moments exist, with other values
    mgr.restore(fresh)
    return {"own": own, "links": links, "restored": local_bytes(fresh) == saved}


def test_each_rank_deduplicates_its_own_shards(tmp_path):
    res = run_with_ranks(2, rank_lora_run, str(tmp_path / "run"), timeout=120)
    root = tmp_path / "run"
    assert CheckpointManager(root).steps() == [2, 3]  # step 1, which wrote the base, is gone
    m = dckpt.read_manifest(root / "step-000000003")
    meta = m.meta["incremental"]
    frozen = sum(t.nbytes for n, t in m.tensors.items() if n.startswith("model/base."))
    assert meta["referenced_bytes"] == frozen and meta["new_bytes"] == m.stored_bytes - frozen
    for r, out in enumerate(res):
        assert out["restored"], r
        # Rank r's own file holds only its trainable part; the base shards it wrote at
        # step 1 are reached through its own link to its own step-1 file.
        trainable = sum(c.stored for n, t in m.tensors.items() if not n.startswith("model/base.")
                        for s in t.shards if s.rank == r for c in s.chunks)
        assert out["own"][1] == out["own"][2] == trainable < out["own"][0] / 10
        assert out["links"][2] == [f"ref-r{r}-step-000000001-rank-{r:05d}.dckpt"]
    # A load on one process (resharding 2 -> 1) gives what the full save holds.
    inc, full = dckpt.load(root / "step-000000003"), dckpt.load(tmp_path / "run-full")
    assert {k: as_bytes(v) for k, v in inc.items()} == {k: as_bytes(v) for k, v in full.items()}


def test_bases_with_the_same_directory_name_chain(tmp_path):
    """Trainer's layout keeps each checkpoint in checkpoint-N/dckpt: every base directory is
    called `dckpt`, and a chain of incremental saves must still name its links apart."""
    frozen = torch.randn(4 * CHUNK // 4)
    prev = None
    for step in range(1, 5):
        state = {"frozen": frozen, "moving": torch.full((CHUNK // 4,), float(step))}
        path = tmp_path / f"checkpoint-{step}" / "dckpt"
        dckpt.save(state, path, chunk_size=CHUNK, base=prev)
        out = dckpt.load(path)
        assert torch.equal(out["frozen"], frozen) and torch.equal(out["moving"], state["moving"])
        prev = path

